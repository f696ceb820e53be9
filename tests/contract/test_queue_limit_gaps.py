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

from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import AsyncStorageBackend, NewTask, Task
from asyncstore.storage.base import TASKS
from tests.waiting import wait_for

# A lease and a fallback poll far beyond the bounds below: only a wakeup can be on time.
SLOW = {"lease_s": 120.0, "fallback_poll_s": 600.0, "shutdown_grace_s": 1.0}
BOUND_S = 30.0  # a hang guard on a loaded machine, well under the 120 s lease


async def test_a_cancel_wakes_a_worker_refused_by_the_running_cap(
    storage: AsyncStorageBackend,
) -> None:
    cfg = QueueConfig(max_workers=2, max_running=1, **SLOW)
    queue = AgentQueue(storage, "capcancel", cfg)
    first, second = await queue.enqueue_many(["first", "second"])
    started: dict[str, anyio.Event] = {"first": anyio.Event(), "second": anyio.Event()}

    async def handler(task: Task) -> None:
        started[str(task.payload)].set()
        await anyio.sleep_forever()

    async with open_worker(queue, handler) as worker:
        with anyio.fail_after(BOUND_S):
            await started["first"].wait()
        await wait_for(lambda: worker.statistics().held_back >= 1, what="a refused claim")
        answer = await storage.cancel_task(first.id, "operator")
        assert answer.was_running
        # Refused with the next retry a lease (120 s) away: only the cancel's wakeup is on time.
        with anyio.fail_after(BOUND_S):
            await started["second"].wait()
        assert (await storage.get_task(second.id)).status == "running"  # type: ignore[union-attr]
        worker.stop()
