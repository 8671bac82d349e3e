"""What every command shares: the override syntax, boxes and triples, and running a service's
stages here or through a queue.

One override syntax everywhere: `--set section.key=value`, the value read as YAML
(`--set inference.segment_threshold=0.6`, `--set segment.subvolume=[64,64,64]`).

Stage verbs take `--queue ROOT` optionally: tasks go to `ROOT/SERVICE` (a shared folder on a
cluster, or an SQS name prefix). Without it, `run` drains the stages in this process through a
temporary local queue, as igneous does with its LocalTaskQueue.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any, Sequence

from exaconnect.errors import ExaconnectError, InputError

POSITIONAL_HELP = {
    "src": "source sections: a folder of PNG/TIFF, a multi-page TIFF, file.h5:dataset or .npy",
    "image_layer": "image layer (path or URL: file://, gs://, s3://)",
    "segmentation_layer": "segmentation layer (path or URL)",
    "layer": "layer (path or URL)",
}


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one option (YAML value), e.g. --set {example} (repeatable)")


def parse_sets(items: Sequence[str] | None, allowed: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings -> {section: {key: value}}; values are YAML scalars, lists or
    maps. A deeper key names an option inside a nested section: `refine.p2.enabled=false` ->
    {refine: {p2: {enabled: False}}}, merged with any other setting of that section."""
    import yaml

    from exaconnect.precomputed.config_loader import merged_mapping

    overrides: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or len(path) < 2 or not all(path):
            raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. inference.segment_threshold=0.6")
        if allowed is not None and path[0] not in allowed:
            raise InputError(f"--set {item!r}: unknown section {path[0]!r}; expected one of {', '.join(allowed)}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"--set {item!r}: the value is not valid YAML") from None
        section = overrides.setdefault(path[0], {})
        for depth, part in enumerate(path[1:-1], start=1):
            inner = section.setdefault(part, {})
            if not isinstance(inner, dict):
                raise InputError(f"--set {item!r}: {'.'.join(path[:depth + 1])} was set to {inner!r} by an "
                                 "earlier --set; expected a section")
            section = inner
        if isinstance(parsed, dict) and isinstance(section.get(path[-1]), dict):
            section[path[-1]] = merged_mapping(section[path[-1]], parsed)
        else:
            section[path[-1]] = parsed
    return overrides


def parse_bbox(text: str | None):
    from exaconnect.precomputed.bbox import Box

    return Box.parse(text) if text else None


def triple(text: str, name: str, positive: bool = True):
    from exaconnect.precomputed.bbox import parse_triple

    return parse_triple(text, name, positive=positive)


def queue_root_argument(text: str) -> str:
    """argparse `type=` for a queue root, checked and normalised once, here at the edge: a folder
    becomes absolute (workers elsewhere must find it); `fq://`, `sqs://` and SQS URLs pass."""
    import os

    from exaconnect.errors import QueueError
    from exaconnect.services.queue import queue_url

    try:
        queue_url(text)
    except QueueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if "://" in text:
        return text
    root = os.path.abspath(text)
    # A file where the root or one of its parents should be a folder fails late, with a
    # traceback from deep in the runner; say so here, by name.
    probe = root
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{text}: {probe} is a file; expected a folder for the queues (or an SQS "
                                         "queue name prefix, sqs://NAME)")
    return root


def add_queue_arguments(parser: argparse.ArgumentParser, workers_default: int | None = None) -> None:
    parser.add_argument("--queue", default=None, metavar="ROOT", type=queue_root_argument,
                        help="queue root: tasks go to ROOT/SERVICE (a shared folder, or an SQS name prefix); "
                             "without it the stages run in this process")
    parser.add_argument("--workers", type=int, default=workers_default,
                        help="local worker processes draining each stage (default: 1 without --queue, 2 with it); "
                             "0 leaves the queue to remote workers and waits for them")


def add_enqueue_arguments(parser: argparse.ArgumentParser, stages: Sequence[str]) -> None:
    parser.add_argument("--queue", required=True, metavar="ROOT", type=queue_root_argument,
                        help="queue root: tasks go to ROOT/SERVICE; drain with `exaconnect queue work ROOT/SERVICE`")
    parser.add_argument("--stage", default=stages[0], choices=list(stages),
                        help=f"which stage to enqueue (default {stages[0]}; each after the previous drained)")


def run_service_stages(stages: list, args: argparse.Namespace, record: str | None = None):
    """Run `stages` through the runner: on `--queue ROOT` with `--workers` local workers (0: wait
    for remote ones), or in this process on a temporary queue. Prints and returns the report."""
    import json

    from exaconnect.services.runner import RunnerOptions, run_stages

    workers = args.workers
    if args.queue is None:
        import shutil

        tmp = tempfile.mkdtemp(prefix="exaconnect-")
        try:
            report = run_stages(stages, RunnerOptions(tmp, f"{tmp}/records", workers=1 if workers is None else max(1, workers)))
        except ExaconnectError as exc:
            if tmp not in str(exc):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # The error names files in this temporary queue (dead letters, the failure ledger):
            # they are kept for the user to read, and the message says so.
            exc.args = (f"{exc} [the run's temporary queue and its failure records are kept in {tmp}; "
                        "delete it when done]",) + exc.args[1:]
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        from exaconnect.services.stages import records_location

        report = run_stages(stages, RunnerOptions(args.queue, record or records_location(args.queue),
                                                  workers=2 if workers is None else workers))
    print(json.dumps(report.as_dict()))
    return report


def enqueue_one_stage(stages: list, args: argparse.Namespace, prefix: str) -> int:
    """Enqueue only the stage named `PREFIX.STAGE` (its requirements must be complete)."""
    from exaconnect.services.queue import enqueue
    from exaconnect.services.runner import service_queue

    wanted = f"{prefix}.{args.stage}" if args.stage else stages[0].name
    chosen = [s for s in stages if s.name == wanted or s.name.endswith(f".{args.stage}")
              or s.name.startswith(f"{args.stage}.")]
    if not chosen:
        raise InputError(f"--stage {args.stage}: expected one of {[s.name.split('.', 1)[1] for s in stages]}")
    stage = chosen[0]
    queue = service_queue(args.queue, stage.service)
    count = enqueue(queue, list(stage.make_tasks()), description=stage.name)
    print(f"enqueued {count} {stage.name} tasks on {queue}; drain with: exaconnect queue work {queue}")
    return 0
