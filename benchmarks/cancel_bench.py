"""Cancel latency across processes on Postgres: a task's handler vs a session's token (issue 19).

An agent process (``python -m benchmarks.cancel_bench agent URL RUNS LEASE_S``) runs a
queue worker whose handler blocks until cancelled and a cancellation registry whose
session holders block on their token; each reports on ``REPORT_CHANNEL`` when its work
started and when it observed the cancellation. This process, on its own connection,
alternates (task, session, task, ...) and times each cancel from the call to the
``observed`` report: ``AgentQueue.cancel`` of a running task (``cancel_task``: row update
and NOTIFY in one statement, the worker's listener cancels the handler's scope) and a
session cancel request (``request_cancel`` with its notification: the agent's registry
fires the token). Both paths end with the same report notification, so the two
distributions differ only by the cancel path. Reported: median, p90, p99, max and the
ratio of medians, with the load average; on a throwaway ``asyncstore_bench_*`` database.

Run: ``python -m benchmarks cancel [--url URL] [--repeats N] [--json PATH]``; about 20 s
for the default 200 pairs. The multi-process tests (``tests/integration/
test_task_cancel_multiprocess.py``) drive the same agent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from asyncstore.orchestrator.cancellation import CancellationConfig, open_cancellation
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import AsyncStorageBackend, NotificationStream, Task, open_storage
from benchmarks._common import (
    REPO,
    create_database,
    drop_database,
    environment,
    load_average,
    median,
    percentile,
    with_database,
)

QUEUE = "cancel-bench"
REPORT_CHANNEL = "asyncstore.bench.cancel_report"
CONTROL_CHANNEL = "asyncstore.bench.cancel_control"
SESSION_CHANNEL = CancellationConfig().channel


# -- the agent process -----------------------------------------------------------------


async def _agent(url: str, runs_path: str, lease_s: float) -> None:
    cfg = QueueConfig(lease_s=lease_s, fallback_poll_s=30.0, shutdown_grace_s=1.0)
    async with open_storage(url) as storage, open_cancellation(storage) as registry:
        queue = AgentQueue(storage, QUEUE, cfg)

        async def report(what: str) -> None:
            with anyio.CancelScope(shield=True):
                await storage.notify(REPORT_CHANNEL, what)

        with open(runs_path, "a", buffering=1) as runs:  # noqa: ASYNC230 (set up once)

            async def handler(task: Task) -> None:
                runs.write(f"{task.id} {time.time()}\n")  # before anything else: SIGKILL-safe
                await report(f"started:task:{task.id}")
                try:
                    await anyio.sleep_forever()
                except anyio.get_cancelled_exc_class():
                    await report(f"observed:task:{task.id}")
                    raise

            async def hold(session_id: str) -> None:
                async with registry.open_token(session_id) as token:
                    await report(f"started:session:{session_id}")
                    await token.wait()
                    await report(f"observed:session:{session_id}")

            async with (
                open_worker(queue, handler) as worker,
                storage.listen(CONTROL_CHANNEL) as control,
                anyio.create_task_group() as tg,
            ):

                async def until_stdin_closes() -> None:
                    await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                    tg.cancel_scope.cancel()

                tg.start_soon(until_stdin_closes)
                print(json.dumps({"event": "ready", "worker_id": worker.worker_id}), flush=True)
                async for note in control:
                    if note.payload.startswith("session:"):
                        tg.start_soon(hold, note.payload.removeprefix("session:"))
            stats = dataclasses.asdict(worker.statistics())
        print(json.dumps({"event": "closed", "statistics": stats}), flush=True)


class AgentProcess:
    """The agent, started and stopped from a test or the benchmark (always killed at the end)."""

    def __init__(self, url: str, runs: Path, *, lease_s: float) -> None:
        self.runs = runs
        command = [sys.executable, "-m", "benchmarks.cancel_bench", "agent", url, str(runs)]
        self.popen = subprocess.Popen(
            [*command, str(lease_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.popen.stdout is not None
        ready = json.loads(self.popen.stdout.readline())
        assert ready["event"] == "ready", ready
        self.worker_id: str = ready["worker_id"]

    def started(self) -> list[int]:
        """Task ids whose handler started here, in order (read from the runs file)."""
        if not self.runs.exists():
            return []
        return [int(line.split()[0]) for line in self.runs.read_text().splitlines() if line]

    def stop(self) -> dict[str, Any]:
        """Close stdin, wait for the exit; the worker's final statistics."""
        out, _ = self.popen.communicate("stop\n", timeout=60)
        assert self.popen.returncode == 0, out
        closed = json.loads(out.strip().splitlines()[-1])
        stats: dict[str, Any] = closed["statistics"]
        return stats

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)


