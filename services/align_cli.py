"""`exaconnect align ...`: enqueue an alignment stage, run all stages with local workers, or
write the quality report. The lead's cli.py calls `add_cli(subparsers)`; `add_enqueue_arguments`
and `enqueue_tasks` serve `exaconnect enqueue align SRC DEST --stage S --queue Q` as well."""

from __future__ import annotations

import argparse
import json

from exaconnect.errors import InputError


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patch-size", type=int, default=None,
                   help="flow patch size in px (default: SOFIMA's 160, a quarter of smaller sections)")
    p.add_argument("--stride", type=int, default=None, help="flow grid spacing in px (default: a quarter patch)")
    p.add_argument("--mesh-stride", type=int, default=None, help="mesh node spacing in px (default: the flow stride)")
    p.add_argument("--block-size", type=int, default=None, help="sections per mesh task (default 64)")
    p.add_argument("--block-overlap", type=int, default=None, help="sections shared with the previous block (default 4)")
    p.add_argument("--detrend", choices=["none", "mean", "linear"], default=None,
                   help="what is common to the stack is removed: mean (default) or mean and tilt in z")
    p.add_argument("--max-skip", type=int, default=None, help="how far back a bad section's successor may match (default 4)")


def config_from_args(args: argparse.Namespace):
    """Defaults scaled to the source's sections (`config_for_shape`), then the options given."""
    from exaconnect.align.match import AlignConfig, config_for_shape
    from exaconnect.precomputed.layers import layer_bounds, open_layer

    width, height, _ = layer_bounds(open_layer(args.src)).shape
    data = config_for_shape((height, width)).as_dict()
    for key, section, name in (("patch_size", "flow", "patch_size"), ("stride", "flow", "stride"),
                               ("mesh_stride", "mesh", "stride"), ("block_size", "mesh", "block_size"),
                               ("block_overlap", "mesh", "block_overlap"), ("detrend", "mesh", "detrend")):
        value = getattr(args, key, None)
        if value is not None:
            data[section][name] = value
    if getattr(args, "max_skip", None) is not None:
        data["max_skip"] = args.max_skip
    if data["flow"]["stride"] > data["flow"]["patch_size"]:
        raise InputError(f"--stride {data['flow']['stride']} is larger than --patch-size {data['flow']['patch_size']}")
    return AlignConfig.from_dict(data)


def add_enqueue_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `exaconnect enqueue align` (SRC and DEST positional)."""
    from exaconnect.services.align import STAGES

    p.add_argument("src", help="source image layer (misaligned sections)")
    p.add_argument("dest", help="destination image layer (created by the flow stage)")
    # dest is not "stage": `exaconnect enqueue` keeps the stage *name* ("align") there.
    p.add_argument("--stage", dest="align_stage", choices=STAGES, default="flow",
                   help="flow, then mesh, compose, render, each after the previous queue drained")
    p.add_argument("--queue", required=True)
    add_config_arguments(p)


def enqueue_tasks(args: argparse.Namespace) -> list:
    from exaconnect.services.align import stage_tasks

    stage = args.align_stage
    return stage_tasks(stage, args.src, args.dest, config_from_args(args) if stage == "flow" else None)


def cmd_enqueue(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import enqueue

    count = enqueue(args.queue, enqueue_tasks(args), description=f"align {args.align_stage}")
    print(f"enqueued {count} align {args.align_stage} tasks on {args.queue}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from exaconnect.services.align import align_report, align_stack_through_queue

    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected at least 1")
    seconds = align_stack_through_queue(args.src, args.dest, args.queue, args.workers, config_from_args(args))
    summary = align_report(args.src, args.dest, args.png)
    print(json.dumps({"seconds": seconds, **{k: v for k, v in summary.items() if k != "per_section"}}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from exaconnect.services.align import align_report

    summary = align_report(args.src, args.dest, args.png)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_section"}))
    return 0


def add_cli(subparsers) -> None:
    """Register `exaconnect align enqueue|run|report`."""
    p = subparsers.add_parser("align", help="elastic alignment of serial sections (flow, mesh, compose, render)")
    verbs = p.add_subparsers(dest="align_command", required=True)

    e = verbs.add_parser("enqueue", help="enqueue one stage (flow first; each after the previous drained)")
    add_enqueue_arguments(e)
    e.set_defaults(func=cmd_enqueue)

    r = verbs.add_parser("run", help="all stages in order, drained by local workers, then the report")
    r.add_argument("src")
    r.add_argument("dest")
    r.add_argument("--queue", required=True)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--png", default=None, help="report figure (default DEST/align/report.png)")
    add_config_arguments(r)
    r.set_defaults(func=cmd_run)

    q = verbs.add_parser("report", help="quality report of a finished alignment (JSON line + PNG)")
    q.add_argument("src")
    q.add_argument("dest")
    q.add_argument("--png", default=None)
    q.set_defaults(func=cmd_report)
