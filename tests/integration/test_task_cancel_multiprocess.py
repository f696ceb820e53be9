"""cancel_task across OS processes on one Postgres database: notification, and a killed worker.

The worker runs in an agent process (``benchmarks.cancel_bench``'s, the one the latency
benchmark drives) whose handler blocks until cancelled; it reports on a channel when a
handler started and when it observed its cancellation, and writes every handler start to
a file before anything else (a SIGKILL loses no record).
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import Task, TaskStatus, open_storage
from asyncstore.storage.task_cancel import TaskCancelOutcome
from benchmarks.cancel_bench import (
    QUEUE,
    AgentProcess,
    cancel_session_once,
    cancel_task_once,
    reports,
)
from tests.conftest import truncate
from tests.waiting import wait_for

# The agent renews leases every 20 s: within this bound only the notification can stop it.
NOTIFY_BOUND_S = 10.0


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


async def test_a_running_task_is_cancelled_in_another_process_by_notification(
    dsn: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    agent = AgentProcess(dsn, tmp_path / "runs", lease_s=60.0)
    try:
        async with open_storage(dsn) as storage, reports(storage) as seen:
            queue = AgentQueue(storage, QUEUE)
            task_s = [(await cancel_task_once(queue, seen))[0] for _ in range(5)]
            session_s = [(await cancel_session_once(storage, seen, n))[0] for n in range(5)]
            record_property("task_cancel_s", task_s)
            record_property("session_cancel_s", session_s)
            assert max(task_s) < NOTIFY_BOUND_S
            rows = [await storage.get_task(i) for i in agent.started()]
        stats = agent.stop()
    finally:
        agent.kill()
    assert [r.status for r in rows if r is not None] == [TaskStatus.CANCELLED] * 5
    assert stats["cancelled"] == 5 and stats["cancel_notifications"] == 5
    assert stats["lease_lost"] == 0 and stats["succeeded"] == 0 and stats["retried"] == 0
    assert len(agent.started()) == 5  # none re-run


async def test_a_worker_killed_while_a_cancel_is_in_flight_never_reruns_the_task(
    dsn: str, tmp_path: Path
) -> None:
    """The worker is stopped (SIGSTOP) with its handler running, the task is cancelled (the
    notification waits in the stopped process's socket), then the worker is SIGKILLed. Its
    lease runs out; a healthy worker then claims the queue, but the cancelled task must
    not run again: a sentinel task due after the dead lease's expiry runs, the cancelled
    one does not."""
    lease_s = 1.0
    victim = AgentProcess(dsn, tmp_path / "victim", lease_s=lease_s)
    try:
        async with open_storage(dsn) as storage, reports(storage) as seen:
            queue = AgentQueue(storage, QUEUE, QueueConfig(lease_s=lease_s, fallback_poll_s=30))
            task = await queue.enqueue("block")
            await seen.wait(f"started:task:{task.id}")
            os.kill(victim.popen.pid, signal.SIGSTOP)
            answer = await queue.cancel(task.id)
            assert answer.outcome is TaskCancelOutcome.CANCELLED and answer.was_running
            assert answer.worker_id == victim.worker_id
            victim.kill()  # SIGKILL, still stopped: it never saw the notification
            row = await storage.get_task(task.id)
            assert row is not None and row.status is TaskStatus.CANCELLED
            expiry = row.run_after  # the dead lease's expiry (the cancel keeps it)

            ran: list[int] = []

            async def handler(claimed: Task) -> None:
                ran.append(claimed.id)

            sentinel = await queue.enqueue("sentinel", run_after=expiry + timedelta(seconds=0.5))
            async with open_worker(queue, handler) as healthy:
                await wait_for(lambda: sentinel.id in ran, 60, what="the sentinel ran")
                stats = healthy.statistics()
            row = await storage.get_task(task.id)
    finally:
        victim.kill()
    assert ran == [sentinel.id]  # the cancelled task, due earlier, was not claimed
    assert stats.reruns == 0
    assert row is not None and row.status is TaskStatus.CANCELLED and row.attempts == 1
    assert victim.started() == [task.id]
