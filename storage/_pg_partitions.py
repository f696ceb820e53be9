"""Postgres stream partitions: converting, creating and dropping ``stream_events`` ranges.

This module owns ``PgPartitions``, the part of ``PostgresBackend`` that runs the opt-in
partitioned layout of ``stream_events`` (the range arithmetic is ``storage._partitions``):
which layout's queries to run, the conversion from the plain table, and the creation and
drop of ranged partitions under their advisory lock and lock timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from asyncstore.storage import _partitions
from asyncstore.storage._pg_conn import _MIGRATION_LOCK, PgConnections, Q
from asyncstore.storage._shield import complete
from asyncstore.storage.base import StreamPartition

# The partitioned layout's queries: each _p_<name> runs in place of <name>.
_PARTITIONED_QUERIES: Mapping[str, str] = {
    **Q,
    **{name[len("_p_") :]: sql for name, sql in Q.items() if name.startswith("_p_")},
}
_PARTITION_LOCK = 0x6173797063  # advisory lock key of partition creation and drops
# A rotation step waits at most this long for its table locks (and so holds up the
# statements queued behind it at most that long); it is retried next round.
_LOCK_TIMEOUT = "5s"


class _Kept(Exception):
    """A partition drop found a live event: roll its transaction back."""


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


class PgPartitions(PgConnections):
    """The stream-partition hooks of ``PostgresBackend`` (a mixin of it)."""

    # -- stream partitions (storage/_partitions.py) ----------------------------

    async def _use_stream_layout(self) -> None:
        """Run the stream queries of the layout the database has: on a partitioned
        ``stream_events``, its ``_p_*`` variants in place of the plain ones."""
        layout = await self.pool.fetchval(Q["_stream_layout"])
        self._q = _PARTITIONED_QUERIES if layout == "p" else Q

    async def _sql_list_stream_partitions(self) -> list[StreamPartition]:
        rows = await self._fetch("_stream_partitions")
        found = (_partitions.parse_partition(r["name"]) for r in rows)
        return _partitions.sort_partitions([p for p in found if p is not None])

    async def _sql_partition_stream_events(self) -> bool:
        try:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if await conn.fetchval(Q["_stream_layout"]) == "p":
                    return False
                self._count("_partition_stream_events")
                await conn.execute(Q["_partition_stream_events"])
            return True
        finally:
            # Whether it committed or not (a cancellation may land after the commit):
            # plans cached on pool connections may be stale, and the layout is re-read.
            await complete(self._refresh_stream_layout())

    async def _refresh_stream_layout(self) -> None:
        await self.pool.expire_connections()
        await self._use_stream_layout()

    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int:
        partitions = await self._sql_list_stream_partitions()
        if not partitions:
            return 0
        waiting = [r["at"] for r in await self._fetch("_default_partition_slots", width_s)]
        now = (await self.pool.fetchval("SELECT clock_timestamp()")).timestamp()
        taken = [
            (int(p.lower.timestamp()), int(p.upper.timestamp()))
            for p in partitions
            if p.lower is not None and p.upper is not None
        ]
        created = 0
        for lower, upper in _partitions.missing_ranges(taken, waiting, now, now + ahead_s, width_s):
            created += await self._create_stream_partition(lower, upper)
        return created

    async def _create_stream_partition(self, lower: int, upper: int) -> int:
        """One partition in one transaction: created detached, filled with the default
        partition's rows of its range, then attached (which finds none left there). It
        holds the default partition exclusively throughout: appends wait for it (a few
        milliseconds while the default partition is empty, as it is when the leader keeps
        partitions ahead), at most ``_LOCK_TIMEOUT`` for its lock."""
        name = _partitions.partition_name(lower, upper)
        bounds = {"lower": _iso(lower), "upper": _iso(upper)}
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                return 0  # another rotation made it
            self._count("_create_stream_partition")
            await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            # ATTACH needs the default partition exclusively: taken first, so no append
            # adds a row of this range there between the move and the attach, and the
            # lock order (default, then the parent) cannot deadlock with an append's.
            default = _partitions.DEFAULT_PARTITION
            await conn.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
            await conn.execute(f"CREATE TABLE {name} (LIKE stream_events INCLUDING DEFAULTS)")
            await conn.execute(Q["_move_into_partition"].format(name=name, **bounds))
            await conn.execute(
                f"ALTER TABLE stream_events ATTACH PARTITION {name} "
                f"FOR VALUES FROM ('{bounds['lower']}') TO ('{bounds['upper']}')"
            )
        return 1

    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None:
        partition = _partitions.parse_partition(name)
        if partition is None or partition.lower is None or partition.upper is None:
            return None
        try:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
                ended = await conn.fetchval(
                    "SELECT to_regclass($1) IS NOT NULL"
                    " AND $2 <= clock_timestamp() - make_interval(secs => $3)",
                    name,
                    partition.upper,
                    age_s,
                )
                if not ended:
                    return None
                self._count("_drop_stream_partition")
                rows = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
                # Anchors first (row locks, in the appends' order), then the table locks
                # in the appends' order too: the parent, then (by DROP) the partition and
                # the default one, whose implicit range grows.
                await conn.execute(Q["_delete_partition_anchors"], partition.lower, partition.upper)
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                await conn.execute("LOCK TABLE ONLY stream_events IN ACCESS EXCLUSIVE MODE")
                if await conn.fetchval(Q["_partition_is_live"].format(name=name), age_s):
                    raise _Kept  # a session came back: roll the anchors back, keep it all
                await conn.execute(f"DROP TABLE {name}")
        except _Kept:
            return None
        return rows
