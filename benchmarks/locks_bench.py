"""Session limiter and cancellation benchmark: optimized vs legacy, side by side, one run.

What it measures, on Postgres and SQLite, for ``lock.mode`` ``two_level`` vs ``db_poll`` and
``cancel.mode`` ``notify`` vs ``poll``:

1. Uncontended acquire+release cycles per second (one task, a new session per cycle) and the
   database statements issued per cycle (from ``storage.statistics()``, by query name).
2. Contention: 300 sessions with 2 contenders each, one contender on each of two limiter
   instances (two storage handles on one database, in this process), no global cap, every
   hold lasting a turn's work: ``HOLDS_S`` = 1 s (an agent turn holds its session for
   seconds of LLM calls) and 200 ms (a short turn), each reported under its own label.
   Reported: total database statements, statements and attempts per acquire, lock wait
   p50 / p99, wall time. Both modes run with ``LimiterConfig``'s defaults: the legacy loop
   sleeps ``poll_interval_s`` = 200 ms between attempts (the old limiter's
   ``SESSION_LOCK_POLL_INTERVAL_S``), ``two_level``'s fallback backoff is 0.5 s to 5 s.
3. Cancellation latency, request to token fired: same instance (the registry that holds the
   token requests the cancel), cross instance (a second storage handle and registry in
   this process stands for the other instance; on Postgres the notification goes through
   the server's NOTIFY, on SQLite through the in-process hub) and, on Postgres, cross
   process (the other instance is a separate OS process, what users of a multi-process
   deployment feel; both stamp ``time.time()``, one clock on one machine; SQLite delivers
   notifications in-process only, so it has no such figure). Also reported: the database
   statements one ``request_cancel`` issues (one in ``notify`` mode: the persisted request
   and its notification are one statement).

Modes alternate A B A B for ``--repeats`` repetitions; figures are medians with their
spread ((max - min) / median). Every repetition uses fresh session ids and slot pools.

Run: ``python -m benchmarks.locks_bench [--url URL] [--sqlite-path PATH] [--repeats N]
[--json PATH] [--quick] [--only {all,locks,cancel}]`` (or ``python -m benchmarks locks ...``).
Postgres is reached through ``--url`` (a server the benchmark creates a throwaway
``asyncstore_bench_*`` database on, dropped at the end); if it does not answer, only SQLite
is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import asyncpg
from anyio.streams.buffered import BufferedByteReceiveStream

from asyncstore.orchestrator.cancellation import CancellationConfig, open_cancellation
from asyncstore.orchestrator.locks import LimiterConfig, SessionLimiter, open_session_limiter
from asyncstore.storage import AsyncStorageBackend, open_storage

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCK_MODES: tuple[str, str] = ("two_level", "db_poll")
CANCEL_MODES: tuple[str, str] = ("notify", "poll")
SESSIONS = 300
HOLDS_S: tuple[float, ...] = (1.0, 0.2)  # a turn of LLM calls; a short turn
UNCONTENDED_CYCLES = 1_000
# 500 notify samples, so a p99 is the 5th worst (of 100 it would be the single worst).
CANCEL_SAMPLES = {"notify": 500, "poll": 15}

STATEMENTS_TARGET = 2.0  # two_level statements per uncontended acquire+release
CONTENTION_RATIO_TARGET = 5.0  # db_poll statements / two_level statements, 300x2
CANCEL_SAME_P99_TARGET_MS = 5.0
CANCEL_CROSS_P99_TARGET_MS = 10.0
PARTS = ("all", "locks", "cancel")
_ROOT = Path(__file__).resolve().parent.parent  # where ``-m benchmarks...`` resolves


@dataclass
class Row:
    """One metric of one backend: the figure per mode (median of the repeats) and spread."""

    backend: str
    metric: str
    unit: str
    optimized: float
    legacy: float
    optimized_spread: float
    legacy_spread: float


def _median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _spread(samples: Sequence[float]) -> float:
    mid = _median(samples)
    return (max(samples) - min(samples)) / mid if samples and mid else 0.0


def _quantile(samples: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least ``q`` of the samples at or below it."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1] if ordered else float("nan")


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _statements(storages: Sequence[AsyncStorageBackend]) -> int:
    return sum(s.statistics().total_statements for s in storages)


def _config(mode: str, **extra: Any) -> LimiterConfig:
    return LimiterConfig.model_validate(
        {"mode": mode, "slot_pool": f"bench-{secrets.token_hex(4)}", **extra}
    )


async def _uncontended(url: str, mode: str, cycles: int) -> dict[str, float]:
    async with open_storage(url) as storage, open_session_limiter(storage, _config(mode)) as lim:
        tag = secrets.token_hex(4)
        before = _statements([storage])
        started = time.perf_counter()
        for i in range(cycles):
            async with lim.hold(f"u-{tag}-{i}"):
                pass
        elapsed = time.perf_counter() - started
        return {
            "cycles_per_s": cycles / elapsed,
            "statements_per_cycle": (_statements([storage]) - before) / cycles,
        }


def _hold_label(hold_s: float) -> str:
    return f"{hold_s * 1000:.0f}ms"


async def _contention(url: str, mode: str, sessions: int, hold_s: float) -> dict[str, float]:
    config = _config(mode)
    async with AsyncExitStack() as stack:
        storages: list[AsyncStorageBackend] = []
        limiters: list[SessionLimiter] = []
        for i in range(2):
            storage = await stack.enter_async_context(open_storage(url))
            storages.append(storage)
            limiters.append(
                await stack.enter_async_context(
                    open_session_limiter(storage, config, instance_id=f"bench{i}")
                )
            )
        tag = secrets.token_hex(4)
        waits: list[float] = []

        async def contender(limiter: SessionLimiter, session: str) -> None:
            async with limiter.hold(session) as held:
                waits.append(held.waited_s)
                await anyio.sleep(hold_s)

        before = _statements(storages)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(sessions):
                for limiter in limiters:
                    tg.start_soon(contender, limiter, f"c-{tag}-{i}")
        elapsed = time.perf_counter() - started
        statements = _statements(storages) - before
        attempts = sum(limiter.statistics().acquire_attempts for limiter in limiters)
    label = _hold_label(hold_s)
    return {
        f"statements_{label}": statements,
        f"statements_per_acquire_{label}": statements / (2 * sessions),
        f"attempts_per_acquire_{label}": attempts / (2 * sessions),
        f"wait_p50_ms_{label}": _quantile(waits, 0.5) * 1000,
        f"wait_p99_ms_{label}": _quantile(waits, 0.99) * 1000,
        f"wall_s_{label}": elapsed,
    }


async def _stamp_when_fired(
    wait: Callable[[], Awaitable[str]], at: list[float], fired: anyio.Event
) -> None:
    await wait()
    at.append(time.perf_counter())
    fired.set()


async def _cancel_latency(
    url: str, mode: str, samples: int, cross: bool
) -> tuple[list[float], float]:
    """Request-to-fired latencies (ms) and the statements per ``request_cancel``."""
    config = CancellationConfig(mode=mode)  # type: ignore[arg-type]
    latencies: list[float] = []
    statements = 0
    async with AsyncExitStack() as stack:
        here_storage = await stack.enter_async_context(open_storage(url))
        here = await stack.enter_async_context(open_cancellation(here_storage, config))
        there = here
        if cross:
            there_storage = await stack.enter_async_context(open_storage(url))
            there = await stack.enter_async_context(open_cancellation(there_storage, config))
        tag = secrets.token_hex(4)
        for i in range(samples):
            session = f"k-{tag}-{i}"
            async with there.open_token(session) as token, anyio.create_task_group() as tg:
                fired = anyio.Event()
                at: list[float] = []
                tg.start_soon(_stamp_when_fired, token.wait, at, fired)
                await anyio.lowlevel.checkpoint()
                before = here_storage.statistics().total_statements
                requested = time.perf_counter()
                await here.request_cancel(session, "bench")
                statements += here_storage.statistics().total_statements - before
                with anyio.fail_after(10):
                    await fired.wait()
                latencies.append((at[0] - requested) * 1000)
            await here_storage.clear_cancel(session)
    return latencies, statements / samples


async def _cancel_waiter(url: str, mode: str) -> None:
    """The other instance, run in its own OS process by ``_cancel_latency_process``.

    For each session id read from stdin: open its token, print ``ready``, wait until it
    fires, print ``time.time()``. Ends at end of input.
    """
    config = CancellationConfig(mode=mode)  # type: ignore[arg-type]
    stdin = anyio.wrap_file(sys.stdin)
    async with open_storage(url) as storage, open_cancellation(storage, config) as registry:
        while session := (await stdin.readline()).strip():
            async with registry.open_token(session) as token:
                print("ready", flush=True)
                with anyio.fail_after(10):
                    await token.wait()
                print(f"{time.time():.6f}", flush=True)


async def _cancel_latency_process(url: str, mode: str, samples: int) -> list[float]:
    """Request-to-fired latencies (ms) with the token held by a registry in another process."""
    command = [sys.executable, "-m", "benchmarks.locks_bench", "--url", url]
    command += ["--cancel-waiter", mode]
    latencies: list[float] = []
    root = _ROOT
    async with (
        await anyio.open_process(command, cwd=root, stderr=None) as proc,
        open_storage(url) as storage,
        open_cancellation(storage, CancellationConfig(mode=mode)) as here,  # type: ignore[arg-type]
    ):
        if proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the waiter process has no pipes")
        lines = BufferedByteReceiveStream(proc.stdout)
        tag = secrets.token_hex(4)
        try:
            for i in range(samples):
                session = f"p-{tag}-{i}"
                await proc.stdin.send(f"{session}\n".encode())
                with anyio.fail_after(30):  # the first sample includes the child's start-up
                    ready = await lines.receive_until(b"\n", 100)
                if ready != b"ready":
                    raise RuntimeError(f"the waiter process said {ready!r}")
                requested = time.time()
                await here.request_cancel(session, "bench")
                with anyio.fail_after(10):
                    fired = float(await lines.receive_until(b"\n", 100))
                latencies.append((fired - requested) * 1000)
                await storage.clear_cancel(session)
        finally:
            await proc.stdin.aclose()
        with anyio.fail_after(10):
            await proc.wait()
    return latencies


async def _bench_backend(
    name: str, url: str, repeats: int, quick: bool, only: str = "all"
) -> list[Row]:
    cycles = UNCONTENDED_CYCLES // (5 if quick else 1)
    sessions = SESSIONS // (3 if quick else 1)
    per_mode: dict[str, dict[str, list[float]]] = {m: {} for m in (*LOCK_MODES, *CANCEL_MODES)}

    def add(mode: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            per_mode[mode].setdefault(key, []).append(value)

    for repeat in range(repeats):
        for mode in LOCK_MODES if only in ("all", "locks") else ():
            _progress(f"{name} #{repeat + 1} {mode}: uncontended x{cycles}, {sessions}x2")
            add(mode, await _uncontended(url, mode, cycles))
            for hold_s in HOLDS_S:
                add(mode, await _contention(url, mode, sessions, hold_s))
        for cmode in CANCEL_MODES if only in ("all", "cancel") else ():
            n = CANCEL_SAMPLES[cmode] // (4 if quick else 1)
            _progress(f"{name} #{repeat + 1} cancel {cmode}: {n} samples x3")
            same, per_request = await _cancel_latency(url, cmode, n, cross=False)
            cross, _ = await _cancel_latency(url, cmode, n, cross=True)
            # SQLite notifications are in-process only: another process sees a request only
            # by polling, so the cross-process figure is measured on Postgres alone.
            process = await _cancel_latency_process(url, cmode, n) if name == "postgres" else []
            add(
                cmode,
                {
                    "cancel_statements": per_request,
                    "cancel_same_p50_ms": _quantile(same, 0.5),
                    "cancel_same_p99_ms": _quantile(same, 0.99),
                    "cancel_cross_p50_ms": _quantile(cross, 0.5),
                    "cancel_cross_p99_ms": _quantile(cross, 0.99),
                    "cancel_process_p50_ms": _quantile(process, 0.5),
                    "cancel_process_p99_ms": _quantile(process, 0.99),
                },
            )
    rows = []
    if only in ("all", "locks"):
        rows += _lock_rows(name, per_mode, sessions)
    if only in ("all", "cancel"):
        for key, label, unit in [
            ("cancel_statements", "statements per cancel request", "stmts"),
            ("cancel_same_p50_ms", "cancel latency same instance p50", "ms"),
            ("cancel_same_p99_ms", "cancel latency same instance p99", "ms"),
            ("cancel_cross_p50_ms", "cancel latency cross instance p50", "ms"),
            ("cancel_cross_p99_ms", "cancel latency cross instance p99", "ms"),
            ("cancel_process_p50_ms", "cancel latency cross process p50", "ms"),
            ("cancel_process_p99_ms", "cancel latency cross process p99", "ms"),
        ]:
            a, b = per_mode["notify"][key], per_mode["poll"][key]
            rows.append(Row(name, label, unit, _median(a), _median(b), _spread(a), _spread(b)))
    return rows


def _lock_rows(name: str, per_mode: dict[str, dict[str, list[float]]], sessions: int) -> list[Row]:
    metrics = [
        ("cycles_per_s", "uncontended acquire+release", "cycles/s"),
        ("statements_per_cycle", "statements per uncontended acquire+release", "stmts"),
    ]
    for hold_s in HOLDS_S:
        label = _hold_label(hold_s)
        scenario = f"{sessions}x2 contention, hold {label}"
        metrics += [
            (f"statements_{label}", f"{scenario}: statements", "stmts"),
            (f"statements_per_acquire_{label}", f"{scenario}: statements/acquire", "stmts"),
            (f"attempts_per_acquire_{label}", f"{scenario}: attempts/acquire", "attempts"),
            (f"wait_p50_ms_{label}", f"{scenario}: lock wait p50", "ms"),
            (f"wait_p99_ms_{label}", f"{scenario}: lock wait p99", "ms"),
            (f"wall_s_{label}", f"{scenario}: wall time", "s"),
        ]
    rows = []
    for key, label, unit in metrics:
        a, b = per_mode["two_level"][key], per_mode["db_poll"][key]
        rows.append(Row(name, label, unit, _median(a), _median(b), _spread(a), _spread(b)))
    return rows


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"))


async def _bench_postgres(admin_url: str, repeats: int, quick: bool, only: str) -> list[Row]:
    name = f"asyncstore_bench_{secrets.token_hex(6)}"
    try:
        conn = await asyncpg.connect(admin_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"Postgres at {_redact(admin_url)} did not answer ({exc!r}): SQLite only.")
        return []
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _with_database(admin_url, name)
    try:
        async with open_storage(url, migrate=True):
            pass
        return await _bench_backend("postgres", url, repeats, quick, only)
    finally:
        conn = await asyncpg.connect(admin_url, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def _bench_sqlite(path: Path, repeats: int, quick: bool, only: str) -> list[Row]:
    url = f"sqlite:///{path}"
    async with open_storage(url, migrate=True):
        pass
    return await _bench_backend("sqlite", url, repeats, quick, only)


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| backend | metric | two_level / notify | db_poll / poll | legacy / optimized |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.legacy / r.optimized if r.optimized else float("nan")
        lines.append(
            f"| {r.backend} | {r.metric} ({r.unit}) | {r.optimized:,.2f} "
            f"(±{r.optimized_spread:.0%}) | {r.legacy:,.2f} (±{r.legacy_spread:.0%}) "
            f"| {ratio:,.1f}x |"
        )
    return "\n".join(lines)


def _find(rows: dict[str, Row], part: str) -> Row:
    return next(r for metric, r in rows.items() if metric.startswith(part) or metric.endswith(part))


def evaluate_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for backend in sorted({r.backend for r in rows}):
        got = {r.metric.split(" (")[0]: r for r in rows if r.backend == backend}

        def target(text: str, value: float, met: bool, backend: str = backend) -> None:
            out.append({"backend": backend, "target": text, "value": value, "met": met})

        if any(m.startswith("statements per uncontended") for m in got):
            per_cycle = _find(got, "statements per uncontended").optimized
            target(
                "two_level statements per uncontended cycle <= 2",
                per_cycle,
                per_cycle <= STATEMENTS_TARGET,
            )
            for hold_s in HOLDS_S:
                label = _hold_label(hold_s)
                contention = _find(got, f"hold {label}: statements")
                ratio = contention.legacy / contention.optimized
                target(
                    f"db_poll / two_level statements under contention >= 5, hold {label}",
                    ratio,
                    ratio >= CONTENTION_RATIO_TARGET,
                )
        if any(m.startswith("cancel latency") for m in got):
            per_request = _find(got, "statements per cancel request").optimized
            target("notify statements per cancel request == 1", per_request, per_request == 1)
            same = _find(got, "cancel latency same instance p99").optimized
            target(
                f"cancel p99 same instance < {CANCEL_SAME_P99_TARGET_MS:g} ms",
                same,
                same < CANCEL_SAME_P99_TARGET_MS,
            )
            for where in ("cross instance", "cross process"):
                value = _find(got, f"cancel latency {where} p99").optimized
                if math.isnan(value):
                    continue  # not measured on this backend
                target(
                    f"cancel p99 {where} < {CANCEL_CROSS_P99_TARGET_MS:g} ms",
                    value,
                    value < CANCEL_CROSS_P99_TARGET_MS,
                )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.locks_bench",
        description="Session limiter (two_level vs db_poll) and cancellation (notify vs poll) "
        "on SQLite and Postgres, side by side.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Postgres server ({DEFAULT_URL})")
    parser.add_argument(
        "--sqlite-path",
        type=Path,
        default=None,
        help="SQLite database file (default: a temporary file, removed after)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--quick", action="store_true", help="fewer cycles and sessions")
    parser.add_argument(
        "--only",
        choices=PARTS,
        default="all",
        help="measure only the session limiter or only cancellation (default: all)",
    )
    # Internal: run as the other instance of the cross-process cancel measurement.
    parser.add_argument("--cancel-waiter", choices=CANCEL_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


async def _run(args: argparse.Namespace, sqlite_path: Path) -> list[Row]:
    rows = await _bench_sqlite(sqlite_path, args.repeats, args.quick, args.only)
    rows += await _bench_postgres(args.url, args.repeats, args.quick, args.only)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cancel_waiter is not None:
        anyio.run(_cancel_waiter, args.url, args.cancel_waiter)
        return 0
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asyncstore-locks-bench-") as tmp:
        sqlite_path = (args.sqlite_path or Path(tmp) / "bench.db").resolve()
        rows = asyncio.run(_run(args, sqlite_path))
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    targets = evaluate_targets(rows)
    defaults = LimiterConfig()
    print(render_table(rows))
    print()
    for t in targets:
        mark = "met" if t["met"] else "MISSED"
        print(f"- {t['backend']}: {t['target']}: {t['value']:.2f} ({mark})")
    print(
        f"repeats: {args.repeats}, quick: {args.quick}, "
        f"holds {', '.join(_hold_label(h) for h in HOLDS_S)}, "
        f"db_poll sleep {defaults.poll_interval_s * 1000:.0f} ms, two_level fallback backoff "
        f"{defaults.backoff_initial_s:g}-{defaults.backoff_max_s:g} s, run time {elapsed:.1f} s; "
        "1-minute load "
        f"{load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs"
    )
    if args.json is not None:
        document = {
            "benchmark": "locks_bench",
            "config": {
                "url": _redact(args.url),
                "repeats": args.repeats,
                "quick": args.quick,
                "only": args.only,
                "sessions": SESSIONS,
                "holds_s": list(HOLDS_S),
                "db_poll_sleep_s": defaults.poll_interval_s,
                "backoff_s": [defaults.backoff_initial_s, defaults.backoff_max_s],
            },
            "run_time_s": elapsed,
            "load_average_1m": {"before": load_before, "after": load_after},
            "rows": [asdict(r) for r in rows],
            "targets": targets,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
