"""`exaconnect downsample run|enqueue LAYER`: an image pyramid (igneous's DownsampleTask)."""

from __future__ import annotations

import argparse

from exaconnect.cli.common import (POSITIONAL_HELP, add_allow_missing_argument, add_enqueue_arguments, add_queue_arguments, enqueue_one_stage,
                                   parse_bbox, run_service_stages, triple)


def _stages(args: argparse.Namespace) -> list:
    from exaconnect.services.downsample import downsample_stage

    return [downsample_stage(args.layer, "downsample.pyramid", num_mips=args.num_mips, mip=args.mip,
                             bbox=parse_bbox(args.bbox), factor=triple(args.factor, "--factor"),
                             allow_missing=args.allow_missing)]


def register(subparsers) -> None:
    p = subparsers.add_parser("downsample", help="image pyramid: mean for images, mode for labels")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb in ("run", "enqueue"):
        v = verbs.add_parser(verb, help="build the pyramid" if verb == "run" else "only enqueue its tasks")
        v.add_argument("layer", help=POSITIONAL_HELP["layer"])
        v.add_argument("--num-mips", type=int, default=2)
        v.add_argument("--mip", type=int, default=0, help="mip to start from")
        v.add_argument("--factor", default="2,2,2", help="X,Y,Z per mip (2,2,1 for thick serial sections)")
        v.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels")
        add_allow_missing_argument(v)
        if verb == "run":
            add_queue_arguments(v)
            v.set_defaults(func=lambda a: (run_service_stages(_stages(a), a), 0)[1])
        else:
            add_enqueue_arguments(v, ["pyramid"])
            v.set_defaults(func=lambda a: enqueue_one_stage(_stages(a), a, "downsample"))
