"""The agent-queue worker's timing reads the ``Clock`` it is given (issue 18).

``open_worker(..., clock=...)``: the lease renewal, the idle worker's fallback poll and the
shutdown grace run on that clock, so a ``ManualClock`` makes each of them happen when the
test moves time past it, never after wall seconds. A runtime built with a clock gives it
to its worker. Real storage; nothing here waits on wall time (``fail_after`` is a hang
guard only).
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, Worker, open_worker
from asyncstore.orchestrator.runtime import open_runtime
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import AsyncStorageBackend, NewTask, Task, TaskStatus

# Long in wall terms: on the system clock none of these would come within ``BOUND_S``.
HEARTBEAT_S = 600.0
LEASE_S = 1800.0
POLL_S = 600.0  # the fallback poll comes after 300 to 900 s of the worker's clock
BOUND_S = 30.0  # a hang guard for a loaded machine, not a timing


class _Holding:
    """A handler that holds its task until cancelled, and says when it started and ended."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.started = anyio.Event()
        self.ended = anyio.Event()

    async def __call__(self, task: Task) -> None:
        self.tasks.append(task)
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.ended.set()


async def _renewal_finds_the_lease_gone(
    storage: AsyncStorageBackend, clock: ManualClock, worker: Worker, handler: _Holding
) -> None:
    """With the handler running, finish its task behind the worker's back: only the next
    lease renewal (``HEARTBEAT_S`` of ``clock`` after the worker started) notices."""
    await handler.started.wait()  # the heartbeat, started with the worker, sleeps by now
    (task,) = handler.tasks
    assert await storage.complete_tasks([task.claim]) == [task.id]
    clock.advance(HEARTBEAT_S - 0.01)
    await anyio.lowlevel.checkpoint()
    assert not handler.ended.is_set() and worker.statistics().lease_lost == 0
    clock.advance(0.01)  # the renewal is due: it finds the task finished by someone else
    await handler.ended.wait()


async def test_the_workers_lease_renewal_runs_on_its_clock(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    config = QueueConfig(max_workers=1, lease_s=LEASE_S, heartbeat_interval_s=HEARTBEAT_S)
    queue = AgentQueue(storage, "renew", config)
    handler = _Holding()
    await queue.enqueue({"job": 1})
    with anyio.fail_after(BOUND_S):
        async with open_worker(queue, handler, clock=clock) as worker:
            await _renewal_finds_the_lease_gone(storage, clock, worker, handler)
            stats = worker.statistics()
    assert stats.lease_lost == 1 and stats.succeeded == 0


async def test_an_idle_worker_polls_when_its_clock_says_so(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    config = QueueConfig(fallback_poll_s=POLL_S, expiry_wakeup=False)
    queue = AgentQueue(storage, "idle", config)
    ran: list[Any] = []
    done = anyio.Event()

    async def handler(task: Task) -> None:
        ran.append(task.payload)
        done.set()

    with anyio.fail_after(BOUND_S):
        async with open_worker(queue, handler, clock=clock) as worker:
            await clock.wait_sleepers(2)  # found nothing: idle, and the heartbeat
            # A task nobody announces (no notification): only the fallback poll finds it.
            await storage.enqueue_tasks([NewTask("idle", 7)])
            clock.advance(0.5 * POLL_S - 0.01)  # short of the earliest poll
            await anyio.lowlevel.checkpoint()
            assert worker.statistics().fallback_polls == 0 and not ran
            clock.advance(POLL_S)  # past the latest poll
            await done.wait()
            await worker.flush()
            stats = worker.statistics()
    assert ran == [7]
    assert stats.fallback_polls == 1 and stats.succeeded == 1 and stats.notifications == 0


async def test_the_shutdown_grace_runs_on_the_workers_clock(storage: AsyncStorageBackend) -> None:
    """An hour of grace is one ``advance``; then the handler is cancelled and its task
    released. (The lease is long, so no renewal falls due within that hour.)"""
    clock = ManualClock()
    config = QueueConfig(max_workers=1, lease_s=100_000.0, shutdown_grace_s=3600.0)
    queue = AgentQueue(storage, "grace", config)
    handler = _Holding()
    sleepers_before_leaving: list[int] = []

    async def end_the_grace() -> None:
        await clock.wait_sleepers(sleepers_before_leaving[0] + 1)  # the grace's timer
        assert not handler.ended.is_set()  # leaving waits for the clock, not for time
        clock.advance(3599.0)
        await anyio.lowlevel.checkpoint()
        assert not handler.ended.is_set()
        clock.advance(1.0)

    task = await queue.enqueue({"job": 1})
    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            async with open_worker(queue, handler, clock=clock) as worker:
                await handler.started.wait()
                await clock.wait_sleepers(1)  # the heartbeat
                sleepers_before_leaving.append(clock.sleepers)
                tg.start_soon(end_the_grace)
            stats = worker.statistics()
    assert handler.ended.is_set()
    assert stats.released == 1 and stats.cancelled == 0
    stored = await queue.get(task.id)
    assert stored is not None and stored.status is TaskStatus.QUEUED  # released, not dead


async def test_a_runtime_gives_its_clock_to_its_worker(storage_url: str) -> None:
    clock = ManualClock()
    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        queue={"max_workers": 1, "lease_s": LEASE_S, "heartbeat_interval_s": HEARTBEAT_S},
    )
    handler = _Holding()
    with anyio.fail_after(BOUND_S):
        async with open_runtime(settings, clock=clock, queue_handler=handler) as rt:
            assert rt.worker is not None
            # An ordinary enqueue: its notification's due time (the database's now) is
            # read as due now, though the clock's wall time is years behind the database's.
            await rt.queue.enqueue({"job": 1})
            await _renewal_finds_the_lease_gone(rt.storage, clock, rt.worker, handler)
            assert rt.worker.statistics().lease_lost == 1
