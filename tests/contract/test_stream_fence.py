"""Stream appends fenced by the session lease, in the database, on both drivers.

A superseded lease holder (one whose token is no longer the session's lease token) must
never store an event, not even at seqs past the new holder's: otherwise the stored stream's
epoch goes backwards and a database resume sees another stream than live subscribers did.
"""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from asyncstore.orchestrator.streams import StreamEventWriter
from asyncstore.storage import (
    AsyncStorageBackend,
    LeaseLost,
    NewStreamEvent,
    StreamAppend,
    open_storage,
)
from tests.conftest import direct_dsn
from tests.waiting import wait_for


def _events(session: str, epoch: int, seqs: range) -> list[NewStreamEvent]:
    return [NewStreamEvent(session, epoch, seq, "delta", {"e": epoch, "s": seq}) for seq in seqs]


async def _take_over(storage: AsyncStorageBackend, session: str, old_token: int) -> int:
    """End the old holder's lease (as an expiry would) and let a new holder acquire it."""
    assert await storage.release_lease(session, old_token)
    lease = await storage.acquire_lease(session, "holder-b", 30)
    assert lease is not None and lease.token > old_token
    return lease.token


async def test_superseded_holder_stores_nothing_after_the_new_holder(
    storage: AsyncStorageBackend,
) -> None:
    a = await storage.acquire_lease("s", "holder-a", 30)
    assert a is not None
    assert await storage.append_stream_events(_events("s", a.token, range(1, 4))) == StreamAppend(3)
    t2 = await _take_over(storage, "s", a.token)

    # The new holder continues at seq 4; the old one, resumed, writes 4..13.
    stale = await storage.append_stream_events(_events("s", a.token, range(4, 14)))
    assert stale == StreamAppend(0, frozenset({("s", a.token)}))
    fresh = await storage.append_stream_events(_events("s", t2, range(4, 9)))
    assert fresh == StreamAppend(5)
    late = await storage.append_stream_events(_events("s", a.token, range(9, 14)))
    assert late == StreamAppend(0, frozenset({("s", a.token)}))

    stored = await storage.load_stream_events("s")
    assert [(e.seq, e.epoch) for e in stored] == [(1, a.token), (2, a.token), (3, a.token)] + [
        (seq, t2) for seq in range(4, 9)
    ]
    assert await storage.last_stream_seq("s") == 8


async def test_fence_refuses_only_the_superseded_sessions_of_a_batch(
    storage: AsyncStorageBackend,
) -> None:
    a = await storage.acquire_lease("old", "holder-a", 30)
    b = await storage.acquire_lease("kept", "holder-a", 30)
    assert a is not None and b is not None
    t2 = await _take_over(storage, "old", a.token)
    batch = _events("kept", b.token, range(1, 4)) + _events("old", a.token, range(1, 3))
    batch += _events("free", 7, range(1, 3))  # no lease row: accepted
    result = await storage.append_stream_events(batch)
    assert result == StreamAppend(5, frozenset({("old", a.token)}))
    assert await storage.load_stream_events("old") == []
    # An epoch newer than the lease token is not the lease either.
    ahead = await storage.append_stream_events(_events("old", t2 + 5, range(1, 2)))
    assert ahead.refused == {("old", t2 + 5)}


async def test_released_lease_still_fences_by_its_token(storage: AsyncStorageBackend) -> None:
    """A release does not supersede its holder: its buffered events still land after it."""
    lease = await storage.acquire_lease("s", "holder-a", 30)
    assert lease is not None
    assert await storage.release_lease("s", lease.token)
    assert await storage.append_stream_events(_events("s", lease.token, range(1, 3))) == (
        StreamAppend(2)
    )
    assert (await storage.append_stream_events(_events("s", lease.token - 1, range(3, 4)))).refused


async def test_without_a_lease_row_an_older_epoch_than_the_head_is_refused(
    storage: AsyncStorageBackend,
) -> None:
    assert await storage.append_stream_events(_events("s", 5, range(1, 4))) == StreamAppend(3)
    assert await storage.append_stream_events(_events("s", 4, range(4, 6))) == StreamAppend(
        0, frozenset({("s", 4)})
    )
    # The same epoch continues; a newer one replaces re-used seqs.
    assert await storage.append_stream_events(_events("s", 5, range(4, 5))) == StreamAppend(1)
    assert await storage.append_stream_events(_events("s", 6, range(3, 6))) == StreamAppend(3)
    stored = await storage.load_stream_events("s")
    assert [(e.seq, e.epoch) for e in stored] == [(1, 5), (2, 5), (3, 6), (4, 6), (5, 6)]


