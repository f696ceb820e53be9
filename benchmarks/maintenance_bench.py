"""Maintenance benchmark (Postgres): TTL purge of stream events, batched DELETE vs DROP PARTITION.

What it measures, on a throwaway ``asyncstore_bench_*`` database dropped at the end:

1. ``batched``: the library's ``purge_stream_events_batch`` loop (what the maintenance
   sweeper runs), ``--batch`` rows per statement, on the regular ``stream_events`` table
   (primary key + BRIN on ``created_at``) until a batch comes back short.
2. ``single``: the existing one-statement ``purge_stream_events`` on the same table.
3. ``drop_partition``: a scratch table with the same columns, partitioned by day on
   ``created_at``, where the expired day is one partition: ``DROP TABLE`` of that partition.

Each pass fills ``--rows`` expired rows (two days old) plus a fifth as many fresh rows with
one ``INSERT ... SELECT generate_series`` before the clock starts, then purges the expired
rows. Passes are interleaved (batched, single, drop, batched, ...); the figures are the
median over ``--repeats`` with the spread ((max - min) / median), and the WAL each purge
wrote (``pg_current_wal_lsn`` before and after). The partitioned table is a measurement
scaffold here, not a schema asyncstore ships.

Run: ``python -m benchmarks.maintenance_bench [--url URL] [--rows N] [--batch N]
[--repeats N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Sequence

import asyncpg

from asyncstore.storage import open_storage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

_FILL = """
INSERT INTO {table} (session_id, seq, epoch, kind, payload, created_at)
SELECT 's' || (g % 1000), g, 1, 'delta', '{{"text": "a token delta of a streamed reply"}}'::jsonb,
       now() - interval '2 days' + g * interval '10 microseconds'
FROM generate_series(1, $1::int) AS g
UNION ALL
SELECT 'f' || (g % 1000), $1 + g, 1, 'delta', '{{"text": "fresh"}}'::jsonb, now()
FROM generate_series(1, $1::int / 5) AS g
"""
_PARTITIONED = """
DROP TABLE IF EXISTS events_by_day;
CREATE TABLE events_by_day (
    session_id text NOT NULL, seq bigint NOT NULL, epoch bigint NOT NULL, kind text NOT NULL,
    payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE events_day_old PARTITION OF events_by_day
    FOR VALUES FROM (now() - interval '3 days') TO (now() - interval '1 day');
CREATE TABLE events_day_new PARTITION OF events_by_day
    FOR VALUES FROM (now() - interval '1 day') TO (now() + interval '1 day');
"""


async def _wal(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"))


async def _pass(dsn: str, kind: str, rows: int, batch: int) -> tuple[float, int, int]:
    """One fill and purge; returns (seconds, rows deleted, WAL bytes)."""
    conn = await asyncpg.connect(dsn)
    try:
        if kind == "drop_partition":
            await conn.execute(_PARTITIONED)
            await conn.execute(_FILL.format(table="events_by_day"), rows)
        else:
            await conn.execute("TRUNCATE stream_events")
            await conn.execute(_FILL.format(table="stream_events"), rows)
        await conn.execute("VACUUM ANALYZE")
        async with open_storage(dsn) as storage:
            await storage.ping()
            lsn = await _wal(conn)
            started = time.perf_counter()
            if kind == "batched":
                deleted = 0
                while True:
                    n = await storage.purge_stream_events_batch(86_400, limit=batch)
                    deleted += n
                    if n < batch:
                        break
            elif kind == "single":
                deleted = await storage.purge_stream_events(86_400)
            else:
                deleted = int(await conn.fetchval("SELECT count(*) FROM events_day_old"))
                started = time.perf_counter()  # the count is not part of the purge
                await conn.execute("DROP TABLE events_day_old")
            elapsed = time.perf_counter() - started
            wal = await _wal(conn) - lsn
        if kind == "drop_partition":
            await conn.execute("DROP TABLE events_by_day")
        return elapsed, deleted, wal
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> int:
    admin = await asyncpg.connect(args.url)
    name = f"asyncstore_bench_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{args.url.rpartition('/')[0]}/{name}"
    kinds = ("batched", "single", "drop_partition")
    results: dict[str, list[tuple[float, int, int]]] = {k: [] for k in kinds}
    try:
        async with open_storage(dsn, migrate=True):
            pass
        for _ in range(args.repeats):
            for kind in kinds:
                results[kind].append(await _pass(dsn, kind, args.rows, args.batch))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"TTL purge of {args.rows} expired rows (+{args.rows // 5} fresh), batch {args.batch}")
    print(f"{'method':<16}{'median s':>10}{'spread':>8}{'rows/s':>12}{'WAL MB':>9}")
    for kind in kinds:
        secs = [r[0] for r in results[kind]]
        median = statistics.median(secs)
        spread = (max(secs) - min(secs)) / median if median else 0.0
        deleted = results[kind][0][1]
        wal = statistics.median(r[2] for r in results[kind]) / 1e6
        rate = deleted / median if median else float("inf")
        print(f"{kind:<16}{median:>10.3f}{spread:>8.0%}{rate:>12,.0f}{wal:>9.1f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default=DEFAULT_URL, help="Postgres server (admin database)")
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
