"""Webhook benchmark: the seed's table, measured (synchronous vs asynchronous batched).

100 tool calls fire ``tool_call_start`` at a local receiver that takes 100 ms per request
(a real HTTP server on 127.0.0.1, in the same event loop), five ways: synchronous
webhooks; async batch 10 / interval 1 s; async batch 50 / interval 2 s; durable batch 10 /
1 s through the journal (the default) and through the legacy ``durable_mode = "direct"``
path, both on a throwaway Postgres database (SQLite when Postgres does not answer). Per
side: HTTP requests made, total time the caller spent blocked in ``fire``, per-call
p50/p99, and time from the first call until the last event arrived. Separately, the
enqueue latency of ``AsyncWebhookBatcher.send_nowait`` (target p99 < 50 us) on a hook
configured by default (capacity 10,000, batch 10), events offered at 2,000/s while the
batches flow to the receiver. Sides alternate within each repetition; medians and spread
are reported.

Run: ``python -m benchmarks.webhooks_bench [--url URL] [--repeats N] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.webhooks import HooksConfig, open_webhooks, parse_hooks
from asyncstore.orchestrator.webhooks.testing import Answer, TestReceiver, open_test_receiver
from asyncstore.storage import AsyncStorageBackend, open_storage
from benchmarks._common import (
    check,
    create_database,
    drop_database,
    environment,
    redact,
    with_database,
)
from benchmarks._common import load_average as _load_average
from benchmarks.streams_bench import Results, _percentile, _progress, render

RECEIVER_DELAY_S = 0.1
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SIDES: dict[str, tuple[int, int, str | None] | None] = {
    "sync": None,
    "async batch 10 / 1 s": (10, 1000, None),
    "async batch 50 / 2 s": (50, 2000, None),
    "durable batch 10 / 1 s (journal)": (10, 1000, "journal"),
    "durable batch 10 / 1 s (direct, legacy)": (10, 1000, "direct"),
}


def _config(url: str, side: str) -> HooksConfig:
    shape = SIDES[side]
    if shape is None:
        sync = {"name": "bench", "url": url, "trigger": "tool_call_start", "retries": 0}
        return parse_hooks({"webhooks": [sync]}, environ={})
    batch, interval, mode = shape
    entry: dict[str, Any] = {
        "name": "bench",
        "url": url,
        "trigger": "tool_call_start",
        "batch_size": batch,
        "flush_interval_ms": interval,
    }
    if mode is not None:
        entry |= {"durable": True, "durable_mode": mode}
    return parse_hooks({"async_webhooks": [entry]}, environ={})


def _arrived(rx: TestReceiver) -> int:
    total = 0
    for request in rx.requests:
        body = request.json()
        total += len(body["events"]) if "events" in body else 1
    return total


async def _tool_calls(
    side: str, calls: int, storage: AsyncStorageBackend | None = None
) -> dict[str, float]:
    shape = SIDES[side]
    durable = shape is not None and shape[2] is not None
    async with (
        open_test_receiver(lambda r: Answer(delay_s=RECEIVER_DELAY_S)) as rx,
        open_webhooks(_config(rx.url, side), storage=storage if durable else None) as webhooks,
    ):
        per_call: list[float] = []
        clock = time.perf_counter
        started = clock()
        for i in range(calls):
            t0 = clock()
            decision = await webhooks.fire("tool_call_start", {"tool_name": "edit", "i": i})
            per_call.append(clock() - t0)
            if decision.warnings:
                raise RuntimeError(f"{side}: {decision.warnings}")
            await anyio.lowlevel.checkpoint()  # the agent loop yields between calls
        await rx.wait_until(lambda requests: _arrived(rx) >= calls, timeout_s=60)
        last = clock() - started
        requests = len(rx.requests)
    return {
        "requests": float(requests),
        "blocked_ms": sum(per_call) * 1000,
        "p50_us": _percentile(per_call, 0.5) * 1e6,
        "p99_us": _percentile(per_call, 0.99) * 1e6,
        "last_ms": last * 1000,
    }


ENQUEUE_RATE = 2_000.0
"""Events/s offered in the enqueue measurement: a busy server's hooks, well within what the
default batch (10 events per request) delivers to a local receiver."""


async def _enqueue_latency(events: int) -> dict[str, float]:
    """``send_nowait`` cost on a batcher as configured by default, batches flowing.

    The hook has the default ``capacity`` (10,000), ``batch_size`` (10) and flush
    interval; a real receiver on 127.0.0.1 takes every batch while events are offered at
    ``ENQUEUE_RATE`` (chunks every 10 ms), so the queue works as it does in a server: never
    sized to the test, flushing all along. Every event must arrive; none may be dropped.
    """
    async with open_test_receiver() as rx:
        hook = {"name": "bench", "url": rx.url, "trigger": "tool_call_start"}
        config = parse_hooks({"async_webhooks": [hook]}, environ={})
        async with open_webhooks(config) as webhooks:
            batcher = webhooks.batchers["bench"]
            samples: list[float] = []
            clock = time.perf_counter_ns
            chunk = max(1, round(ENQUEUE_RATE / 100))
            due = time.monotonic()
            for i in range(events):
                context = {"tool_name": "edit", "i": i}
                t0 = clock()
                batcher.send_nowait("tool_call_start", context)
                samples.append((clock() - t0) / 1000)
                if i % chunk == chunk - 1:
                    due += chunk / ENQUEUE_RATE
                    await anyio.sleep(max(0.0, due - time.monotonic()))
            await batcher.flush()
            stats = batcher.statistics()
            if stats.delivered != events or any(stats.dropped.values()):
                raise RuntimeError(f"enqueue benchmark lost events: {stats}")
        arrived = _arrived(rx)
    if arrived != events:
        raise RuntimeError(f"enqueue benchmark: {arrived} of {events} events arrived")
    return {
        "p50_us": _percentile(samples, 0.5),
        "p99_us": _percentile(samples, 0.99),
        "requests": float(stats.requests),
        "capacity": float(batcher.config.capacity),
    }


@asynccontextmanager
async def _durable_storage(args: argparse.Namespace) -> AsyncIterator[AsyncStorageBackend]:
    """A throwaway Postgres database (dropped afterwards), else a temporary SQLite file."""
    name = await create_database(args.url, "asyncstore_webhooks_bench")
    if name is not None:
        try:
            async with open_storage(with_database(args.url, name), migrate=True) as storage:
                yield storage
        finally:
            await drop_database(args.url, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        async with open_storage(f"sqlite:///{tmp}/bench.db", migrate=True) as storage:
            yield storage


async def run(args: argparse.Namespace) -> Results:
    async with _durable_storage(args) as storage:
        args.dialect = storage.dialect
        return await _run(args, storage)


async def _run(args: argparse.Namespace, storage: AsyncStorageBackend) -> Results:
    results = Results()
    calls = 20 if args.quick else 100
    events = 4_000 if args.quick else 20_000
    await _tool_calls("async batch 10 / 1 s", 10)  # warm-up
    await _tool_calls("durable batch 10 / 1 s (journal)", 10, storage)
    for rep in range(args.repeats):
        order = list(SIDES)
        if rep % 2:
            order.reverse()
        for side in order:
            _progress(f"{side}: {calls} tool calls, repetition {rep + 1}/{args.repeats}")
            fig = await _tool_calls(side, calls, storage)
            section = f"{calls} tool calls"
            results.add(section, side, "HTTP requests", "n", fig["requests"])
            results.add(section, side, "caller blocked, total", "ms", fig["blocked_ms"])
            results.add(section, side, "fire p50", "us", fig["p50_us"])
            results.add(section, side, "fire p99", "us", fig["p99_us"])
            results.add(section, side, "last event arrived", "ms", fig["last_ms"])
        _progress(f"enqueue latency, {events} events, repetition {rep + 1}/{args.repeats}")
        fig = await _enqueue_latency(events)
        results.add("enqueue", "async", "send_nowait p50", "us", fig["p50_us"])
        results.add("enqueue", "async", "send_nowait p99", "us", fig["p99_us"])
        results.add("enqueue", "async", "HTTP requests (batches)", "n", fig["requests"])
        results.add("enqueue", "async", "queue capacity (default)", "n", fig["capacity"])
    return results


def targets(results: Results, calls: int) -> list[str]:
    out = []
    section = f"{calls} tool calls"
    p99 = results.median("enqueue", "async", "send_nowait p99")
    if p99 is not None:
        verdict = check(
            results.rows[("enqueue", "async", "send_nowait p99")].samples, lambda v: v < 50
        )
        out.append(
            "target: enqueue p99 < 50 us (default queue, batches flowing): "
            f"{p99:.1f} us -> {verdict}"
        )
    sides = (
        ("async batch 10 / 1 s", 10),
        ("async batch 50 / 2 s", 50),
        ("durable batch 10 / 1 s (journal)", 10),
    )
    for side, batch in sides:
        requests = results.median(section, side, "HTTP requests")
        if requests is not None:
            want = -(-calls // batch)
            verdict = "met" if requests == want else "NOT MET"
            out.append(f"target: {side}: {want} requests: {requests:.0f} -> {verdict}")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.webhooks_bench",
        description="Webhooks: synchronous vs asynchronous batched, the seed's table measured.",
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"Postgres server (default {DEFAULT_URL})"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 tool calls (a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = _load_average()
    started = time.perf_counter()
    results = anyio.run(run, args)
    elapsed = time.perf_counter() - started
    load_after = _load_average()
    calls = 20 if args.quick else 100
    goals = targets(results, calls)
    print(render(results))
    print()
    print("\n".join(goals))
    print(f"repeats: {args.repeats}, quick: {args.quick}, run time: {elapsed:.1f} s")
    print(f"durable sides on {getattr(args, 'dialect', '?')} ({redact(args.url)})")
    if load_before is not None and load_after is not None:
        print(
            f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, "
            f"on {os.cpu_count()} CPUs (receiver and client share them)"
        )
    if args.json is not None:
        document: dict[str, Any] = {
            "benchmark": "webhooks_bench",
            "config": {"repeats": args.repeats, "quick": args.quick},
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