async def test_writer_raises_lease_lost_after_its_epoch_is_refused(
    storage: AsyncStorageBackend,
) -> None:
    a = await storage.acquire_lease("s", "holder-a", 30)
    assert a is not None
    async with StreamEventWriter(storage) as writer:
        async with writer.session("s", a.token) as stream:
            await stream.emit("delta", 1)
            await writer.flush()
            t2 = await _take_over(storage, "s", a.token)
            for i in range(3):
                await stream.emit("delta", i)
            await writer.flush()
            assert writer.fenced("s")
            with pytest.raises(LeaseLost, match="newer holder"):
                await stream.emit("delta", "after")
            stats = writer.statistics()
            assert stats.refused == 3 and stats.fenced_sessions == 1
        # The new holder (here the same writer, as another process would) continues.
        async with writer.session("s", t2) as stream:
            event = await stream.emit("delta", "b")
            assert event is not None and event.epoch == t2
    stored = await storage.load_stream_events("s")
    assert [(e.seq, e.epoch) for e in stored] == [(1, a.token), (2, t2)]


async def test_legacy_writer_raises_lease_lost_on_a_refused_insert(
    storage: AsyncStorageBackend,
) -> None:
    from asyncstore.orchestrator.streams import StreamConfig

    a = await storage.acquire_lease("s", "holder-a", 30)
    assert a is not None
    async with (
        StreamEventWriter(storage, config=StreamConfig(batching=False)) as writer,
        writer.session("s", a.token) as stream,
    ):
        await stream.emit("delta", 1)
        await _take_over(storage, "s", a.token)
        with pytest.raises(LeaseLost):
            await stream.emit("delta", 2)
        with pytest.raises(LeaseLost):
            await stream.emit("delta", 3)
        assert writer.statistics().refused == 1
    assert [e.seq for e in await storage.load_stream_events("s")] == [1]


async def test_concurrent_acquisition_is_seen_by_a_waiting_append(postgres_dsn: str) -> None:
    """Postgres: an acquisition committing while the append runs either waits for it or is
    seen by it; here it holds the lease row first, so the append must wait, then refuse."""
    async with open_storage(postgres_dsn) as storage:
        a = await storage.acquire_lease("race", "holder-a", 30)
        assert a is not None
        conn = await asyncpg.connect(postgres_dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            t2 = await conn.fetchval(
                "UPDATE session_leases SET token = nextval('lease_tokens'), holder = 'b'"
                " WHERE session_id = 'race' RETURNING token"
            )
            result: list[StreamAppend] = []

            async def append() -> None:
                result.append(
                    await storage.append_stream_events(_events("race", a.token, range(1, 3)))
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(append)

                async def append_waits_for_the_lock() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        )
                    )

                await wait_for(append_waits_for_the_lock, what="the append waiting for the lock")
                await tx.commit()
            assert result == [StreamAppend(0, frozenset({("race", a.token)}))]
            assert t2 > a.token
            assert await storage.load_stream_events("race") == []
        finally:
            await conn.close()


