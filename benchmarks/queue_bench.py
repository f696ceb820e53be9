"""Queue and outbox benchmark: asyncstore's AgentQueue and OutboxRelay against their peers.

What it measures, in one run on one throwaway Postgres database:

1. Drain table: ``--tasks`` no-op tasks (default 10,000) drained by 1, 2 and 4 worker OS
   processes at claim batch 100 and 200, for asyncstore's queue in ``claim`` mode
   (``max_workers`` = the batch), pgqueuer (``batch_size`` = the batch) and a raw SQL
   claim-and-complete loop on asyncstore's table (one asyncpg connection per process:
   claim a batch, call the handler for each row, mark the batch succeeded). ``--systems``
   adds pgqueuer on one connection (``pgqueuer_conn``), the legacy ``poll_spawn`` mode and
   procrastinate. Tasks are enqueued and the tables vacuumed before the clock starts; every
   process connects and prints ready, and nothing consumes before "go". The rate runs from
   the first handler call in any process (so no system's start-up counts: it is reported
   apart, pgqueuer's ``run`` takes a few hundred ms) to the database showing no unfinished
   task (polled every ``DRAIN_POLL_S``): outcomes stored, not just handlers called. The
   earlier harness let asyncstore's workers claim before "go" (the tasks were enqueued
   before the processes started) while pgqueuer started on "go", and stopped the clock at
   the last handler call. Handlers record their task, so duplicates and missing tasks are
   counted. Each cell repeats the systems in turn (A B C A B C) and reports medians;
   ratios compare medians of the same cell.
2. Pickup latency of an idle worker: one worker waits on an empty queue; the time from the
   start of an enqueue call to the handler starting (p50 and p90).
3. Outbox: messages/s delivered across 50 channels with a 20 ms simulated send, the
   grouped relay vs the legacy one-at-a-time (``serial``) loop.
4. Kill recovery, with default settings (lease 30 s, fallback poll 10 s): a worker process
   runs tasks whose handler blocks, an idle worker process waits, the first is SIGKILLed;
   the delay from the kill to the last of its tasks starting again in the idle worker,
   with ``expiry_wakeup`` on (the default) and off (the old behaviour).
5. Enqueue round trip: one-task ``AgentQueue.enqueue`` calls with the wakeup notification
   sent by the enqueue statement itself (the default) and by a second statement after it
   (the legacy ``enqueue_notify="separate"``), alternating; p50 and p90 per mode.

pgqueuer's configuration (its strongest found for this drain, from its own docs and
source): an asyncpg pool (so dequeues, completion-log flushes and heartbeats do not queue
behind each other on one connection), ``batch_size`` = the batch, unlimited concurrency,
drain mode, background log aggregation off, and the ``balanced`` durability (its job table
logged like asyncstore's, its log and statistics tables unlogged).

Run: ``python -m benchmarks.queue_bench [--url URL] [--repeats N] [--tasks N]
[--sections drain,latency,outbox,kill,enqueue] [--systems claim,pgqueuer,raw_sql] [--json PATH]
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
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from asyncstore.orchestrator.outbox import Outbox, OutboxConfig, open_outbox_relay
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import NewOutboxMessage, OutboxMessage, Task, open_storage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CLAIM = QueueConfig(max_workers=200, lease_s=30.0, fallback_poll_s=10.0)
LEGACY = QueueConfig(mode="poll_spawn", poll_interval_s=1.0, poll_batch=1000, lease_s=300.0)
PROCESSES = (1, 2, 4)
BATCHES = (100, 200)
DEFAULT_SYSTEMS = ("claim", "pgqueuer", "raw_sql")
ALL_SYSTEMS = (
    "claim",
    "pgqueuer",
    "raw_sql",
    "pgqueuer_conn",
    "poll_spawn",
    "procrastinate",
    "claim_limited",
    "claim_rate",
)
# Coordinated claims (fleet-wide limits, migration 0010): claim_limited declares a cap no
# drain reaches (max_running), so it measures the coordinated claim's cost alone;
# claim_rate declares max_per_second = RATE_LIMIT, so its drain shows the limit holding.
LIMITED: dict[str, dict[str, Any]] = {
    "claim_limited": {"max_running": 1_000_000},
    "claim_rate": {"max_per_second": 2000.0},
}
RATE_LIMIT = 2000.0
SECTIONS = ("drain", "latency", "outbox", "kill", "enqueue")
ENQUEUE_SAMPLES = 200
PGQ_BATCH = 100
PGQ_POOL = 4
PGQ_DURABILITY = "balanced"
DRAIN_POLL_S = 0.02
LATENCY_SAMPLES = 30
LEGACY_LATENCY_SAMPLES = 8
OUTBOX_CHANNELS = 50
OUTBOX_SEND_S = 0.020
OUTBOX_MESSAGES = 2000
SERIAL_MESSAGES = 150
ENQUEUE_CHUNK = 2000
KILL_TASKS = 5

PEERS = ("pgqueuer", "procrastinate")

# The raw loop: the least a claim-and-complete worker can do on asyncstore's table.
RAW_CLAIM = """
WITH picked AS (
    SELECT id FROM agent_tasks
    WHERE queue = $1 AND status IN ('queued', 'running') AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE agent_tasks t SET status = 'running', attempts = t.attempts + 1, worker_id = $3,
    lease_token = nextval('claim_tokens'), run_after = now() + interval '30 seconds',
    updated_at = now()
FROM picked WHERE t.id = picked.id
RETURNING t.id, t.lease_token, t.payload
"""
RAW_COMPLETE = """
UPDATE agent_tasks t SET status = 'succeeded', updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = 'running'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
"""


# ---------------------------------------------------------------- records


@dataclass
class Drain:
    system: str
    processes: int
    tasks: int
    batch: int = PGQ_BATCH
    rates: list[float] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    handler_rates: list[float] = field(default_factory=list)  # to the last handler call
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


@dataclass
class KillRecovery:
    expiry_wakeup: bool
    delays_s: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- worker processes


def concurrency(batch: int) -> int:
    """Tasks one worker process runs at once at claim batch ``batch``: asyncstore's claim
    worker (``max_workers``) and procrastinate (``concurrency``) alike."""
    return 2 * batch


def _child(argv: Sequence[str]) -> int:
    """Entry point of one worker process: ``--child SYSTEM URL QUEUE BATCH``."""
    system, url, queue, batch = argv
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    return asyncio.run(_child_main(system, url, queue, int(batch)))


async def _wait_go(word: str = "go") -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != word:
        raise SystemExit(f"expected {word!r}, got {line!r}")


async def _remaining(conn: asyncpg.Connection, system: str, queue: str) -> int:
    """Unfinished tasks of a drain: what the parent polls to stop the clock."""
    if system.startswith("pgqueuer"):
        # pgqueuer deletes a job's row when its completion is logged.
        return int(
            await conn.fetchval("SELECT count(*) FROM pgqueuer WHERE entrypoint = $1", queue)
        )
    if system == "procrastinate":
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM procrastinate_jobs"
                " WHERE queue_name = $1 AND status IN ('todo', 'doing')",
                queue,
            )
        )
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM agent_tasks WHERE queue = $1 AND status IN ('queued', 'running')",
            queue,
        )
    )


async def _child_main(system: str, url: str, queue: str, batch: int) -> int:
    """Set everything up, print ``ready``, start consuming on ``go``, exit when drained.

    Nothing consumes before ``go``: each system's own start-up (asyncstore's worker and
    listener, pgqueuer's ``run``) is inside the measured time for every system alike.
    """
    seen: list[int] = []
    first = [0.0]
    last = [0.0]

    def record(value: int) -> None:
        if not seen:
            first[0] = time.time()
        seen.append(value)
        last[0] = time.time()

    if system in ("claim", "poll_spawn", *LIMITED):
        cfg = LEGACY if system == "poll_spawn" else CLAIM.model_copy(update=LIMITED.get(system, {}))
        if system != "poll_spawn":
            # Claims of `batch` tasks, and room for the next claim while a batch runs
            # (pgqueuer's own rule: concurrency at least twice its batch; it runs unlimited).
            cfg = cfg.model_copy(update={"max_workers": concurrency(batch), "claim_batch": batch})
        async with open_storage(url) as storage:

            async def handler(task: Task) -> None:
                record(task.payload)

            print("ready", flush=True)
            await _wait_go()
            async with open_worker(AgentQueue(storage, queue, cfg), handler):
                # Workers serve until stopped: the parent says when the queue is drained.
                await _wait_go("stop")
    elif system == "raw_sql":
        conn = await asyncpg.connect(url)
        try:
            print("ready", flush=True)
            await _wait_go()
            while rows := await conn.fetch(RAW_CLAIM, queue, batch, f"raw:{os.getpid()}"):
                for row in rows:
                    record(json.loads(row["payload"]))
                await conn.execute(
                    RAW_COMPLETE, [r["id"] for r in rows], [r["lease_token"] for r in rows]
                )
        finally:
            await conn.close()
    elif system in ("pgqueuer", "pgqueuer_conn"):
        pgqueuer = importlib.import_module("pgqueuer")
        types = importlib.import_module("pgqueuer.types")
        if system == "pgqueuer":
            pool = await asyncpg.create_pool(url, min_size=PGQ_POOL, max_size=PGQ_POOL)
            pgq = pgqueuer.PgQueuer.from_asyncpg_pool(pool)
        else:  # one connection for everything, as in pgqueuer's quick-start
            conn = await asyncpg.connect(url)
            pgq = pgqueuer.PgQueuer.from_asyncpg_connection(conn)

        async def job(j: Any) -> None:
            record(int(j.payload))

        pgq.entrypoint(queue)(job)
        print("ready", flush=True)
        await _wait_go()
        await pgq.run(
            batch_size=batch,
            mode=types.QueueExecutionMode.drain,
            log_aggregation_interval=timedelta(0),
        )
        await (pool.close() if system == "pgqueuer" else conn.close())
    elif system == "procrastinate":
        procrastinate = importlib.import_module("procrastinate")
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

        async def task(i: int) -> None:
            record(i)

        app.task(name=queue, queue=queue)(task)
        async with app.open_async():
            print("ready", flush=True)
            await _wait_go()
            await app.run_worker_async(queues=[queue], concurrency=concurrency(batch), wait=False)
    else:
        raise SystemExit(f"unknown system {system}")
    print(json.dumps({"seen": seen, "first": first[0], "last": last[0]}), flush=True)
    return 0


def _spawn(system: str, url: str, queue: str, batch: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.queue_bench",
            "--child",
            system,
            url,
            queue,
            str(batch),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


@dataclass
class DrainRun:
    seconds: float  # first handler call to the database showing every task finished
    to_first_s: float  # "go" to the first handler call in any process (start-up)
    to_last_s: float  # first to last handler call in any process
    seen: list[int]


async def _run_processes(system: str, url: str, queue: str, n: int, batch: int) -> DrainRun:
    """Start ``n`` workers, release them together, time until the database shows none left."""
    procs = [_spawn(system, url, queue, batch) for _ in range(n)]
    conn = await asyncpg.connect(url)
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"{system} worker did not start: {line!r}")
        go = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + 600
        while await _remaining(conn, system, queue):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{system} did not drain in 600 s")
            await asyncio.sleep(DRAIN_POLL_S)
        done = time.time()
        seen: list[int] = []
        first, last = math.inf, go
        for proc in procs:
            out, _ = await asyncio.to_thread(proc.communicate, "stop\n", 600)
            if proc.returncode != 0:
                raise RuntimeError(f"{system} worker exited with {proc.returncode}")
            report = json.loads(out.strip().splitlines()[-1])
            seen.extend(report["seen"])
            if report["seen"]:
                first = min(first, report["first"])
                last = max(last, report["last"])
        if not math.isfinite(first):
            raise RuntimeError(f"{system} ran no handler")
        return DrainRun(done - first, first - go, last - first, seen)
    finally:
        await conn.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


# ---------------------------------------------------------------- enqueue per system


async def _enqueue(system: str, url: str, queue: str, n: int) -> None:
    if system in ("claim", "poll_spawn", "raw_sql", *LIMITED):
        async with open_storage(url) as storage:
            q = AgentQueue(storage, queue)
            for start in range(0, n, ENQUEUE_CHUNK):
                await q.enqueue_many(list(range(start, min(n, start + ENQUEUE_CHUNK))))
    elif system.startswith("pgqueuer"):
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


async def _drain_run(system: str, url: str, n: int, processes: int, batch: int) -> DrainRun:
    queue = f"b{secrets.token_hex(4)}"
    await _enqueue(system, url, queue, n)
    async with _vacuumed(url):
        return await _run_processes(system, url, queue, processes, batch)


@contextlib.asynccontextmanager
async def _vacuumed(url: str) -> AsyncIterator[None]:
    """Start every drain from the same table state: earlier drains' dead rows vacuumed."""
    conn = await asyncpg.connect(url)
    try:
        for table in ("agent_tasks", "pgqueuer"):
            with contextlib.suppress(asyncpg.UndefinedTableError):
                await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    yield


async def _drain_once(
    system: str, url: str, n: int, processes: int, batch: int = 100
) -> tuple[float, int, int]:
    """(tasks/s, duplicates, missing) of one drain; kept for ``benchmarks.suite``."""
    run = await _drain_run(system, url, n, processes, batch)
    counts = Counter(run.seen)
    duplicates = sum(c - 1 for c in counts.values())
    missing = sum(1 for i in range(n) if i not in counts)
    return n / run.seconds, duplicates, missing


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


async def _enqueue_calls(url: str, samples: int) -> dict[str, list[float]]:
    """Milliseconds per one-task ``AgentQueue.enqueue`` call (rows and wakeup), with the
    notification in the enqueue statement (the default) and sent after it (the legacy
    ``separate``), alternating call by call on one storage handle, a listener attached."""
    out: dict[str, list[float]] = {"in_statement": [], "separate": []}
    name = f"e{secrets.token_hex(4)}"
    async with open_storage(url) as storage:
        queues = {
            mode: AgentQueue(storage, name, QueueConfig(enqueue_notify=mode))  # type: ignore[arg-type]
            for mode in out
        }
        async with storage.listen(queues["separate"].channel):
            for i in range(samples * 2):
                mode = "in_statement" if i % 2 == 0 else "separate"
                t0 = time.perf_counter()
                await queues[mode].enqueue(i)
                out[mode].append((time.perf_counter() - t0) * 1000)
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


# ---------------------------------------------------------------- kill recovery


def _kill_child(argv: Sequence[str]) -> int:
    """``--kill-child ROLE URL QUEUE EXPIRY_WAKEUP``: a default-settings worker process.

    The victim's handlers print ``started`` and block; the rescuer's print ``ran <time>``.
    """
    role, url, queue, wake = argv
    logging.basicConfig(level=logging.WARNING)
    cfg = QueueConfig(expiry_wakeup=wake == "1")

    async def main() -> None:
        async def handler(task: Task) -> None:
            print(f"{'started' if role == 'victim' else 'ran'} {time.time()}", flush=True)
            if role == "victim":
                await anyio.sleep_forever()

        async with (
            open_storage(url) as storage,
            open_worker(AgentQueue(storage, queue, cfg), handler),
        ):
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)

    anyio.run(main)
    return 0


