"""The storage reads and the audit log behind the operator dashboard (issue 19), on both
drivers: ``list_tasks`` / ``list_jobs`` by status, ``list_leases``, ``record_audit`` and
``list_audit`` (migration 0013), with bad input refused before anything is written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from asyncstore.storage import (
    OUTBOX,
    AsyncStorageBackend,
    InvalidInput,
    NewOutboxMessage,
    NewTask,
    TaskStatus,
)
from asyncstore.storage.base import Failure


async def _dead_task(storage: AsyncStorageBackend, queue: str, n: int) -> int:
    (task,) = await storage.enqueue_tasks([NewTask(queue, {"n": n}, max_attempts=1)])
    (claimed,) = await storage.claim_tasks(queue, "w", limit=1, lease_s=30)
    assert claimed.id == task.id
    await storage.dead_letter_tasks([Failure(claimed.id, claimed.claim.token, f"boom {n}")])
    return task.id


async def test_list_tasks_returns_one_status_newest_first_within_the_limit(
    storage: AsyncStorageBackend,
) -> None:
    dead = [await _dead_task(storage, "q", n) for n in range(3)]
    await storage.enqueue_tasks([NewTask("q", {"n": 10}), NewTask("q", {"n": 11})])
    running = await storage.claim_tasks("q", "worker-1", limit=1, lease_s=30)
    assert [t.id for t in await storage.list_tasks("dead")] == dead[::-1]
    assert [t.id for t in await storage.list_tasks(TaskStatus.DEAD, limit=2)] == dead[:0:-1]
    listed = await storage.list_tasks("running")
    assert [t.id for t in listed] == [running[0].id]
    assert listed[0].worker_id == "worker-1" and listed[0].status is TaskStatus.RUNNING
    assert [t.payload for t in await storage.list_tasks("queued")] == [{"n": 11}]
    assert (await storage.list_tasks("dead"))[0].last_error == "boom 2"


async def test_list_jobs_covers_the_outbox_kind(storage: AsyncStorageBackend) -> None:
    rows = await storage.enqueue_outbox([NewOutboxMessage("c", "a", {"i": i}) for i in range(2)])
    listed = await storage.list_jobs(OUTBOX, "pending")
    assert [m.id for m in listed] == [r.id for r in rows][::-1]


@pytest.mark.parametrize("status", ["sent", "pending", "", "DEAD", 3])
async def test_list_tasks_refuses_a_status_tasks_do_not_have(
    storage: AsyncStorageBackend, status: object
) -> None:
    with pytest.raises(InvalidInput, match=r"not a task status|must be"):
        await storage.list_tasks(status)  # type: ignore[arg-type]


async def test_list_tasks_refuses_a_bad_limit(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput, match="limit"):
        await storage.list_tasks("dead", limit=0)


async def test_list_leases_shows_live_leases_only(storage: AsyncStorageBackend) -> None:
    a = await storage.acquire_lease("s-a", "host-1", ttl_s=30)
    b = await storage.acquire_lease("s-b", "host-2", ttl_s=30)
    gone = await storage.acquire_lease("s-c", "host-3", ttl_s=30)
    assert a is not None and b is not None and gone is not None
    await storage.release_lease("s-c", gone.token)
    leases = await storage.list_leases()
    assert [(x.session_id, x.holder, x.token) for x in leases] == [
        ("s-a", "host-1", a.token),
        ("s-b", "host-2", b.token),
    ]
    assert [x.session_id for x in await storage.list_leases(limit=1)] == ["s-a"]


async def test_audit_entries_round_trip_newest_first(storage: AsyncStorageBackend) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    first = await storage.record_audit("ann@127.0.0.1", "task.redrive", "task:4", "done", "{}")
    second = await storage.record_audit("bob@::1", "webhook.resend", "webhook:m", "refused: x")
    assert second.id > first.id
    assert first.created_at >= before and first.created_at.tzinfo is not None
    listed = await storage.list_audit()
    assert listed == [second, first]
    assert (listed[1].actor, listed[1].action, listed[1].target) == (
        "ann@127.0.0.1",
        "task.redrive",
        "task:4",
    )
    assert listed[0].detail == "" and listed[1].detail == "{}"
    assert await storage.list_audit(limit=1) == [second]


async def test_audit_keeps_a_long_outcome_cut_and_refuses_bad_names(
    storage: AsyncStorageBackend,
) -> None:
    entry = await storage.record_audit("a", "b", "c", "refused: " + "x" * 5000)
    assert len(entry.outcome) == storage.AUDIT_TEXT_CHARS
    for bad in ({"actor": ""}, {"action": "a\x00b"}, {"target": 5}, {"outcome": "x\x00"}):
        args = {"actor": "a", "action": "b", "target": "c", "outcome": "done", **bad}
        with pytest.raises(InvalidInput):
            await storage.record_audit(**args)  # type: ignore[arg-type]
    assert len(await storage.list_audit()) == 1  # nothing partially written


async def test_list_queued_tasks_takes_each_queues_next_in_claim_order(
    storage: AsyncStorageBackend,
) -> None:
    # Per queue, bounded, in claim order (priority first), queued only: the running task and
    # another queue's tasks are left out, however many they are.
    a = await storage.enqueue_tasks([NewTask("a", {"n": n}) for n in range(4)])
    (urgent,) = await storage.enqueue_tasks([NewTask("a", {"n": "urgent"}, priority=5)])
    b = await storage.enqueue_tasks([NewTask("b", {"n": n}) for n in range(30)])
    (running,) = await storage.claim_tasks("a", "w", limit=1, lease_s=30)
    assert running.id == urgent.id
    listed = await storage.list_queued_tasks(["b", "a", "none", "b"], limit=3)
    assert [(t.queue, t.id) for t in listed] == [
        *[("b", t.id) for t in b[:3]],
        *[("a", t.id) for t in a[:3]],
    ]
    assert all(t.status is TaskStatus.QUEUED for t in listed)
    assert [t.id for t in await storage.list_queued_tasks(["a"], limit=10)] == [t.id for t in a]
    assert await storage.list_queued_tasks([], limit=3) == []


@pytest.mark.parametrize(
    ("queues", "limit"), [("a", 3), ([""], 3), (["a"], 0), ([5], 3), (["a"], 10**9)]
)
async def test_list_queued_tasks_refuses_bad_arguments(
    storage: AsyncStorageBackend, queues: object, limit: object
) -> None:
    with pytest.raises(InvalidInput):
        await storage.list_queued_tasks(queues, limit=limit)  # type: ignore[arg-type]


async def test_dead_outbox_messages_are_listed_and_redriven(storage: AsyncStorageBackend) -> None:
    # The dashboard's outbox redrive: list_jobs(OUTBOX, "dead") (index outbox_dead, 0014) and
    # redrive_outbox, which moves only dead messages and is idempotent.
    rows = await storage.enqueue_outbox(
        [NewOutboxMessage("c", f"a{i}", {"i": i}) for i in range(2)]
    )
    claimed = await storage.claim_outbox("w", limit=2, lease_s=30)
    await storage.dead_letter_outbox([Failure(m.id, m.claim.token, "gone") for m in claimed])
    dead = await storage.list_jobs(OUTBOX, "dead")
    assert [(m.id, m.last_error) for m in dead] == [(r.id, "gone") for r in rows][::-1]
    assert await storage.redrive_outbox([rows[0].id]) == [rows[0].id]
    assert await storage.redrive_outbox([rows[0].id]) == []
    assert [m.id for m in await storage.list_jobs(OUTBOX, "dead")] == [rows[1].id]
