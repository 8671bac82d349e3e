"""Cluster launch helpers that need no TensorFlow: TF_CONFIG for multi-node training from a PBS node file.

On Aurora/Polaris `deploy/*/train.pbs` starts one training process per node (each sees all of
its node's tiles or GPUs as local devices; MultiWorkerMirroredStrategy all-reduces across
nodes). Each process needs TF_CONFIG naming every node and its own index:

    TF_CONFIG=$(python -m exaconnect.services.cluster tf-config --nodefile "$PBS_NODEFILE" --port 29500)
    python -m exaconnect.services.cluster with-tf-config -- exaconnect train run --config ...

The node list comes from --nodes (or $EXACONNECT_NODES, comma-separated: the PBS script sets it,
because the node file itself is not visible inside the container) or from --nodefile
($PBS_NODEFILE). The rank comes from the launcher's environment (PALS_RANKID on
Aurora/Polaris, PMI_RANK, OMPI_COMM_WORLD_RANK or SLURM_PROCID elsewhere), or --rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from exaconnect.errors import InputError

RANK_VARIABLES = ("PALS_RANKID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")


def nodes_from_nodefile(path: str | os.PathLike) -> list[str]:
    """Unique host names in the order PBS lists them (PBS repeats a host once per slot)."""
    try:
        lines = Path(path).read_text().split()
    except OSError as exc:
        raise InputError(f"PBS node file {str(path)!r}: cannot read it ({exc.strerror})") from None
    hosts: list[str] = []
    for line in lines:
        if line not in hosts:
            hosts.append(line)
    if not hosts:
        raise InputError(f"PBS node file {str(path)!r} lists no hosts")
    return hosts


def rank_from_environment(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    raise InputError(f"no rank in the environment (looked for {', '.join(RANK_VARIABLES)}); pass --rank")


def tf_config(hosts: Sequence[str], index: int, port: int = 29500) -> dict:
    """TF_CONFIG for MultiWorkerMirroredStrategy: worker `index` of `hosts` (task 0 is the chief)."""
    if not 0 <= index < len(hosts):
        raise InputError(f"rank {index}: the node file lists {len(hosts)} node(s) (one training process per node)")
    if not 0 < port < 65536:
        raise InputError(f"--port {port}: expected 1..65535")
    return {"cluster": {"worker": [f"{host}:{port}" for host in hosts]},
            "task": {"type": "worker", "index": index}}


def _hosts(args: argparse.Namespace) -> list[str]:
    if args.nodes:
        hosts = [h for h in args.nodes.split(",") if h]
        if hosts:
            return hosts
    if not args.nodefile:
        raise InputError("no nodes: pass --nodes, set EXACONNECT_NODES, or --nodefile / PBS_NODEFILE")
    return nodes_from_nodefile(args.nodefile)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exaconnect.services.cluster")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, text in (("tf-config", "print TF_CONFIG (JSON) for this rank"),
                       ("with-tf-config", "run COMMAND with TF_CONFIG set for this rank")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--nodes", default=os.environ.get("EXACONNECT_NODES"), help="host1,host2,... (default: $EXACONNECT_NODES)")
        p.add_argument("--nodefile", default=os.environ.get("PBS_NODEFILE"), help="default: $PBS_NODEFILE")
        p.add_argument("--port", type=int, default=int(os.environ.get("TF_CONFIG_PORT", "29500")))
        p.add_argument("--rank", type=int, default=None, help="default: from PALS_RANKID / PMI_RANK / ...")
        if name == "with-tf-config":
            p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command to run")
    args = parser.parse_args(argv)
    try:
        hosts = _hosts(args)
        rank = rank_from_environment() if args.rank is None else args.rank
        config = json.dumps(tf_config(hosts, rank, args.port), separators=(",", ":"))
        if args.verb == "tf-config":
            print(config)
            return 0
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            raise InputError("with-tf-config: no command given (… with-tf-config -- exaconnect train run …)")
    except InputError as exc:
        print(f"exaconnect cluster: error: {exc}", file=sys.stderr)
        return 2
    os.environ["TF_CONFIG"] = config
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
