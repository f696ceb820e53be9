"""Stream benchmark: the batched StreamEventWriter and the BroadcastHub against their legacy
paths and against the ceilings they aim at, in one run.

1. Persistence throughput of ``emit`` (events/s from the first emit to the flush barrier),
   across 50 sessions: batched writer vs the legacy one-insert-per-event path, vs a raw
   batched insert of the same rows in batches of the writer's size (asyncpg ``unnest`` with
   ``ON CONFLICT DO NOTHING`` on Postgres, ``executemany`` in one transaction on SQLite;
   measured against the alternatives: on SQLite one thread hand-off instead of three is
   within the noise, on Postgres ``executemany`` is slower and ``COPY`` faster). Postgres
   also has a ``raw batched COPY`` row: the fastest plain insert of the rows, with no
   conflict handling, an upper bound no idempotent append reaches. Targets (Postgres): batched >=
   20x legacy and >= 60% of the raw ceiling. A second raw row feeds the same insert from
   the same 50 producer tasks (each makes its row and awaits before the next, a flusher
   inserts full batches one at a time): the ceiling for the producers' shape, so the
   table tells the library's own cost from the cost of 50 tasks taking turns per event.
2. ``emit`` latency on the caller (p50/p99 of each ``emit_nowait`` call, with subscribers
   attached and the flusher running). Target: p99 < 50 us.
3. Fan-out, 500 sessions x 6 subscribers = 3000 subscribers: (a) saturation deliveries/s
   of the memory path vs a bare asyncio fan-out of the same shape (one ``asyncio.Queue``
   per subscriber, no persistence); target >= 50%. (b) at a token rate (20 tokens/s per
   session), delivery latency p50/p99 and database reads per second caused by live
   subscribers, memory mode vs the legacy poll mode. Target: zero reads in memory mode.
4. Cross-process delivery (Postgres only: SQLite's notifications reach only the process
   that sent them). A producer process (StreamEventWriter + BroadcastHub) emits at 20
   events/s per session over 50 sessions (and at 100 events/s per session), a subscriber
   process (its own storage handle and hub, ``cross_instance``) follows every session.
   Latency is the subscriber's wall clock at receipt minus the emit time in the payload
   (same machine), next to the in-process figure of subscribers in the producer's own
   hub; plus the subscriber hub's database reads per event, notifications/s and insert
   statements per event. Optimized (events inline in the notification, prompt flush) vs
   legacy (advances only, receivers fetch; 50 ms flush interval). Target: cross-process
   p99 < 25 ms at 20 events/s per session.

Sides alternate A B A B within each repetition; medians and spread ((max-min)/median) are
reported, and a spread over 25% is flagged as too noisy to claim a result.

Run: ``python -m benchmarks.streams_bench [--url URL] [--repeats N] [--quick] [--json PATH]``
(``--sections`` picks some of throughput, latency, fanout, cross).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import asyncpg

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, DeliveryMode, HubConfig, StreamReset
from asyncstore.orchestrator.errors import Dropped
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import AsyncStorageBackend, StreamEvent, open_storage
from benchmarks._common import NOISY, REPO, check, compare, environment, median
from benchmarks._common import create_database as _create_database
from benchmarks._common import drop_database as _drop_database
from benchmarks._common import load_average as _load_average
from benchmarks._common import redact as _redact
from benchmarks._common import with_database as _with_database
from benchmarks.storage_bench import (
    DEFAULT_URL,
    RAW_APPEND_SQL,
    _raw_connection,
)

SESSIONS_THROUGHPUT = 50
FANOUT_SESSIONS = 500
FANOUT_SUBSCRIBERS_PER_SESSION = 6
TOKEN_RATE_PER_SESSION = 20.0
WRITER_BATCH = 500

TEXT = "some token text"


@dataclass
class Row:
    """One figure of the table, all repetitions."""

    section: str
    driver: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / abs(self.median)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "driver": self.driver,
            "name": self.name,
            "unit": self.unit,
            "samples": self.samples,
            "median": self.median,
            "spread": self.spread,
        }


class Results:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}

    def add(self, section: str, driver: str, name: str, unit: str, value: float) -> None:
        key = (section, driver, name)
        if key not in self.rows:
            self.rows[key] = Row(section, driver, name, unit)
        self.rows[key].samples.append(value)

    def median(self, section: str, driver: str, name: str) -> float | None:
        row = self.rows.get((section, driver, name))
        return row.median if row is not None and row.samples else None


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _batch_config(timer: bool = False) -> BatchConfig:
    """The stream writer's shipped flush rule, with room for a whole run; ``timer``: the
    previous rule (a 50 ms flush interval, no group commit)."""
    update: dict[str, Any] = {"max_batch": WRITER_BATCH, "capacity": 200_000}
    if timer:
        update.update(eager=False, flush_interval_s=0.05)
    return StreamConfig().batch.model_copy(update=update)


# ---------------------------------------------------------------- 1. persistence throughput


async def _emit_all(
    writer: StreamEventWriter, tag: str, events: int, batched: bool, producers: int
) -> float:
    """``producers`` session tasks emit ``events`` in all, each awaiting between events (a
    server's producers await their next token); the clock stops at the flush barrier."""
    sessions = [f"{tag}-{s}" for s in range(SESSIONS_THROUGHPUT)]
    for sid in sessions:
        await writer.begin(sid, epoch=1)

    async def produce(worker: int) -> None:
        for i in range(worker, events, producers):
            sid = sessions[i % SESSIONS_THROUGHPUT]
            if batched:
                with contextlib.suppress(Dropped):  # counted in the writer's statistics
                    writer.emit_nowait(sid, "delta", {"text": TEXT, "i": i})
                await anyio.lowlevel.checkpoint()
            else:
                await writer.emit(sid, "delta", {"text": TEXT, "i": i})

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for worker in range(producers):
            tg.start_soon(produce, worker)
    await writer.flush()
    elapsed = time.perf_counter() - started
    for sid in sessions:
        writer.end(sid)
    return events / elapsed


async def _library(
    storage: AsyncStorageBackend,
    tag: str,
    events: int,
    batched: bool,
    producers: int,
    timer: bool = False,
) -> tuple[float, float]:
    """Events/s and insert statements per event.

    The legacy writer is the seed's "before": one INSERT per event and no NOTIFY, since
    nobody listens here (the hub does not follow other instances).
    """
    config = StreamConfig(batching=batched, batch=_batch_config(timer), notify=batched)
    async with (
        BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
        StreamEventWriter(storage, hub, config) as writer,
    ):
        rate = await _emit_all(writer, tag, events, batched, producers)
        stats = writer.statistics()
        if stats.persisted != events or stats.lost:
            raise RuntimeError(f"persisted {stats.persisted} of {events}, lost {stats.lost}")
        statements = stats.writer.batches if stats.writer is not None else stats.insert_statements
        return rate, statements / events


def _raw_rows(tag: str, events: int) -> list[list[tuple[str, int, int, str, Any]]]:
    batches: list[list[tuple[str, int, int, str, Any]]] = []
    rows: list[tuple[str, int, int, str, Any]] = []
    for i in range(events):
        s = i % SESSIONS_THROUGHPUT
        seq = i // SESSIONS_THROUGHPUT + 1
        rows.append((f"{tag}-{s}", seq, 1, "delta", {"text": TEXT, "i": i}))
        if len(rows) == WRITER_BATCH:
            batches.append(rows)
            rows = []
    if rows:
        batches.append(rows)
    return batches


RawRow = tuple[str, int, int, str, Any]
InsertBatch = Callable[[list[RawRow]], Awaitable[None]]


def _postgres_insert(conn: Any) -> InsertBatch:
    async def insert(batch: list[RawRow]) -> None:
        columns = [list(c) for c in zip(*batch, strict=True)]
        await conn.execute(RAW_APPEND_SQL, *columns)

    return insert


def _postgres_copy(conn: Any) -> InsertBatch:
    """COPY of the same rows (binary, asyncpg's own json codec): the fastest plain way to
    insert a batch here, but with neither idempotency nor a fence (a retried batch fails on
    the primary key), so it bounds what any append statement can reach."""
    import orjson

    columns = ["session_id", "seq", "epoch", "kind", "payload"]

    async def insert(batch: list[RawRow]) -> None:
        records = [(s, q, e, k, orjson.dumps(p).decode()) for s, q, e, k, p in batch]
        await conn.copy_records_to_table("stream_events", records=records, columns=columns)

    return insert


def _sqlite_insert(db: aiosqlite.Connection) -> InsertBatch:
    import orjson

    async def insert(batch: list[RawRow]) -> None:
        await db.execute("BEGIN IMMEDIATE")
        now = time.time()
        await db.executemany(
            "INSERT OR IGNORE INTO stream_events "
            "(session_id, seq, epoch, kind, payload, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(s, q, e, k, orjson.dumps(p).decode(), now) for s, q, e, k, p in batch],
        )
        await db.commit()

    return insert


async def _raw_prebuilt(insert: InsertBatch, tag: str, events: int) -> float:
    """Rows built before the clock starts, inserted in batches of the writer's size."""
    batches = _raw_rows(tag, events)
    started = time.perf_counter()
    for batch in batches:
        await insert(batch)
    return events / (time.perf_counter() - started)


async def _raw_fed(insert: InsertBatch, tag: str, events: int, producers: int) -> float:
    """The same insert fed like the writer: ``producers`` tasks each make their rows and
    await between rows (as ``_emit_all`` does); one flusher inserts ``WRITER_BATCH`` rows at
    a time as they wait, the rest once the producers are done. No library in between."""
    pending: list[RawRow] = []
    full = anyio.Event()
    produced = 0

    async def produce(worker: int) -> None:
        nonlocal full, produced
        for i in range(worker, events, producers):
            sid, seq = f"{tag}-{i % SESSIONS_THROUGHPUT}", i // SESSIONS_THROUGHPUT + 1
            pending.append((sid, seq, 1, "delta", {"text": TEXT, "i": i}))
            produced += 1
            if len(pending) >= WRITER_BATCH or produced == events:
                full.set()
            await anyio.lowlevel.checkpoint()

    async def flush() -> None:
        nonlocal full
        stored = 0
        while stored < events:
            if len(pending) < WRITER_BATCH and produced < events:
                await full.wait()
                full = anyio.Event()
                continue
            batch = pending[:WRITER_BATCH]
            del pending[:WRITER_BATCH]
            await insert(batch)
            stored += len(batch)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(flush)
        for worker in range(producers):
            tg.start_soon(produce, worker)
    return events / (time.perf_counter() - started)


Raw = Callable[[str, int, int | None], Awaitable[float]]
"""``raw(tag, events, producers)``: rows/s of the raw insert, prebuilt rows (None) or fed."""


def _raw(insert: InsertBatch) -> Raw:
    async def raw(tag: str, events: int, producers: int | None) -> float:
        if producers is None:
            return await _raw_prebuilt(insert, tag, events)
        return await _raw_fed(insert, tag, events, producers)

    return raw


async def bench_throughput(
    results: Results,
    driver: str,
    storage: AsyncStorageBackend,
    raw: Raw,
    repeats: int,
    quick: bool,
    copy: Raw | None = None,
) -> None:
    batched_n = 5_000 if quick else 30_000
    legacy_n = 300 if quick else 1_500
    many = SESSIONS_THROUGHPUT
    await _library(storage, f"warm-{driver}", batched_n // 10, True, many)
    await _library(storage, f"warm-l-{driver}", legacy_n // 10, False, many)
    await raw(f"warm-r-{driver}", batched_n // 10, None)
    if copy is not None:
        await copy(f"warm-c-{driver}", batched_n // 10, None)

    async def raw_rate(tag: str, n: int, producers: int | None = None) -> tuple[float, float]:
        return await raw(tag, n, producers), 1 / WRITER_BATCH

    async def _rate(pending: Awaitable[float]) -> tuple[float, float]:
        return await pending, 1 / WRITER_BATCH

    for rep in range(repeats):
        _progress(f"{driver}: persistence throughput, repetition {rep + 1}/{repeats}")
        tag = f"{rep}-{driver}"
        sides: list[tuple[str, Awaitable[tuple[float, float]]]] = [
            ("batched, 50 producers", _library(storage, f"b{tag}", batched_n, True, many)),
            (
                "batched 50 ms timer, 50 producers",
                _library(storage, f"t{tag}", batched_n, True, many, timer=True),
            ),
            ("legacy, 50 producers", _library(storage, f"l{tag}", legacy_n, False, many)),
            ("legacy, 1 producer", _library(storage, f"m{tag}", legacy_n, False, 1)),
            ("raw batched insert", raw_rate(f"r{tag}", batched_n)),
            ("raw batched insert, 50 producers", raw_rate(f"f{tag}", batched_n, many)),
        ]
        if copy is not None:
            sides.append(("raw batched COPY", _rate(copy(f"c{tag}", batched_n, None))))
        if rep % 2:
            sides.reverse()
        for name, pending in sides:
            rate, statements = await pending
            results.add("throughput", driver, name, "events/s", rate)
            if name.startswith("batched"):
                results.add("throughput", driver, f"{name}: statements/event", "ratio", statements)


# ---------------------------------------------------------------- 2. emit latency


async def bench_emit_latency(
    results: Results, driver: str, storage: AsyncStorageBackend, repeats: int, quick: bool
) -> None:
    events = 10_000 if quick else 50_000
    for rep in range(repeats):
        _progress(f"{driver}: emit latency, repetition {rep + 1}/{repeats}")
        config = StreamConfig(batch=_batch_config())
        async with (
            BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
            StreamEventWriter(storage, hub, config) as writer,
        ):
            sessions = [f"lat{rep}-{s}" for s in range(SESSIONS_THROUGHPUT)]
            subs: list[Any] = []
            for sid in sessions:
                await writer.begin(sid, epoch=1)
                subs.extend(hub.subscribe(sid) for _ in range(2))
            samples: list[float] = []
            clock = time.perf_counter_ns
            for i in range(events):
                sid = sessions[i % SESSIONS_THROUGHPUT]
                t0 = clock()
                try:  # noqa: SIM105 - suppress() would add its cost to the timed call
                    writer.emit_nowait(sid, "delta", {"text": TEXT, "i": i})
                except Dropped:  # counted in the writer's statistics
                    pass
                samples.append((clock() - t0) / 1000)
                if i % 200 == 199:
                    await anyio.lowlevel.checkpoint()
            await writer.flush()
            for sub in subs:
                await sub.aclose()
        results.add("emit latency", driver, "emit_nowait p50", "us", _percentile(samples, 0.5))
        results.add("emit latency", driver, "emit_nowait p99", "us", _percentile(samples, 0.99))


# ---------------------------------------------------------------- 3. fan-out


async def _bare_fanout(events_per_session: int) -> float:
    """The same shape with nothing but asyncio queues: the ceiling for deliveries/s."""
    queues = [
        [asyncio.Queue[dict[str, Any]]() for _ in range(FANOUT_SUBSCRIBERS_PER_SESSION)]
        for _ in range(FANOUT_SESSIONS)
    ]
    latencies: list[float] = []
    total = FANOUT_SESSIONS * FANOUT_SUBSCRIBERS_PER_SESSION * events_per_session
    delivered = 0
    done = asyncio.Event()

    async def consume(q: asyncio.Queue[dict[str, Any]]) -> None:
        nonlocal delivered
        for _ in range(events_per_session):
            item = await q.get()
            latencies.append(time.perf_counter() - item["t"])
            delivered += 1
        if delivered == total:
            done.set()

    async def produce(group: list[asyncio.Queue[dict[str, Any]]]) -> None:
        for _ in range(events_per_session):
            item = {"text": TEXT, "t": time.perf_counter()}
            for q in group:
                q.put_nowait(item)
            await asyncio.sleep(0)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for group in queues:
            for q in group:
                tg.start_soon(consume, q)
        for group in queues:
            tg.start_soon(produce, group)
        await done.wait()
    return total / (time.perf_counter() - started)


async def _hub_fanout(
    storage: AsyncStorageBackend,
    tag: str,
    events_per_session: int,
    mode: DeliveryMode,
    rate: float | None,
    poll_interval_s: float = 0.2,
) -> dict[str, float]:
    """Writer + hub + 3000 subscribers; returns deliveries/s, latency and db reads/s."""
    hub_config = HubConfig(mode=mode, cross_instance=False, poll_interval_s=poll_interval_s)
    sessions = [f"{tag}-{s}" for s in range(FANOUT_SESSIONS)]
    total = FANOUT_SESSIONS * FANOUT_SUBSCRIBERS_PER_SESSION * events_per_session
    latencies: list[float] = []
    delivered = 0
    done = anyio.Event()
    async with (
        BroadcastHub(storage, hub_config) as hub,
        StreamEventWriter(storage, hub, StreamConfig(batch=_batch_config())) as writer,
    ):
        for sid in sessions:
            await writer.begin(sid, epoch=1)

        async def consume(sid: str) -> None:
            nonlocal delivered
            async with hub.subscribe(
                sid, after=(1, 0) if mode is DeliveryMode.POLL else None
            ) as sub:
                got = 0
                async for item in sub:
                    if isinstance(item, StreamReset):
                        raise RuntimeError(f"unexpected reset {item}")
                    latencies.append(time.perf_counter() - item.payload["t"])
                    got += 1
                    delivered += 1
                    if got == events_per_session:
                        break
            if delivered == total:
                done.set()

        async def produce(sid: str, offset: float) -> None:
            if rate is not None:
                await anyio.sleep(offset)
            for _ in range(events_per_session):
                with contextlib.suppress(Dropped):  # counted in the writer's statistics
                    writer.emit_nowait(sid, "delta", {"text": TEXT, "t": time.perf_counter()})
                if rate is None:
                    await anyio.lowlevel.checkpoint()
                else:
                    await anyio.sleep(1 / rate)

        reads_before = hub.statistics().db_reads_total
        async with anyio.create_task_group() as tg:
            for sid in sessions:
                for _ in range(FANOUT_SUBSCRIBERS_PER_SESSION):
                    tg.start_soon(consume, sid)
            await anyio.sleep(0.05)  # every subscriber registered and waiting
            started = time.perf_counter()
            for n, sid in enumerate(sessions):
                offset = (n / FANOUT_SESSIONS) / rate if rate else 0.0
                tg.start_soon(produce, sid, offset)
            with anyio.fail_after(300):
                await done.wait()
            elapsed = time.perf_counter() - started
        stats = hub.statistics()
        await writer.flush()
    live_reads = stats.live_db_reads
    return {
        "deliveries_per_s": total / elapsed,
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "db_reads_per_s": (stats.db_reads_total - reads_before) / elapsed,
        "live_db_reads": float(live_reads),
    }


async def bench_fanout(
    results: Results, driver: str, storage: AsyncStorageBackend, repeats: int, quick: bool
) -> None:
    burst = 20 if quick else 60
    paced = 30 if quick else 60  # events per session at TOKEN_RATE_PER_SESSION
    await _bare_fanout(2)
    await _hub_fanout(storage, f"warm-{driver}", 2, DeliveryMode.MEMORY, None)
    for rep in range(repeats):
        _progress(f"{driver}: fan-out saturation, repetition {rep + 1}/{repeats}")
        sides = ["hub", "bare"] if rep % 2 == 0 else ["bare", "hub"]
        for side in sides:
            if side == "bare":
                rate = await _bare_fanout(burst)
                results.add("fan-out", driver, "bare asyncio deliveries/s", "1/s", rate)
            else:
                fig = await _hub_fanout(
                    storage, f"sat{rep}-{driver}", burst, DeliveryMode.MEMORY, None
                )
                results.add(
                    "fan-out", driver, "memory deliveries/s", "1/s", fig["deliveries_per_s"]
                )
        _progress(f"{driver}: fan-out at {TOKEN_RATE_PER_SESSION:g} tokens/s, rep {rep + 1}")
        modes = [DeliveryMode.MEMORY, DeliveryMode.POLL]
        if rep % 2:
            modes.reverse()
        for mode in modes:
            fig = await _hub_fanout(
                storage, f"pace{rep}-{mode.value}-{driver}", paced, mode, TOKEN_RATE_PER_SESSION
            )
            label = mode.value
            results.add("fan-out paced", driver, f"{label} latency p50", "ms", fig["p50_ms"])
            results.add("fan-out paced", driver, f"{label} latency p99", "ms", fig["p99_ms"])
            results.add(
                "fan-out paced", driver, f"{label} db reads/s", "1/s", fig["db_reads_per_s"]
            )
            results.add(
                "fan-out paced", driver, f"{label} live-subscriber reads", "n", fig["live_db_reads"]
            )


# ---------------------------------------------------------------- 4. cross-process delivery

CROSS_SESSIONS = 50
CROSS_RATES = (20.0, 100.0)  # events/s per session
CROSS_SIDES = ("optimized", "eager", "legacy")


def _cross_config(side: str) -> StreamConfig:
    if side == "optimized":
        return StreamConfig()
    if side == "eager":
        # The alternative flush rule: group commit, a flush as soon as the last one is done.
        return StreamConfig(batch=StreamConfig().batch.model_copy(update={"eager": True}))
    # The previous release: advances only (every receiving hub fetches) and a 50 ms timer.
    timer = StreamConfig().batch.model_copy(update={"eager": False, "flush_interval_s": 0.05})
    return StreamConfig(notify_inline=False, batch=timer)


def _summary(latencies_s: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _percentile(latencies_s, 0.5) * 1000,
        "p99_ms": _percentile(latencies_s, 0.99) * 1000,
        "max_ms": max(latencies_s, default=float("nan")) * 1000,
        "n": float(len(latencies_s)),
    }


async def _cross_subscriber(url: str, tag: str, sessions: int, events: int) -> dict[str, float]:
    """The subscriber process: its own storage handle and hub, one subscriber per session."""
    latencies: list[float] = []
    resets = 0
    async with open_storage(url) as storage, BroadcastHub(storage) as hub:
        subs = [hub.subscribe(f"{tag}-{s}") for s in range(sessions)]

        async def consume(sub: Any) -> None:
            nonlocal resets
            got = 0
            async for item in sub:
                now = time.time()
                if isinstance(item, StreamReset):
                    resets += 1
                    continue
                latencies.append(now - item.payload["t"])
                got += 1
                if got == events:
                    break

        print("ready", flush=True)  # every subscription is registered and listening
        started = time.perf_counter()
        with anyio.fail_after(events / 5 + 120):
            async with anyio.create_task_group() as tg:
                for sub in subs:
                    tg.start_soon(consume, sub)
        elapsed = time.perf_counter() - started
        stats = hub.statistics()
        for sub in subs:
            await sub.aclose()
    return {
        **_summary(latencies),
        "db_reads": float(stats.db_reads_total),
        "notifications_per_s": stats.notifications / elapsed,
        "inline_events": float(getattr(stats, "inline_events", 0)),
        "resets": float(resets),
    }


async def _cross_producer(
    url: str, tag: str, sessions: int, events: int, rate: float, side: str
) -> dict[str, float]:
    """The producer process: writer + hub, paced emits, in-process subscribers beside."""
    latencies: list[float] = []
    sids = [f"{tag}-{s}" for s in range(sessions)]
    async with (
        open_storage(url) as storage,
        BroadcastHub(storage) as hub,
        StreamEventWriter(storage, hub, _cross_config(side)) as writer,
    ):
        for sid in sids:
            await writer.begin(sid, epoch=1)

        async def consume(sid: str) -> None:
            got = 0
            async with hub.subscribe(sid) as sub:
                async for item in sub:
                    now = time.time()
                    if isinstance(item, StreamEvent):
                        latencies.append(now - item.payload["t"])
                        got += 1
                        if got == events:
                            break

        async def produce(sid: str, offset: float) -> None:
            await anyio.sleep(offset)
            due = time.monotonic()
            for _ in range(events):
                with contextlib.suppress(Dropped):  # counted in the writer's statistics
                    writer.emit_nowait(sid, "delta", {"text": TEXT, "t": time.time()})
                due += 1 / rate
                await anyio.sleep(max(0.0, due - time.monotonic()))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for sid in sids:
                tg.start_soon(consume, sid)
            await anyio.lowlevel.checkpoint()
            for n, sid in enumerate(sids):
                tg.start_soon(produce, sid, (n / sessions) / rate)
        await writer.flush()
        elapsed = time.perf_counter() - started
        stats = writer.statistics()
    batches = stats.writer.batches if stats.writer is not None else 0
    in_process = _summary(latencies)
    return {
        "in_p50_ms": in_process["p50_ms"],
        "in_p99_ms": in_process["p99_ms"],
        "statements_per_event": batches / max(1, stats.persisted),
        "notifications_per_s": stats.notifications / elapsed,
        "lost": float(stats.lost),
    }


async def _child(argv: list[str]) -> Any:
    return await anyio.open_process(
        [sys.executable, "-m", "benchmarks.streams_bench", *argv],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )


async def _read_line(stream: Any) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


async def _cross_once(
    url: str, tag: str, rate: float, seconds: float, side: str
) -> dict[str, float]:
    """One producer process and one subscriber process; their figures merged."""
    events = max(1, round(rate * seconds))
    common = [
        "--url",
        url,
        "--tag",
        tag,
        "--sessions",
        str(CROSS_SESSIONS),
        "--events",
        str(events),
    ]
    limit = seconds + 120
    with anyio.fail_after(limit):
        async with await _child(["--role", "subscriber", *common]) as sub:
            assert sub.stdout is not None
            ready = await _read_line(sub.stdout)
            if ready != "ready":
                raise RuntimeError(f"subscriber process did not start: {ready!r}")
            argv = ["--role", "producer", *common, "--rate", str(rate), "--side", side]
            async with await _child(argv) as prod:
                assert prod.stdout is not None
                produced = json.loads(await _read_line(prod.stdout))
                await prod.wait()
            received = json.loads(await _read_line(sub.stdout))
            await sub.wait()
    if received["n"] != CROSS_SESSIONS * events or produced["lost"]:
        raise RuntimeError(f"cross-process run incomplete: {received} {produced}")
    return {
        "cross_p50_ms": received["p50_ms"],
        "cross_p99_ms": received["p99_ms"],
        "in_p50_ms": produced["in_p50_ms"],
        "in_p99_ms": produced["in_p99_ms"],
        "reads_per_event": received["db_reads"] / received["n"],
        "notifications_per_s": produced["notifications_per_s"],
        "statements_per_event": produced["statements_per_event"],
    }


async def bench_cross_process(
    results: Results,
    url: str,
    repeats: int,
    quick: bool,
    sides: Sequence[str],
    rates: Sequence[float] | None = None,
) -> None:
    seconds = 3.0 if quick else 8.0
    if rates is None:
        rates = CROSS_RATES[:1] if quick else CROSS_RATES
    for rep in range(repeats):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for rate in rates:
            for side in order:
                _progress(
                    f"postgres: cross-process {side} at {rate:g}/s per session, rep {rep + 1}"
                )
                fig = await _cross_once(url, f"x{rep}-{side}-{rate:g}", rate, seconds, side)
                label = f"{side}, {rate:g}/s x {CROSS_SESSIONS}"
                for key, name, unit in (
                    ("cross_p50_ms", "cross-process p50", "ms"),
                    ("cross_p99_ms", "cross-process p99", "ms"),
                    ("in_p50_ms", "in-process p50", "ms"),
                    ("in_p99_ms", "in-process p99", "ms"),
                    ("reads_per_event", "subscriber db reads/event", "ratio"),
                    ("notifications_per_s", "notifications/s", "1/s"),
                    ("statements_per_event", "insert statements/event", "ratio"),
                ):
                    results.add("cross-process", "postgres", f"{label}: {name}", unit, fig[key])


async def _role(args: argparse.Namespace) -> dict[str, float]:
    if args.role == "subscriber":
        return await _cross_subscriber(args.url, args.tag, args.sessions, args.events)
    return await _cross_producer(
        args.url, args.tag, args.sessions, args.events, args.rate, args.side
    )


# ---------------------------------------------------------------- drivers and report


async def _run_driver(
    results: Results,
    driver: str,
    storage: AsyncStorageBackend,
    raw: Raw,
    args: argparse.Namespace,
    copy: Raw | None = None,
) -> None:
    if "throughput" in args.sections:
        await bench_throughput(results, driver, storage, raw, args.repeats, args.quick, copy)
    if "latency" in args.sections:
        await bench_emit_latency(results, driver, storage, args.repeats, args.quick)
    if "fanout" in args.sections and driver in args.fanout_on:
        await bench_fanout(results, driver, storage, args.repeats, args.quick)


async def run(args: argparse.Namespace, tmp: Path) -> Results:
    results = Results()
    path = tmp / "streams.db"
    async with (
        open_storage(f"sqlite:///{path}", migrate=True) as storage,
        aiosqlite.connect(path) as db,
    ):
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await _run_driver(results, "sqlite", storage, _raw(_sqlite_insert(db)), args)
    name = await _create_database(args.url)
    if name is None:
        return results
    url = _with_database(args.url, name)
    try:
        async with open_storage(url, migrate=True) as storage:
            conn = await _raw_connection(url)
            plain = await asyncpg.connect(url)  # asyncpg's own (binary) json codec, for COPY
            try:
                raw, copy = _raw(_postgres_insert(conn)), _raw(_postgres_copy(plain))
                await _run_driver(results, "postgres", storage, raw, args, copy)
            finally:
                await conn.close()
                await plain.close()
        if "cross" in args.sections:
            await bench_cross_process(
                results, url, args.repeats, args.quick, args.cross_sides, args.cross_rates
            )
    finally:
        await _drop_database(args.url, name)
    return results


def _fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    if unit in ("us", "ms"):
        return f"{value:,.2f} {unit}"
    if unit == "ratio":
        return f"{value:.3f}"
    return f"{value:,.0f}"


def render(results: Results) -> str:
    header = ("section", "driver", "figure", "median", "spread")
    lines = [header]
    for row in results.rows.values():
        flag = " (noisy)" if row.spread > NOISY and row.unit not in ("n", "ratio") else ""
        lines.append(
            (
                row.section,
                row.driver,
                row.name,
                _fmt(row.median, row.unit),
                f"{row.spread:.0%}{flag}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def targets(results: Results) -> list[dict[str, Any]]:
    """Every target with its median figure and the verdict of the suite's noise rule.

    A ratio target compares the repetitions of both rows (``_common.compare``), a bound the
    repetitions of one (``_common.check``): a row spread over 25% gives "too noisy" unless
    its extreme repetitions agree with the medians' verdict.
    """
    out: list[dict[str, Any]] = []

    def samples(section: str, driver: str, name: str) -> list[float]:
        row = results.rows.get((section, driver, name))
        return row.samples if row is not None else []

    def ratio(name: str, a: list[float], b: list[float], goal: float, fmt: str) -> None:
        if a and b:
            verdict = compare(a, b, lambda x, y: x >= goal * y)
            value = median(a) / median(b)
            out.append({"target": name, "value": value, "goal": goal, "met": verdict, "fmt": fmt})

    def bound(name: str, a: list[float], goal: float, fmt: str) -> None:
        if a:
            verdict = check(a, lambda x: x < goal)
            out.append(
                {"target": name, "value": median(a), "goal": goal, "met": verdict, "fmt": fmt}
            )

    for driver in ("postgres", "sqlite"):
        batched = samples("throughput", driver, "batched, 50 producers")
        raw = samples("throughput", driver, "raw batched insert")
        for legacy_name in ("legacy, 50 producers", "legacy, 1 producer"):
            legacy = samples("throughput", driver, legacy_name)
            ratio(f"{driver}: batched / {legacy_name} >= 20x", batched, legacy, 20, "x")
        ratio(f"{driver}: batched / raw batched insert >= 60%", batched, raw, 0.6, "%")
        copy = samples("throughput", driver, "raw batched COPY")
        ratio(f"{driver}: batched / raw batched COPY >= 60%", batched, copy, 0.6, "%")
        fed = samples("throughput", driver, "raw batched insert, 50 producers")
        ratio(
            f"{driver}: batched / raw batched insert fed by the same 50 producers >= 60%",
            batched,
            fed,
            0.6,
            "%",
        )
        p99 = samples("emit latency", driver, "emit_nowait p99")
        bound(f"{driver}: emit p99 < 50 us", p99, 50, "us")
        hub = samples("fan-out", driver, "memory deliveries/s")
        bare = samples("fan-out", driver, "bare asyncio deliveries/s")
        ratio(f"{driver}: fan-out deliveries/s >= 50% of bare asyncio", hub, bare, 0.5, "%")
        reads = samples("fan-out paced", driver, "memory live-subscriber reads")
        bound(f"{driver}: live subscribers cause 0 db reads (memory)", reads, 0.5, "n")
    label = f"optimized, {CROSS_RATES[0]:g}/s x {CROSS_SESSIONS}"
    p99 = samples("cross-process", "postgres", f"{label}: cross-process p99")
    bound("postgres: cross-instance delivery p99 < 25 ms", p99, 25, "ms")
    reads = samples("cross-process", "postgres", f"{label}: subscriber db reads/event")
    bound("postgres: cross-instance subscriber db reads/event < 0.01", reads, 0.01, "r")
    return out


def render_targets(items: list[dict[str, Any]]) -> str:
    lines = []
    for t in items:
        v = t["value"]
        shown = {
            "x": f"{v:.1f}x",
            "%": f"{v:.0%}",
            "us": f"{v:.1f} us",
            "ms": f"{v:.1f} ms",
            "n": f"{v:.0f}",
            "r": f"{v:.3f}",
        }[t["fmt"]]
        lines.append(f"target: {t['target']}: {shown} -> {t['met']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.streams_bench",
        description="Stream writer and broadcast hub: optimized vs legacy vs ceilings.",
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"Postgres server (default {DEFAULT_URL})"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument(
        "--fanout-on",
        nargs="*",
        default=["postgres", "sqlite"],
        help="drivers to run the fan-out section on",
    )
    parser.add_argument(
        "--sections",
        nargs="*",
        default=["throughput", "latency", "fanout", "cross"],
        choices=["throughput", "latency", "fanout", "cross"],
        help="sections to run (cross: cross-process delivery, Postgres only)",
    )
    parser.add_argument(
        "--cross-rates",
        nargs="*",
        type=float,
        default=None,
        help=f"events/s per session of the cross-process section (default {CROSS_RATES})",
    )
    parser.add_argument(
        "--cross-sides",
        nargs="*",
        default=["optimized", "legacy"],
        choices=list(CROSS_SIDES),
        help="configurations of the cross-process section (eager: group-commit flushes)",
    )
    parser.add_argument("--json", type=Path, default=None)
    # The cross-process section runs this module again as its producer and subscriber.
    for name in ("--role", "--tag", "--side"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    for name in ("--sessions", "--events"):
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        print(json.dumps(asyncio.run(_role(args))), flush=True)
        return 0
    load_before = _load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asyncstore-streams-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    elapsed = time.perf_counter() - started
    load_after = _load_average()
    goals = targets(results)
    print(render(results))
    print()
    print(render_targets(goals))
    if "cross" in args.sections:
        print(
            "cross-process delivery runs on Postgres only: SQLite's notifications reach only "
            "the process that sent them (one process: see the fan-out section)"
        )
    print(f"repeats: {args.repeats}, quick: {args.quick}, run time: {elapsed:.1f} s")
    if load_before is not None and load_after is not None:
        print(
            f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, "
            f"on {os.cpu_count()} CPUs (client and database share them)"
        )
    if args.json is not None:
        document = {
            "benchmark": "streams_bench",
            "config": {"url": _redact(args.url), "repeats": args.repeats, "quick": args.quick},
            "environment": environment(),
            "run_time_s": elapsed,
            "results": [r.as_dict() for r in results.rows.values()],
            "targets": goals,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
