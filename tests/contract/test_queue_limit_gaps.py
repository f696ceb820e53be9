"""Coordinated queues, the gaps closed by issue 19's follow-up, on both drivers.

- A cancel (``cancel_task``) frees a running slot like a finish does, so it sends the same
  finish wakeup: a worker refused by a limit starts the next task at once, not at its
  computed retry time (a lease away).
- ``claim_tasks`` / ``claim_jobs(TASKS, ...)`` never bypass a queue's limits or groups:
  on a coordinated queue they raise ``QueueCoordinated`` (the plain claim takes nothing).
- A worker started on a queue without limits learns at its next claim that limits were
  declared (or a grouped task enqueued) and claims through ``claim_limited_tasks`` from
  then on.
"""

from __future__ import annotations

import anyio
import pytest

from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, RetryTask, open_worker
from asyncstore.storage import AsyncStorageBackend, NewTask, QueueCoordinated, Task
from asyncstore.storage.base import TASKS
from asyncstore.storage.errors import UsageError
from tests.waiting import wait_for

# A lease and a fallback poll far beyond the bounds below: only a wakeup can be on time.
SLOW = {"lease_s": 120.0, "fallback_poll_s": 600.0, "shutdown_grace_s": 1.0}
BOUND_S = 30.0  # a hang guard on a loaded machine, well under the 120 s lease


class Blocking:
    """A handler that marks each payload started, then blocks (or retries in 600 s once)."""

    def __init__(self, *payloads: str, retry: str = "") -> None:
        self.started = {p: anyio.Event() for p in payloads}
        self.retry = retry

    async def __call__(self, task: Task) -> None:
        payload = str(task.payload)
        if payload == self.retry and task.attempts == 1:
            raise RetryTask("later", delay_s=600)
        self.started[payload].set()
        await anyio.sleep_forever()

    async def wait(self, payload: str) -> None:
        with anyio.fail_after(BOUND_S):
            await self.started[payload].wait()


async def test_a_cancel_wakes_a_worker_refused_by_the_running_cap(
    storage: AsyncStorageBackend,
) -> None:
    cfg = QueueConfig(max_workers=2, max_running=1, **SLOW)
    queue = AgentQueue(storage, "capcancel", cfg)
    first, second = await queue.enqueue_many(["first", "second"])
    handler = Blocking("first", "second")
    async with open_worker(queue, handler) as worker:
        await handler.wait("first")
        await wait_for(lambda: worker.statistics().held_back >= 1, what="a refused claim")
        answer = await storage.cancel_task(first.id, "operator")
        assert answer.was_running
        # Refused with the next retry a lease (120 s) away: only the cancel's wakeup is on time.
        await handler.wait("second")
        assert (await storage.get_task(second.id)).status == "running"  # type: ignore[union-attr]
        worker.stop()


async def test_cancelling_a_queued_retry_lets_its_group_go_on_at_once(
    storage: AsyncStorageBackend,
) -> None:
    """A task waiting 600 s for its retry holds its group back; cancelled (queued), the
    group's next task starts at once: the cancel sent the wakeup."""
    queue = AgentQueue(storage, "gcancel", QueueConfig(max_workers=4, **SLOW))
    head, _ = await queue.enqueue_many(["head", "next"], group="g")
    handler = Blocking("head", "next", retry="head")
    async with open_worker(queue, handler) as worker:
        await wait_for(lambda: worker.statistics().retried == 1, what="the head's retry")
        # The first claim was refused for "next" (its group's head in flight); the claim
        # that the retry's finish wakeup triggers is refused too (the head waits 600 s).
        await wait_for(lambda: worker.statistics().held_back >= 2, what="a refused claim")
        answer = await storage.cancel_task(head.id)
        assert answer.status == "queued" and answer.outcome == "cancelled"
        await handler.wait("next")
        assert not handler.started["head"].is_set()
        worker.stop()


