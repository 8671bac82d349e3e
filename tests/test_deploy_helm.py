"""Issue 23, items 3, 4 and 7: the Helm chart rendered by Helm's own engine, and its pipeline Job
executed as a local process the way the kubelet would run it: the image's entrypoint with the
container's args and env, as its runAsUser, its volumes mapped to temporary folders, and its
working directory not writable (readOnlyRootFilesystem)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "exaconnect"
SQS_ROOT = "https://sqs.us-east-1.amazonaws.com/123456789012/exa"
EXAMPLE_PIPELINE = "name: lab\nsource: {image: /data/sections}\nworkers: 0\n"
IMAGE_ENTRYPOINT = ["exaconnect"]  # the Dockerfile's ENTRYPOINT


def _render(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="exa", namespace="connectomics")
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def _render_error(values: dict) -> str:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as info:
            chart.render(values, name="exa", namespace="connectomics")
    return str(info.value)


def _kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


class Pod:
    """A rendered pod template run here: each volume mount becomes a folder under `root`, and every
    path under a mount in the args, env and mounted ConfigMaps is rewritten to that folder."""

    def __init__(self, spec: dict, docs: list[dict], root: Path):
        (self.container,) = spec["containers"]
        self.spec, self.root = spec, root
        security = dict(spec.get("securityContext", {}), **self.container.get("securityContext", {}))
        self.uid = int(security.get("runAsUser", os.getuid()))
        self.gid = int(security.get("runAsGroup", os.getgid()))
        self.read_only_root = bool(security.get("readOnlyRootFilesystem"))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        configmaps = _kind(docs, "ConfigMap")
        self.mounts: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts", []):
            folder = root / "volumes" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folder.parent.chmod(0o711)
            self.mounts[mount["mountPath"]] = folder
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                    (self.mounts[mount["mountPath"]] / key).write_text(self.map(text))
        for folder in self.mounts.values():  # fsGroup: the pod's user owns its volumes
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, self.uid, self.gid) if os.getuid() == 0 else None
        # the image's filesystem: the working directory exists but is not writable by the pod
        self.workdir = root / "image-root" / self.container.get("workingDir", "/home/exa").lstrip("/")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for parent in self.workdir.relative_to(root).parents:
            (root / parent).chmod(0o755)
        self.workdir.chmod(0o555 if self.read_only_root else 0o777)

    def map(self, text: str) -> str:
        # one pass, longest mount first, whole path components only (/data, not /database)
        paths = sorted((p.rstrip("/") for p in self.mounts), key=len, reverse=True)
        pattern = r"(?:(?<=://)|(?<![\w./-]))(" + "|".join(map(re.escape, paths)) + r")(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda m: str(self.mounts[m.group(1)] if m.group(1) in self.mounts
                                             else self.mounts[m.group(1) + "/"]), text)

    def path(self, container_path: str) -> Path:
        return Path(self.map(container_path))

    def command(self) -> list[str]:
        command = self.container.get("command") or IMAGE_ENTRYPOINT
        argv = [self.map(a) for a in command + self.container.get("args", [])]
        if argv[0] == "exaconnect":
            argv[0] = str(Path(sys.executable).parent / "exaconnect")
        if os.getuid() == 0 and self.uid != 0:
            argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]
        return argv

    def env(self) -> dict:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}
        for item in self.container.get("env", []):
            env[item["name"]] = self.map(item["value"])
        return env

    def start(self, **kwargs) -> subprocess.Popen:
        if os.getuid() == 0 and self.uid != 0 and shutil.which("setpriv") is None:
            pytest.skip("running the pod as its runAsUser needs setpriv (util-linux)")
        return subprocess.Popen(self.command(), env=self.env(), cwd=self.workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture
def pod_root():
    """A folder the pod's user can reach (pytest's own temporary folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="exaconnect-pod-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _sections(folder: Path, count: int = 3) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for z in range(count):
        Image.fromarray(rng.integers(0, 255, (29, 37), dtype=np.uint8)).save(folder / f"s{z:03d}.png")