def _spawn_kill_child(role: str, url: str, queue: str, wake: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.queue_bench",
            "--kill-child",
            role,
            url,
            queue,
            "1" if wake else "0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def _kill_once(url: str, wake: bool) -> float:
    """Seconds from SIGKILL of a worker holding ``KILL_TASKS`` tasks to the last re-run."""
    queue = f"k{secrets.token_hex(4)}"
    async with open_storage(url) as storage:
        await AgentQueue(storage, queue).enqueue_many(list(range(KILL_TASKS)))
    victim = _spawn_kill_child("victim", url, queue, wake)
    rescuer: subprocess.Popen[str] | None = None
    try:
        assert victim.stdout is not None
        started = 0
        while started < KILL_TASKS:
            line = await asyncio.to_thread(victim.stdout.readline)
            if not line:
                raise RuntimeError("victim exited")
            started += line.startswith("started")
        rescuer = _spawn_kill_child("rescuer", url, queue, wake)
        assert rescuer.stdout is not None
        if (await asyncio.to_thread(rescuer.stdout.readline)).strip() != "ready":
            raise RuntimeError("rescuer did not start")
        killed = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        last = killed
        for _ in range(KILL_TASKS):
            line = await asyncio.wait_for(asyncio.to_thread(rescuer.stdout.readline), 300)
            last = max(last, float(line.split()[1]))
        return last - killed
    finally:
        for proc in (victim, rescuer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)


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
            # pgqueuer's "balanced" durability: its job table stays logged (as asyncstore's
            # is), its log and statistics tables are unlogged. Settings are read from the
            # environment, so the switch goes through its own alter_durability.
            os.environ["PGQUEUER_DURABILITY"] = PGQ_DURABILITY
            try:
                await pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn)).alter_durability()
            finally:
                del os.environ["PGQUEUER_DURABILITY"]
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


