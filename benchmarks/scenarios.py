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
import contextvars
import gc
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio

from asyncstore.orchestrator.broadcast import StreamReset, Subscription
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.orchestrator.runtime import Runtime
from asyncstore.orchestrator.webhooks.testing import open_test_receiver
from asyncstore.storage import NewMessage, Task, open_storage
from benchmarks._common import REPO, percentile, rss_mb

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
T = TypeVar("T")

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
    s1_low_turns: int
    s1_low_concurrency: int
    s2_streams: int
    s2_subscribers: int
    s2_events: int
    s2_clients: int  # subscriber client processes
    s2_repeats: int
    s2_held: bool  # also search the largest size each of library and bare holds
    s3_tasks: int
    s3_workers: int
    s3_lease_s: float
    s3_procrastinate: bool
    s4_segment_s: float
    s4_concurrency: int
    repeats: int
    s3_repeats: int
    s4_repeats: int
    s4_fill: bool  # churn until the memory hub's rings reach their bound first (``s4_fill``)

    @classmethod
    def for_mode(cls, full: bool, scale: float = 1.0) -> Sizes:
        def n(value: int, floor: int = 1) -> int:
            return max(floor, round(value * scale))

        if full:
            return cls(
                s1_turns=n(300, 4),
                s1_deltas=30,
                s1_low_turns=n(100, 4),
                s1_low_concurrency=n(20, 2),
                s2_streams=n(500, 2),
                s2_subscribers=n(3000, 4),
                s2_events=n(60, 3),
                s2_clients=4,
                s2_repeats=3,
                s2_held=True,
                s3_tasks=n(10_000, 50),
                s3_workers=4,
                s3_lease_s=5.0,
                s3_procrastinate=True,
                s4_segment_s=max(1.0, 150.0 * scale),
                s4_concurrency=n(50, 2),
                repeats=3,
                s3_repeats=3,
                s4_repeats=2,
                s4_fill=True,
            )
        return cls(
            # Fewer concurrent turns than the seed's 300, but the same turn: the ratio of the
            # two paths depends on the events per turn (legacy: one INSERT each).
            s1_turns=n(60, 4),
            s1_deltas=30,
            s1_low_turns=n(20, 2),
            s1_low_concurrency=n(20, 2),
            s2_streams=n(100, 2),
            s2_subscribers=n(600, 4),
            s2_events=n(40, 3),
            s2_clients=2,
            s2_repeats=1,
            s2_held=False,
            s3_tasks=n(2000, 50),
            s3_workers=3,
            s3_lease_s=1.5,
            s3_procrastinate=False,
            s4_segment_s=max(1.0, 3.0 * scale),
            s4_concurrency=n(20, 2),
            repeats=3 if scale >= 0.1 else 2,
            s3_repeats=2 if scale >= 0.1 else 1,
            s4_repeats=2 if scale >= 0.1 else 1,
            s4_fill=False,
        )


Tick = Callable[[float], None]
"""Progress callback: the fraction (0..1) of the current repetition done."""


# ---------------------------------------------------------------- S1: agent turns

# Library time of the turn running in this task, by phase (see ``_Probes``).
_PHASES: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "s1_phases", default=None
)
S1_PHASES = ("lease", "appends", "emits", "hooks", "flush", "release", "other")
"""The parts of a turn's library time: ``other`` is the rest of entering and leaving the
turn (cancel token, stream begin with its one read of the last seq, bookkeeping)."""


def _add(phase: str, seconds: float) -> None:
    phases = _PHASES.get()
    if phases is not None:
        phases[phase] = phases.get(phase, 0.0) + seconds


class _Probes:
    """Timers around the runtime components' entry points, for S1's breakdown.

    Wraps, on the instances and only while the block runs, ``hold`` of both limiters (its
    entry is the lease acquire, its exit the release), ``flush`` of both stream writers
    (the end-of-turn barrier) and ``Webhooks.fire`` (every hook of the turn, the ones
    ``Runtime.turn`` fires on entry and exit too). Time goes to the turn running in the
    calling task (a context variable), so background loops are never counted.
    """

    def __init__(self, rt: Runtime) -> None:
        self._patched: list[tuple[object, str]] = []
        for limiter in (rt._limiter.optimized, rt._limiter.legacy):
            if limiter is not None:  # a path not built is never timed
                self._patch(limiter, "hold", _timed_hold(limiter.hold))
        for writer in (rt._streams.optimized, rt._streams.legacy):
            if writer is not None:
                self._patch(writer, "flush", _timed_call(writer.flush, "flush"))
        if rt.webhooks is not None:
            self._patch(rt.webhooks, "fire", _timed_call(rt.webhooks.fire, "hooks"))

    def _patch(self, obj: object, name: str, wrapper: object) -> None:
        setattr(obj, name, wrapper)
        self._patched.append((obj, name))

    def __enter__(self) -> _Probes:
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, name in self._patched:
            delattr(obj, name)


