"""A PBS job's environment on this machine, for running the deploy folder's job scripts as PBS
would (the node file, the job id, the work dir) with deploy/fake's launchers (mpiexec,
apptainer, module) in front of PATH; they log what they were asked to run as JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_BIN = ROOT / "deploy" / "fake"


def pbs_job_env(tmp_path: Path, nodes: int = 1, slots_per_node: int = 1, path_before: tuple[str, ...] = (),
                **env: str) -> dict:
    """The environment of a job on `nodes` nodes; the node file lists each host once per slot, as
    PBS does (the scripts must de-duplicate it). `env` is set last and may override anything."""
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"x4102c{n}s0b0n0\n" * slots_per_node for n in range(nodes)))
    sif = tmp_path / "exaconnect.sif"
    sif.write_text("")
    path = os.pathsep.join([*path_before, str(FAKE_BIN), os.environ["PATH"]])
    full = dict(os.environ, PATH=path, FAKE_LOG=str(log), PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(ROOT),
                PBS_JOBID="123.fake", SIF=str(sif))
    full.pop("WALLTIME", None)
    full.update(env)
    return full


def fake_log(tmp_path: Path, name: str) -> list[dict]:
    """What the fake launchers logged under `name` (apptainer.jsonl, commands.jsonl)."""
    path = tmp_path / "log" / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