def _module(system: str) -> str:
    return "pgqueuer" if system.startswith("pgqueuer") else system


def _available(module: str) -> bool:
    if module not in PEERS:
        return True
    return importlib.util.find_spec(module) is not None


async def _drains(args: argparse.Namespace, url: str, systems: list[str]) -> list[Drain]:
    drains: list[Drain] = []
    for processes in args.processes:
        for batch in args.batches:
            cell = [Drain(system, processes, args.tasks, batch) for system in systems]
            for _ in range(args.repeats):
                for d in cell:
                    run = await _drain_run(d.system, url, d.tasks, processes, batch)
                    counts = Counter(run.seen)
                    d.rates.append(d.tasks / run.seconds)
                    d.startup_s.append(run.to_first_s)
                    d.handler_rates.append(d.tasks / max(run.to_last_s, 1e-6))
                    d.duplicates += sum(c - 1 for c in counts.values())
                    d.missing += sum(1 for i in range(d.tasks) if i not in counts)
                    print(
                        f"  drain {d.system} x{processes} batch {batch}: "
                        f"{d.rates[-1]:,.0f} tasks/s (start-up {run.to_first_s * 1000:.0f} ms)",
                        file=sys.stderr,
                    )
            drains += cell
    return drains


async def run(args: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in args.systems if _available(_module(s))]
    notes = [
        f"{p} not installed: skipped (pip install -e '.[peers]')"
        for p in PEERS
        if p in args.systems and not _available(p)
    ]
    name, url = await _prepare(args.url)
    drains: list[Drain] = []
    latencies: list[Latency] = []
    outbox: dict[str, OutboxRate] = {}
    kills: list[KillRecovery] = []
    enqueue: dict[str, list[float]] = {}
    try:
        if "drain" in args.sections:
            drains = await _drains(args, url, systems)
        if "latency" in args.sections:
            samples = 10 if args.quick else LATENCY_SAMPLES
            latencies.append(Latency("claim", await _latency_asyncstore(url, CLAIM, samples)))
            if "poll_spawn" in systems:
                legacy = LEGACY_LATENCY_SAMPLES if not args.quick else 4
                latencies.append(
                    Latency("poll_spawn", await _latency_asyncstore(url, LEGACY, legacy))
                )
            if "pgqueuer" in systems:
                latencies.append(Latency("pgqueuer", await _latency_pgqueuer(url, samples)))
            if "procrastinate" in systems:
                latencies.append(
                    Latency("procrastinate", await _latency_procrastinate(url, samples))
                )
        if "outbox" in args.sections:
            grouped_n = OUTBOX_MESSAGES // (4 if args.quick else 1)
            serial_n = SERIAL_MESSAGES // (3 if args.quick else 1)
            outbox = {
                "grouped": OutboxRate("grouped", grouped_n),
                "serial": OutboxRate("serial", serial_n),
            }
            for _ in range(args.repeats):
                for mode, rec in outbox.items():
                    rec.rates.append(await _outbox_once(url, mode, rec.messages))
        if "enqueue" in args.sections:
            enqueue = await _enqueue_calls(url, 20 if args.quick else ENQUEUE_SAMPLES)
        if "kill" in args.sections:
            kills = [KillRecovery(True), KillRecovery(False)]
            for _ in range(args.kill_repeats):
                # Both variants at once, on their own queues: each takes 20-45 s of waiting.
                on, off = await asyncio.gather(_kill_once(url, True), _kill_once(url, False))
                kills[0].delays_s.append(on)
                kills[1].delays_s.append(off)
                print(
                    f"  kill recovery: {on:.1f} s (expiry wakeup) / {off:.1f} s (off)",
                    file=sys.stderr,
                )
    finally:
        await _drop(args.url, name)
    return {
        "drains": drains,
        "latencies": latencies,
        "outbox": outbox,
        "kills": kills,
        "enqueue": enqueue,
        "notes": notes,
    }


