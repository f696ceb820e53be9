"""Contract: retention by partition (issue 17), the opt-in partitioned stream_events.

Each Postgres test gets its own database (``empty_postgres_url``) opened with
``storage.stream_partitioning``: partitions made here at past ranges must not leak into
other tests. A session is put in the past by writing its anchor directly (as its first
append would have, days ago) and ageing its events' ``created_at``: real rows in a real
database, no clock is mocked. SQLite keeps the plain table; its test checks it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.orchestrator.maintenance import MaintenanceConfig, open_maintenance
from asyncstore.storage import (
    AsyncStorageBackend,
    ConfigurationError,
    InvalidInput,
    MigrationError,
    NewStreamEvent,
    StorageSettings,
    open_storage,
)
from asyncstore.storage._sql import load_queries
from tests.waiting import wait_for

DAY = 86_400


def _events(session_id: str, first: int, last: int, epoch: int = 1) -> list[NewStreamEvent]:
    return [NewStreamEvent(session_id, epoch, s, "delta", {"s": s}) for s in range(first, last + 1)]


def _parted(url: str) -> StorageSettings:
    return StorageSettings(url=SecretStr(url), stream_partitioning=True)


@pytest.fixture
async def parted(empty_postgres_url: str) -> AsyncIterator[AsyncStorageBackend]:
    async with open_storage(_parted(empty_postgres_url), migrate=True) as storage:
        assert await storage.create_stream_partitions(DAY, ahead_s=DAY) >= 2
        yield storage


@pytest.fixture
async def sql(empty_postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(empty_postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _age_session(sql: asyncpg.Connection, session_id: str, days: int) -> None:
    """Anchor a session ``days`` ago (as its first append then would have) and age its
    stored events as much; the session has no event yet or lives in the default one."""
    await sql.execute(
        "INSERT INTO stream_anchors (session_id, started_at)"
        " VALUES ($1, now() - make_interval(days => $2))"
        " ON CONFLICT (session_id) DO UPDATE SET started_at = EXCLUDED.started_at",
        session_id,
        days,
    )


async def _expire(sql: asyncpg.Connection, session_id: str, days: int) -> None:
    await sql.execute(
        "UPDATE stream_events SET created_at = created_at - make_interval(days => $2)"
        " WHERE session_id = $1",
        session_id,
        days,
    )


async def _partition_of(sql: asyncpg.Connection, session_id: str) -> set[str]:
    rows = await sql.fetch(
        "SELECT DISTINCT tableoid::regclass::text FROM stream_events WHERE session_id = $1",
        session_id,
    )
    return {r[0] for r in rows}


async def test_conversion_keeps_every_row_and_resume_is_exact(empty_postgres_url: str) -> None:
    async with open_storage(empty_postgres_url, migrate=True) as plain:
        await plain.append_stream_events(_events("a", 1, 5) + _events("b", 1, 3, epoch=2))
        before = {s: await plain.load_stream_events(s) for s in ("a", "b")}
        assert await plain.list_stream_partitions() == []
    with pytest.raises(MigrationError, match="stream_partitioning"):
        async with open_storage(_parted(empty_postgres_url)):
            pass
    async with open_storage(_parted(empty_postgres_url), migrate=True) as storage:
        assert [p.name for p in await storage.list_stream_partitions()] == ["stream_events_default"]
        assert {s: await storage.load_stream_events(s) for s in ("a", "b")} == before
        assert await storage.partition_stream_events() is False  # already partitioned
        assert await storage.create_stream_partitions(DAY, ahead_s=DAY) >= 2
        assert {s: await storage.load_stream_events(s) for s in ("a", "b")} == before
        assert (await storage.append_stream_events(_events("a", 1, 5))).stored == 0  # a retry
        assert (await storage.append_stream_events(_events("a", 4, 7))).stored == 2
        assert await storage.last_stream_seq("a") == 7
    conn = await asyncpg.connect(empty_postgres_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM stream_events_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM stream_events") == 10
    finally:
        await conn.close()


async def test_concurrent_first_appends_of_a_session_agree_on_one_anchor(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    """Eight writers append the same new session at once: one anchor, no duplicate."""
    stored: list[int] = []

    async def append(first: int) -> None:
        stored.append((await parted.append_stream_events(_events("new", first, first + 9))).stored)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(append, 1 + (i % 2) * 5)  # seqs 1..10 and 6..15, four times each
    assert sum(stored) == 15
    assert await sql.fetchval("SELECT count(*) FROM stream_anchors WHERE session_id = 'new'") == 1
    assert await sql.fetchval("SELECT count(*) FROM stream_events WHERE session_id = 'new'") == 15
    assert [e.seq for e in await parted.load_stream_events("new")] == list(range(1, 16))


async def test_a_long_session_keeps_every_event_until_the_whole_session_expires(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    """A session started three days ago and still streaming stays in its start's partition
    (its events never straddle a boundary) and the partition is kept until its last event
    is older than the TTL."""
    await _age_session(sql, "long", 3)
    await parted.append_stream_events(_events("long", 1, 4))  # no partition yet: the default
    assert await _partition_of(sql, "long") == {"stream_events_default"}
    assert await parted.create_stream_partitions(DAY, ahead_s=DAY) == 1  # moves its rows
    (home,) = await _partition_of(sql, "long")
    await _expire(sql, "long", 3)
    await parted.append_stream_events(_events("long", 5, 6))  # today: still the same partition
    assert await _partition_of(sql, "long") == {home}

    assert await parted.drop_stream_partition(home, 3600) is None  # seqs 5, 6 are fresh
    assert [e.seq for e in await parted.load_stream_events("long")] == [1, 2, 3, 4, 5, 6]
    assert await parted.last_stream_seq("long") == 6

    await _expire(sql, "long", 1)
    assert await parted.drop_stream_partition(home, 3600) == 6
    assert home not in {p.name for p in await parted.list_stream_partitions()}
    assert await parted.load_stream_events("long") == []
    assert await sql.fetchval("SELECT count(*) FROM stream_anchors WHERE session_id = 'long'") == 0
    # The session id comes back: a new anchor, today's partition, seqs from 1 again.
    assert (await parted.append_stream_events(_events("long", 1, 2))).stored == 2
    assert await _partition_of(sql, "long") != {home}
    assert [e.seq for e in await parted.load_stream_events("long")] == [1, 2]


async def test_a_partition_whose_range_has_not_ended_is_kept(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    await parted.append_stream_events(_events("today", 1, 3))
    (home,) = await _partition_of(sql, "today")
    await _expire(sql, "today", 5)  # every event is old, but new sessions still start there
    assert await parted.drop_stream_partition(home, 3600) is None
    assert len(await parted.load_stream_events("today")) == 3


async def test_drop_refuses_the_default_partition_unknown_names_and_bad_input(
    parted: AsyncStorageBackend,
) -> None:
    assert await parted.drop_stream_partition("stream_events_default", 0) is None
    assert await parted.drop_stream_partition("stream_events_0_86400", 0) is None  # none such
    assert await parted.drop_stream_partition("chat_messages", 0) is None
    with pytest.raises(InvalidInput):
        await parted.drop_stream_partition("", 0)
    with pytest.raises(InvalidInput):
        await parted.drop_stream_partition("stream_events_default", -1)
    with pytest.raises(InvalidInput):
        await parted.create_stream_partitions(0, ahead_s=DAY)
    with pytest.raises(InvalidInput):
        await parted.create_stream_partitions(DAY, ahead_s=-1)


async def test_an_append_in_flight_during_a_drop_keeps_its_partition(
    parted: AsyncStorageBackend, sql: asyncpg.Connection, empty_postgres_url: str
) -> None:
    """A session that comes back while its expired partition is being dropped: the drop
    waits for the append holding its anchor, sees the new event and keeps everything."""
    await _age_session(sql, "back", 3)
    await parted.append_stream_events(_events("back", 1, 2))
    await parted.create_stream_partitions(DAY, ahead_s=DAY)
    (home,) = await _partition_of(sql, "back")
    await _expire(sql, "back", 3)
    writer = await asyncpg.connect(empty_postgres_url)
    try:
        tx = writer.transaction()
        await tx.start()
        # What an append does for a known session: its anchor FOR SHARE, then the insert.
        started = await writer.fetchval(
            "SELECT started_at FROM stream_anchors WHERE session_id = 'back' FOR SHARE"
        )
        await writer.execute(
            "INSERT INTO stream_events (session_id, seq, epoch, kind, payload, started_at)"
            " VALUES ('back', 3, 1, 'delta', '3', $1)",
            started,
        )
        result: list[int | None] = []

        async def drop() -> None:
            result.append(await parted.drop_stream_partition(home, 3600))

        async with anyio.create_task_group() as tg:
            tg.start_soon(drop)

            async def drop_waits_for_the_anchor_lock() -> bool:
                return bool(
                    await sql.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND query LIKE '%stream_anchors%'"
                    )
                )

            await wait_for(drop_waits_for_the_anchor_lock, what="the drop waiting for the lock")
            await tx.commit()
        assert result == [None]
    finally:
        await writer.close()
    assert [e.seq for e in await parted.load_stream_events("back")] == [1, 2, 3]
    assert home in {p.name for p in await parted.list_stream_partitions()}


async def test_batched_purge_names_rows_by_partition(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    """A ctid is unique only within one partition: the plain purge's bare ctids also hit
    rows at the same places of other partitions; the partitioned layout's query does not."""
    await _age_session(sql, "old", 3)
    await parted.append_stream_events(_events("old", 1, 3))
    await parted.create_stream_partitions(DAY, ahead_s=DAY)
    await _expire(sql, "old", 3)  # (an update: its rows move to ctids 4..6)
    await parted.append_stream_events(_events("fresh", 1, 6))  # the same ctids, today
    plain = load_queries("postgres")["purge_stream_events_batch"]
    tx = sql.transaction()
    await tx.start()
    try:
        await sql.execute(plain, 3600.0, 100)  # the defect the _p_ variant avoids
        fresh = "SELECT count(*) FROM stream_events WHERE session_id = 'fresh'"
        assert await sql.fetchval(fresh) < 6
    finally:
        await tx.rollback()
    assert await parted.purge_stream_events_batch(3600, limit=100) == 3
    assert await parted.load_stream_events("old") == []
    assert [e.seq for e in await parted.load_stream_events("fresh")] == [1, 2, 3, 4, 5, 6]


