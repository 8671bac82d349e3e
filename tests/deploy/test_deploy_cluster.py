"""Issue 23, a cluster in a box for PBS: deploy/aurora/pipeline.pbs executed by bash under a
simulated 2-node PBS job. mpiexec (deploy/fake/mpiexec) starts every rank here with the local
rank, tile mask and CPU list the scripts computed (the CPU list applied with sched_setaffinity
where this machine has those CPUs); `module` is a shell function; `apptainer exec` runs the
command directly (deploy/fake/local/apptainer). The runner (`--workers 0`) and the ranks' worker
loops are the real programs; the result must be voxel-identical to a local run of the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HOSTS = ("x4102c0s0b0n0", "x4102c1s0b0n0")

# A small pipeline off the chunk grid (40^3 in 32^3 chunks): ingest (image and labels) and a pyramid.
PIPELINE = """name: box
output: {output}
queue_root: {queues}
workers: 2
source: {{image: synthetic, synthetic_shape: [40, 40, 40], synthetic_seed: 1}}
ingest: {{chunk_size: [32, 32, 32]}}
segment: {{enabled: false}}
pyramid: {{num_mips: 1}}
mesh: {{enabled: false}}
skeletons: {{enabled: false}}
link: {{short: false}}
"""


def _layer(path: Path, mip: int = 0) -> np.ndarray:
    from cloudvolume import CloudVolume

    return np.asarray(CloudVolume(f"file://{path}", mip=mip, progress=False)[:, :, :])


@pytest.mark.slow
def test_pipeline_job_on_two_simulated_nodes_matches_a_local_run(tmp_path):
    exaconnect = Path(sys.executable).parent / "exaconnect"
    local = tmp_path / "local.yaml"
    local.write_text(PIPELINE.format(output=tmp_path / "local", queues=tmp_path / "local-queues"))
    out = subprocess.run([str(exaconnect), "run", str(local)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    log = tmp_path / "log"
    log.mkdir()
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{h}\n{h}\n" for h in HOSTS))
    sif = tmp_path / "exaconnect-xpu.sif"
    sif.write_text("")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(PIPELINE.format(output=tmp_path / "ignored", queues="ignored"))
    modules = tmp_path / "modules.log"
    # `module` is a shell function in a PBS job's shell (Lmod), exported to the job script
    script = (f'module() {{ echo "module $*" >> {modules}; }}\nexport -f module\n'
              f'exec bash {DEPLOY / "aurora" / "pipeline.pbs"}\n')
    env = dict(os.environ, PATH=f"{DEPLOY / 'fake' / 'local'}:{DEPLOY / 'fake'}:{exaconnect.parent}:{os.environ['PATH']}",
               FAKE_LOG=str(log), PBS_NODEFILE=str(nodefile), PBS_JOBID="4242.aurora-pbs", PBS_O_WORKDIR=str(ROOT),
               WALLTIME="00:30:00", SIF=str(sif), PIPELINE=str(cluster), QUEUE_ROOT=f"fq://{tmp_path / 'queues'}",
               OUTPUT=str(tmp_path / "cluster"), WORKERS_PER_NODE="2", CPU_BIND_LIST="0:1", DEVICE="cpu",
               SERVICES="ingest downsample", POLL_SECONDS="0.5", STALL_SECONDS="120", BINDS=str(tmp_path),
               MODULE_USE="/soft/modulefiles", MODULES="apptainer", EXA_STOP_FILE=str(tmp_path / "runner.done"))
    started = time.monotonic()
    job = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert job.returncode == 0, job.stderr[-4000:]
    assert modules.read_text().splitlines() == ["module use /soft/modulefiles", "module load apptainer"]

    runs = [json.loads(line) for line in (log / "apptainer.jsonl").read_text().splitlines()]
    runner = [r for r in runs if r["argv"][r["argv"].index(str(sif)) + 1:][:2] == ["exaconnect", "run"]]
    workers = [r for r in runs if r not in runner]
    assert len(runner) == 1
    table = {}
    for r in workers:
        env_ = r["env"]
        key = (env_["FAKE_HOST"], int(env_["PALS_LOCAL_RANKID"]))
        queue = r["argv"][r["argv"].index("work") + 1]
        row = table.setdefault(key, {"mask": env_["ZE_AFFINITY_MASK"], "cpus": env_["EXACONNECT_CPUS"],
                                     "affinity": r["affinity"], "pids": set(), "queues": set()})
        row["pids"].add(r["pid"])
        row["queues"].add(queue.rsplit("/", 1)[1])
    assert sorted(table) == [(h, local) for h in HOSTS for local in (0, 1)], "2 nodes x 2 ranks"
    print(f"\npipeline.pbs on 2 simulated nodes: {seconds:.1f} s\nhost           local  tile  CPUs  affinity  worker PIDs  queues")
    for (host, local), row in sorted(table.items()):
        assert row["cpus"] == ("0", "1")[local] and row["mask"] == f"0.{local}"
        if set(range(2)) <= os.sched_getaffinity(0):
            assert row["affinity"] == [local], "the rank runs on its CPU list"
        print(f"{host}  {local:>5}  {row['mask']:>4}  {row['cpus']:>4}  {row['affinity']!s:>8}  "
              f"{len(row['pids']):>11}  {sorted(row['queues'])}")

    # stage records live beside the queues (QUEUE_ROOT/records), whichever command ran the stages
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "queues" / "records" / "stages").glob("*.json")
               if not p.name.endswith(".enqueued.json")}
    assert set(records) == {"ingest.image", "ingest.groundtruth", "pyramid.image"}, records
    for name in ("image", "groundtruth"):
        assert np.array_equal(_layer(tmp_path / "local" / name), _layer(tmp_path / "cluster" / name)), name
    assert np.array_equal(_layer(tmp_path / "local" / "image", 1), _layer(tmp_path / "cluster" / "image", 1))
    from exaconnect.services.queue import queue_status

    for service in ("ingest", "downsample"):
        status = queue_status(f"fq://{tmp_path / 'queues' / service}")
        assert (status.enqueued, status.leased, status.failed) == (0, 0, 0), status.as_dict()


def _pbs_demo():
    """deploy/box/pbs_demo.py (`make cluster-demo`), imported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pbs_demo", DEPLOY / "box" / "pbs_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The demo pipeline, smaller: 48^3 voxels in 16^3 chunks (8 segmentation subvolumes of 32^3, the
# outer ones partial), the demo FFN trained for 60 steps; no misalignment (the full demo of
# `make cluster-demo` aligns too).
SMALL_DEMO = ["source.synthetic_shape=[48,48,48]", "ingest.chunk_size=[16,16,16]", "segment.subvolume=[32,32,32]",
              "segment.overlap=[8,8,8]", "segment.demo_model_steps=60", "mesh.shape=[32,32,32]",
              "skeletons.shape=[32,32,32]", "misalign.enabled=false", "align.enabled=false", "link.short=false",
              "montage.enabled=false"]


@pytest.mark.slow
def test_demo_through_pipeline_pbs_matches_a_local_run(tmp_path):
    """`make cluster-demo`, smaller: the demo pipeline through deploy/aurora/pipeline.pbs on 2
    simulated hosts x 2 ranks, voxel-identical to `exaconnect run` with local workers. The walltime
    case (a job stopped mid-segmentation, then resubmitted) is `make cluster-demo`'s: aiming a
    walltime at running tasks depends on the machine's speed, so here it is covered with fixed task
    lengths by tests/deploy/test_deploy_pbs.py `test_walltime_finishes_short_tasks_and_releases_long_ones`."""
    figures_path = tmp_path / "figures.json"
    code = _pbs_demo().main(["--work", str(tmp_path / "box"), "--json", str(figures_path),
                             *[a for s in SMALL_DEMO for a in ("--set", s)]])
    figures = json.loads(figures_path.read_text())
    assert code == 0 and figures["identical"], [r for r in figures["comparison"] if not r["identical"]]
    layers = {r["layer"] for r in figures["comparison"]}
    assert {"image", "groundtruth", "segmentation"} <= layers, layers
    ranks = figures["ranks"]
    assert sorted((r["host"], r["local"]) for r in ranks) == [(h, local) for h in HOSTS for local in (0, 1)]
    cpus = sorted(os.sched_getaffinity(0))
    for r in ranks:
        assert r["mask"] == f"0.{r['local']}" and r["cpus"] == str(cpus[r["local"] % len(cpus)])
        assert r["affinity"] == [cpus[r["local"] % len(cpus)]], "the rank runs on its CPU list"
    drained = {stage for r in ranks for stage in r["stages"]}
    for stage in ("ingest.image", "train.demo-model", "segment.initial", "segment.relabel", "mesh.forge",
                  "skeleton.forge", "evaluate"):
        assert stage in drained, (stage, drained)
    assert all(r["tasks"] > 0 for r in ranks), "every rank drained tasks"
    for queue, counts in figures["queues"].items():
        assert (counts["enqueued"], counts["leased"], counts["dead_lettered"]) == (0, 0, 0), (queue, counts)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
