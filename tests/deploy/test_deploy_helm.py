"""Issue 23, items 3, 4 and 7: the Helm chart rendered by Helm's own engine, and its pipeline Job
executed as a local process the way the kubelet would run it: the image's entrypoint with the
container's args and env, as its runAsUser, its volumes mapped to temporary folders, and its
working directory not writable (readOnlyRootFilesystem)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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
    """A rendered pod template run here: each volume mount becomes a folder under `root` (a
    PersistentVolumeClaim: the folder `shared` names for it, the same for every pod), and every
    path under a mount in the args, env and mounted ConfigMaps is rewritten to that folder. The
    image's files are its entrypoint (this venv's exaconnect) and /usr/local/bin/exaconnect-healthcheck
    (deploy/healthcheck.sh)."""

    def __init__(self, spec: dict, docs: list[dict], root: Path, shared: dict[str, Path] | None = None,
                 extra_env: dict | None = None):
        (self.container,) = spec["containers"]
        self.spec, self.root = spec, root
        self.extra_env = extra_env or {}
        security = dict(spec.get("securityContext", {}), **self.container.get("securityContext", {}))
        self.uid = int(security.get("runAsUser", os.getuid()))
        self.gid = int(security.get("runAsGroup", os.getgid()))
        self.read_only_root = bool(security.get("readOnlyRootFilesystem"))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        configmaps = _kind(docs, "ConfigMap")
        self.mounts: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts", []):
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            folder = (shared or {}).get(claim) or root / "volumes" / mount["name"]
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
        self.bin = root / "image-root" / "usr" / "local" / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, target in (("exaconnect-healthcheck", ROOT / "deploy" / "healthcheck.sh"),
                             ("exaconnect", Path(sys.executable).parent / "exaconnect")):
            if not (self.bin / name).exists():
                (self.bin / name).symlink_to(target)

    def map(self, text: str) -> str:
        # one pass, longest mount first, whole path components only (/data, not /database)
        paths = sorted((p.rstrip("/") for p in self.mounts), key=len, reverse=True)
        pattern = r"(?:(?<=://)|(?<![\w./-]))(" + "|".join(map(re.escape, paths)) + r")(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda m: str(self.mounts[m.group(1)] if m.group(1) in self.mounts
                                             else self.mounts[m.group(1) + "/"]), text)

    def path(self, container_path: str) -> Path:
        return Path(self.map(container_path))

    def as_user(self, argv: list[str]) -> list[str]:
        if os.getuid() == 0 and self.uid != 0:
            return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]
        return argv

    def command(self) -> list[str]:
        command = self.container.get("command") or IMAGE_ENTRYPOINT
        argv = [self.map(a) for a in command + self.container.get("args", [])]
        if argv[0] == "exaconnect":
            argv[0] = str(Path(sys.executable).parent / "exaconnect")
        return self.as_user(argv)

    def env(self) -> dict:
        env = {"PATH": f"{self.bin}:{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}
        for item in self.container.get("env", []):
            env[item["name"]] = self.map(item["value"])
        return {**env, **self.extra_env}

    def start(self, pid_namespace: bool = False, **kwargs) -> subprocess.Popen:
        """The container's process. With `pid_namespace` (root, util-linux unshare) it gets its own
        PID namespace as under a container runtime: the command is PID 1 there, or, with the pod's
        shareProcessNamespace, the child of a pause process that is."""
        if os.getuid() == 0 and self.uid != 0 and shutil.which("setpriv") is None:
            pytest.skip("running the pod as its runAsUser needs setpriv (util-linux)")
        argv = self.command()
        if pid_namespace:
            if os.getuid() != 0 or shutil.which("unshare") is None:
                pytest.skip("a PID namespace for the pod needs root and unshare (util-linux)")
            if self.spec.get("shareProcessNamespace"):
                argv = [sys.executable, "-c", PAUSE, *argv]
            argv = ["unshare", "--pid", "--fork", "--kill-child", *argv]
        return subprocess.Popen(argv, env=self.env(), cwd=self.workdir, stdout=kwargs.pop("stdout", subprocess.PIPE),
                                stderr=subprocess.STDOUT, text=True, **kwargs)


# The pod's pause process (PID 1 of a pod with shareProcessNamespace): runs the container's
# command as its child and exits as it does.
PAUSE = ("import subprocess, sys; code = subprocess.call(sys.argv[1:]); "
         "sys.exit(128 - code if code < 0 else code)")


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


# ---------------------------------------------------------------- Kubernetes in a box

class Kubelet:
    """Runs one pod's container as the kubelet would: restarts it when it exits (restartPolicy
    Always, after RESTART_DELAY instead of the kubelet's 10 s doubling back-off), runs its liveness
    probe's command on the probe's schedule and, after failureThreshold failures in a row, stops the
    container (SIGTERM, SIGKILL after terminationGracePeriodSeconds) and starts it again."""

    RESTART_DELAY = 1.0

    def __init__(self, name: str, pod: Pod, log: Path) -> None:
        self.name, self.pod, self.log = name, pod, log
        self.probe = pod.container.get("livenessProbe")
        self.grace = float(pod.spec.get("terminationGracePeriodSeconds", 30))
        self.process: subprocess.Popen | None = None
        self.started = self.last_probe = 0.0
        self.failures = 0
        self.events: list[tuple[float, str]] = []
        self.exited_at: float | None = None

    def say(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def start(self) -> None:
        self.process = self.pod.start(pid_namespace=True, stdout=open(self.log, "a"))
        self.started = self.last_probe = time.monotonic()
        self.failures, self.exited_at = 0, None
        self.say(f"started (host PID {self.process.pid})")

    def main_pid(self) -> int | None:
        """The container's own process: PID 1 of its namespace, or the pause process's child."""
        pid = self.process.pid
        for _ in range(2 if self.pod.spec.get("shareProcessNamespace") else 1):
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return None
            if not children:
                return None
            pid = int(children[0])
        return pid

    def stop(self, reason: str) -> None:
        self.say(f"stopping: {reason}")
        pid = self.main_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(self.grace)
        except subprocess.TimeoutExpired:
            self.say(f"SIGKILL after {self.grace:g} s")
            self.process.kill()  # unshare --kill-child: the namespace's PID 1, and with it every process in it
            self.process.wait()

    def tick(self) -> None:
        now = time.monotonic()
        if self.process.poll() is not None:
            if self.exited_at is None:
                self.exited_at = now
                self.say(f"exited {self.process.returncode}")
            if now - self.exited_at >= self.RESTART_DELAY:
                self.start()
            return
        if not self.probe or now - self.started < self.probe.get("initialDelaySeconds", 0) or \
                now - self.last_probe < self.probe.get("periodSeconds", 10):
            return
        self.last_probe = now
        command = [self.pod.map(a) for a in self.probe["exec"]["command"]]
        probe = subprocess.run(self.pod.as_user(command), env=self.pod.env(), cwd=self.pod.workdir, capture_output=True,
                               text=True, timeout=self.probe.get("timeoutSeconds", 1) + 5)
        if probe.returncode == 0:
            self.failures = 0
            return
        self.failures += 1
        self.say(f"liveness probe failed: {probe.stderr.strip()}")
        if self.failures >= self.probe.get("failureThreshold", 3):
            self.stop("liveness probe failed")
            self.start()

    def restarts(self) -> int:
        return sum(1 for _, what in self.events if what.startswith("started")) - 1


def _shared_volume(docs: list[dict], folder: Path) -> dict[str, Path]:
    """The chart's PersistentVolumeClaim, as one folder every pod mounts."""
    (claim,) = _kind(docs, "PersistentVolumeClaim")
    return {claim: folder}