async def test_the_leader_creates_ahead_drops_expired_and_keeps_live_partitions(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    for session, days in (("gone", 4), ("alive", 3)):
        await _age_session(sql, session, days)
        await parted.append_stream_events(_events(session, 1, 3))
    await _expire(sql, "gone", 4)
    await _expire(sql, "alive", 3)
    await parted.append_stream_events(_events("alive", 4, 4))  # came back today
    await parted.append_stream_events(_events("today", 1, 2))
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=3600,
        stream_partition_s=DAY,
        stream_partitions_ahead=3,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=None,
    )
    async with open_maintenance(parted, config) as sweeper:
        assert await sweeper.run_once()
        stats = sweeper.statistics()
    assert stats.errors == 0, stats.last_error
    assert stats.partitions_created == 4  # the two sessions' days, and two more ahead
    assert (stats.partitions_dropped, stats.partitions_kept) == (1, 1)
    assert stats.purged["stream_events"] == 3 and stats.stream_batches == 0
    assert await parted.load_stream_events("gone") == []
    assert [e.seq for e in await parted.load_stream_events("alive")] == [1, 2, 3, 4]
    assert [e.seq for e in await parted.load_stream_events("today")] == [1, 2]
    assert await sql.fetchval("SELECT count(*) FROM stream_events_default") == 0