def _timed_hold(hold: Callable[[str], Any]) -> Callable[[str], Any]:
    @asynccontextmanager
    async def timed(session_id: str) -> AsyncIterator[Any]:
        started = time.perf_counter()
        leaving = 0.0
        try:
            async with hold(session_id) as held:
                _add("lease", time.perf_counter() - started)
                try:
                    yield held
                finally:
                    leaving = time.perf_counter()
        finally:
            if leaving:
                _add("release", time.perf_counter() - leaving)

    return timed


def _timed_call(call: Callable[..., Awaitable[T]], phase: str) -> Callable[..., Awaitable[T]]:
    async def timed(*args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            _add(phase, time.perf_counter() - started)

    return timed


async def _lag_monitor(samples: list[float], interval_s: float = 0.005) -> None:
    """Event-loop lag: how late a ``interval_s`` sleep wakes up, sampled until cancelled."""
    while True:
        started = time.perf_counter()
        await anyio.sleep(interval_s)
        samples.append(time.perf_counter() - started - interval_s)


def _quantiles(prefix: str, samples: Sequence[float]) -> dict[str, float]:
    return {f"{prefix}p{q}_ms": percentile(samples, q / 100) * 1000 for q in (50, 95, 99)}


async def s1_once(
    rt: Runtime, tag: str, turns: int, deltas: int, tick: Tick, concurrency: int | None = None
) -> dict[str, Any]:
    """``turns`` simulated turns, at most ``concurrency`` at once (default: all of them).

    Figures: overhead, library time and loop lag per turn.

    Turns arrive spread evenly over ``FIRST_TOKEN_S``. Half the turns call a tool (a
    synchronous ``pre_tool`` webhook, two events, an
    asynchronous ``post_tool`` webhook); every turn appends the user and the assistant
    message under the lease's fencing token, streams ``deltas`` token deltas and a
    ``turn_completed``. Overhead = wall time from asking for the turn to its release, minus
    the simulated think time. It splits into:

    * library time: the time the turn spent inside the library's calls (entering the turn,
      appends, emits, hooks, leaving the turn with its flush and release), each timed
      around the call; its parts by phase come from ``_Probes``;
    * loop lag of the turn: how much later than asked its think-time sleeps woke up (an
      event loop busy with other turns), plus the gaps between calls.

    Also the event loop's lag sampled every 5 ms during the run, and the CPU time of the
    process (the SQLite driver's thread included, the Postgres server not) per turn. A
    library call's time includes the loop lag it met while waiting: at a concurrency that
    saturates the machine the two cannot be told apart, hence a second, lower concurrency.
    """
    overheads: list[float] = []
    library: list[float] = []
    lags: list[float] = []
    parts: dict[str, list[float]] = {phase: [] for phase in S1_PHASES}
    loop: list[float] = []
    statements = rt.storage.statistics().total_statements

    slots = anyio.CapacityLimiter(concurrency or turns)

    async def one(i: int) -> None:
        # Turns arrive spread over one first-token time, as users do (S2 staggers its
        # producers the same way): all of them run at once, none in lockstep with another.
        await anyio.sleep(FIRST_TOKEN_S * i / turns)
        async with slots:
            await turn(i)

    async def turn(i: int) -> None:
        sid = f"{tag}-{i}"
        phases: dict[str, float] = {}
        _PHASES.set(phases)
        inside = 0.0

        async def call(phase: str, awaitable: Awaitable[Any]) -> None:
            nonlocal inside
            t0 = time.perf_counter()
            await awaitable
            spent = time.perf_counter() - t0
            inside += spent
            if phase != "hooks":  # the probe on Webhooks.fire counts hooks
                phases[phase] = phases.get(phase, 0.0) + spent

        started = time.perf_counter()
        turn_cm = rt.turn(sid)
        running = await turn_cm.__aenter__()
        entered = time.perf_counter()
        try:
            token = running.lease.token
            user = [NewMessage("user", {"text": "weather?"})]
            await call("appends", rt.storage.append_messages(sid, user, lease_token=token))
            await anyio.sleep(FIRST_TOKEN_S)
            if i % 2 == 0:
                pre = {"tool": "weather", "args": {"city": "Paris"}}
                await call("hooks", running.fire("pre_tool", pre))
                await call("emits", running.emit("tool_call", {"tool": "weather"}))
                await anyio.sleep(TOOL_S)
                result = {"tool": "weather", "result": {"c": 22}}
                await call("emits", running.emit("tool_result", result))
                post = running.fire("post_tool", {"tool": "weather"}, result={"c": 22})
                await call("hooks", post)
            for _ in range(deltas):
                await call("emits", running.emit("delta", {"text": "tok "}))
                await anyio.sleep(DELTA_S)
            answer = [NewMessage("assistant", {"text": "tok " * deltas})]
            await call("appends", rt.storage.append_messages(sid, answer, lease_token=token))
            await call("emits", running.emit("turn_completed", {"text": "done"}))
        except BaseException as exc:
            if not await turn_cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            leaving = time.perf_counter()
            await turn_cm.__aexit__(None, None, None)
            inside += time.perf_counter() - leaving
        ended = time.perf_counter()
        inside += entered - started
        think_s = FIRST_TOKEN_S + deltas * DELTA_S + (TOOL_S if i % 2 == 0 else 0.0)
        overhead = ended - started - think_s
        overheads.append(overhead)
        library.append(inside)
        lags.append(overhead - inside)
        known = sum(v for k, v in phases.items() if k != "other")
        phases["other"] = max(0.0, inside - known)
        for phase in S1_PHASES:
            parts[phase].append(phases.get(phase, 0.0))
        tick(len(overheads) / turns)

    cpu = time.process_time()
    with _Probes(rt):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_lag_monitor, loop)
            async with anyio.create_task_group() as turns_tg:
                for i in range(turns):
                    turns_tg.start_soon(one, i)
            tg.cancel_scope.cancel()
    cpu = time.process_time() - cpu
    used = rt.storage.statistics().total_statements - statements
    out: dict[str, Any] = {
        **_quantiles("", overheads),
        **_quantiles("lib_", library),
        **_quantiles("lag_", lags),
        "loop_lag_p50_ms": percentile(loop, 0.50) * 1000,
        "loop_lag_p99_ms": percentile(loop, 0.99) * 1000,
        "cpu_ms_per_turn": cpu / turns * 1000,
        "statements_per_turn": used / turns,
    }
    for phase, values in parts.items():
        out[f"{phase}_p50_ms"] = percentile(values, 0.50) * 1000
        out[f"{phase}_p95_ms"] = percentile(values, 0.95) * 1000
    return out


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
    """One S3 worker process, driven by its stdin: ``go``, ``hold N`` (optional), ``stop``.

    Each run appends ``payload time`` to ``record`` (one unbuffered write: what a SIGKILL
    cannot take back). On ``stop`` it prints one JSON line: the outcomes its worker gave up
    at shutdown (``undelivered``). After ``hold N``, once it ran N tasks, the handler appends ``H
    payload time`` and never returns: the worker holds every claim it starts from then on,
    until it is killed.
    """
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    hold_after: int | None = None
    ran = 0

    async def handler(task: Task) -> None:
        nonlocal ran
        if hold_after is not None and ran >= hold_after:
            os.write(fd, f"H {task.payload} {time.time()}\n".encode())
            await anyio.sleep_forever()
        ran += 1
        os.write(fd, f"{task.payload} {time.time()}\n".encode())

    async def read() -> str:
        line: str = await asyncio.to_thread(sys.stdin.readline)
        return line.strip()

    try:
        async with open_storage(url) as storage:
            print("ready", flush=True)
            if (line := await read()) != "go":
                raise SystemExit(f"expected 'go', got {line!r}")
            queue_ = AgentQueue(storage, queue, s3_config(mode, lease_s))
            async with open_worker(queue_, handler) as worker:
                while (line := await read()) != "stop":
                    word, _, count = line.partition(" ")
                    if word != "hold" or not count.isdigit():
                        raise SystemExit(f"expected 'hold N' or 'stop', got {line!r}")
                    hold_after = int(count)
            # after the drain: outcomes given up at shutdown (their tasks would run again)
            print(json.dumps({"undelivered": worker.statistics().undelivered_writes}), flush=True)
    finally:
        os.close(fd)
    return 0


