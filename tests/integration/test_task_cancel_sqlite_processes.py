"""cancel_task across OS processes sharing one SQLite file: the lease renewal is the path.

SQLite notifications are in-process (every handle on the file in this process), so a
worker in another process learns of a cancel when its next lease renewal finds the task
no longer running: within ``heartbeat_interval_s`` (default ``lease_s / 3``) plus one
renewal statement. Session cancellation (``request_cancel``) does not reach another
process on SQLite at all in its default ``notify`` mode (only a token opened later reads
it), so the task cancel is the better of the two there. This test pins the mechanism:
the handler is stopped, counted ``lease_lost`` (no notice arrived), the task stays
``cancelled`` and is never re-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from asyncstore.orchestrator.queue import AgentQueue
from asyncstore.storage import TaskStatus, open_storage
from tests.waiting import wait_for

WORKER = """
import dataclasses, json, sys, time
import anyio
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import open_storage

url, runs = sys.argv[1:3]

async def main():
    cfg = QueueConfig(max_workers=2, lease_s=6.0, heartbeat_interval_s=1.0,
                      fallback_poll_s=60.0, shutdown_grace_s=1.0)
    with open(runs, "a", buffering=1) as out:
        async def handler(task):
            out.write(f"start {task.id} {time.time()}\\n")
            try:
                await anyio.sleep_forever()
            finally:
                out.write(f"stopped {task.id} {time.time()}\\n")

        async with open_storage(url) as storage:
            queue = AgentQueue(storage, "sq", cfg)
            async with open_worker(queue, handler) as worker:
                print("ready", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)
            print(json.dumps(dataclasses.asdict(worker.statistics())), flush=True)

anyio.run(main)
"""


def _spawn(url: str, runs: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(runs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        preexec_fn=lambda: os.nice(19),
    )


def _lines(runs: Path) -> list[list[str]]:
    return [x.split() for x in runs.read_text().splitlines() if x] if runs.exists() else []


async def test_a_cancel_reaches_a_worker_in_another_process_at_its_lease_renewal(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    runs = tmp_path / "runs"
    async with open_storage(url, migrate=True) as storage:
        proc = _spawn(url, runs)
        try:
            assert proc.stdout is not None
            with anyio.fail_after(120):
                ready = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert ready.strip() == "ready"
            task = await AgentQueue(storage, "sq").enqueue("work")
            await wait_for(lambda: any(x[0] == "start" for x in _lines(runs)), 120, what="start")
            cancelled_at = time.time()
            answer = await storage.cancel_task(task.id, "operator")
            assert answer.was_running
            await wait_for(
                lambda: any(x[0] == "stopped" for x in _lines(runs)), 60, what="the handler stop"
            )
            stopped = next(float(x[2]) for x in _lines(runs) if x[0] == "stopped")
            record_property("sqlite_cross_process_cancel_s", stopped - cancelled_at)
            out, _ = proc.communicate("stop\n", timeout=60)
            assert proc.returncode == 0
            stats = json.loads(out.strip().splitlines()[-1])
            row = await storage.get_task(task.id)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert row is not None and row.status is TaskStatus.CANCELLED
    assert stats["lease_lost"] == 1 and stats["cancel_notifications"] == 0
    assert stats["succeeded"] == 0 and stats["retried"] == 0
    assert sum(1 for x in _lines(runs) if x[0] == "start") == 1  # never re-run
