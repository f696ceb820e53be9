"""Contract: the storage operations added for the queue and the outbox relay, both drivers."""

from __future__ import annotations

from asyncstore.storage import (
    AsyncStorageBackend,
    Claim,
    Failure,
    NewOutboxMessage,
    NewTask,
    OutboxStatus,
    TaskStatus,
)


async def test_dead_letter_tasks_ends_a_task_whatever_attempts_are_left(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_tasks([NewTask("q", 1, max_attempts=5), NewTask("q", 2)])
    a, b = await storage.claim_tasks("q", "w", limit=2, lease_s=30)
    stale = Failure(b.id, b.claim.token + 1000, "stale")
    moved = await storage.dead_letter_tasks([Failure(a.id, a.claim.token, "cancelled"), stale])
    assert moved == [a.id]
    row = await storage.get_task(a.id)
    assert row is not None and row.status is TaskStatus.DEAD and row.last_error == "cancelled"
    assert row.attempts == 1
    other = await storage.get_task(b.id)
    assert other is not None and other.status is TaskStatus.RUNNING
    # Not running any more: a second call changes nothing.
    assert await storage.dead_letter_tasks([Failure(a.id, a.claim.token, "again")]) == []
    assert await storage.dead_letter_tasks([]) == []


async def test_release_outbox_gives_messages_back_without_counting_the_attempt(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("tg", "acct", i) for i in range(2)])
    first, second = await storage.claim_outbox("r", limit=2, lease_s=30)
    assert await storage.release_outbox([second.claim, Claim(first.id, 999_999)]) == [second.id]
    row = await storage.get_outbox(second.id)
    assert row is not None and row.status is OutboxStatus.PENDING and row.attempts == 0
    # The released message waits behind the earlier one of its group, still in flight.
    assert await storage.claim_outbox("r2", limit=5, lease_s=30) == []
    assert await storage.mark_outbox_sent([first.claim]) == [first.id]
    again = await storage.claim_outbox("r2", limit=5, lease_s=30)
    assert [m.id for m in again] == [second.id] and again[0].attempts == 1


async def test_dead_letter_outbox_ends_a_message_now(storage: AsyncStorageBackend) -> None:
    (msg,) = await storage.enqueue_outbox([NewOutboxMessage("tg", "acct", "x", max_attempts=9)])
    (claimed,) = await storage.claim_outbox("r", limit=1, lease_s=30)
    failure = Failure(claimed.id, claimed.claim.token, "400 bad request")
    assert await storage.dead_letter_outbox([failure]) == [msg.id]
    row = await storage.get_outbox(msg.id)
    assert row is not None and row.status is OutboxStatus.DEAD
    assert row.last_error == "400 bad request"
    assert await storage.dead_letter_outbox([failure]) == []
    assert await storage.redrive_outbox([msg.id]) == [msg.id]
    assert [m.id for m in await storage.claim_outbox("r", limit=1, lease_s=30)] == [msg.id]
