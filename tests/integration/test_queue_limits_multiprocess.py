"""Fleet-wide queue limits across worker processes on one Postgres database.

Four worker processes share a queue limited to 3 running tasks and 20 starts per second.
Every handler appends ``start <payload> <claim time> <wall time>`` and ``end <payload>
<wall time>`` lines to its process's file (line-buffered, so a SIGKILL loses no line). The
claim time is the task's ``updated_at``: the database clock under the queue's lock, the
time the rate limit logs. While they run, a sampler in the test process reads the number
of the queue's tasks running under a live lease as fast as it can.

Checked: the sampled running count never exceeds 3; no two handler intervals overlap more
than 3 deep (wall clock, one machine); no window of 1 s holds more than 20 claim times;
and a worker SIGKILLed while holding slots gives them back when its leases expire (an idle
worker whose claim was refused wakes at the computed expiry, not at a poll).
"""

from __future__ import annotations

import bisect
import os
import signal
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

QUEUE = "limited"

WORKER = """
import dataclasses, json, sys, time
import anyio
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import open_storage

url, runs, max_running, per_second, lease_s, hang, fallback_poll_s = sys.argv[1:8]

async def main():
    cfg = QueueConfig(
        max_workers=4, lease_s=float(lease_s), heartbeat_interval_s=float(lease_s) / 4,
        fallback_poll_s=float(fallback_poll_s), shutdown_grace_s=1.0,
        max_running=int(max_running), max_per_second=float(per_second),
    )
    with open(runs, "a", buffering=1) as out:
        async def handler(task):
            out.write(f"start {task.payload} {task.updated_at.timestamp()} {time.time()}\\n")
            if hang == "1":
                await anyio.sleep_forever()
            await anyio.sleep(0.005 * (task.payload % 7))  # work of uneven length
            out.write(f"end {task.payload} {time.time()}\\n")

        async with open_storage(url) as storage:
            queue = AgentQueue(storage, "limited", cfg)
            async with open_worker(queue, handler) as worker:
                print("ready", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)
            print(json.dumps(dataclasses.asdict(worker.statistics())), flush=True)

anyio.run(main)
"""


class Proc:
    def __init__(
        self,
        url: str,
        runs: Path,
        *,
        lease_s: float,
        hang: bool = False,
        max_running: int = 3,
        per_second: float = 20.0,
        fallback_poll_s: float = 60.0,
    ) -> None:
        self.runs = runs
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(runs),
                str(max_running),
                str(per_second),
                str(lease_s),
                "1" if hang else "0",
                str(fallback_poll_s),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            preexec_fn=lambda: os.nice(19),
        )

    def wait_ready(self) -> None:
        assert self.popen.stdout is not None
        assert self.popen.stdout.readline().strip() == "ready"

    def stop(self) -> str:
        out, _ = self.popen.communicate("stop\n", timeout=60)
        assert self.popen.returncode == 0
        return out.strip().splitlines()[-1]

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def lines(self) -> list[list[str]]:
        if not self.runs.exists():
            return []
        return [line.split() for line in self.runs.read_text().splitlines() if line]