class _Records:
    """What one S3 worker's record file says: its runs (payload, time) and held tasks."""

    def __init__(self, path: Path) -> None:
        self.runs: list[tuple[int, float]] = []
        self.held: list[int] = []
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        for line in text.split("\n")[:-1]:
            parts = line.split()
            if parts[0] == "H":
                self.held.append(int(parts[1]))
            else:
                self.runs.append((int(parts[0]), float(parts[1])))

    @property
    def ran(self) -> list[int]:
        return [payload for payload, _ in self.runs]


def _spawn(url: str, queue: str, mode: str, lease_s: float, record: Path) -> subprocess.Popen[str]:
    argv = ["--s3-child", url, queue, mode, str(lease_s), str(record)]
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scenarios", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _say(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{word}\n")
    proc.stdin.flush()


HOLD_SETTLE_S = 0.1
"""The victim is killed once the claims it holds stopped growing for this long."""


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
    """Drain ``tasks`` queued tasks with ``workers`` processes; kill one holding claims.

    The workers connect, report ready and are released together: the clock starts at
    that release and stops when the database shows no task of the queue unfinished
    (outcomes stored, as the peers' drains in ``queue_bench`` are timed; until the fifth
    session it stopped once every handler had run, so outcomes still queued in a worker's
    writer were not timed, and a legacy worker could give them up at stop: counted now as
    ``outcomes_undelivered``, which must be 0). The victim starts first and holds: every
    task it starts blocks, so it holds those claims (renewing their leases); once they stop
    growing the others start, and when they ran half of the rest, mid-drain, the victim is
    SIGKILLed.
    The figure is the delay from the kill until the last of those claims ran again in a
    live worker (their lease expires, a live worker claims them again), measured from a
    kill that always finds claims held. With ``kill=False`` nobody is held or killed: the
    plain drain rate, comparable to the peers'.

    Duplicates: runs beyond one per task among live workers (must be 0). Lost: tasks
    neither run by a live worker nor succeeded. Re-runs after the kill (the held claims,
    and any task the victim ran but could not mark done) are counted apart: they are the
    at-least-once recovery, not duplicates.
    """
    queue = f"s3{secrets.token_hex(4)}"
    async with open_storage(url) as storage:
        q = AgentQueue(storage, queue)
        for start in range(0, tasks, 2000):
            await q.enqueue_many(list(range(start, min(tasks, start + 2000))))
        records = [tmp / f"{queue}-{k}.log" for k in range(workers)]
        procs = [
            await asyncio.to_thread(_spawn, url, queue, mode, lease_s, record) for record in records
        ]
        held: set[int] = set()
        killed_at: float | None = None
        undelivered = 0
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                if line.strip() != "ready":
                    raise RuntimeError(f"S3 worker did not start ({proc.poll()})")
            started = time.perf_counter()
            victim = procs[0]
            waiting = procs[1:] if kill else []
            for proc in procs[:1] if kill else procs:
                _say(proc, "go")
            hold_at: float | None = None
            if kill:
                _say(victim, "hold 0")
                hold_at = time.perf_counter()
            last_held = (0, 0.0)
            finished = None
            deadline = started + max(60.0, tasks / 20)
            confirmed: set[int] = set()
            while time.perf_counter() < deadline:
                await asyncio.sleep(0.02)
                seen = [_Records(r) for r in records]
                ran = sum(len(s.runs) for s in seen)
                now = time.perf_counter()
                if hold_at is not None and killed_at is None:
                    count = len(seen[0].held)
                    if count != last_held[0]:
                        last_held = (count, now)
                    if waiting and (
                        (count and now - last_held[1] >= HOLD_SETTLE_S) or now - hold_at > 10
                    ):
                        for proc in waiting:
                            _say(proc, "go")
                        waiting = []
                    elif not waiting and ran >= (tasks - count) // 2:
                        victim.kill()
                        killed_at = time.time()
                        held = set(_Records(records[0]).held)
                live = set().union(*(s.ran for s in (seen[1:] if killed_at else seen)))
                tick(min(1.0, len(live) / tasks))
                if killed_at is None and hold_at is not None:
                    continue
                if len(live | set(seen[0].ran)) < tasks:
                    continue
                depths, _ = await storage.backlog_depths()
                if any(d.name == queue for d in depths):
                    continue  # outcomes not all stored yet: some task not finished
                finished = time.perf_counter()
                for payload in set(seen[0].ran) - live:
                    confirmed.add(payload)  # the victim ran it and its outcome is stored
                break
            for proc in procs[1:] if killed_at else procs:
                _say(proc, "stop")
            for proc in procs[1:] if killed_at else procs:
                assert proc.stdout is not None
                said = await asyncio.to_thread(proc.stdout.read)
                undelivered += json.loads(said.strip().splitlines()[-1])["undelivered"]
            for proc in procs:
                await asyncio.to_thread(proc.wait, 60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    seen = [_Records(r) for r in records]
    live_counts: Counter[int] = Counter()
    first_live: dict[int, float] = {}
    for rec in seen[1:] if killed_at else seen:
        live_counts.update(rec.ran)
        for payload, at in rec.runs:
            first_live[payload] = min(at, first_live.get(payload, at))
    killed_set = (set(seen[0].ran) | held) if killed_at else set()
    elapsed = (finished or time.perf_counter()) - started
    covered = set(live_counts) | confirmed
    for r in records:
        r.unlink(missing_ok=True)
    out = {
        "tasks_per_s": tasks / elapsed,
        "drain_s": elapsed,
        "duplicates": float(sum(c - 1 for c in live_counts.values() if c > 1)),
        "lost": float(tasks - len(covered & set(range(tasks)))),
        "rerun_after_kill": float(len(killed_set & set(live_counts))),
        "outcomes_undelivered": float(undelivered),  # given up by a live worker at stop
    }
    if killed_at is not None:
        out["held_at_kill"] = float(len(held))
        rerun = [first_live[p] for p in held if p in first_live]
        if held and len(rerun) == len(held):
            out["kill_rerun_s"] = max(rerun) - killed_at
    return out


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


async def _churn(
    rt: Runtime,
    tag: str,
    concurrency: int,
    stop: anyio.Event,
    enqueued: list[int],
    sessions: list[int],
) -> None:
    """S4's load until ``stop``: ``concurrency`` loops each run short turns on fresh sessions
    (lease, cancel token, a live subscriber reading to the end, three events, a chat append,
    webhooks) and enqueue an agent task for the runtime's worker; every tenth session is
    cancelled mid-turn. ``sessions[0]`` counts the sessions done."""

    async def loop(n: int) -> None:
        i = 0
        while not stop.is_set():
            sid = f"{tag}-{n}-{i}"
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
            sessions[0] += 1

    async with anyio.create_task_group() as loops:
        for n in range(concurrency):
            loops.start_soon(loop, n)


async def s4_fill(
    rt: Runtime, tag: str, concurrency: int, limit_s: float, enqueued: list[int], tick: Tick
) -> dict[str, float]:
    """Churn S4 sessions until the memory hub's rings reach their bound, at most ``limit_s``.

    Every writer publishes to the memory hub, which keeps a ring per session until it has
    been idle ``ring_idle_ttl_s`` or ``max_rings`` newer ones push it out: in a soak of
    fresh sessions the ring count (and RSS, about 4 KiB a ring) rises until the first ring
    leaves, then stays level. That is the bound working, not growth; S4 measures from
    there. Returns how long it took, the rings held and whether the bound was reached.
    """
    hub = rt._broadcast.optimized
    if hub is None:
        return {"fill_s": 0.0, "fill_rings": 0.0, "fill_reached": 0.0}
    evicted = hub.statistics().rings_evicted
    stop = anyio.Event()
    started = time.perf_counter()
    reached = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(_churn, rt, tag, concurrency, stop, enqueued, [0])
        with anyio.move_on_after(limit_s):
            while hub.statistics().rings_evicted == evicted:
                tick(min(1.0, (time.perf_counter() - started) / limit_s))
                await anyio.sleep(0.25)
            reached = True
        stop.set()
    return {
        "fill_s": time.perf_counter() - started,
        "fill_rings": float(hub.statistics().rings),
        "fill_reached": float(reached),
    }


async def s4_once(
    rt: Runtime,
    tag: str,
    seconds: float,
    concurrency: int,
    enqueued: list[int],
    tick: Tick,
) -> dict[str, Any]:
    """Churn sessions through the whole runtime for ``seconds``; sample every 0.25 s.

    The load is ``_churn``'s, ``concurrency`` loops of short turns. After the first
    quarter (the warm-up), RSS growth is measured to the end; then the loops stop and the
    queues get up to 10 s to return to empty. ``enqueued`` is the running count of tasks
    given to ``rt.queue`` (shared across repetitions: the worker's counters are cumulative).
    """
    stop = anyio.Event()
    sessions = [0]
    lost_before = sum(s.lost for s in rt.statistics().streams.values())
    samples: list[dict[str, float]] = []
    started = time.perf_counter()

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
            loops.start_soon(_churn, rt, tag, concurrency, stop, enqueued, sessions)
            await anyio.sleep(seconds)
            stop.set()
        elapsed = time.perf_counter() - started
        drained_at = None
        with anyio.move_on_after(10):
            while True:
                if rt.webhooks is not None:
                    await rt.webhooks.flush()
                for writer in rt._streams.built().values():
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
        "sessions_per_s": sessions[0] / elapsed,
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
