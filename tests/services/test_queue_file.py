"""The sharded file queue: leases by rename, attempts in the name, ownership, exactly once."""

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_tasks import NoopTask, WriteTask  # noqa: E402

import pytest  # noqa: E402

from exaconnect.errors import QueueError  # noqa: E402
from exaconnect.services.file_queue import FileQueue, parse_name  # noqa: E402
from exaconnect.services.queue import enqueue, open_queue, queue_status  # noqa: E402


def test_tasks_spread_over_shards_and_a_lease_counts_an_attempt(tmp_path):
    q = FileQueue(tmp_path / "q", create=True, shards=4)
    assert q.insert([NoopTask(i) for i in range(8)]) == 8
    assert [len(os.listdir(d)) for d in q._shard_dirs] == [2, 2, 2, 2]
    lease = q.lease(30)
    assert lease.attempts == 1 and json.loads(lease.text)["payload"]["class"] == "NoopTask"
    assert lease.expires >= time.time() + 29
    assert (q.enqueued, q.leased, q.inserted) == (8, 1, 8)
    released = q.release(lease, 0)
    assert parse_name(released.name)[2] == 1  # the attempt stays used
    again = q.release(q.renew(released, 30), 0, refund=True)
    assert parse_name(again.name)[2] == 0  # handed back on shutdown: not an attempt
    assert q.delete(q.lease(30)) and q.completed == 1 and q.enqueued == 7


def test_renewal_fails_once_another_worker_holds_the_task(tmp_path):
    q = FileQueue(tmp_path / "q", create=True, shards=1)
    q.insert([NoopTask(0)])
    mine = q.lease(10)
    other = FileQueue(tmp_path / "q")
    assert other.lease(10) is None  # leased: not available
    stolen = q.release(mine, 0)  # as if my lease had run out...
    theirs = other.lease(10)  # ...and another worker took the task
    assert theirs is not None and theirs.attempts == 2
    assert q.renew(mine, 10) is None and q.renew(stolen, 10) is None
    assert q.delete(mine) is False  # not ours any more, but the task is done: removed anyway
    assert q.is_empty()


def _drain(path, out):
    q = FileQueue(path)
    ran = []
    while (lease := q.lease(60)) is not None:
        ran.append(json.loads(lease.text)["payload"]["index"])
        q.delete(lease)
    Path(out).write_text(json.dumps(ran))


def test_concurrent_workers_lease_every_task_exactly_once(tmp_path):
    q = FileQueue(tmp_path / "q", create=True, shards=3)
    q.insert([NoopTask(i) for i in range(600)])
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_drain, args=(str(tmp_path / "q"), str(tmp_path / f"ran{k}"))) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    ran = sorted(i for k in range(6) for i in json.loads((tmp_path / f"ran{k}").read_text()))
    assert ran == list(range(600))
    assert q.completed == 600 and q.is_empty()
    assert [p for p in (tmp_path / "q").rglob("*") if p.is_file() and p.stat().st_size == 0] == []


def test_open_queue_refuses_an_upstream_flat_queue_and_a_missing_one(tmp_path):
    from taskqueue import TaskQueue

    TaskQueue("fq://" + str(tmp_path / "old"), progress=False).insert([NoopTask(0)])
    with pytest.raises(QueueError, match="flat layout"):
        open_queue(str(tmp_path / "old"))
    with pytest.raises(QueueError, match="does not exist"):
        open_queue(str(tmp_path / "none"), create=False)


def test_enqueue_and_status_on_a_new_queue(tmp_path):
    queue = str(tmp_path / "q")
    assert enqueue(queue, [WriteTask(str(tmp_path / "a"), "x")] * 3) == 3
    status = queue_status(queue)
    assert (status.inserted, status.enqueued, status.leased, status.completed, status.failed, status.retrying) == (3, 3, 0, 0, 0, 0)
    assert not list((tmp_path / "q" / "tmp").iterdir())


def test_queue_create_sets_the_shard_count_once(tmp_path, capsys):
    from exaconnect.cli.queue import main

    assert main(["create", str(tmp_path / "q"), "--shards", "4"]) == 0
    assert main(["create", str(tmp_path / "q"), "--shards", "16"]) == 0  # exists: unchanged
    assert FileQueue(tmp_path / "q").shards == 4
    assert main(["create", str(tmp_path / "r"), "--shards", "0"]) == 2
    assert "already exists" in capsys.readouterr().out