def render(result: dict[str, Any]) -> str:
    drains: list[Drain] = result["drains"]
    latency = {lat.system: lat for lat in result["latencies"]}
    median = {(d.system, d.processes, d.batch): d.median for d in drains}
    lines: list[str] = []
    targets: list[str] = []
    if drains:
        lines += [
            "| processes | batch | system | tasks | tasks/s (median) | spread | vs pgqueuer "
            "| vs raw SQL | start-up ms | to last handler tasks/s | duplicates | missing |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in drains:
            pgq = median.get(("pgqueuer", d.processes, d.batch))
            raw = median.get(("raw_sql", d.processes, d.batch))
            vs = f"{d.median / pgq:.2f}x" if pgq else "-"
            vs_raw = f"{d.median / raw:.2f}x" if raw else "-"
            lines.append(
                f"| {d.processes} | {d.batch} | {d.system} | {d.tasks:,} | {d.median:,.0f} | "
                f"{d.spread * 100:.0f}% | {vs} | {vs_raw} | "
                f"{statistics.median(d.startup_s) * 1000:.0f} | "
                f"{statistics.median(d.handler_rates):,.0f} | {d.duplicates} | {d.missing} |"
            )
        for d in drains:
            if d.system != "claim":
                continue
            pgq = median.get(("pgqueuer", d.processes, d.batch))
            raw = median.get(("raw_sql", d.processes, d.batch))
            cell = f"{d.processes} process(es), batch {d.batch}"
            if pgq:
                ratio = d.median / pgq
                targets.append(
                    f"target >= 1.5x pgqueuer, {cell}: {ratio:.2f}x -> "
                    f"{'met' if ratio >= 1.5 else 'NOT MET'}"
                )
            if raw:
                ratio = d.median / raw
                targets.append(
                    f"target >= 0.5x raw SQL loop, {cell}: {ratio:.2f}x -> "
                    f"{'met' if ratio >= 0.5 else 'NOT MET'}"
                )
        if any(d.system == "procrastinate" for d in drains):
            lines.append(
                "\nprocrastinate runs at the claim worker's concurrency (2 x batch per process, "
                "its `concurrency`) on the same number of tasks"
            )
        dup = sum(d.duplicates for d in drains if d.system == "claim")
        targets.append(
            f"target zero duplicates (claim mode): {dup} -> {'met' if dup == 0 else 'NOT MET'}"
        )
    if latency:
        lines += ["", "| pickup latency | p50 ms | p90 ms |", "|---|---|---|"]
        lines += [f"| {lat.system} | {lat.p50:.1f} | {lat.p90:.1f} |" for lat in latency.values()]
        if "claim" in latency:
            p50 = latency["claim"].p50
            targets.append(
                f"target pickup p50 < 10 ms: {p50:.1f} ms -> {'met' if p50 < 10 else 'NOT MET'}"
            )
    out: dict[str, OutboxRate] = result["outbox"]
    if out:
        lines += [
            "",
            f"| outbox ({OUTBOX_CHANNELS} channels, {OUTBOX_SEND_S * 1000:.0f} ms send) "
            "| messages | messages/s (median) |",
            "|---|---|---|",
        ]
        lines += [f"| {o.mode} | {o.messages:,} | {o.median:,.0f} |" for o in out.values()]
        if "grouped" in out and "serial" in out:
            lines.append(
                "\noutbox speed-up grouped vs serial: "
                f"{out['grouped'].median / out['serial'].median:.1f}x"
            )
    enqueue: dict[str, list[float]] = result["enqueue"]
    if enqueue:
        lines += [
            "",
            "| enqueue call (1 task, rows + wakeup) | calls | p50 ms | p90 ms |",
            "|---|---|---|---|",
        ]
        for mode, ms in enqueue.items():
            p90 = sorted(ms)[min(len(ms) - 1, int(len(ms) * 0.9))]
            lines.append(f"| {mode} | {len(ms)} | {statistics.median(ms):.2f} | {p90:.2f} |")
        fused, separate = (statistics.median(enqueue[m]) for m in ("in_statement", "separate"))
        lines.append(f"\nenqueue in one statement vs separate notify: {separate / fused:.2f}x")
    kills: list[KillRecovery] = result["kills"]
    if kills:
        lines += [
            "",
            f"| kill recovery, default settings (lease {CLAIM.lease_s:g} s, fallback poll "
            f"{CLAIM.fallback_poll_s:g} s) | samples | SIGKILL -> last re-run, s |",
            "|---|---|---|",
        ]
        for k in kills:
            label = "expiry wakeup (default)" if k.expiry_wakeup else "expiry wakeup off (old)"
            delays = ", ".join(f"{x:.1f}" for x in k.delays_s)
            lines.append(f"| {label} | {len(k.delays_s)} | {delays} |")
        worst = max(kills[0].delays_s)
        bound = QueueConfig().lease_s + 1.0
        targets.append(
            f"target re-run within lease + 1 s ({bound:g} s) of the kill: worst {worst:.1f} s -> "
            f"{'met' if worst <= bound else 'NOT MET'}"
        )
    return "\n".join([*lines, "", *targets, *result["notes"]])


def _csv(kind: type, choices: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(x) for x in text.split(",") if x]
        if choices is not None and any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, choices))}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queue_bench",
        description="Drain table of asyncstore's queue vs pgqueuer and a raw SQL loop, pickup "
        "latency, outbox relay vs one-at-a-time sending, kill-recovery delay.",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="Postgres server for a throwaway asyncstore_qbench_* database",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per drain cell")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per drain")
    parser.add_argument(
        "--processes", type=_csv(int), default=list(PROCESSES), help="worker process counts"
    )
    parser.add_argument("--batches", type=_csv(int), default=list(BATCHES), help="claim batches")
    parser.add_argument(
        "--systems",
        type=_csv(str, ALL_SYSTEMS),
        default=list(DEFAULT_SYSTEMS),
        help=f"drain systems, from {','.join(ALL_SYSTEMS)}",
    )
    parser.add_argument(
        "--sections", type=_csv(str, SECTIONS), default=list(SECTIONS), help="what to run"
    )
    parser.add_argument(
        "--kill-repeats", type=int, default=2, help="kill-recovery samples (20-45 s each)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 tasks, 1 repeat, fewer samples"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = min(args.tasks, 2_000)
        args.repeats = 1
        args.kill_repeats = 1
    if args.repeats < 1 or args.tasks < 10 or args.kill_repeats < 1:
        parser.error("--repeats and --kill-repeats must be >= 1 and --tasks >= 10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--child"]:
        return _child(raw[1:])
    if raw[:1] == ["--kill-child"]:
        return _kill_child(raw[1:])
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
            "config": {
                "tasks": args.tasks,
                "repeats": args.repeats,
                "quick": args.quick,
                "processes": args.processes,
                "batches": args.batches,
                "systems": args.systems,
                "pgqueuer": {"pool": PGQ_POOL, "durability": PGQ_DURABILITY},
            },
            "drains": [asdict(d) | {"median": d.median} for d in result["drains"]],
            "latency_ms": {
                lat.system: {"p50": lat.p50, "p90": lat.p90, "samples": lat.samples_ms}
                for lat in result["latencies"]
            },
            "outbox": {k: asdict(v) | {"median": v.median} for k, v in result["outbox"].items()},
            "kill_recovery_s": {
                ("expiry_wakeup" if k.expiry_wakeup else "no_expiry_wakeup"): k.delays_s
                for k in result["kills"]
            },
            "enqueue_ms": result["enqueue"],
            "notes": result["notes"],
            "load_average_1m": {"before": load_before, "after": load_after},
            "run_time_s": elapsed,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
