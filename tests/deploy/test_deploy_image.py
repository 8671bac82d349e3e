"""Issue 23, items 1 and 8: what the images install, executed rather than grepped.

Item 1: the XPU base image (intel/oneapi-runtime:2024.1.0-devel-ubuntu22.04) already configures
Intel's GPU repository with its own keyring; deploy/install.sh must not add a second entry with
another Signed-By (apt then refuses every command, exit 100). The base image's apt sources are
reproduced from its published Dockerfile (intel/oneapi-containers, images/docker/runtime) in a
folder, install.sh's apt step runs against that folder, and the real `apt-get` parses the result.

Item 8: `make setup` installs the cpu lock first, so CI tests what the image ships; the lock and
pyproject.toml must agree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
INTEL_GPU = "https://repositories.intel.com/gpu/ubuntu"

# /etc/apt/sources.list.d of intel/oneapi-runtime:2024.1.0-devel-ubuntu22.04, as its Dockerfile writes them
ONEAPI_RUNTIME_2024_1_SOURCES = {
    "oneAPI.list": "deb [signed-by=/usr/share/keyrings/intel-oneapi-archive-keyring.gpg] "
                   "https://apt.repos.intel.com/oneapi all main \n",
    "intel-graphics.list": "deb [signed-by=/usr/share/keyrings/intel-graphics-archive-keyring.gpg arch=amd64] "
                           f"{INTEL_GPU} jammy/lts/2350 unified\n",
}


def _apt_tree(root: Path, sources: dict[str, str]) -> dict[str, str]:
    etc = root / "etc" / "apt"
    for sub in ("sources.list.d", "apt.conf.d", "preferences.d", "trusted.gpg.d"):
        (etc / sub).mkdir(parents=True, exist_ok=True)
    (etc / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu/ jammy main restricted\n")
    for name, text in sources.items():
        (etc / "sources.list.d" / name).write_text(text)
    (root / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "state" / "status").write_text("")
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "keyrings").mkdir(exist_ok=True)
    return {"APT_ETC": str(etc), "KEYRINGS": str(root / "keyrings")}


def _apt_parses(root: Path) -> subprocess.CompletedProcess:
    """The real apt reads the sources (no network): exit 100 on conflicting Signed-By values."""
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("apt-get not installed here (a Debian/Ubuntu machine runs this check)")
    options = [f"-oDir={root}", f"-oDir::Etc={root / 'etc' / 'apt'}", f"-oDir::State={root / 'state'}",
               f"-oDir::State::status={root / 'state' / 'status'}", f"-oDir::Cache={root / 'cache'}"]
    return subprocess.run([apt, *options, "indextargets"], capture_output=True, text=True)


def _shims(folder: Path, log: Path) -> str:
    """curl and gpg that record their use; gpg writes a key file where -o says."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curl").write_text(f'#!/bin/sh\necho "curl $*" >> "{log}"\necho KEY\n')
    (folder / "gpg").write_text(f'#!/bin/sh\necho "gpg $*" >> "{log}"\nwhile [ $# -gt 0 ]; do '
                                'if [ "$1" = -o ]; then cat > "$2"; fi; shift; done\n')
    for name in ("curl", "gpg"):
        (folder / name).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_the_reproduced_base_sources_conflict_as_reported(tmp_path):
    """The check itself: the old install.sh's extra entry makes apt fail as on the real build."""
    _apt_tree(tmp_path, {**ONEAPI_RUNTIME_2024_1_SOURCES, "intel-gpu-jammy.list":
                         f"deb [arch=amd64 signed-by=/usr/share/keyrings/intel-graphics.gpg] {INTEL_GPU} jammy/lts/2350 unified\n"})
    out = _apt_parses(tmp_path)
    assert out.returncode == 100 and "Conflicting values set for option Signed-By" in out.stderr, out.stderr


