"""`exaconnect layer verify|info`: what a layer holds, and whether every chunk of it is sound.

    exaconnect layer verify LAYER [--mip 0] [--bbox x0,y0,z0,x1,y1,z1]   # JSON; exit 1 if a chunk is missing or damaged
    exaconnect layer info LAYER                                          # info, mips and provenance as JSON
"""

from __future__ import annotations

import argparse
import json


def cmd_verify(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.verify import verify_layer

    bbox = Box.parse(args.bbox) if args.bbox else None
    report = verify_layer(args.layer, mips=args.mip or None, bbox=bbox)
    print(json.dumps(report, indent=None if args.compact else 1))
    return 0 if report["ok"] else 1


def cmd_info(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.layers import layer_url, open_layer

    url = layer_url(args.layer)
    vol = open_layer(url)
    scales = [{"mip": i, "key": s["key"], "resolution": s["resolution"], "size": s["size"],
               "voxel_offset": s["voxel_offset"], "chunk_size": s["chunk_sizes"][0], "encoding": s["encoding"]}
              for i, s in enumerate(vol.info["scales"])]
    try:
        provenance = json.loads(vol.provenance.serialize())
    except Exception:  # a layer written by another tool may have none
        provenance = None
    print(json.dumps({"layer": url, "type": vol.info["type"], "data_type": vol.info["data_type"],
                      "num_channels": vol.info["num_channels"], "mips": scales, "provenance": provenance},
                     indent=None if args.compact else 1, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("layer", help="inspect a precomputed layer: verify its chunks, print its info")
    verbs = p.add_subparsers(dest="verb", required=True)

    v = verbs.add_parser("verify", help="report missing or damaged chunks as JSON (exit 1 when any)")
    v.add_argument("layer", help="layer (path or URL)")
    v.add_argument("--mip", type=int, action="append", default=[],
                   help="check this mip (repeatable; default every mip)")
    v.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels (default: the whole layer)")
    v.add_argument("--compact", action="store_true", help="one JSON line")
    v.set_defaults(func=cmd_verify)

    i = verbs.add_parser("info", help="geometry, encodings and provenance as JSON")
    i.add_argument("layer", help="layer (path or URL)")
    i.add_argument("--compact", action="store_true", help="one JSON line")
    i.set_defaults(func=cmd_info)