class Reports:
    """What the agent reported, awaited by name (``started:task:7``)."""

    def __init__(self, stream: NotificationStream) -> None:
        self.stream = stream
        self.seen: dict[str, float] = {}

    async def wait(self, what: str, limit_s: float = 60.0) -> float:
        """The monotonic time the report arrived (waits for it)."""
        with anyio.fail_after(limit_s):
            while what not in self.seen:
                note = await self.stream.receive()
                self.seen[note.payload] = time.monotonic()
        return self.seen[what]


@contextlib.asynccontextmanager
async def reports(storage: AsyncStorageBackend) -> AsyncIterator[Reports]:
    async with storage.listen(REPORT_CHANNEL) as stream:
        yield Reports(stream)


async def cancel_task_once(queue: AgentQueue, seen: Reports) -> tuple[float, float]:
    """Seconds from ``AgentQueue.cancel`` to the agent's handler observing it, and to the
    cancel call's return (its statement's round trip and commit)."""
    task = await queue.enqueue("block")
    await seen.wait(f"started:task:{task.id}")
    started = time.monotonic()
    answer = await queue.cancel(task.id)
    returned = time.monotonic() - started
    assert answer.was_running, answer
    return await seen.wait(f"observed:task:{task.id}") - started, returned


async def cancel_session_once(
    storage: AsyncStorageBackend, seen: Reports, n: int
) -> tuple[float, float]:
    """Seconds from a session cancel request to the agent's token holder observing it, and
    to the request's return."""
    session_id = f"bench-{n}-{time.monotonic_ns()}"
    await storage.notify(CONTROL_CHANNEL, f"session:{session_id}")
    await seen.wait(f"started:session:{session_id}")
    started = time.monotonic()
    await storage.request_cancel(session_id, "bench", notify_channel=SESSION_CHANNEL)
    returned = time.monotonic() - started
    return await seen.wait(f"observed:session:{session_id}") - started, returned


def summary(samples: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "n": len(ms),
        "median_ms": median(ms),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = args.url
    name = await create_database(admin)
    if name is None:
        raise SystemExit("this benchmark needs Postgres (--url)")
    url = with_database(admin, name)
    load_before = load_average()
    task_s: list[tuple[float, float]] = []
    session_s: list[tuple[float, float]] = []
    try:
        async with open_storage(url, migrate=True) as storage:
            runs = Path(f"/tmp/{name}.runs")
            agent = AgentProcess(url, runs, lease_s=60.0)  # renewal every 20 s: never the cause
            try:
                queue = AgentQueue(storage, QUEUE)
                async with reports(storage) as seen:
                    for n in range(args.repeats):
                        task_s.append(await cancel_task_once(queue, seen))
                        session_s.append(await cancel_session_once(storage, seen, n))
                stats = agent.stop()
            finally:
                agent.kill()
                runs.unlink(missing_ok=True)  # noqa: ASYNC240 (one small file at the end)
    finally:
        await drop_database(admin, name)
    result = {
        "benchmark": "cancel",
        "environment": environment(),
        "load_average": {"before": load_before, "after": load_average()},
        "repeats": args.repeats,
        "task_cancel": summary([s for s, _ in task_s]),
        "session_cancel": summary([s for s, _ in session_s]),
        "median_ratio_task_vs_session": median([s for s, _ in task_s])
        / median([s for s, _ in session_s]),
        "task_cancel_call": summary([c for _, c in task_s]),
        "session_cancel_call": summary([c for _, c in session_s]),
        "agent_worker": {k: stats[k] for k in ("cancelled", "cancel_notifications", "lease_lost")},
    }
    return result


def main(argv: list[str]) -> int:
    if argv and argv[0] == "agent":
        url, runs, lease_s = argv[1:4]
        anyio.run(_agent, url, runs, float(lease_s))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks cancel", description=__doc__)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = anyio.run(run, args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