def test_example_pipeline_config_loads(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(EXAMPLE_PIPELINE)
    out = subprocess.run([str(Path(sys.executable).parent / "exaconnect"), "run", str(config), "--print-config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["source"]["image"] == "/data/sections" and printed["workers"] == 0


@pytest.mark.parametrize("ledger_dir", ["/data/ledger", ""])
def test_pipeline_job_writes_to_the_volume_and_stops_when_stalled(pod_root, ledger_dir):
    """The Job as the kubelet runs it, with no workers at all: its records go to the shared
    volume (not the read-only working directory), and the stalled first stage fails the Job
    after `pipelineJob.stallSeconds` instead of holding it forever. With queue.ledgerDir (the
    default) the Job passes `exaconnect run --ledger-dir` (issue 23, item 2)."""
    docs = _render({"pipelineJob": {"enabled": True, "config": EXAMPLE_PIPELINE, "stallSeconds": 5},
                    "queue": {"ledgerDir": ledger_dir}})
    (job,) = _kind(docs, "Job").values()
    pod = Pod(job["spec"]["template"]["spec"], docs, pod_root)
    assert pod.read_only_root and pod.uid == 10001
    _sections(pod.path("/data/sections"))
    for path in pod.path("/data").rglob("*"):
        os.chown(path, pod.uid, pod.gid) if os.getuid() == 0 else None
    started = time.monotonic()
    process = pod.start()
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    seconds = time.monotonic() - started
    print(f"\npipeline Job ({' '.join(pod.command()[-14:])}) exited {process.returncode} after {seconds:.1f} s\n"
          f"{output[-2000:]}")
    assert not any(pod.workdir.iterdir()), "the Job wrote into its working directory"
    assert (pod.path("/data/pipeline") / "pipeline" / "config.json").is_file(), output
    assert process.returncode != 0 and "have not moved for 5 s" in output, output
    assert pod.path("/data/queues").is_dir()


@pytest.mark.parametrize("output", ["data/pipeline", "pipeline", ""])
def test_pipeline_job_refuses_a_relative_output(output):
    message = _render_error({"pipelineJob": {"enabled": True, "config": EXAMPLE_PIPELINE, "output": output}})
    assert re.search(r"pipelineJob[./]output", message), message


def test_keda_gets_credentials_from_a_trigger_authentication():
    values = {"queue": {"root": SQS_ROOT, "sqsRegion": "us-east-1"}, "autoscaling": {"keda": {"enabled": True}}}
    docs = _render(values)
    (auth,) = _kind(docs, "TriggerAuthentication").values()
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}
    for scaled in _kind(docs, "ScaledObject").values():
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        assert "identityOwner" not in trigger["metadata"]
        assert trigger["metadata"]["queueURL"].startswith(SQS_ROOT + "-")
    docs = _render({**values, "autoscaling": {"keda": {"enabled": True, "identityOwner": "operator"}}})
    (auth,) = _kind(docs, "TriggerAuthentication").values()
    assert auth["spec"]["podIdentity"]["identityOwner"] == "keda"
    docs = _render({**values, "autoscaling": {"keda": {"enabled": True, "authenticationRef": "lab-aws"}}})
    assert not _kind(docs, "TriggerAuthentication")
    for scaled in _kind(docs, "ScaledObject").values():
        assert scaled["spec"]["triggers"][0]["authenticationRef"] == {"name": "lab-aws", "kind": "TriggerAuthentication"}


@pytest.mark.parametrize("root", ["sqs://exa", "http://localhost:9324/queue/exa"])
def test_keda_refuses_a_queue_root_it_cannot_scale_on(root):
    message = _render_error({"queue": {"root": root, "sqsRegion": "us-east-1"}, "autoscaling": {"keda": {"enabled": True}}})
    assert "https://sqs.REGION.amazonaws.com/ACCOUNT" in message and root in message


def test_xpu_workers_join_the_render_group_and_use_whole_cards():
    message = _render_error({"accelerator": "xpu"})
    assert "accelerators.xpu.supplementalGroups" in message and "renderD128" in message
    deployments = _kind(_render({"accelerator": "xpu", "accelerators": {"xpu": {"supplementalGroups": [110]}}}),
                        "Deployment")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        if name.endswith(("-segment", "-train")):
            assert pod["securityContext"]["supplementalGroups"] == [110]
            assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "COMPOSITE"
        else:
            assert "supplementalGroups" not in pod["securityContext"]
            assert "ZE_FLAT_DEVICE_HIERARCHY" not in env
