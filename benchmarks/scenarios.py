"""The seed's acceptance scenarios S1-S4, each run once on one path of a running runtime.

Every function here measures one repetition of one scenario on the path the runtime's flags
select (``OPTIMIZED`` or ``LEGACY``, applied by the caller with ``rt.update_flags``) and
returns plain figures; ``benchmarks.suite`` warms up, alternates the paths, repeats and
judges. S3 also runs here as a child process (``python -m benchmarks.scenarios --s3-child``),
one per queue worker, so a worker can be killed mid-drain. The peers' drains come from
``benchmarks.queue_bench``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from benchmarks._common import REPO, percentile, rss_mb
from orchestrator.broadcast import StreamReset, Subscription
from orchestrator.queue import AgentQueue, QueueConfig, open_worker
from orchestrator.runtime import Runtime
from orchestrator.webhooks.testing import open_test_receiver
from storage import NewMessage, Task, TaskStatus, open_storage

OPTIMIZED: dict[str, str] = {
    "stream_batching": "batched",
    "stream_delivery": "memory",
    "lock": "two_level",
    "cancel": "notify",
}
LEGACY: dict[str, str] = {
    "stream_batching": "per_event",
    "stream_delivery": "poll",
    "lock": "db_poll",
    "cancel": "poll",
}
PATHS = ("optimized", "legacy")

# S1: a simulated model. Time to first token, a tool's run time, and one token every
# DELTA_S (50 tokens/s): all of it is think time, subtracted from the figure.
FIRST_TOKEN_S = 0.25
TOOL_S = 0.05
DELTA_S = 0.02
# S2: each live stream produces tokens at this rate.
S2_RATE = 20.0

HOOKS_TOML = """
[[webhooks]]
name = "tool-guard"
trigger = "pre_tool"
url = "{url}/hooks/pre-tool"
timeout_secs = 5

