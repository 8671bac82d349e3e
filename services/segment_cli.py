"""Options and task creation for the `exaconnect enqueue segment*` stages (registered in
exaconnect/cli.py's ENQUEUE_STAGES). A run is four stages drained in order:

    exaconnect enqueue segment IMAGE_LAYER OUT_LAYER --model PATH --queue Q   # one pass
    exaconnect enqueue segment IMAGE_LAYER OUT_LAYER --model PATH2 --pass-name refine \\
        --seed-order reverse --consensus-with initial --queue Q                 # optional refinement
    exaconnect enqueue segment-faces OUT_LAYER --queue Q
    exaconnect enqueue segment-equivalence OUT_LAYER --queue Q
    exaconnect enqueue segment-relabel OUT_LAYER --queue Q
    exaconnect enqueue downsample OUT_LAYER --queue Q                           # then mesh
"""

from __future__ import annotations

import argparse
import json
import os

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box, parse_triple

STAGES = ("segment", "segment-faces", "segment-equivalence", "segment-relabel")


def add_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """Options of one segment stage; the stage's first positional (`layer`) is added by the CLI:
    the image layer for `segment`, the segmentation layer for the stitch stages."""
    parser.add_argument("--staging", default=None, help="staging folder/URL (default: OUT_LAYER.staging)")
    parser.add_argument("--pass-name", default=None, help="FFN pass (default: 'initial' for segment, the last pass for stitching)")
    if stage != "segment":
        return
    parser.add_argument("segmentation_layer", help="output segmentation layer (created, uint64)")
    parser.add_argument("--model", required=True, help="FFN checkpoint: a google/ffn TF1 prefix or an exaconnect checkpoint folder")
    parser.add_argument("--subvolume", default="256,256,256", help="subvolume (task write box) X,Y,Z; a multiple of the chunk size")
    parser.add_argument("--overlap", default="32,32,32", help="voxels added on each side to every subvolume's read box X,Y,Z")
    parser.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels (default: the whole layer)")
    parser.add_argument("--inference", default="{}", help="JSON of InferenceOptions overrides, e.g. '{\"min_segment_size\": 500}'")
    parser.add_argument("--seed-order", choices=["forward", "reverse"], default="forward")
    parser.add_argument("--consensus-with", default=None, help="combine with this earlier pass by split consensus (refinement)")
    parser.add_argument("--consensus-min-size", type=int, default=0, help="drop consensus pieces smaller than this")
    parser.add_argument("--min-overlap-voxels", type=int, default=100, help="face matching: least shared voxels of a joined pair")
    parser.add_argument("--min-fraction", type=float, default=0.5, help="face matching: shared share of each object's overlap voxels (>= 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="start a new run even if staging holds another")


def stage_tasks(args: argparse.Namespace) -> list:
    from exaconnect.precomputed.layers import layer_url
    from exaconnect.precomputed.stitching import MatchOptions
    from exaconnect.services.segment import add_pass, create_segment_tasks, prepare_run
    from exaconnect.services.segment_staging import PassSpec, default_staging, load_run
    from exaconnect.services.stitch import create_equivalence_tasks, create_faces_tasks, create_relabel_tasks

    if args.stage == "segment":
        try:
            overrides = json.loads(args.inference)
        except ValueError as exc:
            raise InputError(f"--inference {args.inference!r}: not JSON ({exc})") from None
        if not isinstance(overrides, dict):
            raise InputError(f"--inference {args.inference!r}: expected a JSON object")
        run = prepare_run(
            args.layer, args.segmentation_layer,
            parse_triple(args.subvolume, "--subvolume"), parse_triple(args.overlap, "--overlap", positive=False),
            Box.parse(args.bbox) if args.bbox else None, args.staging,
            MatchOptions(args.min_overlap_voxels, args.min_fraction), overwrite=args.overwrite,
        )
        # Workers may start elsewhere: a local model path is stored absolute.
        model = os.path.abspath(args.model) if os.path.exists(args.model) else str(args.model)
        spec = PassSpec(args.pass_name or "initial", model, overrides, args.seed_order,
                        args.consensus_with, args.consensus_min_size)
        run = add_pass(run.staging, spec)
        return create_segment_tasks(run, spec.name)
    run = load_run(args.staging or default_staging(layer_url(args.layer)))
    make = {"segment-faces": create_faces_tasks, "segment-equivalence": create_equivalence_tasks,
            "segment-relabel": create_relabel_tasks}[args.stage]
    return make(run, args.pass_name)
