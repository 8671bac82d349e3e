"""`exaconnect align run|enqueue|report|apply SRC DEST`: elastic alignment of serial sections.

Options of the alignment are the fields of `AlignConfig` (align/match.py), given as
`--set flow.patch_size=48`, `--set mesh.stride=16`, `--set max_skip=3`; defaults are scaled to the
section size.
"""

from __future__ import annotations

import argparse
import json

from exaconnect.cli.common import (add_enqueue_arguments, add_queue_arguments, add_set_argument, enqueue_one_stage,
                                   parse_sets, run_service_stages)
from exaconnect.errors import InputError


def align_config(src: str, sets: list[str]):
    """`config_for_shape(section size)`, then the `--set` overrides, each checked by name."""
    from exaconnect.align.match import AlignConfig, config_for_shape
    from exaconnect.precomputed.layers import layer_bounds, open_layer

    width, height, _ = layer_bounds(open_layer(src, layer_type="image")).shape
    data = config_for_shape((height, width)).as_dict()
    for section, values in parse_sets([s if "." in s.partition("=")[0] else f"align.{s}" for s in sets]).items():
        target = data if section == "align" else data.get(section)
        if not isinstance(target, dict):
            raise InputError(f"--set {section}.…: unknown section; expected one of "
                             f"{sorted(k for k, v in data.items() if isinstance(v, dict))} (or a top-level option)")
        for key, value in values.items():
            if key not in target or isinstance(target[key], dict):
                raise InputError(f"--set {section}.{key}: unknown option; {section} takes "
                                 f"{sorted(k for k, v in target.items() if not isinstance(v, dict))}")
            target[key] = value
    return AlignConfig.from_dict(data)


def _stages(args: argparse.Namespace) -> list:
    from exaconnect.services.align import align_stages

    return align_stages(args.src, args.dest, align_config(args.src, args.set))


def _report(args: argparse.Namespace) -> int:
    from exaconnect.services.align import align_report

    summary = align_report(args.src, args.dest, args.png)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_section"}, default=float))
    return 0


def _run(args: argparse.Namespace) -> int:
    run_service_stages(_stages(args), args)
    return _report_from_store(args)


def _report_from_store(args: argparse.Namespace) -> int:
    from exaconnect.services.align import get_file

    raw = get_file(args.dest, "align/report.json")
    if raw is not None:
        print(json.dumps({k: v for k, v in json.loads(raw).items() if k != "per_section"}))
    return 0


def _apply_stages(args: argparse.Namespace) -> list:
    from exaconnect.services.align import AlignApply

    return [AlignApply(src=args.src, dest=args.dest, alignment=args.alignment, order=args.order)]


def register(subparsers) -> None:
    from exaconnect.services.align import STAGES
    from exaconnect.services.stages import layer_argument

    p = subparsers.add_parser("align", help="elastic alignment of serial sections (flow, mesh, compose, render, report)")
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb in ("run", "enqueue"):
        v = verbs.add_parser(verb, help="every stage, then the report" if verb == "run" else "only enqueue one stage")
        v.add_argument("src", type=layer_argument, help="source image layer (misaligned sections)")
        v.add_argument("dest", type=layer_argument, help="destination image layer (created by the flow stage)")
        add_set_argument(v, "flow.patch_size=48")
        if verb == "run":
            add_queue_arguments(v)
            v.set_defaults(func=_run)
        else:
            add_enqueue_arguments(v, list(STAGES))
            v.set_defaults(func=lambda a: enqueue_one_stage(_stages(a), a, "align"))
    r = verbs.add_parser("report", help="quality report of a finished alignment (JSON line + PNG)")
    r.add_argument("src", type=layer_argument)
    r.add_argument("dest", type=layer_argument)
    r.add_argument("--png", default=None, help="report figure (default DEST/align/report.png)")
    r.set_defaults(func=_report)
    a = verbs.add_parser("apply", help="move another layer (labels, a channel) through a finished alignment")
    a.add_argument("src", type=layer_argument, help="layer in the unaligned frame")
    a.add_argument("dest", type=layer_argument, help="new layer in the aligned frame")
    a.add_argument("--alignment", type=layer_argument, required=True, help="the aligned image layer whose meshes to use")
    a.add_argument("--order", type=int, default=0, choices=[0, 1, 3], help="interpolation: 0 for labels, 3 for images")
    add_queue_arguments(a)
    a.set_defaults(func=lambda args: (run_service_stages(_apply_stages(args), args), 0)[1])
