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
    if args.forget:
        from exaconnect.pipeline import build_plan
        from exaconnect.services.runner import forget_stages

        plan = build_plan(config)
        names = [s.name for s in plan.stages]
        chosen = [n for n in names if any(n == f or n.startswith(f + ".") for f in args.forget)]
        # Everything below a forgotten stage is redone too (its fingerprint changes only if its
        # inputs' parameters do, so forget it explicitly).
        below = set(chosen)
        for stage in plan.stages:
            if set(stage.requires) & below:
                below.add(stage.name)
        forget_stages(f"{plan.output}/pipeline", sorted(below))
    summary = run_pipeline(config, progress=True, stall_seconds=args.stall_seconds)
    print_summary(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from exaconnect.pipeline import default_pipeline_file

    args.pipeline = str(default_pipeline_file())
    if args.source:
        args.set = list(args.set) + [f"source.image={args.source}"]
        args.set += [f"source.groundtruth={args.groundtruth}"] if args.groundtruth else []
        args.set += ["misalign.enabled=false"]
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


def _run_arguments(p: argparse.ArgumentParser) -> None:
    add_set_argument(p, "segment.subvolume=[64,64,64]")
    p.add_argument("--queue-root", default=None, help="override queue_root (a shared folder for many nodes)")
    p.add_argument("--workers", type=int, default=None, help="override workers (0: remote workers drain the queues)")
    p.add_argument("--output", default=None, help="override output (where layers and records go)")
    p.add_argument("--status", action="store_true", help="print which stages are complete and exit")
    p.add_argument("--forget", action="append", default=[], metavar="STAGE",
                   help="redo this stage (or every stage under a prefix, e.g. segment) and what depends on it")
    p.add_argument("--print-config", action="store_true", help="print the complete validated pipeline and exit")
    p.add_argument("--stall-seconds", type=float, default=None,
                   help="with remote workers: fail when a stage's queue has not moved for this long")


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