[[async_webhooks]]
name = "turn-events"
trigger = "turn_start, post_tool, turn_complete, error"
url = "{url}/events"
batch_size = 50
flush_interval_ms = 100
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each scenario is; ``for_mode`` gives the quick, full or scaled sizes."""

    s1_turns: int
    s1_deltas: int
    s2_streams: int
    s2_subscribers: int
    s2_events: int
    s2_clients: int  # subscriber client processes
    s2_repeats: int
    s3_tasks: int
    s3_workers: int
    s3_lease_s: float
    s4_segment_s: float
    s4_concurrency: int
    repeats: int
    s3_repeats: int
    s4_repeats: int

    @classmethod
    def for_mode(cls, full: bool, scale: float = 1.0) -> Sizes:
        def n(value: int, floor: int = 1) -> int:
            return max(floor, round(value * scale))

        if full:
            return cls(
                s1_turns=n(300, 4),
                s1_deltas=30,
                s2_streams=n(500, 2),
                s2_subscribers=n(3000, 4),
                s2_events=n(60, 3),
                s2_clients=4,
                s2_repeats=3,
                s3_tasks=n(10_000, 50),
                s3_workers=4,
                s3_lease_s=5.0,
                s4_segment_s=max(1.0, 150.0 * scale),
                s4_concurrency=n(50, 2),
                repeats=3,
                s3_repeats=3,
                s4_repeats=2,
            )
        return cls(
            s1_turns=n(100, 4),
            s1_deltas=10,
            s2_streams=n(100, 2),
            s2_subscribers=n(600, 4),
            s2_events=n(40, 3),
            s2_clients=2,
            s2_repeats=1,
            s3_tasks=n(2000, 50),
            s3_workers=3,
            s3_lease_s=1.5,
            s4_segment_s=max(1.0, 3.0 * scale),
            s4_concurrency=n(20, 2),
            repeats=3 if scale >= 0.1 else 2,
            s3_repeats=2 if scale >= 0.1 else 1,
            s4_repeats=2 if scale >= 0.1 else 1,
        )


Tick = Callable[[float], None]
"""Progress callback: the fraction (0..1) of the current repetition done."""


# ---------------------------------------------------------------- S1: agent turns


async def s1_once(rt: Runtime, tag: str, turns: int, deltas: int, tick: Tick) -> dict[str, Any]:
    """``turns`` concurrent simulated turns; non-LLM overhead per turn in ms.

    Half the turns call a tool (a synchronous ``pre_tool`` webhook, two events, an
    asynchronous ``post_tool`` webhook); every turn appends the user and the assistant
    message under the lease's fencing token, streams ``deltas`` token deltas and a
    ``turn_completed``. Overhead = wall time from asking for the turn to its release, minus
    the simulated think time.
    """
    overheads: list[float] = []
    statements = rt.storage.statistics().total_statements

    async def one(i: int) -> None:
        sid = f"{tag}-{i}"
        think = 0.0
        started = time.perf_counter()
        async with rt.turn(sid) as turn:
            token = turn.lease.token
            await rt.storage.append_messages(
                sid, [NewMessage("user", {"text": "weather?"})], lease_token=token
            )
            await anyio.sleep(FIRST_TOKEN_S)
            think += FIRST_TOKEN_S
            if i % 2 == 0:
                await turn.fire("pre_tool", {"tool": "weather", "args": {"city": "Paris"}})
                await turn.emit("tool_call", {"tool": "weather"})
                await anyio.sleep(TOOL_S)
                think += TOOL_S
                await turn.emit("tool_result", {"tool": "weather", "result": {"c": 22}})
                await turn.fire("post_tool", {"tool": "weather"}, result={"c": 22})
            for _ in range(deltas):
                await turn.emit("delta", {"text": "tok "})
                await anyio.sleep(DELTA_S)
                think += DELTA_S
            await rt.storage.append_messages(
                sid, [NewMessage("assistant", {"text": "tok " * deltas})], lease_token=token
            )
            await turn.emit("turn_completed", {"text": "done"})
        overheads.append(time.perf_counter() - started - think)
        tick(len(overheads) / turns)

    async with anyio.create_task_group() as tg:
        for i in range(turns):
            tg.start_soon(one, i)
    used = rt.storage.statistics().total_statements - statements
    return {
        "p50_ms": percentile(overheads, 0.50) * 1000,
        "p95_ms": percentile(overheads, 0.95) * 1000,
        "p99_ms": percentile(overheads, 0.99) * 1000,
        "statements_per_turn": used / turns,
    }


# ---------------------------------------------------------------- S2: fan-out
# Over real sockets, in processes of their own: benchmarks.s2_sockets.


# ---------------------------------------------------------------- S3: queue drain


def s3_config(mode: str, lease_s: float) -> QueueConfig:
    """The worker configuration of a path: the claim defaults or the legacy poll loop."""
    if mode == "claim":
        # A dead worker's tasks are re-claimed by the next claim once their lease expired;
        # an idle claim worker claims again on a NOTIFY or its fallback poll, so the poll
        # is set to the lease here (the default 10 s would dominate a short drain's tail).
        return QueueConfig(max_workers=200, lease_s=lease_s, fallback_poll_s=lease_s)
    return QueueConfig(mode="poll_spawn", poll_interval_s=1.0, poll_batch=1000, lease_s=lease_s)


async def _s3_child(url: str, queue: str, mode: str, lease_s: float, record: str) -> int:
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def handler(task: Task) -> None:
        # One unbuffered write per run: what a SIGKILL cannot take back.
        os.write(fd, f"{task.payload}\n".encode())

    async def expect(word: str) -> None:
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != word:
            raise SystemExit(f"expected {word!r}, got {line!r}")

    try:
        async with open_storage(url) as storage:
            print("ready", flush=True)
            await expect("go")
            async with open_worker(AgentQueue(storage, queue, s3_config(mode, lease_s)), handler):
                await expect("stop")
    finally:
        os.close(fd)
    return 0


def _read_records(path: Path) -> list[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split("\n")[:-1]]


def _spawn(url: str, queue: str, mode: str, lease_s: float, record: Path) -> subprocess.Popen[str]:
    argv = ["--s3-child", url, queue, mode, str(lease_s), str(record)]
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scenarios", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


async def s3_once(
    url: str,
    mode: str,
    tasks: int,
    workers: int,
    lease_s: float,
    tmp: Path,
    tick: Tick,
    *,
    kill: bool = True,
) -> dict[str, Any]:
    """Drain ``tasks`` queued tasks with ``workers`` processes; SIGKILL one at half-way.

    With ``kill=False`` nobody is killed: the plain drain rate, comparable to the peers'.

    The workers connect, report ready and are released together: the clock starts at
    that release (each worker's start, its first claim, is inside the figure) and
    stops when every task ran in a live worker or is ``succeeded`` in
    the database. Duplicates: runs beyond one per task among live workers (must be 0).
    Lost: tasks neither. Re-runs after the kill (the killed worker's unfinished claims,
    taken again once their lease expired) are counted apart: they are the at-least-once
    recovery, not duplicates.
    """
    queue = f"s3{secrets.token_hex(4)}"
    ids: dict[int, int] = {}
    async with open_storage(url) as storage:
        q = AgentQueue(storage, queue)
        for start in range(0, tasks, 2000):
            for task in await q.enqueue_many(list(range(start, min(tasks, start + 2000)))):
                ids[int(task.payload)] = task.id
        records = [tmp / f"{queue}-{k}.log" for k in range(workers)]
        procs = [
            await asyncio.to_thread(_spawn, url, queue, mode, lease_s, record) for record in records
        ]
        try:
            started = time.perf_counter()
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                if line.strip() != "ready":
                    raise RuntimeError(f"S3 worker did not start ({proc.poll()})")
            started = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            victim = procs[0]
            killed = False
            finished = None
            deadline = started + max(60.0, tasks / 20)
            confirmed: set[int] = set()
            while time.perf_counter() < deadline:
                await asyncio.sleep(0.02)
                seen = [_read_records(r) for r in records]
                ran = sum(len(s) for s in seen)
                if kill and not killed and ran >= tasks // 2:
                    victim.kill()
                    killed = True
                live = set().union(*seen[1:]) if killed else set().union(*seen)
                tick(min(1.0, len(live) / tasks))
                if len(live | set(seen[0])) < tasks:
                    continue
                for payload in set(seen[0]) - live - confirmed:
                    row = await storage.get_task(ids[payload])
                    if row is not None and row.status is TaskStatus.SUCCEEDED:
                        confirmed.add(payload)
                if len(live | confirmed) == tasks:
                    finished = time.perf_counter()
                    break
            for proc in procs[1:] if killed else procs:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            for proc in procs:
                await asyncio.to_thread(proc.wait, 60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    seen = [_read_records(r) for r in records]
    live_counts: Counter[int] = Counter()
    for s in seen[1:] if killed else seen:
        live_counts.update(s)
    killed_set = set(seen[0]) if killed else set()
    elapsed = (finished or time.perf_counter()) - started
    covered = set(live_counts) | confirmed
    for r in records:
        r.unlink(missing_ok=True)
    return {
        "tasks_per_s": tasks / elapsed,
        "drain_s": elapsed,
        "duplicates": float(sum(c - 1 for c in live_counts.values() if c > 1)),
        "lost": float(tasks - len(covered & set(range(tasks)))),
        "rerun_after_kill": float(len(killed_set & set(live_counts))),
    }


# ---------------------------------------------------------------- S4: soak


def _open_sockets() -> int:
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def _connections(rt: Runtime) -> int:
    pool = getattr(rt.storage, "pool", None)
    size = getattr(pool, "get_size", None)
    if callable(size):
        return int(size())
    return _open_sockets()


def _depths(rt: Runtime, enqueued: int) -> dict[str, int]:
    stats = rt.statistics()
    writers = sum(
        (s.writer.pending + s.writer.in_flight) if s.writer is not None else 0
        for s in stats.streams.values()
    )
    hooks = 0
    if rt.webhooks is not None:
        for b in rt.webhooks.statistics().batchers.values():
            hooks += b.writer.pending + b.writer.in_flight
    done = rt.worker.statistics().succeeded if rt.worker is not None else 0
    return {
        "stream_writer": writers,
        "webhooks": hooks,
        "agent_queue": enqueued - done,
        "rings": sum(s.rings for s in stats.broadcast.values()),
        "tracked": stats.tracked,
    }


async def _read_until_end(sub: Subscription) -> None:
    """A live client of one S4 turn: reads until the turn's last event (at most 5 s)."""
    async with sub:
        with anyio.move_on_after(5):
            async for item in sub:
                if isinstance(item, StreamReset) or item.kind in ("turn_completed", "cancelled"):
                    return


async def s4_once(
    rt: Runtime,
    tag: str,
    seconds: float,
    concurrency: int,
    enqueued: list[int],
    tick: Tick,
) -> dict[str, Any]:
    """Churn sessions through the whole runtime for ``seconds``; sample every 0.25 s.

    ``concurrency`` loops each run short turns on fresh sessions (lease, cancel token, a
    live subscriber reading to the end, three events, a chat append, webhooks) and
    enqueue an agent task for the runtime's worker; every tenth session is cancelled mid-turn. After
    the first
    quarter (the warm-up), RSS growth is measured to the end; then the loops stop and the
    queues get up to 10 s to return to empty. ``enqueued`` is the running count of tasks
    given to ``rt.queue`` (shared across repetitions: the worker's counters are cumulative).
    """
    stop = anyio.Event()
    sessions = 0
    lost_before = sum(s.lost for s in rt.statistics().streams.values())
    samples: list[dict[str, float]] = []
    started = time.perf_counter()

    async def churn(loop: int) -> None:
        nonlocal sessions
        i = 0
        while not stop.is_set():
            sid = f"{tag}-{loop}-{i}"
            i += 1
            async with anyio.create_task_group() as tg:
                sub = rt.subscribe(sid)
                tg.start_soon(_read_until_end, sub)
                async with rt.turn(sid) as turn:
                    if i % 10 == 0:
                        await rt.request_cancel(sid, "soak")
                    await turn.emit("delta", {"text": "a"})
                    await rt.storage.append_messages(
                        sid, [NewMessage("assistant", {"text": "a"})], lease_token=turn.lease.token
                    )
                    await turn.emit("delta", {"text": "b"})
                    await anyio.sleep(0.01)
                    await turn.emit("turn_completed", {"text": "ab"})
            await rt.queue.enqueue({"session": sid})
            enqueued[0] += 1
            sessions += 1

    async def sample() -> None:
        while True:
            gc.collect()
            now = time.perf_counter() - started
            samples.append(
                {
                    "t": now,
                    "rss_mb": rss_mb(),
                    "connections": float(_connections(rt)),
                    **{k: float(v) for k, v in _depths(rt, enqueued[0]).items()},
                }
            )
            tick(min(1.0, now / seconds))
            await anyio.sleep(0.25)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        async with anyio.create_task_group() as loops:
            for loop in range(concurrency):
                loops.start_soon(churn, loop)
            await anyio.sleep(seconds)
            stop.set()
        elapsed = time.perf_counter() - started
        drained_at = None
        with anyio.move_on_after(10):
            while True:
                if rt.webhooks is not None:
                    await rt.webhooks.flush()
                for writer in rt.streams.built().values():
                    await writer.flush()
                d = _depths(rt, enqueued[0])
                if d["stream_writer"] == 0 and d["webhooks"] == 0 and d["agent_queue"] == 0:
                    drained_at = time.perf_counter() - started - elapsed
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    final = _depths(rt, enqueued[0])
    warm = [s for s in samples if s["t"] >= seconds / 4 and s["t"] <= elapsed]
    base = warm[0]["rss_mb"] if warm else samples[0]["rss_mb"]
    peak = max(s["rss_mb"] for s in warm) if warm else base
    return {
        "rss_growth_pct": (peak - base) / base * 100,
        "rss_mb": peak,
        "sessions_per_s": sessions / elapsed,
        "peak_connections": max(s["connections"] for s in samples),
        "queues_left": float(final["stream_writer"] + final["webhooks"] + final["agent_queue"]),
        "drain_s": drained_at if drained_at is not None else float("nan"),
        "events_lost": float(sum(s.lost for s in rt.statistics().streams.values()) - lost_before),
        "series": samples,
    }


async def _receiver_child() -> int:
    async with open_test_receiver() as receiver:
        print(receiver.url, flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    return 0


def spawn_receiver() -> subprocess.Popen[str]:
    """A webhook receiver in its own process (its first stdout line is its URL).

    Out of process so the receiver's work is not counted as the turns' overhead; it
    stops when its stdin is closed.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scenarios", "--receiver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def main(argv: Sequence[str]) -> int:
    if argv == ["--receiver"]:
        return asyncio.run(_receiver_child())
    if len(argv) == 6 and argv[0] == "--s3-child":
        logging.basicConfig(level=logging.WARNING)
        _, url, queue, mode, lease_s, record = argv
        return asyncio.run(_s3_child(url, queue, mode, float(lease_s), record))
    print("internal module: run `python -m benchmarks`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
