"""The stage registry: a stage declared once (a typed dataclass in its module) appears in the
CLI, the pipeline file's validation, `run --status`, and the service lists the deployments are
made from. The lab's module (tests/plugin_lab/lab_synapses.py) lives outside exaconnect's
folders and is registered the way a lab would, through EXACONNECT_PLUGINS; nothing else is
edited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from exaconnect.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
LAB = Path(__file__).resolve().parents[1] / "plugin_lab"


def _exaconnect(*args: str, cwd: Path | None = None, plugins: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if plugins:
        env["EXACONNECT_PLUGINS"] = "lab_synapses"
        env["PYTHONPATH"] = os.pathsep.join([str(LAB), env.get("PYTHONPATH", "")])
    else:
        env.pop("EXACONNECT_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "exaconnect.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def labels_layer(tmp_path_factory):
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, write_box

    root = tmp_path_factory.mktemp("registry")
    labels = np.zeros((13, 17, 21), np.uint32)  # z, y, x: an odd size, off the origin and the chunk grid
    labels[2:9, 3:10, 4:15] = 7
    labels[10:12, 1:5, 1:3] = 9
    vol = create_layer(str(root / "labels"), LayerSpec("segmentation", "uint32", (21, 17, 13), (4.0, 4.0, 40.0),
                                                       voxel_offset=(5, 3, 11), chunk_size=(8, 8, 8)),
                       Provenance("test"))
    write_box(vol, Box((5, 3, 11), (26, 20, 24)), labels)
    return root, {"7": int((labels == 7).sum()), "9": int((labels == 9).sum())}


def test_a_labs_stage_appears_in_the_cli_and_runs(labels_layer, tmp_path):
    root, counts = labels_layer
    help_text = _exaconnect("--help").stdout
    assert "synapse" in help_text and "count voxels per object" in help_text
    assert "synapse" not in _exaconnect("--help", plugins=False).stdout
    out = tmp_path / "counts.json"
    done = _exaconnect("synapse", "run", str(root / "labels"), str(out), "--min-voxels", "9")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text()) == {k: v for k, v in counts.items() if v >= 9}
    assert json.loads(done.stdout.strip().splitlines()[-1])["synapse.count"]["status"] == "done"
    # enqueue: its --stage choices come from the declaration, its queue from its service
    queued = _exaconnect("synapse", "enqueue", str(root / "labels"), str(out), "--stage", "count",
                         "--queue", str(tmp_path / "q"))
    assert queued.returncode == 0, queued.stderr[-2000:]
    assert (tmp_path / "q" / "synapse").is_dir()
    wrong = _exaconnect("synapse", "enqueue", str(root / "labels"), str(out), "--stage", "nope", "--queue", "q")
    assert wrong.returncode == 2 and "count" in wrong.stderr


def test_a_labs_section_is_validated_planned_and_listed_by_status(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output: {tmp_path / 'out'}\nqueue_root: {tmp_path / 'q'}\n"
                        "source: {synthetic_shape: [32, 32, 32]}\nmisalign: {enabled: false}\n"
                        "synapses: {enabled: true, min_voxels: 5}\n")
    printed = _exaconnect("run", str(pipeline), "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert "synapses:" in printed.stdout and "min_voxels: 5" in printed.stdout
    bad = _exaconnect("run", str(pipeline), "--print-config", "--set", "synapses.min_voxel=3")
    assert bad.returncode == 2 and "synapses.min_voxel: unknown key" in bad.stderr
    typed = _exaconnect("run", str(pipeline), "--print-config", "--set", "synapses.min_voxels=many")
    assert typed.returncode == 2 and "synapses.min_voxels" in typed.stderr and "integer" in typed.stderr
    status = _exaconnect("run", str(pipeline), "--status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["synapse.count"] == "pending"
    # Without the lab's module the key is unknown, and the message lists what the file takes.
    without = _exaconnect("run", str(pipeline), "--print-config", plugins=False)
    assert without.returncode == 2 and "synapses: unknown key" in without.stderr


def test_the_service_lists_come_from_the_registry():
    plain = _exaconnect("services", plugins=False)
    assert plain.returncode == 0
    ours = plain.stdout.split()
    assert ours[:4] == ["montage", "ingest", "downsample", "align"] and "synapse" not in ours
    with_lab = _exaconnect("services").stdout.split()
    assert with_lab == ours + ["synapse"]
    stages = json.loads(_exaconnect("services", "--format", "json").stdout)
    assert stages["synapse"] == ["synapse.count"] and "mesh.forge" in stages["mesh"]


def test_a_broken_plugin_module_is_named():
    env = dict(os.environ, EXACONNECT_PLUGINS="no_such_lab_module")
    done = subprocess.run([sys.executable, "-m", "exaconnect.cli", "services"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and "no_such_lab_module" in done.stderr and "Traceback" not in done.stderr


def test_a_stage_field_is_part_of_its_fingerprint():
    from exaconnect.services.mesh import MeshForge, mesh_stages
    from exaconnect.services.stages import fingerprint

    a = MeshForge(layer="file:///x", simplification_error=40.0)
    b = MeshForge(layer="file:///x", simplification_error=20.0)
    assert fingerprint(a) != fingerprint(b)
    merge_a, merge_b = mesh_stages(a)[1], mesh_stages(b)[1]
    # the merge's own parameters are equal; what differs upstream reaches it through requires()
    assert merge_a.parameters() == merge_b.parameters()
    assert merge_a.requires() == (a,)
    with pytest.raises(InputError, match="stage name"):
        MeshForge(layer="file:///x", name="mesh forge")


def test_the_chart_and_the_pbs_jobs_take_a_labs_service_from_the_registry(tmp_path):
    """The chart renders a worker Deployment for the lab's service from `exaconnect services
    --format helm-values`; the PBS pipeline job's ranks drain it (deploy/lib.sh `exa_services`,
    run by bash with the local apptainer shim)."""
    import yaml

    values = _exaconnect("services", "--format", "helm-values")
    assert values.returncode == 0, values.stderr
    assert yaml.safe_load(values.stdout)["services"]["synapse"] == {}
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    with helm.Chart.load(str(ROOT / "helm" / "exaconnect")) as chart:
        rendered = chart.render(yaml.safe_load(values.stdout), name="exa", namespace="lab")
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Deployment"}
    assert "exa-exaconnect-synapse" in deployments and "exa-exaconnect-mesh" in deployments
    worker = deployments["exa-exaconnect-synapse"]["spec"]["template"]["spec"]["containers"][0]
    assert any("synapse" in part for part in worker.get("args", []) + worker.get("command", []))

    sif = tmp_path / "exaconnect.sif"
    sif.write_text("image")
    env = dict(os.environ, EXACONNECT_PLUGINS="lab_synapses", SIF=str(sif), EXA_BINDS="",
               PATH=os.pathsep.join([str(ROOT / "deploy" / "fake" / "local"), str(Path(sys.executable).parent),
                                     os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join([str(LAB), os.environ.get("PYTHONPATH", "")]))
    env.pop("SERVICES", None)
    script = f'source "{ROOT}/deploy/lib.sh"; exa_services; echo "$SERVICES"'
    listed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[-1] == "synapse" and "segment" in listed.stdout.split()


def test_segment_run_then_run_resumes_the_same_work(tmp_path):
    """The stage records of a queue root live in one place (ROOT/records), whichever command ran
    the stages: a pipeline whose segmentation is the same work finds `segment run`'s stages done."""
    from conftest import make_tiny_ffn

    from exaconnect.cli import main
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, write_box
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    image, _ = synthetic_volume(SyntheticSpec(shape=(24, 40, 32), neurites=6, seed=5))
    vol = create_layer(str(tmp_path / "image"), LayerSpec("image", "uint8", (32, 40, 24), (8.0, 8.0, 8.0),
                                                          voxel_offset=(3, 5, 7), chunk_size=(8, 8, 8)),
                       Provenance("test"))
    write_box(vol, Box((3, 5, 7), (35, 45, 31)), image)
    model = make_tiny_ffn(tmp_path / "tiny_ffn")
    queue, output = tmp_path / "queues", tmp_path / "out"
    assert main(["segment", "run", str(tmp_path / "image"), str(output / "segmentation"), "--model", model,
                 "--subvolume", "16,16,16", "--overlap", "4,4,4", "--num-mips", "1", "--queue", str(queue),
                 "--workers", "1"]) == 0
    assert (queue / "records" / "stages" / "segment.initial.json").exists()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output: {output}\nqueue_root: {queue}\nworkers: 1\n"
                        f"source: {{image: 'precomputed://{tmp_path / 'image'}'}}\n"
                        f"segment: {{model: {model}, subvolume: [16, 16, 16], overlap: [4, 4, 4]}}\n"
                        "pyramid: {num_mips: 1}\nmesh: {enabled: false}\nskeletons: {enabled: false}\n")
    from exaconnect.pipeline import run_pipeline
    from exaconnect.pipeline_config import load_pipeline

    summary = run_pipeline(load_pipeline(pipeline), progress=False)
    stages = summary["stages"]
    for name in ("segment.initial", "segment.faces", "segment.equivalence", "segment.relabel", "pyramid.segmentation"):
        assert stages[name]["status"] == "skipped", (name, stages)
    assert stages["pyramid.image"]["status"] == "done"  # only the pipeline's own stage ran


def test_a_stage_field_declared_layer_url_holds_the_layers_one_name(tmp_path, monkeypatch):
    """However a stage is made (a relative path, `precomputed://`, a URL), its layer fields hold
    the one name its tasks and records carry; the fingerprint is the same for every spelling."""
    from dataclasses import dataclass

    from exaconnect.precomputed.layers import LayerUrl, layer_url
    from exaconnect.services import stages as registry
    from exaconnect.services.stages import Stage, fingerprint

    monkeypatch.setattr(registry, "STAGE_TYPES", dict(registry.STAGE_TYPES))  # the probe stays out of the registry

    @dataclass(frozen=True)
    class Probe(Stage):
        service: ClassVar[str] = "probe"
        stage_name: ClassVar[str] = "probe.layers"
        layer: LayerUrl
        other: LayerUrl | None = None
        label: str = "kept/as given"

    monkeypatch.chdir(tmp_path)
    spellings = [Probe(layer="sub/layer"), Probe(layer=f"precomputed://{tmp_path}/sub/layer"),
                 Probe(layer=f"file://{tmp_path}/sub/layer/")]
    for stage in spellings:
        assert stage.layer == f"file://{tmp_path}/sub/layer" and isinstance(stage.layer, LayerUrl)
        assert stage.other is None and stage.label == "kept/as given"
    assert len({fingerprint(stage, []) for stage in spellings}) == 1
    assert layer_url(spellings[0].layer) is spellings[0].layer
    with pytest.raises(InputError, match="unsupported URL scheme ftp://"):
        Probe(layer="ftp://host/layer")
