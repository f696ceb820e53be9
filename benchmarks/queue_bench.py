"""Queue and outbox benchmark: asyncstore's AgentQueue and OutboxRelay against their peers.

What it measures, in one run on one throwaway Postgres database:

1. Drain: ``--tasks`` no-op tasks (default 10,000) drained by 1 and 2 worker OS processes,
   for asyncstore's queue in ``claim`` mode, the legacy ``poll_spawn`` mode, and pgqueuer and
   procrastinate when importable (``pip install -e '.[peers]'``; skipped with a note
   otherwise). Tasks are enqueued before the clock starts; workers connect, report ready,
   and start together; the drain time runs from "go" to the last handler call in any
   process. Every handler records its task, so duplicates (runs beyond one per task) and
   missing tasks are counted. procrastinate, about 20x slower, drains a fifth of the tasks.
2. Pickup latency of an idle worker: one worker waits on an empty queue; the time from the
   start of an enqueue call to the handler starting, over ``LATENCY_SAMPLES`` tasks
   enqueued one at a time with idle gaps (p50 and p90).
3. Outbox: messages/s delivered across 50 channels with a 20 ms simulated send, the
   grouped relay vs the legacy one-at-a-time (``serial``) loop.

Repetitions alternate the systems (A B C A B C) and report the median and spread. Run:
``python -m benchmarks.queue_bench [--url URL] [--repeats N] [--tasks N] [--json PATH]
[--quick]``. The peers are driven through their documented public APIs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from orchestrator.outbox import Outbox, OutboxConfig, open_outbox_relay
from orchestrator.queue import AgentQueue, QueueConfig, open_worker
from storage import NewOutboxMessage, OutboxMessage, Task, open_storage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CLAIM = QueueConfig(max_workers=200, lease_s=30.0, fallback_poll_s=10.0)
LEGACY = QueueConfig(mode="poll_spawn", poll_interval_s=1.0, poll_batch=1000, lease_s=300.0)
PGQ_BATCH = 100
PROCRASTINATE_CONCURRENCY = 10
PROCRASTINATE_SHARE = 5  # procrastinate drains tasks / 5
LATENCY_SAMPLES = 30
LEGACY_LATENCY_SAMPLES = 8
OUTBOX_CHANNELS = 50
OUTBOX_SEND_S = 0.020
OUTBOX_MESSAGES = 2000
SERIAL_MESSAGES = 150
ENQUEUE_CHUNK = 2000

PEERS = ("pgqueuer", "procrastinate")


# ---------------------------------------------------------------- records


@dataclass
class Drain:
    system: str
    processes: int
    tasks: int
    rates: list[float] = field(default_factory=list)
    duplicates: int = 0
    missing: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        return (max(self.rates) - min(self.rates)) / self.median if self.rates else 0.0


@dataclass
class Latency:
    system: str
    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p90(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


@dataclass
class OutboxRate:
    mode: str
    messages: int
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


# ---------------------------------------------------------------- worker processes


def _child(argv: Sequence[str]) -> int:
    """Entry point of one worker process: ``--child SYSTEM URL QUEUE``."""
    system, url, queue = argv
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    return asyncio.run(_child_main(system, url, queue))


async def _wait_go() -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"unexpected start line {line!r}")


async def _child_main(system: str, url: str, queue: str) -> int:
    seen: list[int] = []
    last = [0.0]

    def record(value: int) -> None:
        seen.append(value)
        last[0] = time.time()

    if system in ("claim", "poll_spawn"):
        cfg = CLAIM if system == "claim" else LEGACY
        async with open_storage(url) as storage:

            async def handler(task: Task) -> None:
                record(task.payload)

            probe = await asyncpg.connect(url)
            try:
                async with open_worker(AgentQueue(storage, queue, cfg), handler):
                    print("ready", flush=True)
                    await _wait_go()
                    while await probe.fetchval(  # noqa: ASYNC110 - progress of other processes
                        "SELECT count(*) FROM agent_tasks"
                        " WHERE queue = $1 AND status IN ('queued', 'running')",
                        queue,
                    ):
                        await asyncio.sleep(0.05)
            finally:
                await probe.close()
    elif system == "pgqueuer":
        pgqueuer = importlib.import_module("pgqueuer")
        types = importlib.import_module("pgqueuer.types")
        conn = await asyncpg.connect(url)
        pgq = pgqueuer.PgQueuer.from_asyncpg_connection(conn)

        async def job(j: Any) -> None:
            record(int(j.payload))

        pgq.entrypoint(queue)(job)
        print("ready", flush=True)
        await _wait_go()
        await pgq.run(batch_size=PGQ_BATCH, mode=types.QueueExecutionMode.drain)
        await conn.close()
    elif system == "procrastinate":
        procrastinate = importlib.import_module("procrastinate")
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

        async def task(i: int) -> None:
            record(i)

        app.task(name=queue, queue=queue)(task)
        async with app.open_async():
            print("ready", flush=True)
            await _wait_go()
            await app.run_worker_async(
                queues=[queue], concurrency=PROCRASTINATE_CONCURRENCY, wait=False
            )
    else:
        raise SystemExit(f"unknown system {system}")
    print(json.dumps({"seen": seen, "last": last[0]}), flush=True)
    return 0


def _spawn(system: str, url: str, queue: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.queue_bench", "--child", system, url, queue],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _run_processes(system: str, url: str, queue: str, n: int) -> tuple[float, list[int]]:
    """Start ``n`` workers, release them together, return (seconds, payloads seen)."""
    procs = [_spawn(system, url, queue) for _ in range(n)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        seen: list[int] = []
        last = go
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{system} worker exited with {proc.returncode}")
            report = json.loads(out.strip().splitlines()[-1])
            seen.extend(report["seen"])
            last = max(last, report["last"])
        return last - go, seen
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


# ---------------------------------------------------------------- enqueue per system


async def _enqueue(system: str, url: str, queue: str, n: int) -> None:
    if system in ("claim", "poll_spawn"):
        async with open_storage(url) as storage:
            q = AgentQueue(storage, queue)
            for start in range(0, n, ENQUEUE_CHUNK):
                await q.enqueue_many(list(range(start, min(n, start + ENQUEUE_CHUNK))))
    elif system == "pgqueuer":
        pgqueuer = importlib.import_module("pgqueuer")
        conn = await asyncpg.connect(url)
        try:
            queries = pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn))
            for start in range(0, n, ENQUEUE_CHUNK):
                ids = range(start, min(n, start + ENQUEUE_CHUNK))
                await queries.enqueue(
                    [queue] * len(ids), [str(i).encode() for i in ids], [0] * len(ids)
                )
        finally:
            await conn.close()
    else:
        app = _procrastinate_app(url)
        async with app.open_async():
            deferrer = app.configure_task(queue, queue=queue)
            for start in range(0, n, ENQUEUE_CHUNK):
                ids = range(start, min(n, start + ENQUEUE_CHUNK))
                await deferrer.batch_defer_async(*({"i": i} for i in ids))


def _procrastinate_app(url: str) -> Any:
    procrastinate = importlib.import_module("procrastinate")
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))


async def _drain_once(system: str, url: str, n: int, processes: int) -> tuple[float, int, int]:
    queue = f"b{secrets.token_hex(4)}"
    await _enqueue(system, url, queue, n)
    seconds, seen = await asyncio.to_thread(_run_processes, system, url, queue, processes)
    counts = Counter(seen)
    duplicates = sum(c - 1 for c in counts.values())
    missing = sum(1 for i in range(n) if i not in counts)
    return n / seconds, duplicates, missing


# ---------------------------------------------------------------- pickup latency


async def _latency_asyncstore(url: str, cfg: QueueConfig, samples: int) -> list[float]:
    out: list[float] = []
    started = anyio.Event()
    at = [0.0]

    async def handler(task: Task) -> None:
        at[0] = time.perf_counter()
        started.set()

    queue = f"l{secrets.token_hex(4)}"
    async with (
        open_storage(url) as producer,
        open_storage(url) as consumer,
        open_worker(AgentQueue(consumer, queue, cfg), handler),
    ):
        q = AgentQueue(producer, queue)
        await asyncio.sleep(0.2)  # let the worker's first claim find nothing
        for i in range(samples):
            started = anyio.Event()
            t0 = time.perf_counter()
            await q.enqueue(i)
            with anyio.fail_after(30):
                await started.wait()
            out.append((at[0] - t0) * 1000)
            await asyncio.sleep(0.03 + 0.02 * (i % 3))  # idle again
    return out


async def _latency_pgqueuer(url: str, samples: int) -> list[float]:
    pgqueuer = importlib.import_module("pgqueuer")
    out: list[float] = []
    started = asyncio.Event()
    at = [0.0]
    name = f"l{secrets.token_hex(4)}"
    worker_conn = await asyncpg.connect(url)
    producer = await asyncpg.connect(url)
    pgq = pgqueuer.PgQueuer.from_asyncpg_connection(worker_conn)

    async def job(j: Any) -> None:
        at[0] = time.perf_counter()
        started.set()

    pgq.entrypoint(name)(job)
    runner = asyncio.create_task(pgq.run(batch_size=PGQ_BATCH))
    try:
        queries = pgqueuer.Queries(pgqueuer.AsyncpgDriver(producer))
        await asyncio.sleep(0.5)
        for i in range(samples):
            started.clear()
            t0 = time.perf_counter()
            await queries.enqueue(name, str(i).encode())
            await asyncio.wait_for(started.wait(), 30)
            out.append((at[0] - t0) * 1000)
            await asyncio.sleep(0.03 + 0.02 * (i % 3))
    finally:
        pgq.shutdown.set()
        await asyncio.wait_for(runner, 30)
        await worker_conn.close()
        await producer.close()
    return out


async def _latency_procrastinate(url: str, samples: int) -> list[float]:
    out: list[float] = []
    started = asyncio.Event()
    at = [0.0]
    name = f"l{secrets.token_hex(4)}"
    app = _procrastinate_app(url)

    async def task(i: int) -> None:
        at[0] = time.perf_counter()
        started.set()

    app.task(name=name, queue=name)(task)
    async with app.open_async():
        runner = asyncio.create_task(app.run_worker_async(queues=[name], concurrency=1))
        try:
            deferrer = app.configure_task(name, queue=name)
            await asyncio.sleep(0.5)
            for i in range(samples):
                started.clear()
                t0 = time.perf_counter()
                await deferrer.defer_async(i=i)
                await asyncio.wait_for(started.wait(), 30)
                out.append((at[0] - t0) * 1000)
                await asyncio.sleep(0.03 + 0.02 * (i % 3))
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    return out


# ---------------------------------------------------------------- outbox


async def _outbox_once(url: str, mode: str, messages: int) -> float:
    channels = [f"ch{i}" for i in range(OUTBOX_CHANNELS)]
    done = anyio.Event()
    count = 0

    async def send(msg: OutboxMessage) -> None:
        nonlocal count
        await anyio.sleep(OUTBOX_SEND_S)
        count += 1
        if count >= messages:
            done.set()

    async with open_storage(url) as storage:
        # A clean slate: earlier runs' rows must not be delivered in this one.
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DELETE FROM outbox")
        finally:
            await conn.close()
        outbox = Outbox(storage)
        rows = [NewOutboxMessage(channels[i % OUTBOX_CHANNELS], "acct", i) for i in range(messages)]
        for start in range(0, messages, ENQUEUE_CHUNK):
            await outbox.enqueue(rows[start : start + ENQUEUE_CHUNK])
        cfg = OutboxConfig(mode="grouped" if mode == "grouped" else "serial", max_in_flight=64)
        t0 = time.perf_counter()
        async with open_outbox_relay(storage, dict.fromkeys(channels, send), config=cfg):
            with anyio.fail_after(600):
                await done.wait()
            elapsed = time.perf_counter() - t0
    return messages / elapsed


# ---------------------------------------------------------------- orchestration


async def _prepare(admin_url: str) -> tuple[str, str]:
    name = f"asyncstore_qbench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    async with open_storage(url, migrate=True):
        pass
    if _available("pgqueuer"):
        pgqueuer = importlib.import_module("pgqueuer")
        conn = await asyncpg.connect(url)
        try:
            await pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    if _available("procrastinate"):
        app = _procrastinate_app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
    return name, url


async def _drop(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    systems = ["claim", "poll_spawn", *(p for p in PEERS if _available(p))]
    notes = [
        f"{p} not installed: skipped (pip install -e '.[peers]')"
        for p in PEERS
        if not _available(p)
    ]
    name, url = await _prepare(args.url)
    drains: dict[tuple[str, int], Drain] = {}
    latencies: list[Latency] = []
    outbox: dict[str, OutboxRate] = {}
    try:
        for processes in (1, 2):
            for system in systems:
                n = args.tasks // PROCRASTINATE_SHARE if system == "procrastinate" else args.tasks
                drains[(system, processes)] = Drain(system, processes, n)
            for _ in range(args.repeats):
                for system in systems:
                    d = drains[(system, processes)]
                    rate, dups, missing = await _drain_once(system, url, d.tasks, processes)
                    d.rates.append(rate)
                    d.duplicates += dups
                    d.missing += missing
                    print(f"  drain {system} x{processes}: {rate:,.0f} tasks/s", file=sys.stderr)
        samples = 10 if args.quick else LATENCY_SAMPLES
        latencies.append(Latency("claim", await _latency_asyncstore(url, CLAIM, samples)))
        legacy = LEGACY_LATENCY_SAMPLES if not args.quick else 4
        latencies.append(Latency("poll_spawn", await _latency_asyncstore(url, LEGACY, legacy)))
        if "pgqueuer" in systems:
            latencies.append(Latency("pgqueuer", await _latency_pgqueuer(url, samples)))
        if "procrastinate" in systems:
            latencies.append(Latency("procrastinate", await _latency_procrastinate(url, samples)))
        grouped_n = OUTBOX_MESSAGES // (4 if args.quick else 1)
        serial_n = SERIAL_MESSAGES // (3 if args.quick else 1)
        outbox = {
            "grouped": OutboxRate("grouped", grouped_n),
            "serial": OutboxRate("serial", serial_n),
        }
        for _ in range(args.repeats):
            for mode, rec in outbox.items():
                rec.rates.append(await _outbox_once(url, mode, rec.messages))
    finally:
        await _drop(args.url, name)
    return {
        "drains": list(drains.values()),
        "latencies": latencies,
        "outbox": outbox,
        "notes": notes,
    }


def render(result: dict[str, Any]) -> str:
    drains: list[Drain] = result["drains"]
    latency = {lat.system: lat for lat in result["latencies"]}
    pgq = {d.processes: d.median for d in drains if d.system == "pgqueuer"}
    lines = [
        "| system | processes | tasks | tasks/s (median) | spread | vs pgqueuer | duplicates "
        "| missing | pickup p50 / p90 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(drains, key=lambda d: (d.processes, d.system != "claim")):
        vs = f"{d.median / pgq[d.processes]:.2f}x" if d.processes in pgq else "-"
        lat = latency.get(d.system)
        pickup = f"{lat.p50:.1f} / {lat.p90:.1f}" if lat and d.processes == 1 else ""
        lines.append(
            f"| {d.system} | {d.processes} | {d.tasks:,} | {d.median:,.0f} | "
            f"{d.spread * 100:.0f}% | {vs} | {d.duplicates} | {d.missing} | {pickup} |"
        )
    out: dict[str, OutboxRate] = result["outbox"]
    lines += [
        "",
        f"| outbox ({OUTBOX_CHANNELS} channels, {OUTBOX_SEND_S * 1000:.0f} ms send) | messages "
        "| messages/s (median) |",
        "|---|---|---|",
    ]
    lines += [f"| {o.mode} | {o.messages:,} | {o.median:,.0f} |" for o in out.values()]
    if "grouped" in out and "serial" in out:
        lines.append(
            "\noutbox speed-up grouped vs serial: "
            f"{out['grouped'].median / out['serial'].median:.1f}x"
        )
    claim1 = next((d for d in drains if d.system == "claim" and d.processes == 1), None)
    targets = []
    for procs in (1, 2):
        ours = next((d for d in drains if d.system == "claim" and d.processes == procs), None)
        if ours is not None and procs in pgq:
            ratio = ours.median / pgq[procs]
            targets.append(
                f"target >= 1.5x pgqueuer, {procs} process(es): {ratio:.2f}x -> "
                f"{'met' if ratio >= 1.5 else 'NOT MET'}"
            )
    dup = sum(d.duplicates for d in drains if d.system == "claim")
    targets.append(
        f"target zero duplicates (claim mode): {dup} -> {'met' if dup == 0 else 'NOT MET'}"
    )
    if "claim" in latency:
        p50 = latency["claim"].p50
        targets.append(
            f"target pickup p50 < 10 ms: {p50:.1f} ms -> {'met' if p50 < 10 else 'NOT MET'}"
        )
    if claim1 is None:
        targets.append("claim mode not measured")
    return "\n".join([*lines, "", *targets, *result["notes"]])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queue_bench",
        description="Drain rate, duplicates and pickup latency of asyncstore's queue vs legacy "
        "poll_spawn, pgqueuer and procrastinate; outbox relay vs one-at-a-time sending.",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="Postgres server for a throwaway asyncstore_qbench_* database",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per drain")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per drain")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 tasks, 1 repeat, fewer samples"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = min(args.tasks, 2_000)
        args.repeats = 1
    if args.repeats < 1 or args.tasks < 10:
        parser.error("--repeats must be >= 1 and --tasks >= 10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--child"]:
        return _child(raw[1:])
    args = parse_args(raw)
    # procrastinate warns about where its App is built; it is a benchmark harness here.
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = asyncio.run(run(args))
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    print(render(result))
    print(
        f"repeats: {args.repeats}, run time {elapsed:.0f} s, 1-minute load average "
        f"{load_before:.2f} before / {load_after:.2f} after on {os.cpu_count()} CPUs "
        "(workers, the database and any other jobs share them)"
    )
    if args.json is not None:
        document = {
            "benchmark": "queue_bench",
            "config": {"tasks": args.tasks, "repeats": args.repeats, "quick": args.quick},
            "drains": [asdict(d) | {"median": d.median} for d in result["drains"]],
            "latency_ms": {
                lat.system: {"p50": lat.p50, "p90": lat.p90, "samples": lat.samples_ms}
                for lat in result["latencies"]
            },
            "outbox": {k: asdict(v) | {"median": v.median} for k, v in result["outbox"].items()},
            "notes": result["notes"],
            "load_average_1m": {"before": load_before, "after": load_after},
            "run_time_s": elapsed,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