def test_install_keeps_the_base_images_intel_source(tmp_path):
    env = _apt_tree(tmp_path, ONEAPI_RUNTIME_2024_1_SOURCES)
    log = tmp_path / "calls.log"
    env["PATH"] = _shims(tmp_path / "bin", log)
    out = subprocess.run(["sh", str(INSTALL), "apt-sources"], env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "configured already" in out.stderr
    assert not log.exists(), "no second keyring is fetched"
    lists = sorted(p.name for p in (tmp_path / "etc" / "apt" / "sources.list.d").iterdir())
    assert lists == sorted(ONEAPI_RUNTIME_2024_1_SOURCES)
    parsed = _apt_parses(tmp_path)
    assert parsed.returncode == 0, parsed.stderr


def test_install_adds_the_intel_source_on_a_plain_ubuntu(tmp_path):
    env = _apt_tree(tmp_path, {})
    log = tmp_path / "calls.log"
    env["PATH"] = _shims(tmp_path / "bin", log)
    out = subprocess.run(["sh", str(INSTALL), "apt-sources"], env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    added = (tmp_path / "etc" / "apt" / "sources.list.d" / "intel-gpu-jammy.list").read_text()
    assert f"signed-by={tmp_path / 'keyrings' / 'intel-graphics.gpg'}" in added and "jammy/lts/2350 unified" in added
    assert (tmp_path / "keyrings" / "intel-graphics.gpg").read_text().strip() == "KEY"
    parsed = _apt_parses(tmp_path)
    assert parsed.returncode == 0, parsed.stderr


def test_xpu_image_does_not_claim_to_have_no_compilers():
    """The oneAPI base ships build-essential, cmake, git and openssh-server: install.sh removes
    them (unless that would take GPU runtime packages along), and the Dockerfile says so."""
    text = (ROOT / "Dockerfile").read_text()
    assert "no compiler in any stage" not in text
    script = INSTALL.read_text()
    extras = re.search(r'^XPU_BASE_EXTRAS="([^"]+)"', script, re.M)
    assert extras and set(extras.group(1).split()) == {"build-essential", "cmake", "git", "openssh-server"}
    system_xpu = script.split("  system-xpu)", 1)[1].split(";;", 1)[0]
    assert "remove_base_extras" in system_xpu and "apt_sources" in system_xpu
    assert "--only-binary=:all:" in script


# ---------------------------------------------------------------- item 8: CI installs the lock

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1).lower())] = m.group(2)
    return pins


def _satisfies(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


@pytest.mark.parametrize("flavour,extra", [("cpu", "cpu"), ("nvidia", "gpu"), ("xpu", "xpu")])
def test_lock_agrees_with_pyproject(flavour, extra):
    """Every requirement of pyproject (base and the flavour's extra) that applies on Linux x86_64
    is pinned in the lock at a version the requirement allows."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(ROOT / "deploy" / "lock" / f"{flavour}.txt")
    python = "3.10" if flavour == "xpu" else "3.11"
    environment = {"platform_machine": "x86_64", "sys_platform": "linux", "python_version": python,
                   "platform_system": "Linux", "extra": extra}
    problems = []
    for text in project["dependencies"] + project["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name.lower())
        if name not in pins:
            problems.append(f"{requirement} is not pinned")
        elif requirement.specifier and not _satisfies(pins[name], str(requirement.specifier)):
            problems.append(f"{requirement} but the lock pins {name}=={pins[name]}")
    assert not problems, f"deploy/lock/{flavour}.txt and pyproject.toml disagree (run deploy/lock/compile.sh " \
                         f"{flavour}): {problems}"


def test_make_setup_installs_the_cpu_lock_first():
    """`make setup` (and so `make test` and CI) installs deploy/lock/cpu.txt before the project."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    out = subprocess.run([make, "-n", "-B", "setup", "VENV=/nonexistent-venv"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "pip install" in line]
    lock = next((i for i, line in enumerate(lines) if "-r deploy/lock/cpu.txt" in line), None)
    project = next((i for i, line in enumerate(lines) if "-e " in line and "[" in line), None)
    assert lock is not None and project is not None and lock < project, out.stdout
    assert "-c deploy/lock/cpu.txt" in lines[project], "the project's own install must not move the pins"
