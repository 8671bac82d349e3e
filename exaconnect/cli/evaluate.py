"""`exaconnect evaluate SEGMENTATION GROUNDTRUTH`: VI (split, merge), adapted Rand error,
split and merged bodies, and with ground-truth skeletons (`--skeletons LAYER` or
`--skeletonize-groundtruth`) expected run length, merging segments, split and omitted edges;
with `--image` the same scores of two baselines on the box (an empty segmentation, a watershed of
the image), so a score can be read against what no work and little work give; as JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import sys

from exaconnect.cli.common import parse_bbox


def skeleton_options(args: argparse.Namespace):
    """SkeletonOptions from the command line, or None when no skeleton source was asked for."""
    from exaconnect.errors import InputError
    from exaconnect.precomputed.bbox import parse_resolution
    from exaconnect.precomputed.evaluate_report import SkeletonOptions
    from exaconnect.precomputed.skeleton_metrics import KimimaroParameters

    if args.skeletons is None and not args.skeletonize_groundtruth:
        if args.merge_min_nodes != 1:
            raise InputError("--merge-min-nodes needs ground-truth skeletons: add --skeletons LAYER "
                             "or --skeletonize-groundtruth")
        return None
    if args.merge_min_nodes < 1:
        raise InputError(f"--merge-min-nodes {args.merge_min_nodes}: expected an integer >= 1")
    if args.kimimaro_scale <= 0 or args.kimimaro_const < 0 or args.kimimaro_dust_threshold < 0:
        raise InputError("--kimimaro-scale must be positive, --kimimaro-const and --kimimaro-dust-threshold "
                         "non-negative")
    kimimaro = None
    if args.skeletonize_groundtruth:
        # anisotropy is set to the voxel size once it is known (layer or --resolution)
        kimimaro = KimimaroParameters(scale=args.kimimaro_scale, const=args.kimimaro_const,
                                      dust_threshold=args.kimimaro_dust_threshold)
    resolution = parse_resolution(args.resolution) if args.resolution else None
    return SkeletonOptions(layer=args.skeletons, kimimaro=kimimaro, merge_min_nodes=args.merge_min_nodes,
                           resolution=resolution)


def summary(metrics: dict) -> str:
    """What a person reads; the JSON on stdout has everything."""
    from exaconnect.precomputed.evaluate_report import baseline_lines, voxel_scores

    line = voxel_scores(metrics)
    if "erl" in metrics:
        line += (f"; ERL {metrics['erl'] / 1000:.3f} um of {metrics['erl_max'] / 1000:.3f} um possible "
                 f"({metrics['skeleton_count']} skeletons, {metrics['skeleton_length'] / 1000:.1f} um), "
                 f"{metrics['skeleton_merging_segments']} merging segments, "
                 f"{metrics['skeleton_split_edges']} split edges, "
                 f"{100 * metrics['skeleton_omitted_fraction']:.1f} % of edges omitted")
    return "\n".join([line, *baseline_lines(metrics)])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.evaluate_report import evaluate

    options = skeleton_options(args)
    metrics = evaluate(args.segmentation, args.groundtruth, parse_bbox(args.bbox), args.out,
                       args.ignore_segmentation_zero, options, not args.include_groundtruth_zero, args.image)
    print(json.dumps(metrics))
    print(summary(metrics), file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="VI (split, merge), adapted Rand error, split/merged objects, "
                                               "expected run length")
    p.add_argument("segmentation", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("groundtruth", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels")
    p.add_argument("--out", default=None, help="write JSON here and a PNG beside it")
    p.add_argument("--ignore-segmentation-zero", action="store_true", help="score only voxels the segmentation labelled")
    p.add_argument("--include-groundtruth-zero", action="store_true",
                   help="score the ground truth's label 0 too, as one body (no voxel left out)")
    p.add_argument("--image", default=None, metavar="IMAGE",
                   help="the segmented image (layer, .npy, .npz or file.h5:dataset): also score an empty "
                        "segmentation and a seeded watershed of it on the same box, as baselines")
    skel = p.add_argument_group("skeleton scores (expected run length, funlib.evaluate's rules)")
    source = skel.add_mutually_exclusive_group()
    source.add_argument("--skeletons", default=None, metavar="LAYER",
                        help="ground-truth skeletons: a segmentation layer with a precomputed skeleton source")
    source.add_argument("--skeletonize-groundtruth", action="store_true",
                        help="ground-truth skeletons made here with kimimaro from the ground-truth labels")
    skel.add_argument("--kimimaro-scale", type=float, default=1.5,
                      help="TEASAR invalidation radius = scale * boundary distance + const (default 1.5)")
    skel.add_argument("--kimimaro-const", type=float, default=300.0, help="TEASAR const in nm (default 300)")
    skel.add_argument("--kimimaro-dust-threshold", type=int, default=100,
                      help="bodies under this many voxels get no skeleton (default 100)")
    skel.add_argument("--merge-min-nodes", type=int, default=1, metavar="K",
                      help="lenient merge rule: a segment merges a skeleton only where >= K of its nodes lie in it "
                           "(default 1, funlib.evaluate's rule)")
    skel.add_argument("--resolution", default=None, metavar="X,Y,Z",
                      help="voxel size in nm for .npy/.npz/.h5 inputs (default: the layers' own)")
    p.set_defaults(func=cmd_evaluate)
