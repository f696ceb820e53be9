"""What a periodic tick costs: ``record_periodic_tick`` against a plain single-task enqueue.

A tick is one transaction of three statements (the ``periodic_ticks`` insert, the job
engine's enqueue statement, the tick's task id), so it costs more than ``enqueue_task``'s
one statement; ticks are per schedule per period, not per request, so the figure to know
is the ratio and the absolute rate. Modes, run interleaved (A B C A B C ...) for
``--repeats`` repetitions of ``--ticks`` sequential calls on one handle:

``enqueue``    ``enqueue_task`` of one task: the reference.
``tick``       ``record_periodic_tick`` of a new tick each call (a task written).
``duplicate``  ``record_periodic_tick`` of a tick already recorded (what every runner but
               one does per tick in ``periodic.mode = "all"``: nothing written).

Reported per driver: calls/s as the median of the repetitions with their spread, the ratio
tick / enqueue, and the load average before and after. Postgres runs on a throwaway
``asyncstore_bench_*`` database, dropped at the end; SQLite on a temporary file.

Run: ``python -m benchmarks periodic [--url URL] [--ticks N] [--repeats N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncstore.storage import AsyncStorageBackend, NewTask, open_storage
from benchmarks._common import (
    create_database,
    drop_database,
    environment,
    load_average,
    median,
    spread,
    with_database,
)

MODES = ("enqueue", "tick", "duplicate")
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


async def _rate(calls: int, call: Callable[[int], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    for i in range(calls):
        await call(i)
    return calls / (time.perf_counter() - started)


async def _bench(storage: AsyncStorageBackend, ticks: int, repeats: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    offset = 0
    await storage.record_periodic_tick("dup", EPOCH, NewTask("bench-dup", None))
    for repeat in range(repeats):
        base = offset

        async def enqueue(i: int) -> object:
            return await storage.enqueue_task(NewTask("bench-enqueue", i))

        async def tick(i: int, base: int = base) -> object:
            at = EPOCH + timedelta(seconds=base + i)
            return await storage.record_periodic_tick(
                "bench", at, NewTask("bench-tick", i), notify="asyncstore.queue.bench-tick"
            )

        async def duplicate(i: int) -> object:
            return await storage.record_periodic_tick("dup", EPOCH, NewTask("bench-dup", i))

        calls = {"enqueue": enqueue, "tick": tick, "duplicate": duplicate}
        order = MODES if repeat % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            rates[mode].append(await _rate(ticks, calls[mode]))
        offset += ticks
    out: dict[str, Any] = {
        mode: {"per_s": round(median(r)), "spread": round(spread(r), 3), "runs": len(r)}
        for mode, r in rates.items()
    }
    out["tick_over_enqueue"] = round(median(rates["tick"]) / median(rates["enqueue"]), 3)
    return out


async def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks periodic")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--ticks", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"environment": environment(), "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        async with open_storage(url, migrate=True) as storage:
            result["sqlite"] = await _bench(storage, args.ticks, args.repeats)
    name = await create_database(args.url)
    if name is not None:
        try:
            async with open_storage(with_database(args.url, name), migrate=True) as storage:
                result["postgres"] = await _bench(storage, args.ticks, args.repeats)
        finally:
            await drop_database(args.url, name)
    result["load_after"] = load_average()
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks periodic``: run and print the figures."""
    asyncio.run(run(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
