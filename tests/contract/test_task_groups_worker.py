"""Workers on coordinated queues, on both drivers: groups run in order, limits hold.

``open_worker`` declares the limits a ``QueueConfig`` sets (``max_running``,
``max_per_second``, ``max_per_group``) or finds the queue's row (a grouped task was
enqueued); its claims then go through ``claim_limited_tasks``, a refused claim waits for a
finish notification or the computed time, and finished tasks wake refused claimers.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import AsyncStorageBackend, QueueLimits, Task
from asyncstore.storage.errors import UsageError
from tests.waiting import wait_for

FAST = {"lease_s": 10.0, "fallback_poll_s": 60.0, "shutdown_grace_s": 1.0}


async def test_a_worker_runs_each_group_in_order_one_at_a_time(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "gq", QueueConfig(max_workers=8, **FAST))
    for g in "abc":
        await queue.enqueue_many([f"{g}{i}" for i in range(5)], group=g)
    order: dict[str, list[str]] = {g: [] for g in "abc"}
    running: dict[str, int] = dict.fromkeys("abc", 0)
    peak = 0
    done = anyio.Event()

    async def handler(task: Task) -> None:
        nonlocal peak
        g = str(task.payload)[0]
        running[g] += 1
        peak = max(peak, running[g])
        order[g].append(str(task.payload))
        await anyio.lowlevel.checkpoint()
        running[g] -= 1
        if sum(len(v) for v in order.values()) == 15:
            done.set()

    async with open_worker(queue, handler) as worker:
        with anyio.fail_after(60):
            await done.wait()
        assert worker.statistics().coordinated
    assert peak == 1
    assert order == {g: [f"{g}{i}" for i in range(5)] for g in "abc"}


async def test_a_declared_running_cap_holds_within_one_worker_and_wakes_on_finish(
    storage: AsyncStorageBackend,
) -> None:
    cfg = QueueConfig(max_workers=8, max_running=2, **FAST)
    queue = AgentQueue(storage, "capped", cfg)
    await queue.enqueue_many(list(range(12)))
    running = 0
    peak = 0
    finished = 0
    release = anyio.Event()

    async def handler(task: Task) -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        finished += 1

    async with open_worker(queue, handler) as worker:
        await wait_for(lambda: running == 2, what="two tasks running")
        await wait_for(lambda: worker.statistics().held_back >= 1, what="a refused claim")
        release.set()
        # The fallback poll is 60 s away: only the finish wakeups can drain the queue.
        await wait_for(lambda: finished == 12, what="all twelve finished")
    assert peak == 2
    assert await storage.get_queue_limits("capped") == QueueLimits("capped", 2, None, 1)


async def test_the_legacy_poll_spawn_mode_refuses_a_coordinated_queue(
    storage: AsyncStorageBackend,
) -> None:
    cfg = QueueConfig(mode="poll_spawn", max_running=2)
    queue = AgentQueue(storage, "legacy", cfg)

    async def handler(task: Task) -> None:
        pass

    with pytest.raises(UsageError):
        async with open_worker(queue, handler):
            pass


async def test_a_worker_without_a_declaration_follows_the_queues_row(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("declared", max_running=1)
    queue = AgentQueue(storage, "declared", QueueConfig(max_workers=4, **FAST))
    await queue.enqueue_many([1, 2, 3])
    running = 0
    peak = 0
    finished = 0

    async def handler(task: Task) -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        await anyio.lowlevel.checkpoint()
        running -= 1
        finished += 1

    async with open_worker(queue, handler) as worker:
        await wait_for(lambda: finished == 3, what="three finished")
        assert worker.statistics().coordinated
    assert peak == 1
