"""Storage benchmark: throughput of asyncstore's two hottest write paths on both drivers.

What it measures, with one client and sequential calls (so the figures are per-call cost):

1. ``append_stream_events`` in batches of 1, 100 and 1000 events, in rows/s.
2. ``claim_tasks`` + ``complete_tasks`` in batches of 1, 10 and 100 on a pre-filled queue,
   drained to empty, in tasks/s (the claim and complete calls are also timed on their own).
3. On Postgres only, the raw asyncpg ceiling for the same rows on the same tables: a plain
   ``INSERT ... SELECT * FROM unnest(...)`` and a plain ``FOR UPDATE SKIP LOCKED`` claim that
   returns what a worker needs (id, lease token, attempts, payload decoded with orjson) plus
   a fenced ``UPDATE ... FROM unnest(ids, tokens)`` complete, on one plain asyncpg
   connection. The library's rate is printed as a ratio of that ceiling.

Inputs (``NewStreamEvent`` batches, raw column lists) are built before the clock starts;
JSON encoding happens inside it on both sides. Every measurement has a warm-up pass, is
repeated ``--repeats`` times with library and raw runs interleaved (A B A B), and is
reported as the median with its spread ((max - min) / median). Every repetition writes new
session ids and a new queue, so inserts are real inserts.

Run: ``python -m benchmarks.storage_bench [--url URL] [--sqlite-path PATH] [--repeats N]
[--json PATH] [--scale F]`` (``--scale 0.1`` for a quick smoke run). Postgres is reached
through ``--url`` (a server the benchmark may create a throwaway ``asyncstore_bench_*``
database on, dropped at the end); if it does not answer, only SQLite is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from asyncstore.storage import AsyncStorageBackend, NewStreamEvent, NewTask, open_storage
from benchmarks._common import create_database as _create_database
from benchmarks._common import drop_database as _drop_database
from benchmarks._common import environment
from benchmarks._common import load_average as _load_average
from benchmarks._common import redact as _redact
from benchmarks._common import with_database as _with_database

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

APPEND_BATCHES: tuple[int, ...] = (1, 100, 1000)
CLAIM_BATCHES: tuple[int, ...] = (1, 10, 100)
# Rows per repetition; small batches cost a round trip per row, so they get fewer rows.
APPEND_ROWS: dict[int, int] = {1: 1_500, 100: 20_000, 1000: 20_000}
CLAIM_ROWS: dict[int, int] = {1: 600, 10: 4_000, 100: 5_000}
WARMUP_FRACTION = 0.1
ENQUEUE_CHUNK = 1_000
LEASE_S = 30.0
WORKER_ID = "bench-worker"

APPEND_TARGET = 0.70  # library 1000-event append vs the raw batched insert
CLAIM_TARGET = 0.60  # library claim of 100 vs the raw claim

RAW_APPEND_SQL = """
INSERT INTO stream_events (session_id, seq, epoch, kind, payload)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::json[])
ON CONFLICT DO NOTHING
"""

RAW_CLAIM_SQL = """
WITH picked AS (
    SELECT id FROM agent_tasks
    WHERE queue = $1 AND status IN ('queued', 'running') AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE agent_tasks t SET
    status = 'running',
    attempts = t.attempts + 1,
    worker_id = $2,
    lease_token = nextval('claim_tokens'),
    run_after = now() + make_interval(secs => $4),
    updated_at = now()
FROM picked WHERE t.id = picked.id
RETURNING t.id, t.lease_token, t.attempts, t.payload
"""

# Fenced like the library's: a completion counts only under the claim's lease token.
RAW_COMPLETE_SQL = """
UPDATE agent_tasks t SET status = 'succeeded', updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'running'
"""


# ---------------------------------------------------------------- results


@dataclass
class Measurement:
    """One table row: an operation at one batch size on one driver, all repetitions."""

    driver: str
    operation: str
    batch: int
    rows: int
    library: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.library)

    @property
    def spread(self) -> float:
        return _spread(self.library)

    @property
    def raw_median(self) -> float | None:
        return statistics.median(self.raw) if self.raw else None

    @property
    def ratio(self) -> float | None:
        raw = self.raw_median
        return self.median / raw if raw else None

    def as_dict(self) -> dict[str, Any]:
        raw = self.raw_median
        return {
            "driver": self.driver,
            "operation": self.operation,
            "batch": self.batch,
            "rows_per_repetition": self.rows,
            "library_rows_per_s": self.library,
            "library_median": self.median,
            "library_spread": self.spread,
            "raw_rows_per_s": self.raw,
            "raw_median": raw,
            "raw_spread": _spread(self.raw) if self.raw else None,
            "ratio_to_raw": self.ratio,
        }


@dataclass(frozen=True)
class Timing:
    """One drained claim loop: wall time, time inside claim calls and inside complete calls."""

    rows: int
    total_s: float
    claim_s: float
    complete_s: float


def _spread(samples: Sequence[float]) -> float:
    med = statistics.median(samples)
    return (max(samples) - min(samples)) / med if med else 0.0


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


def _run_tag() -> str:
    return secrets.token_hex(4)


def _payload(i: int) -> dict[str, Any]:
    return {"delta": "some token text", "i": i}


def _event_batches(session_id: str, rows: int, batch: int) -> list[list[NewStreamEvent]]:
    events = [
        NewStreamEvent(session_id, 1, seq, "token", _payload(seq)) for seq in range(1, rows + 1)
    ]
    return [events[i : i + batch] for i in range(0, rows, batch)]


RawColumns = tuple[list[str], list[int], list[int], list[str], list[dict[str, Any]]]


def _raw_event_batches(session_id: str, rows: int, batch: int) -> list[RawColumns]:
    out: list[RawColumns] = []
    for start in range(1, rows + 1, batch):
        seqs = list(range(start, min(start + batch, rows + 1)))
        out.append(
            (
                [session_id] * len(seqs),
                seqs,
                [1] * len(seqs),
                ["token"] * len(seqs),
                [_payload(s) for s in seqs],
            )
        )
    return out


async def _fill_queue(storage: AsyncStorageBackend, queue: str, rows: int) -> None:
    """Enqueue ``rows`` tasks (not timed), in chunks, through the library."""
    for start in range(0, rows, ENQUEUE_CHUNK):
        chunk = [
            NewTask(queue, {"job": "summarize", "session": f"s-{i % 50}", "i": i})
            for i in range(start, min(start + ENQUEUE_CHUNK, rows))
        ]
        await storage.enqueue_tasks(chunk)


# ---------------------------------------------------------------- timed loops


async def _library_append(
    storage: AsyncStorageBackend, session_id: str, rows: int, batch: int
) -> float:
    batches = _event_batches(session_id, rows, batch)
    stored = 0
    start = time.perf_counter()
    for events in batches:
        stored += (await storage.append_stream_events(events)).stored
    elapsed = time.perf_counter() - start
    if stored != rows:
        raise RuntimeError(f"library append stored {stored} of {rows} events (conflicts?)")
    return rows / elapsed


async def _raw_append(conn: Any, session_id: str, rows: int, batch: int) -> float:
    batches = _raw_event_batches(session_id, rows, batch)
    stored = 0
    start = time.perf_counter()
    for columns in batches:
        status: str = await conn.execute(RAW_APPEND_SQL, *columns)
        stored += int(status.rsplit(" ", 1)[-1])
    elapsed = time.perf_counter() - start
    if stored != rows:
        raise RuntimeError(f"raw append stored {stored} of {rows} events (conflicts?)")
    return rows / elapsed


async def _library_claim(storage: AsyncStorageBackend, queue: str, rows: int, batch: int) -> Timing:
    done = 0
    claim_s = complete_s = 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        claimed = await storage.claim_tasks(queue, WORKER_ID, limit=batch, lease_s=LEASE_S)
        t1 = time.perf_counter()
        claim_s += t1 - t0
        if not claimed:
            break
        done += len(await storage.complete_tasks([t.claim for t in claimed]))
        complete_s += time.perf_counter() - t1
    total_s = time.perf_counter() - start
    if done != rows:
        raise RuntimeError(f"library claim loop completed {done} of {rows} tasks")
    return Timing(done, total_s, claim_s, complete_s)


async def _raw_claim(conn: Any, queue: str, rows: int, batch: int) -> Timing:
    done = 0
    claim_s = complete_s = 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        claimed = await conn.fetch(RAW_CLAIM_SQL, queue, WORKER_ID, batch, LEASE_S)
        # A worker needs the payload as a value, as the library hands it over: the
        # connection's json codec decodes it (with orjson) while the rows are read.
        _payloads = [r[3] for r in claimed]
        t1 = time.perf_counter()
        claim_s += t1 - t0
        if not claimed:
            break
        status: str = await conn.execute(
            RAW_COMPLETE_SQL, [r[0] for r in claimed], [r[1] for r in claimed]
        )
        done += int(status.rsplit(" ", 1)[-1])
        complete_s += time.perf_counter() - t1
    total_s = time.perf_counter() - start
    if done != rows:
        raise RuntimeError(f"raw claim loop completed {done} of {rows} tasks")
    return Timing(done, total_s, claim_s, complete_s)


# ---------------------------------------------------------------- one driver


@dataclass
class Bench:
    """Runs every measurement of one driver; ``raw`` is a plain asyncpg connection or None."""

    driver: str
    storage: AsyncStorageBackend
    raw: Any | None
    repeats: int
    scale: float
    tag: str = field(default_factory=_run_tag)
    results: list[Measurement] = field(default_factory=list)

    def _rows(self, base: int, batch: int) -> int:
        # A whole number of batches, at least two.
        return max(2 * batch, round(base * self.scale / batch) * batch)

    def _name(self, kind: str, side: str, batch: int, rep: str) -> str:
        return f"bench-{self.tag}-{kind}-{side}-b{batch}-{rep}"

    async def run(self) -> list[Measurement]:
        for batch in APPEND_BATCHES:
            await self._append(batch)
        for batch in CLAIM_BATCHES:
            await self._claim(batch)
        return self.results

    async def _append(self, batch: int) -> None:
        rows = self._rows(APPEND_ROWS[batch], batch)
        m = Measurement(self.driver, "append_stream_events", batch, rows)
        warm = self._rows(int(APPEND_ROWS[batch] * WARMUP_FRACTION), batch)
        await _library_append(self.storage, self._name("ev", "lib", batch, "warm"), warm, batch)
        if self.raw is not None:
            await _raw_append(self.raw, self._name("ev", "raw", batch, "warm"), warm, batch)
        for rep in range(self.repeats):
            sid = self._name("ev", "lib", batch, str(rep))
            m.library.append(await _library_append(self.storage, sid, rows, batch))
            if self.raw is not None:
                sid = self._name("ev", "raw", batch, str(rep))
                m.raw.append(await _raw_append(self.raw, sid, rows, batch))
            self._report(m, rep)
        self.results.append(m)

    async def _claim(self, batch: int) -> None:
        rows = self._rows(CLAIM_ROWS[batch], batch)
        both = Measurement(self.driver, "claim+complete", batch, rows)
        claim = Measurement(self.driver, "claim only", batch, rows)
        complete = Measurement(self.driver, "complete only", batch, rows)

        async def library(rep: str, n: int) -> Timing:
            queue = self._name("q", "lib", batch, rep)
            await self._fill(queue, n)
            return await _library_claim(self.storage, queue, n, batch)

        async def raw(rep: str, n: int) -> Timing:
            queue = self._name("q", "raw", batch, rep)
            await self._fill(queue, n)
            return await _raw_claim(self.raw, queue, n, batch)

        sides: list[tuple[Callable[[str, int], Awaitable[Timing]], bool]] = [(library, False)]
        if self.raw is not None:
            sides.append((raw, True))
        warm = self._rows(int(CLAIM_ROWS[batch] * WARMUP_FRACTION), batch)
        for side, _ in sides:
            await side("warm", warm)
        for rep in range(self.repeats):
            for side, is_raw in sides:
                t = await side(str(rep), rows)
                for target, seconds in (
                    (both, t.total_s),
                    (claim, t.claim_s),
                    (complete, t.complete_s),
                ):
                    (target.raw if is_raw else target.library).append(t.rows / seconds)
            self._report(both, rep)
        self.results.extend([both, claim, complete])

    async def _fill(self, queue: str, rows: int) -> None:
        """Pre-fill a queue (not timed). On Postgres, then vacuum and analyze the table.

        The benchmark grows ``agent_tasks`` from empty within seconds, far faster than
        autovacuum reacts: without fresh statistics a prepared statement keeps a generic
        plan made for a tiny table (the raw ``id = ANY($1)`` complete then seq-scans the
        whole table), and dead rows from earlier repetitions tax later ones. A production
        table has autovacuum's statistics; this gives every repetition, library and raw
        alike, the same clean start.
        """
        await _fill_queue(self.storage, queue, rows)
        if self.raw is not None:
            await self.raw.execute("VACUUM (ANALYZE) agent_tasks")

    def _report(self, m: Measurement, rep: int) -> None:
        line = (
            f"  {m.driver:<8} {m.operation:<22} batch={m.batch:<5} rep {rep + 1}/{self.repeats}: "
        )
        line += f"{m.library[-1]:>10,.0f} rows/s"
        if m.raw:
            line += f"   raw {m.raw[-1]:>10,.0f} rows/s"
        _progress(line)


# ---------------------------------------------------------------- Postgres setup


def _encode_json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _decode_json_text(text: str) -> Any:
    return orjson.loads(text)


async def _raw_connection(url: str) -> Any:
    conn = await asyncpg.connect(url)
    for name in ("json", "jsonb"):  # payloads are json since migration 0008
        await conn.set_type_codec(
            name,
            encoder=_encode_json_text,
            decoder=_decode_json_text,
            schema="pg_catalog",
            format="text",
        )
    return conn


async def _bench_postgres(admin_url: str, repeats: int, scale: float) -> list[Measurement] | None:
    name = await _create_database(admin_url)
    if name is None:
        return None
    url = _with_database(admin_url, name)
    _progress(f"postgres: throwaway database {name}")
    try:
        async with open_storage(url, migrate=True) as storage:
            raw = await _raw_connection(url)
            try:
                return await Bench("postgres", storage, raw, repeats, scale).run()
            finally:
                await raw.close()
    finally:
        await _drop_database(admin_url, name)
        _progress(f"postgres: dropped {name}")


async def _bench_sqlite(path: Path, repeats: int, scale: float) -> list[Measurement]:
    _progress(f"sqlite: {path}")
    async with open_storage(f"sqlite:///{path}", migrate=True) as storage:
        return await Bench("sqlite", storage, None, repeats, scale).run()


# ---------------------------------------------------------------- report


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


_PARTS = frozenset({"claim only", "complete only"})  # shown indented under claim+complete


def render_table(results: Sequence[Measurement]) -> str:
    header = (
        "driver",
        "operation",
        "batch",
        "rows/s (median)",
        "spread %",
        "raw ceiling rows/s",
        "ratio to raw",
    )
    lines = [
        (
            m.driver,
            f"  {m.operation}" if m.operation in _PARTS else m.operation,
            str(m.batch),
            _fmt_rate(m.median),
            f"{m.spread * 100:.1f}",
            _fmt_rate(m.raw_median),
            _fmt_pct(m.ratio),
        )
        for m in results
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    left = {0, 1}

    def fmt(row: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(row) for row in lines)])


def _find(results: Sequence[Measurement], operation: str, batch: int) -> Measurement | None:
    for m in results:
        if m.driver == "postgres" and m.operation == operation and m.batch == batch:
            return m
    return None


def evaluate_targets(results: Sequence[Measurement]) -> list[dict[str, Any]]:
    append = _find(results, "append_stream_events", 1000)
    claim = _find(results, "claim only", 100)
    both = _find(results, "claim+complete", 100)
    targets: list[dict[str, Any]] = []
    for title, m, goal in (
        ("library 1000-event append >= 70% of raw batched insert", append, APPEND_TARGET),
        ("claim of 100 >= 60% of raw claim", claim, CLAIM_TARGET),
    ):
        ratio = None if m is None else m.ratio
        targets.append(
            {
                "target": title,
                "goal": goal,
                "ratio": ratio,
                "met": None if ratio is None else ratio >= goal,
            }
        )
    if both is not None:
        targets[1]["claim_plus_complete_ratio"] = both.ratio
    return targets


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        if t["ratio"] is None:
            verdict = "n/a (Postgres not measured)"
        else:
            verdict = f"{t['ratio'] * 100:.1f}% -> {'met' if t['met'] else 'NOT MET'}"
            if "claim_plus_complete_ratio" in t and t["claim_plus_complete_ratio"] is not None:
                verdict += f" (claim+complete: {t['claim_plus_complete_ratio'] * 100:.1f}%)"
        lines.append(f"target: {t['target']}: {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.storage_bench",
        description="Measure asyncstore's stream-event append and task claim paths on SQLite "
        "and Postgres, against the raw asyncpg ceiling.",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="Postgres server to create a throwaway asyncstore_bench_* database on "
        f"(default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--sqlite-path",
        type=Path,
        default=None,
        help="SQLite database file (default: bench.db in a temporary directory, removed after)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per measurement")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every row count by this (e.g. 0.1 for a quick smoke run)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    return args


async def _run(args: argparse.Namespace, sqlite_path: Path) -> list[Measurement]:
    results = await _bench_sqlite(sqlite_path, args.repeats, args.scale)
    postgres = await _bench_postgres(args.url, args.repeats, args.scale)
    if postgres is not None:
        results.extend(postgres)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = _load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asyncstore-bench-") as tmp:
        sqlite_path = (args.sqlite_path or Path(tmp) / "bench.db").resolve()
        results = asyncio.run(_run(args, sqlite_path))
    elapsed = time.perf_counter() - started
    load_after = _load_average()
    targets = evaluate_targets(results)

    print(render_table(results))
    print()
    print(render_targets(targets))
    print(f"repeats: {args.repeats}, scale: {args.scale}, run time: {elapsed:.1f} s")
    if load_before is not None and load_after is not None:
        print(
            f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, "
            f"on {os.cpu_count()} CPUs (this client and the database share them)"
        )

    if args.json is not None:
        document = {
            "benchmark": "storage_bench",
            "config": {
                "url": _redact(args.url),
                "repeats": args.repeats,
                "scale": args.scale,
                "append_rows": APPEND_ROWS,
                "claim_rows": CLAIM_ROWS,
            },
            "environment": environment(),
            "run_time_s": elapsed,
            "load_average_1m": {"before": load_before, "after": load_after},
            "results": [m.as_dict() for m in results],
            "targets": targets,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
