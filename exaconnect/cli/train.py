"""`exaconnect train run|sweep|summary|evaluate|partition`: FFN training.

    exaconnect train run --config configs/train_synthetic.yaml [--set training.max_steps=500 ...]
    exaconnect train evaluate runs/small [--queue queues] [--every-steps 1000]   # every kept checkpoint
    exaconnect train summary runs/small --metric adapted_rand_error              # curves, table, chosen model
    exaconnect train sweep enqueue configs/sweep_synthetic.yaml --queue queues
    exaconnect queue work queues/train --processes 1 --lease-seconds 3600 --exit-when-empty
    exaconnect train sweep summary configs/sweep_synthetic.yaml
    exaconnect train partition LABELS DEST --lom-radius 16,16,16 [--queue queues]
"""

from __future__ import annotations

import argparse
import json
import logging


logger = logging.getLogger(__name__)


def cmd_train(args: argparse.Namespace) -> int:
    from exaconnect.ffn.training.config import config_to_yaml, load_train_config

    from exaconnect.cli.common import parse_sets

    config = load_train_config(args.config, parse_sets(args.set))
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from exaconnect.ffn.training.loop import train
    from exaconnect.services.train import evaluation_enqueuer

    result = train(config, on_evaluation_checkpoint=evaluation_enqueuer(config))
    print(json.dumps({"out_dir": str(result.out_dir), "model_dir": str(result.model_dir), "step": result.step,
                      "resumed_from": result.resumed_from, "examples_per_second": round(result.examples_per_second, 3),
                      "last_loss": result.last_loss, "validation": result.validation}))
    return 0