async def test_the_legacy_purge_still_runs_on_a_partitioned_table_behind_the_flag(
    parted: AsyncStorageBackend, sql: asyncpg.Connection
) -> None:
    await _age_session(sql, "alive", 3)
    await parted.append_stream_events(_events("alive", 1, 3))
    await _expire(sql, "alive", 3)
    await parted.append_stream_events(_events("alive", 4, 4))
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=3600,
        stream_drop_partitions=False,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=None,
    )
    async with open_maintenance(parted, config) as sweeper:
        assert await sweeper.run_once()
        stats = sweeper.statistics()
    assert stats.errors == 0, stats.last_error
    assert stats.partitions_dropped == 0 and stats.stream_batches == 1
    assert stats.purged["stream_events"] == 3  # row by row: the session's oldest events go
    assert [e.seq for e in await parted.load_stream_events("alive")] == [4]


async def test_sqlite_keeps_the_plain_table_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    with caplog.at_level(logging.WARNING, logger="asyncstore.storage"):
        async with open_storage(_parted(url), migrate=True) as storage:
            await storage.append_stream_events(_events("s", 1, 3))
            assert await storage.list_stream_partitions() == []
            assert await storage.create_stream_partitions(DAY, ahead_s=DAY) == 0
            assert await storage.drop_stream_partition("stream_events_default", 0) is None
            with pytest.raises(ConfigurationError, match="batched DELETE"):
                await storage.partition_stream_events()
            assert len(await storage.load_stream_events("s")) == 3
    assert "plain table purged by batched DELETE" in caplog.text


