"""Notifying commits/s on Postgres with the stream writer's flush pattern (issue 17).

Postgres serializes the commit of every transaction that sent a NOTIFY: at pre-commit it
takes one database-wide lock (held until the commit record is flushed) and appends to the
shared notification queue. One notifying commit per flush per instance is the stream
writer's budget, so this measures how many such commits this machine sustains.

Each of ``--writers`` flushers (asyncio tasks, each on its own pool connection, one
process) runs closed-loop flushes: a batch of 5-20 events spread over 1-4 of its own
sessions (a few hundred bytes each, like token deltas), then, by mode:

``append``    ``append_stream_events`` alone, no NOTIFY: the baseline.
``library``   ``append_stream_events``, then one ``pg_notify`` commit carrying the batch
              inline (``encode_stream_notes``): what ``StreamEventWriter`` does (its
              notifier sends the flush's notification as its own statement).
``same_txn``  the same two statements in one transaction: one commit that writes and
              notifies (what a writer that notified in its append statement would do).
``notify``    ``pg_notify`` commits alone: the bare notifying-commit ceiling.

Every notifying mode runs with one LISTENer connected (counting what it receives) and,
for ``library``, also without. Reported per cell: flushes (= commits carrying the flush)
per second, notifications delivered per second, p50/p99 flush latency, as the median of
``--repeats`` interleaved repetitions with their spread; plus the load average before and
after. On a throwaway ``asyncstore_bench_*`` database, dropped at the end.

Run: ``python -m benchmarks notify [--url URL] [--writers 1,4,16,64] [--duration S]
[--repeats N] [--json PATH]``. Default about 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr

from asyncstore.orchestrator.broadcast import NoteSegment, encode_stream_notes
from asyncstore.storage import AsyncStorageBackend, NewStreamEvent, StorageSettings, open_storage
from asyncstore.storage._sql import load_queries
from asyncstore.storage._validate import encode_payload
from benchmarks._common import (
    create_database,
    drop_database,
    environment,
    load_average,
    median,
    percentile,
    spread,
    with_database,
)

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CHANNEL = "asyncstore_stream_bench"
MODES = ("append", "library", "same_txn", "notify")
# (mode, listener connected): the cells of one repetition.
CELLS = (
    ("append", False),
    ("library", True),
    ("library", False),
    ("same_txn", True),
    ("notify", True),
)


@dataclass
class _Flusher:
    """One flusher's sessions and seq counters (its sessions are its own, like a writer's)."""

    index: int
    rng: random.Random
    next_seq: dict[str, int] = field(default_factory=dict)

    def batch(self) -> tuple[list[NewStreamEvent], list[NoteSegment], list[bytes]]:
        """A flush: its events, their notification segments, their encoded payloads."""
        n_sessions = self.rng.randint(1, 4)
        n_events = self.rng.randint(5, 20)
        sessions = [f"w{self.index}-s{self.rng.randrange(64)}" for _ in range(n_sessions)]
        events: list[NewStreamEvent] = []
        carried: dict[str, list[tuple[str, bytes]]] = {}
        texts: list[bytes] = []
        for i in range(n_events):
            sid = sessions[i % n_sessions]
            seq = self.next_seq.get(sid, 0) + 1
            self.next_seq[sid] = seq
            text = "a token delta of a streamed reply " * self.rng.randint(1, 6)
            payload = encode_payload({"text": text, "i": i})
            events.append(NewStreamEvent(sid, 1, seq, "delta", payload))
            carried.setdefault(sid, []).append(("delta", payload.data))
            texts.append(payload.data)
        now_us = time.time_ns() // 1000
        segments = [
            NoteSegment(sid, 1, self.next_seq[sid] - len(evs) + 1, self.next_seq[sid], now_us, evs)
            for sid, evs in carried.items()
        ]
        return events, segments, texts


@dataclass
class Cell:
    mode: str
    listener: bool
    writers: int
    flushes_per_s: list[float] = field(default_factory=list)
    delivered_per_s: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.mode}{'' if self.mode == 'append' else '+listen' if self.listener else ''}"


class _Counter:
    def __init__(self) -> None:
        self.received = 0
        self.changed = asyncio.Event()

    def __call__(self, *_: object) -> None:
        self.received += 1
        self.changed.set()


async def _one(
    mode: str,
    writers: int,
    duration: float,
    storage: AsyncStorageBackend,
    raw: asyncpg.Pool,
    flushers: list[_Flusher],
    queries: dict[str, str],
) -> tuple[int, int, list[float], float]:
    """Run ``writers`` closed-loop flushers for ``duration`` s: (flushes, notifications
    sent, latencies in s, elapsed)."""
    latencies: list[float] = []
    sent = 0
    flushes = 0
    deadline = time.perf_counter() + duration

    async def flusher(f: _Flusher) -> None:
        nonlocal sent, flushes
        while time.perf_counter() < deadline:
            events, segments, texts = f.batch()
            payloads = encode_stream_notes(segments) if mode != "append" else []
            started = time.perf_counter()
            if mode == "append":
                await storage.append_stream_events(events)
            elif mode == "library":
                await storage.append_stream_events(events)
                for p in payloads:
                    await storage.notify(CHANNEL, p)
            elif mode == "notify":
                for p in payloads:
                    await storage.notify(CHANNEL, p)
            else:  # same_txn
                columns = [
                    [e.session_id for e in events],
                    [e.seq for e in events],
                    [e.epoch for e in events],
                    [e.kind for e in events],
                    texts,
                ]
                async with raw.acquire() as conn, conn.transaction():
                    await conn.fetch(queries["append_stream_events"], *columns, "", [])
                    for p in payloads:
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, p)
            latencies.append(time.perf_counter() - started)
            flushes += 1
            sent += len(payloads)

    started = time.perf_counter()
    await asyncio.gather(*(flusher(f) for f in flushers[:writers]))
    return flushes, sent, latencies, time.perf_counter() - started


async def _drain(counter: _Counter, target: int, within: float) -> None:
    """Wait until the listener has received ``target`` notifications (at most ``within`` s)."""
    end = time.perf_counter() + within
    while counter.received < target:
        left = end - time.perf_counter()
        if left <= 0:
            return
        counter.changed.clear()
        try:
            await asyncio.wait_for(counter.changed.wait(), left)
        except TimeoutError:
            return


async def run(args: argparse.Namespace) -> dict[str, Any]:
    writers = [int(w) for w in args.writers.split(",")]
    load_before = load_average()
    name = await create_database(args.url, "asyncstore_bench_notify")
    if name is None:
        raise SystemExit(2)
    dsn = with_database(args.url, name)
    cells = {(m, li, w): Cell(m, li, w) for w in writers for m, li in CELLS}
    queries = load_queries("postgres")
    try:
        settings = StorageSettings(
            url=SecretStr(dsn), pool_min_size=max(writers), pool_max_size=max(writers)
        )
        async with open_storage(dsn, migrate=True):
            pass
        listen_conn = await asyncpg.connect(dsn)
        counter = _Counter()
        flushers = [_Flusher(i, random.Random(i)) for i in range(max(writers))]
        try:
            async with open_storage(settings) as storage:
                # same_txn borrows the backend's own pool (one pool: Postgres allows 100
                # clients here, shared with whoever else is running).
                raw = getattr(storage, "_pool", None)
                if not isinstance(raw, asyncpg.Pool):
                    raise SystemExit("the Postgres backend's pool is not where expected")
                await _one("library", max(writers), 0.2, storage, raw, flushers, queries)
                for _ in range(args.repeats):
                    for w in writers:
                        for mode, listener in CELLS:
                            cell = cells[(mode, listener, w)]
                            if listener:
                                await listen_conn.add_listener(CHANNEL, counter)
                            before = counter.received
                            flushes, sent, lat, elapsed = await _one(
                                mode, w, args.duration, storage, raw, flushers, queries
                            )
                            if listener:
                                await _drain(counter, before + sent, 5.0)
                                await listen_conn.remove_listener(CHANNEL, counter)
                                got = counter.received - before
                                cell.delivered_per_s.append(got / elapsed)
                                cell.lost.append(sent - got)
                            cell.flushes_per_s.append(flushes / elapsed)
                            cell.p50_ms.append(percentile(lat, 0.5) * 1000)
                            cell.p99_ms.append(percentile(lat, 0.99) * 1000)
        finally:
            await listen_conn.close()
    finally:
        await drop_database(args.url, name)
    load_after = load_average()
    report = {
        "environment": environment(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": {"writers": writers, "duration_s": args.duration, "repeats": args.repeats},
        "cells": [
            {
                "mode": c.mode,
                "listener": c.listener,
                "writers": c.writers,
                "flushes_per_s": c.flushes_per_s,
                "delivered_per_s": c.delivered_per_s,
                "p50_ms": c.p50_ms,
                "p99_ms": c.p99_ms,
                "lost": c.lost,
            }
            for c in cells.values()
        ],
    }
    print(
        f"notifying commits, closed loop, {args.duration:g} s x {args.repeats} repeats per "
        f"cell; load average before {load_before}, after {load_after}"
    )
    print(
        f"{'writers':>7} {'mode':<16}{'flushes/s':>10}{'spread':>8}{'notif/s':>9}"
        f"{'lost':>6}{'p50 ms':>8}{'p99 ms':>8}"
    )
    for c in cells.values():
        notif = f"{median(c.delivered_per_s):9.0f}" if c.delivered_per_s else f"{'-':>9}"
        lost = f"{sum(c.lost):6d}" if c.lost else f"{'-':>6}"
        print(
            f"{c.writers:>7} {c.label:<16}{median(c.flushes_per_s):10.0f}"
            f"{spread(c.flushes_per_s):8.0%}{notif}{lost}"
            f"{median(c.p50_ms):8.1f}{median(c.p99_ms):8.1f}"
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks notify",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="Postgres server (admin database)")
    parser.add_argument("--writers", default="1,4,16,64", help="comma-separated flusher counts")
    parser.add_argument("--duration", type=float, default=0.8, help="seconds per cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
