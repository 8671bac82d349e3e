"""`exaconnect ingest run|enqueue SRC LAYER`: sections into a precomputed layer."""

from __future__ import annotations

import argparse

from exaconnect.cli.common import (POSITIONAL_HELP, add_enqueue_arguments, add_queue_arguments, enqueue_one_stage,
                                   run_service_stages, triple)
from exaconnect.precomputed.bbox import parse_resolution


def _stages(args: argparse.Namespace) -> list:
    from exaconnect.services.ingest import IngestOptions, ingest_stage
    from exaconnect.services.queue import queue_url

    if args.queue:
        queue_url(args.queue)  # an unsupported queue URL is refused before anything is written
    options = IngestOptions(layer_type=args.type, resolution=parse_resolution(args.resolution),
                            voxel_offset=triple(args.voxel_offset, "--voxel-offset", positive=False),
                            chunk_size=triple(args.chunk_size, "--chunk-size"), encoding=args.encoding,
                            overwrite=args.overwrite)
    return [ingest_stage(args.src, args.layer, options, name="ingest.slabs")]


def register(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="sections -> precomputed layer (one task per chunk-aligned z-slab)")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb in ("run", "enqueue"):
        v = verbs.add_parser(verb, help="ingest now (or through --queue)" if verb == "run" else "only enqueue the slabs")
        v.add_argument("src", help=POSITIONAL_HELP["src"])
        v.add_argument("layer", help="destination layer (path or URL)")
        v.add_argument("--resolution", required=True, help="X,Y,Z voxel size in nm")
        v.add_argument("--type", choices=["image", "segmentation"], default="image")
        v.add_argument("--chunk-size", default="64,64,64", help="X,Y,Z chunk size (default 64,64,64)")
        v.add_argument("--voxel-offset", default="0,0,0", help="X,Y,Z of the first voxel")
        v.add_argument("--encoding", default=None, help="raw|jpeg for images, compressed_segmentation|compresso for labels")
        v.add_argument("--overwrite", action="store_true", help="replace an existing layer's info")
        if verb == "run":
            add_queue_arguments(v)
            v.set_defaults(func=lambda a: (run_service_stages(_stages(a), a), 0)[1])
        else:
            add_enqueue_arguments(v, ["slabs"])
            v.set_defaults(func=lambda a: enqueue_one_stage(_stages(a), a, "ingest"))