async def test_rotation_steps_that_cannot_get_their_locks_are_counted_and_finished_later(
    parted: AsyncStorageBackend, sql: asyncpg.Connection, empty_postgres_url: str
) -> None:
    """A long reader of the default partition holds up both steps (a creation moves rows
    out of it, a drop widens its range): each gives up after its lock timeout, counted,
    with nothing half done, and the next round does both."""
    await _age_session(sql, "gone", 4)
    await parted.append_stream_events(_events("gone", 1, 2))
    await parted.create_stream_partitions(DAY, ahead_s=DAY)
    (gone_home,) = await _partition_of(sql, "gone")
    await _expire(sql, "gone", 4)
    await _age_session(sql, "waiting", 2)  # its partition does not exist: the default one
    await parted.append_stream_events(_events("waiting", 1, 2))
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=3600,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=None,
    )
    async with open_maintenance(parted, config) as sweeper:
        reader = await asyncpg.connect(empty_postgres_url)
        try:
            async with reader.transaction():
                await reader.execute("LOCK TABLE stream_events_default IN ACCESS SHARE MODE")
                assert await sweeper.run_once()  # both steps wait out their lock timeout
                stats = sweeper.statistics()
        finally:
            await reader.close()
        assert stats.errors == 2 and "lock timeout" in (stats.last_error or "")
        assert (stats.partitions_created, stats.partitions_dropped) == (0, 0)
        assert await _partition_of(sql, "waiting") == {"stream_events_default"}
        assert await _partition_of(sql, "gone") == {gone_home}
        assert await sql.fetchval("SELECT count(*) FROM stream_anchors") == 2  # rolled back

        assert await sweeper.run_once()
        stats = sweeper.statistics()
    assert stats.errors == 2  # none more
    # The waiting session's day and the second day ahead; its day is kept (live events).
    assert (stats.partitions_created, stats.partitions_dropped, stats.partitions_kept) == (2, 1, 1)
    assert await parted.load_stream_events("gone") == []
    assert [e.seq for e in await parted.load_stream_events("waiting")] == [1, 2]
    assert await _partition_of(sql, "waiting") != {"stream_events_default"}


async def test_a_cancelled_conversion_leaves_the_table_plain_or_converted_whole(
    empty_postgres_url: str,
) -> None:
    """``partition_stream_events`` cancelled after k event-loop turns (k from 0 on, until
    one completes): each time the table is either still plain or partitioned, with every
    row, and the handle keeps working."""
    async with open_storage(empty_postgres_url, migrate=True) as storage:
        await storage.append_stream_events(_events("a", 1, 20))
        before = await storage.load_stream_events("a")
        for turns in range(10_000):
            task = asyncio.ensure_future(storage.partition_stream_events())
            for _ in range(turns):
                if task.done():
                    break
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            converted = bool(await storage.list_stream_partitions())
            async with open_storage(empty_postgres_url) as fresh:  # the layout from scratch
                assert await fresh.load_stream_events("a") == before
            if converted:
                break
        assert converted, "the conversion never completed"
        assert await storage.load_stream_events("a") == before
        assert (await storage.append_stream_events(_events("a", 20, 21))).stored == 1
