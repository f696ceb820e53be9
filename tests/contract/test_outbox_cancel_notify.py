"""Contract: outbox, cancellation state, notifications, lifecycle and migrations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    InvalidInput,
    NewOutboxMessage,
    OutboxStatus,
    StorageClosed,
    open_storage,
)


async def test_outbox_claims_in_order_and_marks_sent(storage: AsyncStorageBackend) -> None:
    rows = await storage.enqueue_outbox(
        [NewOutboxMessage("slack", "a", i) for i in range(3)] + [NewOutboxMessage("mail", "b", "m")]
    )
    assert [r.payload for r in rows] == [0, 1, 2, "m"]
    claimed = await storage.claim_outbox("w", limit=10, lease_s=30)
    assert [m.payload for m in claimed] == [0, 1, 2, "m"]
    assert all(m.status is OutboxStatus.SENDING and m.attempts == 1 for m in claimed)
    assert await storage.mark_outbox_sent([m.claim for m in claimed]) == [m.id for m in claimed]
    assert await storage.mark_outbox_sent([m.claim for m in claimed]) == []
    sent = await storage.get_outbox(rows[0].id)
    assert sent is not None and sent.status is OutboxStatus.SENT


async def test_outbox_group_waits_for_its_earlier_message(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("slack", "a", 1)])
    (first,) = await storage.claim_outbox("w1", limit=10, lease_s=30)
    await storage.enqueue_outbox(
        [NewOutboxMessage("slack", "a", 2), NewOutboxMessage("slack", "other", 3)]
    )
    # Message 2 of group (slack, a) must wait while message 1 is in flight.
    assert [m.payload for m in await storage.claim_outbox("w2", limit=10, lease_s=30)] == [3]
    retry_at = datetime.now(UTC) + timedelta(milliseconds=200)
    status = await storage.fail_outbox([Failure(first.id, first.lease_token or 0, "503", retry_at)])
    assert status == {first.id: OutboxStatus.PENDING}
    assert await storage.claim_outbox("w2", limit=10, lease_s=30) == []  # 1 waits to retry
    await anyio.sleep(0.3)
    assert [m.payload for m in await storage.claim_outbox("w2", limit=10, lease_s=30)] == [1, 2]


async def test_outbox_channel_filter(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_outbox(
        [NewOutboxMessage("slack", "a", 1), NewOutboxMessage("mail", "a", 2)]
    )
    got = await storage.claim_outbox("w", limit=10, lease_s=30, channels=["mail"])
    assert [m.payload for m in got] == [2]


async def test_outbox_dead_letter_and_redrive(storage: AsyncStorageBackend) -> None:
    (msg,) = await storage.enqueue_outbox([NewOutboxMessage("slack", "a", 1, max_attempts=1)])
    (claimed,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    failed = await storage.fail_outbox([Failure(claimed.id, claimed.lease_token or 0, "gone")])
    assert failed == {msg.id: OutboxStatus.DEAD}
    assert await storage.claim_outbox("w", limit=1, lease_s=30) == []
    dead = await storage.get_outbox(msg.id)
    assert dead is not None and dead.last_error == "gone"
    assert await storage.redrive_outbox([msg.id, 10**9]) == [msg.id]
    (again,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    assert again.id == msg.id and again.attempts == 1
    assert await storage.redrive_outbox([msg.id]) == []  # only dead rows move


async def test_outbox_expired_claim_is_reclaimed(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("slack", "a", 1)])
    (first,) = await storage.claim_outbox("crashed", limit=1, lease_s=0.2)
    await anyio.sleep(0.3)
    (second,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    assert second.id == first.id and second.attempts == 2
    assert await storage.mark_outbox_sent([first.claim]) == []
    assert await storage.mark_outbox_sent([second.claim]) == [second.id]


# ---------------------------------------------------------------- cancellation


async def test_cancel_request_is_persisted_once(storage: AsyncStorageBackend) -> None:
    assert await storage.get_cancel("s") is None
    first = await storage.request_cancel("s", "user pressed stop")
    again = await storage.request_cancel("s", "second")
    assert again == first and first.reason == "user pressed stop"
    assert await storage.get_cancel("s") == first
    assert await storage.clear_cancel("s")
    assert not await storage.clear_cancel("s")
    assert await storage.get_cancel("s") is None


# ---------------------------------------------------------------- notifications


async def test_notifications_reach_listeners_in_order(storage: AsyncStorageBackend) -> None:
    async with storage.listen("alpha", "beta") as stream, storage.listen("beta") as only_beta:
        for i in range(5):
            await storage.notify("alpha", f"a{i}")
        await storage.notify("beta", "b")
        await storage.notify("gamma", "nobody listens")
        with anyio.fail_after(5):
            got = [await stream.receive() for _ in range(6)]
            beta = await only_beta.receive()
    assert [(n.channel, n.payload) for n in got] == [("alpha", f"a{i}") for i in range(5)] + [
        ("beta", "b")
    ]
    assert (beta.channel, beta.payload, beta.gap) == ("beta", "b", False)


async def test_two_handles_on_one_database_see_each_others_notifications(
    storage_url: str,
) -> None:
    async with (
        open_storage(storage_url) as a,
        open_storage(storage_url) as b,
        b.listen("events") as stream,
    ):
        await a.notify("events", "from-a")
        with anyio.fail_after(5):
            note = await stream.receive()
    assert note.payload == "from-a"


async def test_notify_rejects_large_or_bad_payloads(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput, match="send ids"):
        await storage.notify("c", "x" * 8000)
    with pytest.raises(InvalidInput, match="channel"):
        await storage.notify("bad channel!", "x")
    with pytest.raises(InvalidInput):
        storage.listen()


async def test_slow_listener_gets_a_gap_instead_of_unbounded_memory(storage_url: str) -> None:
    from asyncstore.storage import StorageSettings

    settings = StorageSettings(url=storage_url, listener_queue_size=3)
    async with open_storage(settings) as backend, backend.listen("c") as stream:
        for i in range(10):
            await backend.notify("c", str(i))
        await backend.notify("c", "after")
        with anyio.fail_after(5):
            first = await stream.receive()
            while first.gap is False and first.payload != "after":
                first = await stream.receive()
        assert first.gap
        assert backend.statistics().notifications_dropped > 0


async def test_postgres_listener_reconnects_and_reports_a_gap(postgres_dsn: str) -> None:
    from asyncstore.storage.postgres import PostgresBackend

    async with open_storage(postgres_dsn) as backend:
        assert isinstance(backend, PostgresBackend)
        async with backend.listen("c") as stream:
            await backend.terminate_listener_for_tests()
            with anyio.fail_after(10):
                marker = await stream.receive()
                assert marker.gap
                await backend.notify("c", "after-reconnect")
                note = await stream.receive()
        assert note.payload == "after-reconnect" and not note.gap
        assert backend.statistics().listener_reconnects == 1


# ---------------------------------------------------------------- lifecycle and migrations


async def test_closed_storage_refuses_calls(storage_url: str) -> None:
    async with open_storage(storage_url) as backend:
        pass
    with pytest.raises(StorageClosed):
        await backend.get_cancel("s")
    await backend.aclose()  # idempotent


async def test_migrate_twice_is_a_no_op(storage: AsyncStorageBackend) -> None:
    version = await storage.schema_version()
    assert version >= 1
    assert await storage.migrate() == []
    assert await storage.schema_version() == version


async def test_statistics_count_statements_by_name(storage: AsyncStorageBackend) -> None:
    before = storage.statistics().statements.get("acquire_lease", 0)
    await storage.acquire_lease("s", "h", 30)
    assert storage.statistics().statements["acquire_lease"] == before + 1
