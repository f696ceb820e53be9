"""Contract: the one leased-job engine (``*_jobs`` with a ``JobKind``), both drivers.

Agent tasks and outbox messages are two kinds of one engine: the same calls, validated
once, the lease-bound SQL written once per dialect. What only the engine gives: the
enqueue and its wakeup notification in one round trip, a heartbeat for outbox claims and a
redrive for dead tasks. The per-kind names (``claim_tasks``, ``mark_outbox_sent``, ...) are
aliases, covered by the older contract tests.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    InvalidInput,
    NewOutboxMessage,
    NewTask,
    OutboxStatus,
    TaskStatus,
)
from asyncstore.storage.base import JOB_KINDS, OUTBOX, TASKS, JobKind, render_job_queries
from asyncstore.storage.postgres import PostgresBackend


def _operations(storage: AsyncStorageBackend) -> dict[str, int]:
    """Timed storage calls per operation: each is one round trip to the database."""
    return {name: sum(c) for name, (c, _) in storage.statistics().durations.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def test_enqueue_and_its_notification_are_one_call(storage: AsyncStorageBackend) -> None:
    channel = f"jobs.{secrets.token_hex(4)}"
    later = datetime.now(UTC) + timedelta(hours=1)
    async with storage.listen(channel) as stream:
        before = _operations(storage)
        rows = await storage.enqueue_jobs(
            TASKS, [NewTask("q1", 1, run_after=later), NewTask("q1", 2)], notify=channel
        )
        assert _delta(before, _operations(storage)) == {"enqueue_jobs": 1}
        with anyio.fail_after(10):
            note = await stream.receive()
        # The earliest run_after of the queued rows, as Unix seconds.
        assert float(note.payload) == pytest.approx(min(r.run_after for r in rows).timestamp())
        assert float(note.payload) < later.timestamp()

        msgs = await storage.enqueue_jobs(OUTBOX, [NewOutboxMessage("tg", "a", 1)], notify=channel)
        with anyio.fail_after(10):
            note = await stream.receive()
        assert float(note.payload) == pytest.approx(msgs[0].run_after.timestamp())


async def test_no_notification_when_no_row_is_waiting(storage: AsyncStorageBackend) -> None:
    channel = f"jobs.{secrets.token_hex(4)}"
    (task,) = await storage.enqueue_jobs(TASKS, [NewTask("q2", 1, idempotency_key="k")])
    (claimed,) = await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30, queues=["q2"])
    async with storage.listen(channel) as stream:
        # The key matches the running task: that task comes back, nothing new is waiting.
        (again,) = await storage.enqueue_jobs(
            TASKS, [NewTask("q2", 1, idempotency_key="k")], notify=channel
        )
        assert again.id == task.id and again.status is TaskStatus.RUNNING
        await storage.notify(channel, "marker")
        with anyio.fail_after(10):
            note = await stream.receive()
        assert note.payload == "marker"
    assert claimed.id == task.id


async def test_without_notify_the_enqueue_sends_nothing(storage: AsyncStorageBackend) -> None:
    channel = f"jobs.{secrets.token_hex(4)}"
    async with storage.listen(channel) as stream:
        await storage.enqueue_jobs(TASKS, [NewTask("q3", 1)])
        await storage.enqueue_jobs(OUTBOX, [NewOutboxMessage("tg", "b", 1)])
        await storage.notify(channel, "marker")
        with anyio.fail_after(10):
            note = await stream.receive()
        assert note.payload == "marker"


async def test_outbox_claims_can_be_renewed(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_jobs(OUTBOX, [NewOutboxMessage("tg", "hb", 1)])
    (msg,) = await storage.claim_jobs(OUTBOX, "r", limit=1, lease_s=1)
    assert await storage.heartbeat_jobs(OUTBOX, [msg.claim], 3600) == [msg.id]
    row = await storage.get_job(OUTBOX, msg.id)
    assert row is not None and row.status is OutboxStatus.SENDING
    assert row.run_after > msg.run_after + timedelta(seconds=600)
    stale = msg.claim._replace(token=msg.claim.token + 1000)
    assert await storage.heartbeat_jobs(OUTBOX, [stale], 3600) == []


async def test_dead_tasks_can_be_redriven(storage: AsyncStorageBackend) -> None:
    (task,) = await storage.enqueue_jobs(TASKS, [NewTask("q4", 1, max_attempts=1)])
    (claimed,) = await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30, queues=["q4"])
    statuses = await storage.fail_jobs(TASKS, [Failure(claimed.id, claimed.claim.token, "boom")])
    assert statuses == {task.id: TaskStatus.DEAD}
    assert await storage.redrive_jobs(TASKS, [task.id, task.id + 10_000]) == [task.id]
    row = await storage.get_job(TASKS, task.id)
    assert row is not None and row.status is TaskStatus.QUEUED and row.attempts == 0
    (again,) = await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30, queues=["q4"])
    assert again.id == task.id and again.attempts == 1
    assert await storage.redrive_jobs(TASKS, [task.id]) == []  # running, not dead


async def test_kinds_and_queue_filters_are_checked_before_anything_runs(
    storage: AsyncStorageBackend,
) -> None:
    forged: JobKind[Any, Any, Any] = JobKind(
        "evil",
        "chat_messages; DROP TABLE outbox",
        "x",
        "a",
        "b",
        "c",
        grouped=False,
        queue_label="queue",
        record=dict,
        status=TaskStatus,
        prepare=list,
    )
    with pytest.raises(InvalidInput, match="job kinds"):
        await storage.claim_jobs(forged, "w", limit=1, lease_s=30, queues=["q"])
    with pytest.raises(InvalidInput, match="job kinds"):
        await storage.enqueue_jobs("task", [NewTask("q", 1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="exactly one queue"):
        await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30)
    with pytest.raises(InvalidInput, match="exactly one queue"):
        await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30, queues=["a", "b"])
    with pytest.raises(InvalidInput, match="must be a sequence"):
        await storage.claim_jobs(OUTBOX, "w", limit=1, lease_s=30, queues="tg")
    with pytest.raises(InvalidInput, match="channel"):
        await storage.enqueue_jobs(TASKS, [NewTask("q5", 1)], notify="bad channel!")
    # Nothing was written by the refused enqueue.
    assert await storage.claim_jobs(TASKS, "w", limit=5, lease_s=30, queues=["q5"]) == []


def test_templates_fill_only_the_kinds_fields() -> None:
    assert TASKS.render("UPDATE {jobs} SET status = '{done}'") == (
        "UPDATE agent_tasks SET status = 'succeeded'"
    )
    with pytest.raises(ValueError, match="unknown field"):
        OUTBOX.render("SELECT {table}")
    rendered = render_job_queries({"get_jobs": "SELECT * FROM {jobs}", "get_outbox": "own"})
    assert rendered == {"get_tasks": "SELECT * FROM agent_tasks", "get_outbox": "own"}
    assert [k.name for k in JOB_KINDS] == ["task", "outbox"]


def test_a_dialect_cannot_override_the_per_kind_aliases() -> None:
    with pytest.raises(TypeError, match="claim_tasks"):

        class Bypass(PostgresBackend):
            async def claim_tasks(self, *args: Any, **kwargs: Any) -> Any:
                return []
