"""Limits declared while workers run: every worker honours them without a restart.

Two worker processes start on a queue without limits (each up to 4 handlers, so up to 8
run at once) and drain a backlog; a third process declares ``max_running=2`` with
``set_queue_limits`` while they run. Each worker's next plain claim is refused
(``QueueCoordinated``) and it switches to the coordinated claim; each prints
``coordinated`` when it has (the acknowledgement). A sampler in the test process reads the
queue's running count (live leases) as fast as it can.

Checked: before the change the count went above 2 (the test can fail); once both workers
acknowledged and the tasks started before that finished, no sample exceeds 2; every task
ran exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from asyncstore.orchestrator.queue import AgentQueue
from asyncstore.storage import NewTask, open_storage
from tests.conftest import truncate
from tests.waiting import wait_for

QUEUE = "latelimits"
LIMIT = 2

WORKER = """
import dataclasses, json, sys, time
import anyio
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import open_storage

url, runs = sys.argv[1:3]

async def main():
    cfg = QueueConfig(max_workers=4, lease_s=10.0, fallback_poll_s=60.0, shutdown_grace_s=1.0)
    with open(runs, "a", buffering=1) as out:
        async def handler(task):
            out.write(f"start {task.payload} {time.time()}\\n")
            await anyio.sleep(0.05)
            out.write(f"end {task.payload} {time.time()}\\n")

        async with open_storage(url) as storage:
            queue = AgentQueue(storage, "latelimits", cfg)
            async with open_worker(queue, handler) as worker, anyio.create_task_group() as tg:
                async def acknowledge():
                    while not worker.statistics().coordinated:
                        await anyio.sleep(0.005)  # the test harness watching its own worker
                    print("coordinated", flush=True)

                tg.start_soon(acknowledge)
                print("ready", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)
                tg.cancel_scope.cancel()
            print(json.dumps(dataclasses.asdict(worker.statistics())), flush=True)

anyio.run(main)
"""

SETTER = """
import sys
import anyio
from asyncstore.storage import open_storage

async def main():
    async with open_storage(sys.argv[1]) as storage:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        await storage.set_queue_limits("latelimits", max_running=int(sys.argv[2]))
        print("set", flush=True)

anyio.run(main)
"""


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        preexec_fn=lambda: os.nice(19),
    )


async def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    with anyio.fail_after(120):  # a hang guard: another process's progress, under load
        return (await anyio.to_thread.run_sync(proc.stdout.readline)).strip()


RUNNING = (
    "SELECT count(*) FROM agent_tasks WHERE queue = $1 AND status = 'running' AND run_after > now()"
)


class Sampler:
    """Reads the queue's running count in a loop; keeps (wall time, count) pairs."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.samples: list[tuple[float, int]] = []
        self.stop = anyio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self.stop.is_set():
                taken = time.time()  # before the read: a sample is never dated too late
                self.samples.append((taken, await conn.fetchval(RUNNING, QUEUE)))
                await anyio.lowlevel.checkpoint()
        finally:
            await conn.close()


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *(args or (QUEUE,))))
    finally:
        await conn.close()


async def _none_running(dsn: str, ids: list[int]) -> bool:
    sql = "SELECT count(*) AS n FROM agent_tasks WHERE id = ANY($1) AND status = 'running'"
    return (await _fetch(dsn, sql, ids))[0]["n"] == 0


async def _all_succeeded(dsn: str) -> bool:
    sql = "SELECT count(*) AS n FROM agent_tasks WHERE queue = $1 AND status <> 'succeeded'"
    return (await _fetch(dsn, sql))[0]["n"] == 0


async def test_limits_set_from_a_third_process_are_honoured_by_running_workers(
    dsn: str, tmp_path: Path
) -> None:
    total = 400
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = [_spawn(WORKER, dsn, str(log)) for log in logs]
    setter = _spawn(SETTER, dsn, str(LIMIT))
    sampler = Sampler(dsn)
    try:
        for proc in (*workers, setter):
            assert await _line(proc) == "ready"
        async with open_storage(dsn) as storage:
            await AgentQueue(storage, QUEUE).enqueue_tasks(
                [NewTask(QUEUE, i) for i in range(total)]
            )
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            await wait_for(
                lambda: any(n > LIMIT for _, n in sampler.samples),
                120,
                what="more running than the coming limit (uncapped)",
            )
            assert setter.stdin is not None
            setter.stdin.write("go\n")
            setter.stdin.flush()
            assert await _line(setter) == "set"
            for proc in workers:
                assert await _line(proc) == "coordinated"
            acknowledged = time.time()
            # The tasks running now started before the change: wait for them to end.
            before = [r["id"] for r in await _fetch(dsn, RUNNING.replace("count(*)", "id"))]
            await wait_for(
                lambda: _none_running(dsn, before), 120, what="the tasks started before to end"
            )
            drained = time.time()
            await wait_for(lambda: _all_succeeded(dsn), 240, what="every task to succeed")
            sampler.stop.set()
        stats = []
        for proc in workers:
            out, _ = proc.communicate("stop\n", timeout=60)
            assert proc.returncode == 0
            stats.append(out.strip().splitlines()[-1])
        setter.wait(timeout=30)
    finally:
        for proc in (*workers, setter):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    lines = [line.split() for log in logs for line in log.read_text().splitlines() if line]
    starts = sorted(int(x[1]) for x in lines if x[0] == "start")
    assert starts == list(range(total))  # each task started exactly once
    peak_before = max(n for t, n in sampler.samples if t < acknowledged)
    after = [n for t, n in sampler.samples if t >= drained]
    print(  # pytest -s
        f"limit change: peak {peak_before} before, {len(after)} samples after the "
        f"acknowledgement, peak {max(after, default=0)} after; ack-to-drain "
        f"{drained - acknowledged:.2f} s"
    )
    assert peak_before > LIMIT
    assert len(after) > 50 and max(after) <= LIMIT
    assert all('"coordinated": true' in s for s in stats)