def _small_pipeline() -> str:
    """A pipeline through most services, small enough for a test: ingest, pyramid, the demo FFN
    (a few steps), segmentation, meshes, skeletons, evaluation; off the chunk grid (40x36x34)."""
    return ("name: kbox\nsource: {image: synthetic, synthetic_shape: [40, 36, 34], synthetic_seed: 3}\n"
            "ingest: {chunk_size: [16, 16, 16]}\n"
            "segment: {subvolume: [32, 32, 32], overlap: [8, 8, 8], demo_model_steps: 20,"
            " inference: {min_segment_size: 100}}\n"
            "pyramid: {num_mips: 1}\nmesh: {shape: [32, 32, 32]}\nskeletons: {shape: [32, 32, 32]}\n"
            "evaluate: {skeleton_metrics: false}\nlink: {short: false}\nworkers: 0\n")


def _done_tasks(log: Path) -> int:
    return len(re.findall(r"^.*task \S+ \(.*\) done in", log.read_text(errors="replace"), re.M)) if log.exists() else 0


@pytest.mark.slow
def test_rendered_pods_run_the_pipeline_job_with_every_service_draining(pod_root):
    """The pipeline Job and one pod of each worker Deployment, as rendered, run here together on one
    shared volume: the Job's run completes, each service's pod drains its stages' tasks, nothing is
    written into a read-only working directory, and every worker passes its liveness probe."""
    values = {"pipelineJob": {"enabled": True, "config": _small_pipeline(), "stallSeconds": 300},
              "queue": {"leaseSeconds": 12},
              "worker": {"livenessProbe": {"initialDelaySeconds": 60, "periodSeconds": 10}},
              "serviceDefaults": {"replicas": 1},
              "services": {name: {"replicas": 1} for name in yaml.safe_load((CHART / "values.yaml").read_text())["services"]}}
    docs = _render(values)
    shared = _shared_volume(docs, pod_root / "pvc")
    (job,) = _kind(docs, "Job").values()
    runner = Pod(job["spec"]["template"]["spec"], docs, pod_root / "job", shared)
    kubelets = []
    for name, deployment in sorted(_kind(docs, "Deployment").items()):
        service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = Pod(deployment["spec"]["template"]["spec"], docs, pod_root / service, shared)
        assert pod.read_only_root and pod.spec["shareProcessNamespace"] is True
        kubelets.append(Kubelet(service, pod, pod_root / f"{service}.log"))
    for path in [pod_root / "pvc", *(pod_root / "pvc").rglob("*")]:
        os.chown(path, runner.uid, runner.gid) if os.getuid() == 0 else None
    started = time.monotonic()
    for kubelet in kubelets:
        kubelet.start()
    process = runner.start(stdout=open(pod_root / "job.log", "w"))
    try:
        while process.poll() is None and time.monotonic() - started < 600:
            for kubelet in kubelets:
                kubelet.tick()
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
        for kubelet in kubelets:
            kubelet.stop("the test is over")
    seconds = time.monotonic() - started
    output = (pod_root / "job.log").read_text()
    print(f"\npipeline Job exited {process.returncode} after {seconds:.1f} s\n{'pod':<12} {'tasks':>5} restarts")
    for kubelet in kubelets:
        print(f"{kubelet.name:<12} {_done_tasks(kubelet.log):>5} {kubelet.restarts():>8}")
    assert process.returncode == 0, output[-3000:]
    for pod in [runner] + [k.pod for k in kubelets]:
        assert not any(pod.workdir.iterdir()), f"{pod.workdir}: written into the read-only working directory"
    drained = {k.name: _done_tasks(k.log) for k in kubelets}
    for service in ("ingest", "downsample", "train", "segment", "mesh", "skeleton", "evaluate"):
        assert drained[service] > 0, (service, drained)
    assert all(k.restarts() == 0 for k in kubelets), {k.name: k.events for k in kubelets}
    summary = json.loads((pod_root / "pvc" / "pipeline" / "pipeline" / "summary.json").read_text())
    assert summary["scores"]["segments"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("share_process_namespace", [True, False], ids=["pause-is-pid-1", "worker-is-pid-1"])
def test_a_hung_task_is_detected_and_its_pod_restarted(pod_root, share_process_namespace):
    """A task that hangs deaf to signals (a C call holding the GIL, signals blocked) in a worker pod of the rendered
    chart: the worker's task timeout (worker.taskTimeoutSeconds) finds it; its lease keeper kills
    the worker, the container exits and is restarted, and the task is retried, then dead-lettered.
    Where the worker is PID 1 of its container (shareProcessNamespace false) the kernel drops the
    keeper's SIGKILL: the liveness probe sees the task past its timeout and the kubelet restarts it."""
    from deploy_tasks import HungTask

    from exaconnect.services.queue import FailureLedger, open_queue, queue_status

    values = {"queue": {"leaseSeconds": 10, "maxAttempts": 2},
              "worker": {"taskTimeoutSeconds": 5, "terminationGracePeriodSeconds": 2,
                         "shareProcessNamespace": share_process_namespace,
                         "livenessProbe": {"initialDelaySeconds": 20, "periodSeconds": 2, "failureThreshold": 2},
                         "extraArgs": ["--task-module", "deploy_tasks", "--retry-delay-seconds", "1"],
                         # The lab's task module comes with the data, as it would on a cluster:
                         # the pod rewrites paths under its mounts (/tmp among them), so a checkout
                         # under /tmp could not be named here.
                         "env": [{"name": "PYTHONPATH", "value": "/data/lab"},
                                 {"name": "EXACONNECT_TIMEOUT_GRACE", "value": "8"}]}}
    deployment = _kind(_render(values), "Deployment")["exa-exaconnect-mesh"]
    docs = _render(values)
    pod = Pod(deployment["spec"]["template"]["spec"], docs, pod_root / "mesh", _shared_volume(docs, pod_root / "pvc"))
    (pod_root / "pvc" / "lab").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tests" / "deploy_tasks.py", pod_root / "pvc" / "lab" / "deploy_tasks.py")
    queue = f"fq://{pod_root / 'pvc' / 'queues' / 'mesh'}"
    open_queue(queue, create=True).insert([HungTask(str(pod_root / "pvc" / "hung"), 600)])
    for path in [pod_root / "pvc", *(pod_root / "pvc").rglob("*")]:
        os.chown(path, pod.uid, pod.gid) if os.getuid() == 0 else None
    ledger = FailureLedger(str(pod_root / "pvc" / "ledger" / "mesh"))
    kubelet = Kubelet("mesh", pod, pod_root / "mesh.log")
    started = time.monotonic()
    kubelet.start()
    try:
        while not ledger.dead_records() and time.monotonic() - started < 150:
            kubelet.tick()
            time.sleep(0.2)
        buried = time.monotonic() - started
    finally:
        kubelet.stop("the test is over")
    log = kubelet.log.read_text(errors="replace")
    print(f"\nshareProcessNamespace={share_process_namespace}: dead-lettered after {buried:.1f} s")
    for when, what in kubelet.events:
        print(f"  {when - started:6.1f} s  {what}")
    records = ledger.dead_records()
    assert records, f"the hung task was never dead-lettered:\n{log[-3000:]}"
    assert "timed out after 5 s" in json.dumps(records[0]), records[0]
    runs = (pod_root / "pvc" / "hung.runs").read_text().split()
    assert len(runs) == 2, "run once, retried once (maxAttempts 2)"
    assert kubelet.restarts() >= 1
    status = queue_status(queue, str(pod_root / "pvc" / "ledger" / "mesh"))
    assert (status.enqueued, status.failed) == (0, 1), status.as_dict()
    probe_kills = [what for _, what in kubelet.events if what == "stopping: liveness probe failed"]
    if share_process_namespace:
        assert not probe_kills, "the keeper ends the worker itself"
        assert buried < 60
    else:
        assert probe_kills, "as PID 1 only the kubelet can end the worker: the probe must catch it"
