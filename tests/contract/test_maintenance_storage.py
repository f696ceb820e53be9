"""Contract: the storage operations behind maintenance (batched purges, leadership)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    InvalidInput,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    open_storage,
)
from tests.conftest import direct_dsn
from tests.waiting import wait_for


def _events(session_id: str, first: int, last: int) -> list[NewStreamEvent]:
    return [NewStreamEvent(session_id, 1, s, "delta", {"i": s}) for s in range(first, last + 1)]


def _batch_statements(storage: AsyncStorageBackend) -> int:
    return storage.statistics().statements.get("purge_stream_events_batch", 0)


async def test_batch_purge_removes_only_expired_rows_in_bounded_batches(
    storage: AsyncStorageBackend,
) -> None:
    await storage.append_stream_events(_events("a", 1, 6) + _events("b", 1, 6))
    await storage.append_stream_events(_events("a", 7, 9) + _events("b", 7, 9))
    await anyio.sleep(1.2)  # database time: these rows age past the 1 s TTL below
    await storage.append_stream_events(_events("fresh", 1, 4))
    before = _batch_statements(storage)

    assert await storage.purge_stream_events_batch(3600, limit=10) == 0
    assert await storage.purge_stream_events_batch(1.0, limit=12) == 12
    left = await storage.load_stream_events("a") + await storage.load_stream_events("b")
    assert len(left) == 6
    assert await storage.purge_stream_events_batch(1.0, limit=4) == 4
    assert await storage.purge_stream_events_batch(1.0, limit=4) == 2
    assert await storage.purge_stream_events_batch(1.0, limit=4) == 0
    assert _batch_statements(storage) - before == 5
    assert await storage.load_stream_events("a") == []
    assert [e.seq for e in await storage.load_stream_events("fresh")] == [1, 2, 3, 4]


async def test_batch_purge_refuses_bad_arguments(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput):
        await storage.purge_stream_events_batch(60, limit=0)
    with pytest.raises(InvalidInput):
        await storage.purge_stream_events_batch(-1, limit=10)
    with pytest.raises(InvalidInput):
        await storage.purge_outbox(-1)


async def test_purge_outbox_removes_old_sent_messages_only(storage: AsyncStorageBackend) -> None:
    sent, dead, pending = await storage.enqueue_outbox(
        [NewOutboxMessage("slack", a, {"n": 1}) for a in ("x", "y", "z")]
    )
    claimed = {m.id: m for m in await storage.claim_outbox("w", limit=2, lease_s=30)}
    assert await storage.mark_outbox_sent([claimed[sent.id].claim]) == [sent.id]
    failure = Failure(dead.id, claimed[dead.id].claim.token, "permanent")
    assert await storage.dead_letter_outbox([failure]) == [dead.id]
    await anyio.sleep(0.3)
    assert await storage.purge_outbox(3600) == 0
    assert await storage.purge_outbox(0.1) == 1
    assert await storage.get_outbox(sent.id) is None
    assert await storage.get_outbox(dead.id) is not None
    assert await storage.get_outbox(pending.id) is not None


async def test_purge_tasks_keeps_unfinished_tasks(storage: AsyncStorageBackend) -> None:
    done, waiting = await storage.enqueue_tasks([NewTask("q", 1), NewTask("q", 2, priority=-1)])
    (claimed,) = await storage.claim_tasks("q", "w", limit=1, lease_s=30)
    await storage.complete_task(claimed.claim)
    await anyio.sleep(0.3)
    assert await storage.purge_tasks(0.1) == 1
    assert await storage.get_task(done.id) is None
    assert await storage.get_task(waiting.id) is not None


async def test_leadership_is_exclusive_across_handles_and_released_on_exit(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    async with open_storage(storage_url) as other:
        async with storage.open_leadership("sweeper", ttl_s=30) as mine:
            assert not mine.leading
            async with other.open_leadership("sweeper", ttl_s=30) as theirs:
                assert await mine.try_lead() and mine.leading
                assert not await theirs.try_lead() and not theirs.leading
                assert await mine.try_lead()  # kept, not re-taken
                assert not await theirs.try_lead()
                async with other.open_leadership("another-role", ttl_s=30) as unrelated:
                    assert await unrelated.try_lead()
        async with other.open_leadership("sweeper", ttl_s=30) as theirs:
            assert await theirs.try_lead()  # given up when the holder's block ended


async def test_leadership_passes_on_when_its_holder_dies(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    async with (
        open_storage(storage_url) as other,
        storage.open_leadership("sweeper", ttl_s=1.0) as dying,
        other.open_leadership("sweeper", ttl_s=1.0) as heir,
    ):
        assert await dying.try_lead()
        assert not await heir.try_lead()
        if storage.dialect == "postgres":
            # A crashed process: the server ends its session and, with it, the lock.
            conn = await asyncpg.connect(direct_dsn(storage_url))
            try:
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND classid = 1634957678 AND granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            finally:
                await conn.close()
            assert killed == 1
        # SQLite: a holder that stops renewing; its row expires after ttl_s. Postgres: the
        # server may take a moment to end the killed session.
        await wait_for(heir.try_lead, what="the heir's leadership")
        assert heir.leading
        assert not await dying.try_lead()