@pytest.mark.parametrize("how", ["limits", "group"])
async def test_the_plain_claim_refuses_a_coordinated_queue_and_takes_nothing(
    storage: AsyncStorageBackend, how: str
) -> None:
    await storage.enqueue_tasks([NewTask("q", "a"), NewTask("q", "b")])
    assert [t.payload for t in await storage.claim_tasks("q", "w", limit=1, lease_s=30)] == ["a"]
    if how == "limits":
        await storage.set_queue_limits("q", max_running=1)
    else:
        await storage.enqueue_tasks([NewTask("q", "g0", group="g")])
    with pytest.raises(QueueCoordinated, match="claim_limited_tasks") as caught:
        await storage.claim_tasks("q", "w", limit=10, lease_s=30)
    assert caught.value.queue == "q"
    assert isinstance(caught.value, UsageError)
    with pytest.raises(QueueCoordinated):
        await storage.claim_jobs(TASKS, "w", limit=10, lease_s=30, queues=["q"])
    statuses = sorted((t.payload, t.status) for t in await storage.list_tasks("queued"))
    assert [p for p, _ in statuses] == (["b"] if how == "limits" else ["b", "g0"])
    claim = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    if how == "limits":  # "a" runs: the cap of 1 is full
        assert claim.tasks == [] and claim.refused
    else:
        assert sorted(str(t.payload) for t in claim.tasks) == ["b", "g0"]


async def test_an_empty_plain_claim_of_a_queue_without_limits_is_not_refused(
    storage: AsyncStorageBackend,
) -> None:
    assert await storage.claim_tasks("free", "w", limit=10, lease_s=30) == []
    await storage.set_queue_limits("other", max_running=1)  # another queue's row
    assert await storage.claim_tasks("free", "w", limit=10, lease_s=30) == []


async def test_a_running_worker_honours_limits_declared_after_it_started(
    storage: AsyncStorageBackend,
) -> None:
    """Started uncapped; ``set_queue_limits`` from another handle; its next claim refuses,
    it switches to the coordinated claim, and from then on at most the cap runs."""
    queue = AgentQueue(storage, "late", QueueConfig(max_workers=8, **SLOW))
    running: set[str] = set()
    peak_after = 0
    limited = False
    release = anyio.Event()
    finished = 0

    async def handler(task: Task) -> None:
        nonlocal peak_after, finished
        running.add(str(task.payload))
        if limited:
            peak_after = max(peak_after, len(running))
        await release.wait()
        running.discard(str(task.payload))
        finished += 1

    async with open_worker(queue, handler) as worker:
        assert not worker.statistics().coordinated
        await queue.enqueue_many([f"a{i}" for i in range(3)])
        await wait_for(lambda: len(running) == 3, what="three uncapped tasks running")
        await storage.set_queue_limits("late", max_running=2)
        limited = True
        await queue.enqueue_many([f"b{i}" for i in range(6)])  # the notice wakes the worker
        await wait_for(lambda: worker.statistics().coordinated, what="the switch")
        await wait_for(lambda: worker.statistics().held_back >= 1, what="a refused claim")
        assert len(running) == 3  # the three started before; no new start over the cap
        release.set()
        await wait_for(lambda: finished == 9, what="all nine finished")
    assert peak_after <= 2, peak_after


async def test_the_legacy_poll_spawn_mode_is_refused_on_a_grouped_queue_at_open(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "legacyg", QueueConfig(mode="poll_spawn"))
    await queue.enqueue("g0", group="g")
    with pytest.raises(UsageError, match="poll_spawn"):
        async with open_worker(queue, Blocking("g0")):
            pass


async def test_a_running_legacy_worker_takes_nothing_once_limits_are_declared(
    storage: AsyncStorageBackend,
) -> None:
    """The legacy loop cannot honour limits: it claims nothing (counted held back)."""
    cfg = QueueConfig(mode="poll_spawn", poll_interval_s=0.05, shutdown_grace_s=1.0)
    queue = AgentQueue(storage, "legacyl", cfg)
    async with open_worker(queue, Blocking("x")) as worker:
        await storage.set_queue_limits("legacyl", max_running=5)
        task = await queue.enqueue("x")
        await wait_for(lambda: worker.statistics().held_back >= 2, what="refused polls")
        assert (await storage.get_task(task.id)).status == "queued"  # type: ignore[union-attr]
        assert not worker.statistics().coordinated
        worker.stop()
