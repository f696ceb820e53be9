"""Maintenance benchmark (Postgres): stream event retention, batched DELETE vs partition drop.

Two throwaway ``asyncstore_bench_*`` databases, dropped at the end: one with the plain
``stream_events`` (the default layout), one converted to the partitioned layout
(``storage.stream_partitioning``, issue 17). What it measures:

1. Purge of ``--rows`` expired rows (two days old, 1000 sessions) next to a fifth as many
   fresh rows:
   - ``batched``: on the plain table, the library's ``purge_stream_events_batch`` loop
     (what the maintenance sweeper runs), ``--batch`` rows per statement, until a batch
     comes back short;
   - ``drop``: on the partitioned table, where the expired sessions share a partition
     (their start day), the library's ``drop_stream_partition`` (what the maintenance
     leader runs): count, delete the sessions' anchors, lock, check, ``DROP TABLE``.
   The rows are loaded before the clock starts with one ``INSERT ... SELECT
   generate_series`` (and ``synchronous_commit = off``), then ``VACUUM ANALYZE`` and a
   ``CHECKPOINT``, so both purges start with the same clean buffers and write their full
   page images alike. Time is wall time of the library call; WAL is
   ``pg_current_wal_lsn()`` after minus before.
2. Append throughput, plain vs partitioned: ``--writers`` concurrent writers each call
   ``append_stream_events`` with ``--sessions`` sessions x ``--events`` events per call,
   ``--appends`` calls each, new sessions per pass (so the partitioned side also pays
   for each session's anchor on its first append).

Passes are interleaved (batched, drop, batched, ...; plain, partitioned, ...) and repeated
``--repeats`` times; the figures are medians with the spread ((max - min) / median) and
the ratio partitioned / plain in the same run.

Run: ``python -m benchmarks maintenance [--url URL] [--rows N] [--batch N] [--repeats N]
[--skip-purge] [--skip-append]``; ``--rows 10000000`` is the issue's figure (each pass
loads 12M rows: minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from pydantic import SecretStr

from asyncstore.storage import AsyncStorageBackend, NewStreamEvent, StorageSettings, open_storage
from asyncstore.storage._partitions import partition_name

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DAY = 86_400

# $1 expired rows, in 1000 sessions started three days ago and idle for two; a fifth as
# many fresh rows in 1000 sessions started now. {started} is the partitioned layout's
# anchor column, empty on the plain one.
_FILL = """
INSERT INTO stream_events (session_id, seq, epoch, kind, payload, created_at{started})
SELECT 's' || (g % 1000), g, 1, 'delta', '{{"text": "a token delta of a streamed reply"}}'::json,
       now() - interval '2 days' + g * interval '10 microseconds'{old}
FROM generate_series(1, $1::int) AS g
UNION ALL
SELECT 'f' || (g % 1000), $1 + g, 1, 'delta', '{{"text": "fresh"}}'::json, now(){new}
FROM generate_series(1, $1::int / 5) AS g
"""
_ANCHORS = """
INSERT INTO stream_anchors (session_id, started_at)
SELECT 's' || g, $1::timestamptz FROM generate_series(0, 999) AS g
UNION ALL
SELECT 'f' || g, $2::timestamptz FROM generate_series(0, 999) AS g
"""


@dataclass(frozen=True)
class Purge:
    seconds: float
    rows: int
    wal: int


async def _wal(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"))


async def _fill_plain(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute("TRUNCATE stream_events, stream_anchors")
    await conn.execute(_FILL.format(started="", old="", new=""), rows)


async def _fill_partitioned(conn: asyncpg.Connection, rows: int) -> str:
    """Load the rows into the partitioned table; return the expired sessions' partition."""
    await conn.execute("TRUNCATE stream_events, stream_anchors")
    now = int(await conn.fetchval("SELECT extract(epoch FROM now())::bigint"))
    old_day = (now - 3 * DAY) // DAY * DAY
    name = partition_name(old_day, old_day + DAY)
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
        await conn.execute(
            f"CREATE TABLE {name} PARTITION OF stream_events FOR VALUES FROM "
            f"(to_timestamp({old_day})) TO (to_timestamp({old_day + DAY}))"
        )
    old = await conn.fetchval("SELECT to_timestamp($1::bigint)", old_day + 3600)
    new = await conn.fetchval("SELECT now()")
    await conn.execute(_ANCHORS, old, new)
    fill = _FILL.format(started=", started_at", old=", $2::timestamptz", new=", $3::timestamptz")
    await conn.execute(fill, rows, old, new)
    return name