def cmd_sweep_enqueue(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import enqueue
    from exaconnect.services.runner import service_queue
    from exaconnect.services.train import create_sweep_tasks

    tasks = create_sweep_tasks(args.sweep)
    queue = service_queue(args.queue, "train")
    count = enqueue(queue, tasks, description="sweep")
    print(f"enqueued {count} training tasks on {queue}; run: exaconnect queue work {queue} "
          f"--lease-seconds 3600 --exit-when-empty")
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    """Every grid point trained: in this process one after the other, or through --queue ROOT
    (ROOT/train) with --workers local workers (0: remote workers drain it)."""
    import os

    from exaconnect.cli.common import run_service_stages
    from exaconnect.services.train import TrainSweep

    run_service_stages([TrainSweep(sweep=os.path.abspath(args.sweep))], args)
    return 0


def cmd_sweep_summary(args: argparse.Namespace) -> int:
    from exaconnect.ffn.training.sweep import load_sweep, summarize_sweep, write_summary

    sweep = load_sweep(args.sweep)
    rows = summarize_sweep(sweep)
    paths = write_summary(sweep, rows)
    print(paths["table"].read_text(), end="")
    print(f"plot: {paths['plot']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Every kept checkpoint of a run without a record: segmented on the config's evaluation
    boxes, here or as queue tasks."""
    from exaconnect.cli.common import run_service_stages
    from exaconnect.ffn.training.evaluation import pending_steps, run_config
    from exaconnect.services.train import TrainEvaluate

    config = run_config(args.run_dir)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    pending = pending_steps(args.run_dir, args.every_steps, steps)
    if not config.evaluation.boxes:
        from exaconnect.errors import InputError

        raise InputError(f"{args.run_dir}/config.yaml: evaluation.boxes is empty; add the validation boxes "
                         "(name, image, labels, bbox) to its evaluation section")
    if not pending:
        print(json.dumps({"run": args.run_dir, "pending": [], "note": "every selected checkpoint has a record"}))
        return 0
    stage = TrainEvaluate(run_dir=args.run_dir, every_steps=args.every_steps, steps=tuple(steps) if steps else None,
                          pending=tuple(pending), lease=args.lease_seconds)
    run_service_stages([stage], args)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from exaconnect.ffn.training.evaluation import summarize_run

    summary = summarize_run(args.run_dir, args.metric, export=not args.no_export,
                            extra_suites=tuple(args.also or ()))
    print(open(summary["table"]).read(), end="")
    chosen = summary["chosen"]
    if chosen is None:
        print(f"no evaluated checkpoints in {args.run_dir}; run: exaconnect train evaluate {args.run_dir}")
    else:
        print(f"chosen by {args.metric}: step {chosen['step']} ({args.metric} {chosen[args.metric]:.4f})"
              + (f"; exported to {summary['model']}" if summary["model"] else ""))
    print(f"plot: {summary['plot']}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.bbox import parse_triple
    from exaconnect.services.train import TrainPartition

    from exaconnect.ffn.training.config import DEFAULT_THRESHOLDS

    radius_xyz = parse_triple(args.lom_radius, "--lom-radius")
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else list(DEFAULT_THRESHOLDS)
    from exaconnect.cli.common import run_service_stages

    stage = TrainPartition(labels=args.labels, dest=args.dest, lom_radius_zyx=tuple(reversed(radius_xyz)),
                           thresholds=tuple(thresholds), min_size=args.min_size,
                           block_size=parse_triple(args.block_size, "--block-size"))
    run_service_stages([stage], args)
    return 0


def register(subparsers) -> None:
    from exaconnect.cli.common import add_queue_arguments

    noun = subparsers.add_parser("train", help="FFN training: runs, sweeps as queue tasks, partition volumes")
    verbs = noun.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("run", help="train or fine-tune an FFN from a YAML config (see ffn/training/config.py)")
    p.add_argument("--config", required=True, help="training config YAML (every option documented in "
                                                   "configs/train_synthetic.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.OPTION=VALUE",
                   help="override one option, e.g. --set training.max_steps=100 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the complete validated config and exit")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("sweep", help="hyperparameter scans of FFN training as queue tasks")
    sweep = p.add_subparsers(dest="sweep_command", required=True)
    s = sweep.add_parser("enqueue", help="one training task per grid point of a sweep file")
    s.add_argument("sweep", help="sweep YAML (base config + grid, see ffn/training/sweep.py)")
    s.add_argument("--queue", default="queues", metavar="ROOT", help="queue root; tasks go to ROOT/train")
    s.set_defaults(func=cmd_sweep_enqueue)
    s = sweep.add_parser("run", help="train every grid point: here, or through --queue ROOT with --workers")
    s.add_argument("sweep", help="sweep YAML (base config + grid, see ffn/training/sweep.py)")
    add_queue_arguments(s)
    s.set_defaults(func=cmd_sweep_run)
    s = sweep.add_parser("summary", help="rank finished runs: summary.md, summary.json, sweep.png")
    s.add_argument("sweep")
    s.set_defaults(func=cmd_sweep_summary)

    from exaconnect.ffn.training.config import EVAL_METRICS

    p = verbs.add_parser("evaluate", help="segment the run's evaluation boxes with each kept checkpoint and "
                                          "record VI, adapted Rand error and the unsegmented fraction")
    p.add_argument("run_dir", help="training run folder (holds config.yaml with an evaluation section)")
    p.add_argument("--every-steps", type=int, default=None, help="only checkpoints at multiples of N steps")
    p.add_argument("--steps", default=None, help="only these steps (comma list)")
    p.add_argument("--lease-seconds", type=int, default=1800, help="worker lease per evaluation task")
    add_queue_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("summary", help="checkpoint-evaluation curves beside loss and F1 (PNG + table); "
                                         "exports the best checkpoint as RUN_DIR/model")
    p.add_argument("run_dir", help="training run folder")
    p.add_argument("--metric", default="adapted_rand_error", choices=list(EVAL_METRICS),
                   help="choose the checkpoint with the lowest value (default adapted_rand_error)")
    p.add_argument("--no-export", action="store_true", help="only the table and the plot")
    p.add_argument("--also", action="append", metavar="SUITE",
                   help="another record folder of the run (e.g. heldout) to show beside, never used to choose")
    p.set_defaults(func=cmd_summary)

    p = verbs.add_parser("partition", help="the partition volume of a big label layer, block by block")
    p.add_argument("labels", help="segmentation layer")
    p.add_argument("dest", help="new uint8 image layer for the partitions")
    p.add_argument("--lom-radius", required=True, help="x,y,z (usually fov//2 + deltas)")
    p.add_argument("--thresholds", default=None, help="comma list of fractions (default: the reference's)")
    p.add_argument("--min-size", type=int, default=10000)
    p.add_argument("--block-size", default="128,128,128")
    add_queue_arguments(p)
    p.set_defaults(func=cmd_partition)
