"""SIGKILL of the maintenance leader mid-rotation (issue 17): every partition step is one
transaction, so a killed leader leaves each step done or not done, and the next leader
finishes the rotation.

The test holds a row lock the leader's step needs (a default-partition row it must move,
then an anchor it must delete, as an append in flight would), waits until the leader's
statement waits for it (``pg_stat_activity``), SIGKILLs the leader, then lets go. Sessions
are anchored in past hours by writing their anchor as their first append would have, and
aged by moving their events' ``created_at`` back: real rows, no mocked clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg
from pydantic import SecretStr

from asyncstore.orchestrator.maintenance import open_maintenance
from asyncstore.storage import NewStreamEvent, StorageSettings, open_storage
from tests.faults.conftest import FaultDB
from tests.faults.procs import Agent, spawn_agent
from tests.faults.rotation_leader import config
from tests.waiting import wait_for

HOUR = 3600
OPTIONS = {"partition_s": HOUR, "ttl_s": HOUR}
EXPIRED = [f"e{i}" for i in range(6)]  # e0 anchored 36 h ago (oldest) ... e5 31 h ago

_CONSISTENT = """
SELECT
  (SELECT count(*) FROM stream_events e LEFT JOIN stream_anchors a USING (session_id)
   WHERE a.started_at IS DISTINCT FROM e.started_at) AS rows_off_anchor,
  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname = current_schema() AND c.relname LIKE 'stream_events\\_%'
     AND c.relkind = 'r' AND NOT c.relispartition) AS stray_tables
"""


def _events(session_id: str, count: int) -> list[NewStreamEvent]:
    return [NewStreamEvent(session_id, 1, s, "delta", {"s": s}) for s in range(1, count + 1)]


async def _anchor(sql: asyncpg.Connection, session_id: str, hours_ago: int) -> None:
    await sql.execute(
        "INSERT INTO stream_anchors (session_id, started_at)"
        " VALUES ($1, now() - make_interval(hours => $2))",
        session_id,
        hours_ago,
    )


async def _check_consistent(sql: asyncpg.Connection) -> None:
    row = await sql.fetchrow(_CONSISTENT)
    assert (row["rows_off_anchor"], row["stray_tables"]) == (0, 0), dict(row)


async def _homes(sql: asyncpg.Connection) -> dict[str, str]:
    rows = await sql.fetch(
        "SELECT DISTINCT session_id, tableoid::regclass::text AS home FROM stream_events"
    )
    return {r["session_id"]: r["home"] for r in rows}


async def _wait_blocked(sql: asyncpg.Connection, table: str) -> None:
    """Until some backend's statement on ``table`` waits for a lock."""

    async def blocked() -> bool:
        return bool(
            await sql.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%' || $1 || '%'",
                table,
            )
        )

    await wait_for(blocked, 60, what=f"a statement on {table} waiting for a lock")


async def _wait_leader_gone(sql: asyncpg.Connection) -> None:
    """Until the killed leader's server session has ended (its leadership lock with it)."""

    async def gone() -> bool:
        return not await sql.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )

    await wait_for(gone, 60, what="the killed leader's session to end")


@asynccontextmanager
async def _holding(url: str, sql_text: str, *args: object) -> AsyncIterator[None]:
    """A transaction of another client that holds the row locks ``sql_text`` takes."""
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction()
        await tx.start()
        assert await conn.fetch(sql_text, *args)
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def _kill_when_blocked(agent: Agent, sql: asyncpg.Connection, table: str) -> None:
    await _wait_blocked(sql, table)
    agent.kill()
    with anyio.fail_after(30):
        await agent.process.wait()


async def test_a_leader_killed_mid_rotation_leaves_it_consistent_and_the_next_finishes(
    fault_db: FaultDB,
) -> None:
    url = fault_db.url
    settings = StorageSettings(url=SecretStr(url), stream_partitioning=True)
    sql = await asyncpg.connect(url)
    try:
        async with open_storage(settings, migrate=True) as storage:
            for i, session in enumerate(EXPIRED):
                await _anchor(sql, session, 36 - i)
                await storage.append_stream_events(_events(session, 5))
            assert await storage.create_stream_partitions(HOUR, ahead_s=HOUR) == 6 + 2
            await sql.execute(
                "UPDATE stream_events SET created_at = created_at - interval '2 days'"
            )
            await _anchor(sql, "waiting", 10)  # its partition does not exist yet
            await storage.append_stream_events(_events("waiting", 3) + _events("now", 2))
        homes = await _homes(sql)
        assert homes["waiting"] == "stream_events_default"

        # Leader A: killed while moving the waiting session out of the default partition.
        async with (
            _holding(
                url, "SELECT 1 FROM stream_events_default WHERE session_id = 'waiting' FOR SHARE"
            ),
            spawn_agent("A", url, module="tests.faults.rotation_leader", **OPTIONS) as a,
        ):
            await _kill_when_blocked(a, sql, "stream_events_default")
        await _wait_leader_gone(sql)
        await _check_consistent(sql)
        assert await _homes(sql) == homes  # the move and its new table rolled back

        # Leader B: killed while dropping e3's partition, after e0..e2's (e3 came back:
        # an append holds its anchor).
        async with (
            _holding(url, "SELECT 1 FROM stream_anchors WHERE session_id = 'e3' FOR SHARE"),
            spawn_agent("B", url, module="tests.faults.rotation_leader", **OPTIONS) as b,
        ):
            await _kill_when_blocked(b, sql, "stream_anchors")
        await _wait_leader_gone(sql)
        await _check_consistent(sql)
        now_homes = await _homes(sql)
        assert set(now_homes) == set(homes) - {"e0", "e1", "e2"}
        assert {s: now_homes[s] for s in ("e3", "e4", "e5", "now")} == {
            s: homes[s] for s in ("e3", "e4", "e5", "now")
        }
        assert now_homes["waiting"] != "stream_events_default"  # B's finished move stayed
        for session in ("e0", "e1", "e2"):
            assert homes[session] not in {
                r[0]
                for r in await sql.fetch(
                    "SELECT relname::text FROM pg_class WHERE relname LIKE 'stream_events\\_%'"
                )
            }

        # Leader C (this process) finishes the rotation.
        async with (
            open_storage(url) as storage,
            open_maintenance(storage, config(OPTIONS)) as sweeper,
        ):
            assert await sweeper.run_once()
            stats = sweeper.statistics()
            assert stats.errors == 0, stats.last_error
            assert stats.partitions_dropped == 3 and stats.purged["stream_events"] == 15
            for session in EXPIRED:
                assert await storage.load_stream_events(session) == []
            assert [e.seq for e in await storage.load_stream_events("waiting")] == [1, 2, 3]
            assert [e.seq for e in await storage.load_stream_events("now")] == [1, 2]
        await _check_consistent(sql)
        assert await sql.fetchval("SELECT count(*) FROM stream_anchors") == 2
    finally:
        await sql.close()
