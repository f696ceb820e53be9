"""Contract: what idle queue workers and the metrics read about unfinished rows, both drivers.

``next_task_due_s`` (when the next task of a queue becomes claimable, leases included),
``backlog_depths`` (depth and oldest wait of each queue and of the outbox) and the
``lease expired`` mark a re-claimed task carries.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncstore.orchestrator.backlog import open_backlog_monitor
from asyncstore.orchestrator.metrics import Metrics
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import (
    LEASE_EXPIRED,
    AsyncStorageBackend,
    InvalidInput,
    NewOutboxMessage,
    NewTask,
    QueueDepth,
    Task,
    TaskStatus,
)


async def _expire(storage: AsyncStorageBackend, queue: str) -> None:
    """Wait until the leases of ``queue`` have run out by the database's clock."""
    with anyio.fail_after(10):
        for _ in range(100):
            due = await storage.next_task_due_s(queue)
            if due is None or due == 0:
                return
            await anyio.sleep(due)  # a lease is a span of time: only time ends it
        raise AssertionError(f"leases of {queue} did not run out")


async def test_next_task_due_covers_due_delayed_and_leased_tasks(
    storage: AsyncStorageBackend,
) -> None:
    assert await storage.next_task_due_s("q") is None
    later = datetime.now(UTC) + timedelta(seconds=100)
    await storage.enqueue_tasks([NewTask("q", 1, run_after=later)])
    due = await storage.next_task_due_s("q")
    assert due is not None and 90 < due <= 100
    await storage.enqueue_tasks([NewTask("q", 2)])
    assert await storage.next_task_due_s("q") == 0.0
    # Claimed under a 50 s lease: the queue's next event is that lease running out.
    (claimed,) = await storage.claim_tasks("q", "w", limit=5, lease_s=50)
    assert claimed.payload == 2
    due = await storage.next_task_due_s("q")
    assert due is not None and 40 < due <= 50
    assert await storage.complete_tasks([claimed.claim]) == [claimed.id]
    due = await storage.next_task_due_s("q")
    assert due is not None and 90 < due <= 100
    assert await storage.next_task_due_s("other") is None
    with pytest.raises(InvalidInput):
        await storage.next_task_due_s("")


async def test_reclaimed_task_is_marked_lease_expired(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_tasks([NewTask("q", 1, max_attempts=2)])
    (first,) = await storage.claim_tasks("q", "dead-worker", limit=1, lease_s=0.05)
    assert first.last_error is None and first.attempts == 1
    await _expire(storage, "q")
    (again,) = await storage.claim_tasks("q", "rescuer", limit=1, lease_s=0.05)
    assert again.id == first.id and again.attempts == 2 and again.last_error == LEASE_EXPIRED
    await _expire(storage, "q")
    # No attempts left: dead-lettered by the claim, not returned.
    assert await storage.claim_tasks("q", "rescuer", limit=1, lease_s=30) == []
    row = await storage.get_task(first.id)
    assert row is not None and row.status is TaskStatus.DEAD
    assert row.last_error == "lease expired on the last attempt"


async def test_backlog_depths_count_waiting_delayed_and_in_flight(
    storage: AsyncStorageBackend,
) -> None:
    tasks, outbox = await storage.backlog_depths()
    assert tasks == [] and outbox == QueueDepth("outbox", 0, 0, 0, 0.0)
    now = datetime.now(UTC)
    await storage.enqueue_tasks(
        [
            NewTask("b", 1, run_after=now - timedelta(seconds=60)),  # due for a minute
            NewTask("b", 2),
            NewTask("b", 3, run_after=now + timedelta(seconds=60)),
            NewTask("a", 4),
            NewTask("a", 5),
        ]
    )
    (leased,) = await storage.claim_tasks("a", "w", limit=1, lease_s=30)
    await storage.enqueue_tasks([NewTask("lost", 6)])
    await storage.claim_tasks("lost", "dead-worker", limit=1, lease_s=0.05)
    await _expire(storage, "lost")
    done = await storage.enqueue_tasks([NewTask("done", 7)])
    (claim,) = await storage.claim_tasks("done", "w", limit=1, lease_s=30)
    await storage.complete_tasks([claim.claim])
    await storage.enqueue_outbox([NewOutboxMessage("ch", "acct", i) for i in range(3)])

    tasks, outbox = await storage.backlog_depths()
    by_name = {d.name: d for d in tasks}
    assert [d.name for d in tasks] == ["a", "b", "lost"]  # sorted; finished queues absent
    a, b, lost = by_name["a"], by_name["b"], by_name["lost"]
    assert (a.waiting, a.delayed, a.in_flight) == (1, 0, 1)
    assert (b.waiting, b.delayed, b.in_flight) == (2, 1, 0)
    assert 59 < b.oldest_wait_s < 120
    assert 0 <= a.oldest_wait_s < 30
    # A dead worker's task whose lease ran out waits to be re-run.
    assert (lost.waiting, lost.delayed, lost.in_flight) == (1, 0, 0)
    assert lost.oldest_wait_s > 0
    assert (outbox.name, outbox.waiting, outbox.delayed, outbox.in_flight) == ("outbox", 3, 0, 0)
    assert outbox.oldest_wait_s >= 0
    assert leased.status is TaskStatus.RUNNING and done[0].queue == "done"


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_export_depths_oldest_wait_and_reruns(storage: AsyncStorageBackend) -> None:
    metrics = Metrics()
    queue = AgentQueue(storage, "m", QueueConfig(lease_s=5.0, fallback_poll_s=30.0))
    await queue.enqueue_many([1, 2])
    await storage.enqueue_outbox([NewOutboxMessage("ch", "acct", 1)])
    async with open_backlog_monitor(storage, interval_s=30) as monitor:
        metrics.add_source("backlog", monitor)
        got = _samples(metrics)
    key = (("queue", "m"), ("source", "backlog"))
    assert got[("asyncstore_queue_depth", (*key, ("state", "waiting")))] == 2
    assert got[("asyncstore_queue_depth", (*key, ("state", "in_flight")))] == 0
    assert got[("asyncstore_queue_oldest_wait_seconds", key)] >= 0
    outbox = (("source", "backlog"), ("state", "waiting"))
    assert got[("asyncstore_outbox_depth", outbox)] == 1
    assert got[("asyncstore_backlog_read_age_seconds", (("source", "backlog"),))] >= 0

    # A dead worker's task, re-run by a live one: counted on the worker's re-run counter.
    (orphan,) = await storage.claim_tasks("m", "dead-worker", limit=1, lease_s=0.05)
    await _expire(storage, "m")
    ran = anyio.Event()
    runs: list[int] = []

    async def handler(task: Task) -> None:
        runs.append(task.payload)
        if len(runs) == 2:
            ran.set()

    async with open_worker(queue, handler) as worker:
        metrics.add_source("queue", worker)
        with anyio.fail_after(10):
            await ran.wait()
        assert _samples(metrics)[("asyncstore_queue_reruns_total", (("source", "queue"),))] == 1
    assert sorted(runs) == [1, 2] and orphan.payload in runs