class Sampler:
    """Reads the queue's running count (live leases) in a loop until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.samples = 0
        self.peak = 0
        self.stop = anyio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self.stop.is_set():
                n = await conn.fetchval(
                    "SELECT count(*) FROM agent_tasks WHERE queue = $1 AND status = 'running'"
                    " AND run_after > now()",
                    QUEUE,
                )
                self.samples += 1
                self.peak = max(self.peak, n)
                await anyio.lowlevel.checkpoint()  # yield to the test's own progress checks
        finally:
            await conn.close()


async def _succeeded(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM agent_tasks WHERE queue = $1 AND status = 'succeeded'", QUEUE
        )
        return n
    finally:
        await conn.close()


async def _wait_succeeded(dsn: str, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (done := await _succeeded(dsn)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {expected} tasks succeeded in {timeout_s} s")
        await anyio.sleep(0.05)  # cross-process progress: there is no event to wait on


def _max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` inside any half-open window [t, t + window)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        depth += step
        peak = max(peak, depth)
    return peak


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


async def _enqueue(dsn: str, payloads: list[int]) -> None:
    async with open_storage(dsn) as storage:
        await AgentQueue(storage, QUEUE).enqueue_tasks([NewTask(QUEUE, p) for p in payloads])


async def test_four_processes_never_exceed_3_running_or_20_starts_per_second(
    dsn: str, tmp_path: Path
) -> None:
    total = 100
    procs = [Proc(dsn, tmp_path / f"w{i}.log", lease_s=10.0) for i in range(4)]
    sampler = Sampler(dsn)
    try:
        for p in procs:
            p.wait_ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            await _enqueue(dsn, list(range(total)))
            await _wait_succeeded(dsn, total, timeout_s=120)
            sampler.stop.set()
        stats = [p.stop() for p in procs]
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.kill()
    lines = [line for p in procs for line in p.lines()]
    starts = {int(x[1]): (float(x[2]), float(x[3])) for x in lines if x[0] == "start"}
    ends = {int(x[1]): float(x[2]) for x in lines if x[0] == "end"}
    assert sorted(starts) == list(range(total)) == sorted(ends)
    assert sum(1 for x in lines if x[0] == "start") == total  # each task started once
    claims = [claim for claim, _ in starts.values()]
    overlap = _max_overlap([(starts[p][1], ends[p]) for p in starts])
    window = _max_in_window(claims, 1.0)
    print(  # the figures the README quotes (pytest -s)
        f"limits: {sampler.samples} samples, peak running {sampler.peak}, handler overlap "
        f"{overlap}, most claims in 1 s {window}, {total / (max(claims) - min(claims)):.1f} "
        "starts/s overall"
    )
    assert sampler.samples > 100 and sampler.peak <= 3
    assert overlap <= 3
    assert window <= 20
    assert all('"coordinated": true' in s for s in stats)


async def test_a_sigkilled_workers_slots_come_back_when_its_leases_expire(
    dsn: str, tmp_path: Path
) -> None:
    lease_s = 2.0
    holder = Proc(dsn, tmp_path / "holder.log", lease_s=lease_s, hang=True)
    sampler = Sampler(dsn)
    other: Proc | None = None
    try:
        holder.wait_ready()
        await _enqueue(dsn, [0, 1, 2])
        deadline = time.monotonic() + 60
        while sum(1 for x in holder.lines() if x[0] == "start") < 3:
            assert time.monotonic() < deadline, "the holder never started its 3 tasks"
            await anyio.sleep(0.05)  # cross-process progress
        other = Proc(dsn, tmp_path / "other.log", lease_s=lease_s)
        other.wait_ready()
        await _enqueue(dsn, [3, 4, 5])
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            # The holder heartbeats: its 3 slots stay taken, the other worker is refused.
            await _wait_refused(dsn)
            assert not other.lines()
            killed_at = time.time()
            holder.kill()
            await _wait_succeeded(dsn, 6, timeout_s=60)
            sampler.stop.set()
        other.stop()
    finally:
        for p in (holder, other):
            if p is not None and p.popen.poll() is None:
                p.kill()
    assert sampler.peak <= 3
    claims = sorted(float(x[2]) for x in other.lines() if x[0] == "start")
    assert len(claims) == 6  # the holder's 3 re-run, and the 3 that waited
    # Nothing started before the holder's leases ran out (the last renewal before the
    # kill, at most lease_s earlier), and the slots came back at the lease expiry: the
    # other worker's fallback poll is 60 s away.
    assert claims[0] >= killed_at - 1e-3
    assert claims[0] - killed_at <= lease_s + 10.0


async def _wait_refused(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 60
        while not await conn.fetchval("SELECT waiting FROM task_queues WHERE queue = $1", QUEUE):
            assert time.monotonic() < deadline, "the second worker was never refused"
            await anyio.sleep(0.05)  # cross-process progress
    finally:
        await conn.close()
