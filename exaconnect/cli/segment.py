"""`exaconnect segment run|enqueue|box IMAGE_LAYER SEGMENTATION_LAYER`: FFN segmentation.

`run` and `enqueue` go through the segment service's stages (FFN passes over overlapping
subvolumes, then faces, equivalence, relabel and the pyramid); `box` segments one box in this
process, the box being the canvas (interactive use, and the reference's crop runs).
"""

from __future__ import annotations

import argparse
import json

from exaconnect.cli.common import (POSITIONAL_HELP, add_enqueue_arguments, add_queue_arguments, add_set_argument,
                                   enqueue_one_stage, parse_bbox, parse_sets, run_service_stages, triple)
from exaconnect.errors import InputError

STAGE_CHOICES = ("pass", "faces", "equivalence", "relabel", "pyramid")  # pyramid: pyramid.segmentation


def _inference_overrides(args: argparse.Namespace) -> dict:
    from dataclasses import fields

    from exaconnect.ffn.config import InferenceOptions

    sets = parse_sets(args.set, allowed=("inference",))
    overrides = sets.get("inference", {})
    known = {f.name for f in fields(InferenceOptions)}
    for key in overrides:
        if key not in known:
            raise InputError(f"--set inference.{key}: unknown inference option; expected one of {', '.join(sorted(known))}")
    return overrides


def _plan(args: argparse.Namespace):
    from exaconnect.precomputed.stitching import MatchOptions
    from exaconnect.services.segment_stages import SegmentPlan
    from exaconnect.services.segment_staging import PassSpec

    overrides = _inference_overrides(args)
    passes = [PassSpec(args.pass_name, args.model, overrides, args.seed_order, args.consensus_with,
                       args.consensus_min_size)]
    if args.refine:
        passes.append(PassSpec("refine", args.refine, overrides, "reverse", args.pass_name, args.consensus_min_size))
    return SegmentPlan(args.image_layer, args.segmentation_layer, tuple(passes), triple(args.subvolume, "--subvolume"),
                       triple(args.overlap, "--overlap", positive=False), parse_bbox(args.bbox), args.staging,
                       MatchOptions(args.min_overlap_voxels, args.min_fraction), downsample_mips=args.num_mips,
                       overwrite=True)


def _stages(args: argparse.Namespace) -> list:
    from exaconnect.services.segment_stages import segment_stages

    return segment_stages(_plan(args))


def _run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    from exaconnect.services.segment_stages import segment_stages

    run_service_stages(segment_stages(plan), args)
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    stages = _stages(args)
    if args.stage == "pass":
        args.stage = args.pass_name
    return enqueue_one_stage(stages, args, "segment")


def _box(args: argparse.Namespace) -> int:
    from exaconnect.segment import segment_box

    summary = segment_box(args.image_layer, args.segmentation_layer, args.model, parse_bbox(args.bbox),
                          _inference_overrides(args), args.device, args.probabilities, args.counters,
                          fill=args.fill_unsegmented)
    print(json.dumps(summary, default=str))
    return 0


def _common(v: argparse.ArgumentParser) -> None:
    from exaconnect.services.stages import layer_argument

    v.add_argument("image_layer", type=layer_argument, help=POSITIONAL_HELP["image_layer"])
    v.add_argument("segmentation_layer", type=layer_argument,
                   help="segmentation layer to write (created with the image's geometry)")
    v.add_argument("--model", required=True, help="FFN checkpoint: an exaconnect checkpoint folder or a google/ffn TF1 prefix")
    v.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels (default: the whole layer)")
    add_set_argument(v, "inference.segment_threshold=0.6")


def register(subparsers) -> None:
    p = subparsers.add_parser("segment", help="FFN segmentation: whole volumes through the queue, or one box")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb in ("run", "enqueue"):
        v = verbs.add_parser(verb, help="every stage (passes, stitching, pyramid)" if verb == "run"
                             else "only enqueue one stage")
        _common(v)
        v.add_argument("--subvolume", default="256,256,256", help="subvolume (task write box) X,Y,Z; a multiple of the chunk size")
        v.add_argument("--overlap", default="32,32,32", help="voxels added on each side of every subvolume's read box")
        v.add_argument("--staging", default=None, help="staging folder/URL (default: SEGMENTATION_LAYER.staging)")
        v.add_argument("--pass-name", default="initial", help="name of the (first) FFN pass")
        v.add_argument("--seed-order", choices=["forward", "reverse"], default="forward")
        v.add_argument("--consensus-with", default=None, help="combine this pass with an earlier one by split consensus")
        v.add_argument("--consensus-min-size", type=int, default=0)
        v.add_argument("--refine", default=None, metavar="MODEL",
                       help="add a refinement pass with this model: seeds in reverse order, split consensus with the first")
        v.add_argument("--min-overlap-voxels", type=int, default=100, help="face matching: least shared voxels of a joined pair")
        v.add_argument("--min-fraction", type=float, default=0.5, help="face matching: shared share of each object's overlap (>= 0.5)")
        v.add_argument("--num-mips", type=int, default=2, help="mips of the stitched segmentation")
        if verb == "run":
            add_queue_arguments(v)
            v.set_defaults(func=_run)
        else:
            add_enqueue_arguments(v, list(STAGE_CHOICES))
            v.set_defaults(func=_enqueue)
    b = verbs.add_parser("box", help="segment one box in this process (the box is the canvas)")
    _common(b)
    b.add_argument("--device", default="auto", help="auto|cpu|gpu|xpu")
    b.add_argument("--probabilities", default=None, help="also write the quantized object probability map here")
    b.add_argument("--counters", default=None, help="write counters JSON here")
    b.add_argument("--fill-unsegmented", action="store_true",
                   help="hand voxels the FFN left unsegmented to the neighbouring objects (a dense output)")
    b.set_defaults(func=_box)
