"""A heartbeat that hangs (a stalled pool) or keeps failing: the handler is cancelled before
its lease can run out, so another worker that re-claims the task never runs it twice live.

The database is real; only the heartbeat call is wrapped to hang, standing in for a stall."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio

from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import AsyncStorageBackend, Claim, Task
from tests.waiting import wait_for


class StalledHeartbeats:
    def __init__(self, inner: AsyncStorageBackend) -> None:
        self.inner = inner
        self.hang = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def heartbeat_jobs(self, kind: Any, claims: Sequence[Claim], lease_s: float) -> list[int]:
        if self.hang:
            await anyio.sleep(3600)
        return await self.inner.heartbeat_jobs(kind, claims, lease_s)


async def test_a_hanging_heartbeat_cancels_the_handler_before_the_lease_ends(
    storage: AsyncStorageBackend,
) -> None:
    stalled = StalledHeartbeats(storage)
    config = QueueConfig(max_workers=1, lease_s=0.9, heartbeat_interval_s=0.3)
    queue = AgentQueue(stalled, "hb", config)  # type: ignore[arg-type]
    started = anyio.Event()
    stopped_after: list[float] = []

    async def handler(task: Task) -> None:
        begun = time.monotonic()
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            stopped_after.append(time.monotonic() - begun)

    await queue.enqueue({"job": 1})
    async with open_worker(queue, handler) as worker:
        with anyio.fail_after(5):
            await started.wait()
        stalled.hang = True
        await wait_for(lambda: bool(stopped_after), what="the handler's own finally")
        stats = worker.statistics()
        stalled.hang = False
    assert stats.lease_lost == 1
    assert stopped_after[0] < 0.9 + 0.5  # before the lease could be re-claimed (generous)