async def _insert_raw(url: str, rows: list[tuple[str, int, int]]) -> None:
    """Rows written around the library (data from before the fence, or a foreign writer)."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        with conn:
            conn.executemany(
                "INSERT INTO stream_events (session_id, seq, epoch, kind, payload, created_at)"
                " VALUES (?, ?, ?, 'delta', '\"stale\"', 0)",
                rows,
            )
        conn.close()
        return
    pg = await asyncpg.connect(direct_dsn(url))
    try:
        partitioned = await pg.fetchval(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = 'stream_events'::regclass"
        )
        if partitioned:  # the session's anchor, as an append would have made it (0009)
            await pg.executemany(
                "INSERT INTO stream_anchors (session_id, started_at) VALUES ($1, now())"
                " ON CONFLICT (session_id) DO NOTHING",
                sorted({(row[0],) for row in rows}),
            )
        anchor = "(SELECT started_at FROM stream_anchors WHERE session_id = $1)"
        await pg.executemany(
            "INSERT INTO stream_events (session_id, seq, epoch, kind, payload"
            + (", started_at)" if partitioned else ")")
            + " VALUES ($1, $2, $3, 'delta', '\"stale\"'"
            + (f", {anchor})" if partitioned else ")"),
            rows,
        )
    finally:
        await pg.close()


async def test_fan_in_of_rows_the_ring_refuses_ends_instead_of_looping(storage_url: str) -> None:
    """A notified hub whose fetch brings only rows its ring cannot take reads once, not forever."""
    from asyncstore.orchestrator.broadcast import BroadcastHub, encode_advances

    async with (
        open_storage(storage_url) as storage,
        BroadcastHub(storage) as hub,
        StreamEventWriter(storage) as writer,
    ):
        sub = hub.subscribe("s", after=(0, 0))
        async with writer.session("s", 2) as stream:
            for i in range(3):
                await stream.emit("delta", i)
        seen = []
        with anyio.fail_after(10):
            async for item in sub:
                seen.append(item)
                if len(seen) == 3:
                    break
        # Rows of an older epoch past the head, announced as if they were current.
        await _insert_raw(storage_url, [("s", seq, 1) for seq in range(4, 7)])
        for note in encode_advances([("s", 2, 4, 6)]):
            await storage.notify("asyncstore_stream", note)
        await wait_for(
            lambda: hub.statistics().dropped.get("fetch_untaken", 0) >= 1,
            what="the untaken fetch",
        )
        reads = hub.statistics().db_reads.get("fan_in", 0)
        handled = hub.statistics().notifications
        # A stale-epoch announcement is not even read.
        for note in encode_advances([("s", 1, 4, 6)]):
            await storage.notify("asyncstore_stream", note)
        await storage.notify("asyncstore_stream", "[]")  # marks that the one before was handled
        await wait_for(
            lambda: hub.statistics().notifications >= handled + 2,
            what="both notifications handled",
        )
        assert hub.statistics().db_reads.get("fan_in", 0) == reads <= 2
        await sub.aclose()


async def test_a_turn_that_lost_its_lease_emits_nothing_more(storage_url: str) -> None:
    """No ``cancelled`` event (nor any other) under an epoch the runtime no longer holds."""
    from asyncstore.orchestrator.config import load_settings
    from asyncstore.orchestrator.runtime import open_runtime

    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        lock={"lease_ttl_s": 5.0, "renew_interval_s": 0.05},
    )
    async with open_runtime(settings) as rt, open_storage(storage_url) as other:
        async with rt.turn("s") as turn:
            token = turn.lease.token
            await turn.emit("delta", "before")
            await rt._streams.optimized.flush()
            # Another holder takes the session over (as after an expiry).
            assert await other.release_lease("s", token)
            assert await other.acquire_lease("s", "thief", 30) is not None
            with anyio.fail_after(10):
                await turn.lease.wait_lost()
            # The body has not reached a checkpoint yet: its emit is refused in memory.
            await turn.emit("delta", "after")
            pytest.fail("a turn that lost its lease must stop at its next emit")
        stats = rt.statistics().streams["optimized"]
        assert stats.refused == 0
        stored = await other.load_stream_events("s")
        assert [(e.epoch, e.kind, e.payload) for e in stored] == [(token, "delta", "before")]


async def test_local_subscribers_of_a_refused_writer_are_reset_to_the_stored_stream(
    storage: AsyncStorageBackend,
) -> None:
    """Events published live and then refused by the fence are taken back from the ring."""
    from asyncstore.orchestrator.batching import BatchConfig
    from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig, StreamReset
    from asyncstore.orchestrator.streams import StreamConfig

    a = await storage.acquire_lease("s", "holder-a", 30)
    assert a is not None
    manual = StreamConfig(batch=BatchConfig(flush_interval_s=3600, max_batch=100))
    async with (
        BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
        StreamEventWriter(storage, hub, manual) as writer,
    ):
        sub = hub.subscribe("s", after=(0, 0))
        seen: list[object] = []

        async def read(n: int) -> None:
            with anyio.fail_after(10):
                async for item in sub:
                    seen.append(item)
                    if len(seen) == n:
                        return

        async with writer.session("s", a.token) as stream:
            await stream.emit("delta", 1)
            await stream.emit("delta", 2)
            await writer.flush()
            await _take_over(storage, "s", a.token)
            await stream.emit("delta", "refused 3")
            await stream.emit("delta", "refused 4")
            await read(4)  # live, before the writer tried to store them
            await writer.flush()
        await read(5)
        assert [getattr(e, "payload", None) for e in seen[:4]] == [1, 2, "refused 3", "refused 4"]
        reset = seen[4]
        assert isinstance(reset, StreamReset)
        assert (reset.reason, reset.epoch, reset.seq) == ("epoch_changed", a.token, 2)
        await sub.aclose()
        # A resume from the reset point and the database agree: nothing after seq 2.
        assert [e.seq for e in await storage.load_stream_events("s")] == [1, 2]
