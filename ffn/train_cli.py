"""CLI for FFN training: `exaconnect train`, `exaconnect sweep`, `exaconnect train-partition`.

    exaconnect train --config configs/train_synthetic.yaml [--set training.max_steps=500 ...]
    exaconnect sweep enqueue configs/sweep_synthetic.yaml --queue queues/train
    exaconnect worker queues/train --processes 1 --lease-seconds 3600 --exit-when-empty
    exaconnect sweep summary configs/sweep_synthetic.yaml
    exaconnect train-partition LABELS DEST --lom-radius 16,16,16 --queue queues/partition
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from exaconnect.errors import InputError

logger = logging.getLogger(__name__)


def parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """`section.option=value` strings (values parsed as YAML) -> overrides by section."""
    import yaml

    overrides: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise InputError(f"--set {item!r}: expected section.option=value")
        overrides.setdefault(section, {})[option] = yaml.safe_load(value)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import config_to_yaml, load_train_config

    config = load_train_config(args.config, parse_sets(args.set))
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from .training.loop import train

    result = train(config)
    print(json.dumps({"out_dir": str(result.out_dir), "model_dir": str(result.model_dir), "step": result.step,
                      "resumed_from": result.resumed_from, "examples_per_second": round(result.examples_per_second, 3),
                      "last_loss": result.last_loss, "validation": result.validation}))
    return 0


def cmd_sweep_enqueue(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import enqueue
    from exaconnect.services.train import create_sweep_tasks

    tasks = create_sweep_tasks(args.sweep)
    count = enqueue(args.queue, tasks, description="sweep")
    print(f"enqueued {count} training tasks on {args.queue}; run: exaconnect worker {args.queue} "
          f"--lease-seconds 3600 --exit-when-empty")
    return 0


def cmd_sweep_summary(args: argparse.Namespace) -> int:
    from .training.sweep import load_sweep, summarize_sweep, write_summary

    sweep = load_sweep(args.sweep)
    rows = summarize_sweep(sweep)
    paths = write_summary(sweep, rows)
    print(paths["table"].read_text(), end="")
    print(f"plot: {paths['plot']}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.bbox import parse_triple
    from exaconnect.services.queue import enqueue
    from exaconnect.services.train import create_partition_tasks

    from .training.config import DEFAULT_THRESHOLDS

    radius_xyz = parse_triple(args.lom_radius, "--lom-radius")
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else list(DEFAULT_THRESHOLDS)
    tasks = create_partition_tasks(args.labels, args.dest, tuple(reversed(radius_xyz)), thresholds, args.min_size,
                                   parse_triple(args.block_size, "--block-size"))
    count = enqueue(args.queue, tasks, description="train-partition")
    print(f"enqueued {count} partition tasks on {args.queue}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune an FFN from a YAML config (see ffn/training/config.py)")
    p.add_argument("--config", required=True, help="training config YAML (every option documented in "
                                                   "ffn/training/config.py and configs/train_synthetic.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE",
                   help="override one option, e.g. --set training.max_steps=100 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the complete validated config and exit")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("sweep", help="hyperparameter scans of FFN training as queue tasks")
    sweep = p.add_subparsers(dest="sweep_command", required=True)
    s = sweep.add_parser("enqueue", help="one training task per grid point of a sweep file")
    s.add_argument("sweep", help="sweep YAML (base config + grid, see ffn/training/sweep.py)")
    s.add_argument("--queue", default="queues/train")
    s.set_defaults(func=cmd_sweep_enqueue)
    s = sweep.add_parser("summary", help="rank finished runs: summary.md, summary.json, sweep.png")
    s.add_argument("sweep")
    s.set_defaults(func=cmd_sweep_summary)

    p = subparsers.add_parser("train-partition", help="enqueue the partition volume of a big label layer")
    p.add_argument("labels", help="segmentation layer")
    p.add_argument("dest", help="new uint8 image layer for the partitions")
    p.add_argument("--lom-radius", required=True, help="x,y,z (usually fov//2 + deltas)")
    p.add_argument("--thresholds", default=None, help="comma list of fractions (default: the reference's)")
    p.add_argument("--min-size", type=int, default=10000)
    p.add_argument("--block-size", default="128,128,128")
    p.add_argument("--queue", default="queues/partition")
    p.set_defaults(func=cmd_partition)