async def _purge_pass(dsn: str, kind: str, rows: int, batch: int) -> Purge:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        if kind == "batched":
            await _fill_plain(conn, rows)
        else:
            partition = await _fill_partitioned(conn, rows)
        await conn.execute("VACUUM ANALYZE stream_events")
        await conn.execute("CHECKPOINT")
        async with open_storage(dsn) as storage:
            await storage.ping()
            lsn = await _wal(conn)
            started = time.perf_counter()
            if kind == "batched":
                deleted = 0
                while True:
                    n = await storage.purge_stream_events_batch(DAY, limit=batch)
                    deleted += n
                    if n < batch:
                        break
            else:
                dropped = await storage.drop_stream_partition(partition, DAY)
                assert dropped is not None, "the expired partition was kept"
                deleted = dropped
            elapsed = time.perf_counter() - started
            wal = await _wal(conn) - lsn
        left = await conn.fetchval("SELECT count(*) FROM stream_events")
        assert deleted == rows and left == rows // 5, (kind, deleted, left)
        return Purge(elapsed, deleted, wal)
    finally:
        await conn.close()


async def _append_pass(storage: AsyncStorageBackend, args: argparse.Namespace, tag: str) -> float:
    """Events per second of ``--writers`` concurrent writers, new sessions each pass."""

    async def writer(w: int) -> None:
        for i in range(args.appends):
            first = i * args.events + 1
            batch = [
                NewStreamEvent(f"{tag}-{w}-{s}", 1, seq, "delta", {"text": "a token delta"})
                for s in range(args.sessions)
                for seq in range(first, first + args.events)
            ]
            await storage.append_stream_events(batch)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(args.writers)))
    elapsed = time.perf_counter() - started
    return float(args.writers * args.appends * args.sessions * args.events) / elapsed


def _median_spread(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median if median else 0.0


async def run(args: argparse.Namespace) -> int:
    admin = await asyncpg.connect(args.url)
    names = {k: f"asyncstore_bench_{k}_{secrets.token_hex(4)}" for k in ("plain", "parted")}
    dsns = {k: f"{args.url.rpartition('/')[0]}/{name}" for k, name in names.items()}
    purges: dict[str, list[Purge]] = {"batched": [], "drop": []}
    appends: dict[str, list[float]] = {"plain": [], "parted": []}
    try:
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
        async with open_storage(dsns["plain"], migrate=True):
            pass
        parted = StorageSettings(url=SecretStr(dsns["parted"]), stream_partitioning=True)
        async with open_storage(parted, migrate=True) as storage:
            await storage.create_stream_partitions(DAY, ahead_s=DAY)
        if not args.skip_purge:
            for _ in range(args.repeats):
                for kind, db in (("batched", "plain"), ("drop", "parted")):
                    purges[kind].append(await _purge_pass(dsns[db], kind, args.rows, args.batch))
                    print(f"  purge {kind}: {purges[kind][-1]}", file=sys.stderr)
        if not args.skip_append:
            async with (
                open_storage(dsns["plain"]) as plain,
                open_storage(dsns["parted"]) as partitioned,
            ):
                for r in range(args.repeats):
                    for key, storage in (("plain", plain), ("parted", partitioned)):
                        appends[key].append(await _append_pass(storage, args, f"r{r}"))
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    if not args.skip_purge:
        print(
            f"Purge of {args.rows:,} expired rows (+{args.rows // 5:,} fresh kept), "
            f"batch {args.batch}, median of {args.repeats}"
        )
        print(f"{'method':<10}{'median s':>11}{'spread':>8}{'rows/s':>14}{'WAL MB':>10}")
        medians = {}
        for kind, results in purges.items():
            median, spread = _median_spread([p.seconds for p in results])
            wal = statistics.median(p.wal for p in results) / 1e6
            medians[kind] = (median, wal)
            rate = args.rows / median if median else float("inf")
            print(f"{kind:<10}{median:>11.3f}{spread:>8.0%}{rate:>14,.0f}{wal:>10.1f}")
        (bt, bw), (dt, dw) = medians["batched"], medians["drop"]
        print(f"drop / batched: time {dt / bt:.4f}x, WAL {dw / bw:.5f}x")
    if not args.skip_append:
        per_call = args.sessions * args.events
        print(
            f"Append throughput: {args.writers} writers x {args.appends} calls of "
            f"{args.sessions} sessions x {args.events} events ({per_call} per call)"
        )
        for key, rates in appends.items():
            median, spread = _median_spread(rates)
            print(f"{key:<10}{median:>14,.0f} events/s{spread:>8.0%}")
        ratio = statistics.median(appends["parted"]) / statistics.median(appends["plain"])
        print(f"partitioned / plain: {ratio:.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default=DEFAULT_URL, help="Postgres server (admin database)")
    parser.add_argument("--rows", type=int, default=500_000, help="expired rows to purge")
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--appends", type=int, default=50, help="calls per writer")
    parser.add_argument("--sessions", type=int, default=20, help="sessions per call")
    parser.add_argument("--events", type=int, default=10, help="events per session per call")
    parser.add_argument("--skip-purge", action="store_true")
    parser.add_argument("--skip-append", action="store_true")
    args = parser.parse_args(argv)
    if args.rows < 5 or args.batch < 1 or args.repeats < 1:
        parser.error("--rows must be at least 5, --batch and --repeats at least 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
