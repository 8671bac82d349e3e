"""`exaconnect run PIPELINE.yaml`, `exaconnect demo` and `exaconnect sample`."""

from __future__ import annotations

import argparse
import json

from exaconnect.cli.common import add_set_argument, parse_sets, triple


def _load(args: argparse.Namespace):
    from exaconnect.pipeline_config import load_pipeline

    sets = parse_sets(args.set)
    top = sets.setdefault("pipeline", {})
    if args.queue_root is not None:
        top["queue_root"] = args.queue_root
    if args.workers is not None:
        top["workers"] = args.workers
    if args.output is not None:
        top["output"] = args.output
    return load_pipeline(args.pipeline, sets)


def cmd_run(args: argparse.Namespace) -> int:
    from exaconnect.pipeline import print_summary, read_plan_status, run_pipeline
    from exaconnect.pipeline_config import to_mapping

    config = _load(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_mapping(config), sort_keys=False), end="")
        return 0
    if args.status:
        print(json.dumps(read_plan_status(config), indent=1))
        return 0
    if args.no_verify_checksums:
        from exaconnect.precomputed.checksums import set_checksum_verification

        set_checksum_verification(False)
    from exaconnect.pipeline import build_plan
    from exaconnect.precomputed.layers import local_path
    from exaconnect.services.run_lock import RunLock
    from exaconnect.services.runner import RunStopped

    plan = build_plan(config)
    forget = _forgotten(plan, args.forget)
    output = local_path(plan.output)
    # One run at a time on one output (the runner also locks the stage records beside the queues).
    with RunLock(f"{output}/pipeline") if output is not None else _no_lock():
        if forget:
            from exaconnect.pipeline import run_records
            from exaconnect.services.runner import forget_stages

            forget_stages(run_records(config, plan), forget)
        try:
            summary = run_pipeline(config, progress=True, stall_seconds=args.stall_seconds, ledger_dir=args.ledger_dir,
                                   task_timeout_seconds=args.task_timeout, grace_seconds=args.grace_seconds)
        except RunStopped as exc:
            import sys

            print(f"exaconnect run: {exc}", file=sys.stderr, flush=True)
            return 128 + int(exc.signum)
    print_summary(summary)
    return 0


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


def _forgotten(plan, forget: list[str]) -> list[str]:
    """The stages `--forget` names (a stage, or a prefix such as `segment`) and every stage
    below them (their fingerprints change only if their inputs' parameters do)."""
    from exaconnect.errors import InputError

    names = [s.name for s in plan.stages]
    chosen = []
    for wanted in forget:
        matched = [n for n in names if n == wanted or n.startswith(wanted + ".")]
        if not matched:
            prefixes = sorted({n.split(".")[0] for n in names})
            raise InputError(f"--forget {wanted}: no such stage in this pipeline; its stages are {', '.join(names)} "
                             f"(or a prefix: {', '.join(prefixes)})")
        chosen += matched
    below = set(chosen)
    for stage in plan.stages:
        if {r.name for r in stage.requires()} & below:
            below.add(stage.name)
    return sorted(below)


def cmd_demo(args: argparse.Namespace) -> int:
    from exaconnect.pipeline import default_pipeline_file

    args.pipeline = str(default_pipeline_file())
    if args.source:
        args.set = list(args.set) + [f"source.image={args.source}"]
        args.set += [f"source.groundtruth={args.groundtruth}"] if args.groundtruth else []
        args.set += ["misalign.enabled=false", "montage.enabled=false"]  # a volume of whole sections
    if args.model:
        args.set += [f"segment.model={args.model}"]
    return cmd_run(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    spec = SyntheticSpec(shape=tuple(reversed(triple(args.shape, "--shape"))), seed=args.seed)  # type: ignore[arg-type]
    image, labels = synthetic_volume(spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", image)
    np.save(out / "labels.npy", labels)
    print(f"wrote {out / 'image.npy'} and {out / 'labels.npy'} ({image.shape[2]}x{image.shape[1]}x{image.shape[0]} voxels, {labels.max()} objects)")
    return 0


def _positive_seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number of seconds")
    return value


def _run_arguments(p: argparse.ArgumentParser) -> None:
    add_set_argument(p, "segment.subvolume=[64,64,64]")
    p.add_argument("--queue", "--queue-root", dest="queue_root", default=None, metavar="ROOT",
                   help="override queue_root: tasks go to ROOT/SERVICE, as with every stage verb's --queue "
                        "(a shared folder for many nodes; --queue-root is the older spelling)")
    p.add_argument("--workers", type=int, default=None, help="override workers (0: remote workers drain the queues)")
    p.add_argument("--output", default=None, help="override output (where layers and records go)")
    p.add_argument("--status", action="store_true", help="print which stages are complete and exit")
    p.add_argument("--forget", action="append", default=[], metavar="STAGE",
                   help="redo this stage (or every stage under a prefix, e.g. segment) and what depends on it")
    p.add_argument("--print-config", action="store_true", help="print the complete validated pipeline and exit")
    p.add_argument("--ledger-dir", default=None,
                   help="the workers' failure ledgers outside the queues (LEDGER_DIR/SERVICE; PBS LEDGER_DIR, "
                        "the chart's queue.ledgerDir)")
    p.add_argument("--stall-seconds", type=float, default=None,
                   help="with remote workers: fail when a stage's queue has not moved for this long")
    p.add_argument("--task-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="end a task of a locally drained stage that runs longer than this (counted as a failed "
                        "attempt, 'timed out after N s'); default: no limit")
    p.add_argument("--grace-seconds", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="after SIGTERM or Ctrl-C, how long running tasks may take to finish before they are "
                        "released back to the queue (default 30)")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="do not check the chunks stages read against the checksums recorded when they were written")


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run (or resume) a whole pipeline described in a YAML file")
    p.add_argument("pipeline", help="pipeline YAML (every option explained in configs/pipeline.yaml)")
    _run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("demo", help="the demo pipeline (configs/demo.yaml) on the built-in sample, or --source")
    p.add_argument("--source", default=None, help="a real volume instead of the sample (folder of sections, .h5:ds, .npy)")
    p.add_argument("--groundtruth", default=None, help="labels for --source (e.g. groundtruth.h5:stack)")
    p.add_argument("--model", default=None, help="an FFN checkpoint instead of training the demo model")
    _run_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("sample", help="write the built-in synthetic EM-like sample (image.npy, labels.npy)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="96,96,96", help="X,Y,Z")
    p.set_defaults(func=cmd_sample)
