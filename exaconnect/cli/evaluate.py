"""`exaconnect evaluate SEGMENTATION GROUNDTRUTH`: VI (split, merge), adapted Rand error,
split and merged bodies, as JSON and a PNG."""

from __future__ import annotations

import argparse
import json

from exaconnect.cli.common import parse_bbox


def cmd_evaluate(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.evaluate_report import evaluate

    metrics = evaluate(args.segmentation, args.groundtruth, parse_bbox(args.bbox), args.out,
                       args.ignore_segmentation_zero)
    print(json.dumps(metrics))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="VI (split, merge), adapted Rand error, split/merged objects")
    p.add_argument("segmentation", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("groundtruth", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels")
    p.add_argument("--out", default=None, help="write JSON here and a PNG beside it")
    p.add_argument("--ignore-segmentation-zero", action="store_true", help="score only voxels the segmentation labelled")
    p.set_defaults(func=cmd_evaluate)
