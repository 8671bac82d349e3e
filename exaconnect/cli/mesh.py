"""`exaconnect mesh run|enqueue SEGMENTATION_LAYER` and `exaconnect skeleton run|enqueue ...`:
igneous meshing (forge, then manifests) and kimimaro skeletons (forge, then merge)."""

from __future__ import annotations

import argparse

from exaconnect.cli.common import (POSITIONAL_HELP, add_allow_missing_argument, add_enqueue_arguments, add_queue_arguments, enqueue_one_stage,
                                   run_service_stages, triple)


def _mesh_stages(args: argparse.Namespace) -> list:
    from exaconnect.services.mesh import mesh_stages

    return mesh_stages(args.segmentation_layer, mip=args.mip, shape=triple(args.shape, "--shape"),
                       simplification_error=args.simplification_error, allow_missing=args.allow_missing)


def _skeleton_stages(args: argparse.Namespace) -> list:
    from exaconnect.services.skeletonize import skeleton_stages

    return skeleton_stages(args.segmentation_layer, mip=args.mip, shape=triple(args.shape, "--shape"),
                           scale=args.scale, const=args.const, dust_threshold=args.dust_threshold,
                           allow_missing=args.allow_missing)


def _register(subparsers, noun: str, help_text: str, make, extra) -> None:
    p = subparsers.add_parser(noun, help=help_text)
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb in ("run", "enqueue"):
        v = verbs.add_parser(verb, help="forge then merge" if verb == "run" else "only enqueue one stage")
        v.add_argument("segmentation_layer", help=POSITIONAL_HELP["segmentation_layer"])
        v.add_argument("--mip", type=int, default=0)
        v.add_argument("--shape", default="256,256,256", help="task box X,Y,Z")
        add_allow_missing_argument(v)
        extra(v)
        if verb == "run":
            add_queue_arguments(v)
            v.set_defaults(func=lambda a: (run_service_stages(make(a), a), 0)[1])
        else:
            add_enqueue_arguments(v, ["forge", "merge"])
            v.set_defaults(func=lambda a, noun=noun: enqueue_one_stage(make(a), a, noun))


def register(subparsers) -> None:
    _register(subparsers, "mesh", "meshes per object (marching cubes per box, then manifests)", _mesh_stages,
              lambda v: v.add_argument("--simplification-error", type=float, default=40.0, help="nm"))

    def skeleton_options(v):
        v.add_argument("--scale", type=float, default=4.0, help="TEASAR invalidation: scale * boundary distance + const")
        v.add_argument("--const", type=float, default=100.0, help="nm")
        v.add_argument("--dust-threshold", type=int, default=500, help="skip objects smaller than this (voxels)")

    _register(subparsers, "skeleton", "kimimaro skeletons per object (per box, then merged)", _skeleton_stages,
              skeleton_options)
