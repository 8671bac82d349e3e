"""`exaconnect queue work|status|purge|dead-letters`: run workers on a queue and look after it.

    exaconnect queue create QUEUE [--shards 64]
    exaconnect queue work QUEUE [--processes N] [--lease-seconds S] [--max-attempts N] ...
    exaconnect queue status QUEUE [--watch]
    exaconnect queue purge QUEUE [--dead-letters]
    exaconnect queue dead-letters list QUEUE
    exaconnect queue dead-letters show QUEUE ID
    exaconnect queue dead-letters requeue QUEUE (ID ... | --all)
    exaconnect queue dead-letters purge QUEUE

`python -m exaconnect.cli.queue ...` runs the same verbs without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

from exaconnect.services.stages import at_least


def cmd_work(args: argparse.Namespace) -> int:
    from exaconnect.services.worker import WorkerOptions, run_workers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("exaconnect").setLevel(logging.INFO)
    if args.device in ("gpu", "xpu"):
        from exaconnect.ffn.device import require_device

        require_device(args.device)  # absent: InputError, one line, exit 2 (as `exaconnect doctor --device`)
    if args.no_verify_checksums:
        from exaconnect.precomputed.checksums import set_checksum_verification

        set_checksum_verification(False)
    options = WorkerOptions(lease_seconds=args.lease_seconds, exit_when_empty=args.exit_when_empty,
                            max_attempts=args.max_attempts, ledger_dir=args.ledger_dir,
                            task_modules=tuple(args.task_module), heartbeat=args.heartbeat,
                            create_queue=args.create_queue, max_restarts=args.max_restarts,
                            retry_delay_seconds=args.retry_delay_seconds, max_tasks=args.max_tasks,
                            task_timeout_seconds=args.task_timeout)
    return run_workers(args.queue, options, processes=args.processes)


def cmd_create(args: argparse.Namespace) -> int:
    from exaconnect.errors import InputError
    from exaconnect.services.file_queue import FileQueue, is_file_queue
    from exaconnect.services.queue import open_queue, queue_path

    path = queue_path(args.queue)
    if path is None:
        raise InputError(f"queue {args.queue}: only file queues are created here (SQS queues are made in AWS)")
    if args.shards < 1:
        raise InputError(f"--shards {args.shards}: expected at least 1")
    existed = is_file_queue(path)
    queue = open_queue(args.queue, create=True, shards=args.shards)
    assert isinstance(queue, FileQueue)
    print(f"{'queue already exists' if existed else 'created queue'} {path} with {queue.shards} shards")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from exaconnect.services.queue import queue_status

    status = queue_status(args.queue, args.ledger_dir)
    if not args.watch:
        print(json.dumps(status.as_dict()))
        return 1 if status.failed else 0
    with tqdm(total=max(status.inserted, 1), desc=f"{args.queue}", unit="task") as bar:
        while True:
            status = queue_status(args.queue, args.ledger_dir)
            bar.total = max(status.inserted, 1)
            bar.n = status.completed + status.failed
            bar.set_postfix(enqueued=status.enqueued, leased=status.leased, waiting=status.waiting, retrying=status.retrying,
                            failed=status.failed)
            bar.refresh()
            if status.enqueued == 0:
                break
            time.sleep(args.interval)
    print(json.dumps(status.as_dict()))
    return 1 if status.failed else 0


def cmd_purge(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import FailureLedger, purge_queue

    count = purge_queue(args.queue, args.ledger_dir, dead_letters=args.dead_letters)
    kept = FailureLedger.for_queue(args.queue, args.ledger_dir).dead_count()
    print(f"purged {count} tasks from {args.queue}" + (f"; kept {kept} dead letters (--dead-letters removes them)" if kept else ""))
    return 0


def _task_class(payload) -> str:
    if isinstance(payload, dict):
        return str(payload.get("class", "?"))
    if isinstance(payload, list) and payload:
        return str(payload[0])
    return "(not a task)"


def cmd_dead_list(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import FailureLedger, open_queue

    open_queue(args.queue, create=False)
    records = FailureLedger.for_queue(args.queue, args.ledger_dir).dead_records()
    if args.json:
        for r in records:
            print(json.dumps({"id": r["id"], "class": _task_class(r.get("payload")), "attempts": r.get("attempts"),
                              "reason": r.get("reason")}))
        return 0
    for r in records:
        print(f"{r['id']}  {_task_class(r.get('payload'))}  attempts={r.get('attempts')}  {r.get('reason')}")
    print(f"{len(records)} dead-lettered tasks", file=sys.stderr)
    return 0


def cmd_dead_show(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import FailureLedger

    record = FailureLedger.for_queue(args.queue, args.ledger_dir).dead_record(args.id)
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"task {record['id']} ({_task_class(record.get('payload'))}), attempts {record.get('attempts')}")
    print(f"reason: {record.get('reason')}")
    print("payload: " + json.dumps(record.get("payload"), indent=1))
    for i, failure in enumerate(record.get("failures", []), 1):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(failure.get("time", 0)))
        print(f"--- failure {i} ({failure.get('kind', 'exception')}, {when} UTC)")
        print(str(failure.get("error", "")).rstrip())
    return 0


def cmd_dead_requeue(args: argparse.Namespace) -> int:
    from exaconnect.errors import InputError
    from exaconnect.services.queue import requeue_dead_letters

    if bool(args.ids) == bool(args.all):
        raise InputError("dead-letters requeue: give task ids or --all (not both)")
    count = requeue_dead_letters(args.queue, None if args.all else list(args.ids), args.ledger_dir)
    print(f"requeued {count} tasks on {args.queue}")
    return 0


def cmd_dead_purge(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import open_queue, purge_dead_letters

    open_queue(args.queue, create=False)
    print(f"removed {purge_dead_letters(args.queue, args.ledger_dir)} dead letters from {args.queue}")
    return 0


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("queue", help="a path or fq://PATH (SQS URLs for status and dead letters)")
    p.add_argument("--ledger-dir", default=None, help="failure/dead-letter folder (default: inside a file queue)")


def register(subparsers) -> None:
    noun = subparsers.add_parser("queue", help="run workers on a queue; status, purge, dead letters")
    verbs = noun.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("create", help="create an empty file queue (choose its shard count before enqueueing)")
    _queue_args(p)
    p.add_argument("--shards", type=at_least(1), default=64, help="sub-folders; about workers/16 for thousands of workers")
    p.set_defaults(func=cmd_create)

    p = verbs.add_parser("work", help="lease, run and delete tasks (the worker)")
    _queue_args(p)
    p.add_argument("--processes", type=at_least(1), default=1, help="supervised worker processes (dead ones are replaced)")
    p.add_argument("--lease-seconds", type=int, default=600, help="lease length, at least 10 (renewed while a task runs)")
    p.add_argument("--max-attempts", type=at_least(1), default=3, help="leases a task may use before it goes to the dead letter")
    p.add_argument("--exit-when-empty", action="store_true")
    p.add_argument("--max-tasks", type=at_least(1), default=None, help="stop after this many tasks")
    p.add_argument("--retry-delay-seconds", type=at_least(0, float), default=None, help="wait before a failed task is retried (default: the lease)")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="do not check chunks read against the checksums their writers recorded")
    p.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                   help="end a task that runs longer (counted as a failed attempt, 'timed out after N s'); "
                        "a task that does not stop is ended by killing its worker (run under --processes "
                        "or a supervisor that restarts it)")
    p.add_argument("--max-restarts", type=at_least(0), default=100, help="replacements of dead worker processes (with --processes)")
    p.add_argument("--task-module", action="append", default=[], help="import this module's task classes too (repeatable)")
    p.add_argument("--heartbeat", default=os.environ.get("EXACONNECT_HEARTBEAT") or None, metavar="PATH",
                   help="a JSON heartbeat {time, pid, task, task_started, progress, task_timeout} written at every step "
                        "of the task loop and every 10 s while alive, read by exaconnect-healthcheck (liveness probes; "
                        "default: $EXACONNECT_HEARTBEAT)")
    p.add_argument("--create-queue", action="store_true", help="create an empty file queue if there is none yet")
    p.add_argument("--device", choices=["auto", "cpu", "gpu", "xpu"], default="auto",
                   help="gpu|xpu: refuse to start (exit 2) when that device is absent; tasks choose their own device")
    p.set_defaults(func=cmd_work)

    p = verbs.add_parser("status", help="inserted, enqueued, leased, completed, failed (dead-lettered), retrying")
    _queue_args(p)
    p.add_argument("--watch", action="store_true", help="a progress bar until the queue is empty")
    p.add_argument("--interval", type=float, default=2.0)
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("purge", help="delete every task, the counters and failure records")
    _queue_args(p)
    p.add_argument("--dead-letters", action="store_true", help="remove the dead letters too")
    p.set_defaults(func=cmd_purge)

    dead = verbs.add_parser("dead-letters", help="tasks that used up their attempts: list, show, requeue, purge")
    actions = dead.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="one line per dead-lettered task: id, class, attempts, reason")
    _queue_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_list)
    p = actions.add_parser("show", help="payload and every traceback of one task")
    _queue_args(p)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_show)
    p = actions.add_parser("requeue", help="put tasks back with fresh attempts")
    _queue_args(p)
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_dead_requeue)
    p = actions.add_parser("purge", help="delete every dead letter")
    _queue_args(p)
    p.set_defaults(func=cmd_dead_purge)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exaconnect.cli.queue ...` = `exaconnect queue ...` (the same parser and errors)."""
    from exaconnect.cli import main as exaconnect_main

    return exaconnect_main(["queue", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
