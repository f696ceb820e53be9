"""Password hashing benchmark: event-loop lag during concurrent logins, off-loop vs inline.

What it measures: ``--logins`` (50) concurrent ``PasswordHasher.verify`` calls of one stored
argon2id hash, with ``auth.off_loop`` on (hashes on the hasher's bounded thread pool) and off
(the legacy path: hashed on the event loop). While they run, ``open_loop_lag_monitor``
sleeps ``--lag-interval-ms`` (2 ms) in a loop and records how late each wake-up is: the lag
every other request on that loop would see. Reported per mode: lag p50 / p99 / max and the
number of lag samples, login latency p50 / p99 (from the moment all logins arrived, so
queueing counts) and the wall time of the batch.

Modes alternate A B A B for ``--repeats`` repetitions; figures are medians, with the spread
((max - min) / median) of the lag p99. Argon2 parameters default to the library's defaults
(RFC 9106: t=3, m=64 MiB, p=4) and the pool to ``PasswordHashingConfig().max_concurrent``.

Burst rows (login limiter): ``--logins`` concurrent wrong passwords for one account, each
from its own address, through the login path with the account limit at its default (5):
``before`` is the old flow (``check``, verify, ``record_failure``: attempts in flight are not
counted), ``memory`` is ``check_login`` with the in-memory limiter, ``storage`` the same with
``auth.attempts.mode = storage`` on ``--storage-url`` (only when given). Reported per mode:
verifications run, logins refused, wall time of the burst (medians over ``--repeats``).

Run: ``python -m benchmarks.auth_bench [--repeats N] [--logins N] [--storage-url URL]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from asyncstore.orchestrator.auth import (
    AttemptLimiterConfig,
    LoginAttemptLimiter,
    LoginLocked,
    PasswordHasher,
    PasswordHashingConfig,
    check_login,
)
from asyncstore.orchestrator.metrics import Metrics, MetricsConfig, open_loop_lag_monitor
from asyncstore.storage import AsyncStorageBackend, open_storage

MODES: tuple[str, str] = ("off_loop", "inline")


@dataclass(frozen=True, slots=True)
class Run:
    mode: str
    wall_s: float
    login_p50_s: float
    login_p99_s: float
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float
    lag_samples: int


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _one(config: PasswordHashingConfig, logins: int, lag_interval_s: float) -> Run:
    hasher = PasswordHasher(config)
    stored = await hasher.hash("correct horse battery staple")
    latencies: list[float] = []
    start = 0.0

    async def login() -> None:
        # All logins arrive together: latency counts from the batch start, queueing included.
        result = await hasher.verify(stored, "correct horse battery staple")
        latencies.append(time.perf_counter() - start)
        if not result.ok:
            raise RuntimeError("verification failed")

    metrics = Metrics(MetricsConfig(process_metrics=False))
    async with open_loop_lag_monitor(metrics, interval_s=lag_interval_s) as monitor:
        await anyio.sleep(0.05)  # settle; then measure only the batch
        monitor.reset()
        before = monitor.statistics().samples
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(logins):
                tg.start_soon(login)
        wall = time.perf_counter() - start
        # One more wake-up records the lag of a loop that was blocked until now.
        await anyio.sleep(lag_interval_s * 2)
        lag = monitor.statistics()
    return Run(
        mode="off_loop" if config.off_loop else "inline",
        wall_s=wall,
        login_p50_s=_pct(latencies, 0.50),
        login_p99_s=_pct(latencies, 0.99),
        lag_p50_s=lag.p50_s,
        lag_p99_s=lag.p99_s,
        lag_max_s=lag.max_s,
        lag_samples=lag.samples - before,
    )


async def _run(args: argparse.Namespace) -> list[Run]:
    base = PasswordHashingConfig(
        time_cost=args.time_cost,
        memory_cost=args.memory_cost,
        parallelism=args.parallelism,
        **({"max_concurrent": args.max_concurrent} if args.max_concurrent else {}),
    )
    runs: list[Run] = []
    for _ in range(args.repeats):
        for mode in MODES:
            config = base.model_copy(update={"off_loop": mode == "off_loop"})
            runs.append(await _one(config, args.logins, args.lag_interval_ms / 1000))
    return runs


BURST_MODES: tuple[str, ...] = ("before", "memory", "storage")


@dataclass(frozen=True, slots=True)
class BurstRun:
    mode: str
    verifications: int
    refused: int
    wall_s: float


async def _legacy_login(
    hasher: PasswordHasher, limiter: LoginAttemptLimiter, account: str, address: str, stored: str
) -> None:
    # The flow before the fix: check, verify, record; nothing counts attempts in flight.
    limiter.check(account, address)
    result = await hasher.verify(stored, "wrong")
    if result.ok:
        limiter.record_success(account, address)
    else:
        limiter.record_failure(account, address)


async def _burst(
    mode: str,
    hasher: PasswordHasher,
    stored: str,
    logins: int,
    storage: AsyncStorageBackend | None,
    account: str,
) -> BurstRun:
    config = AttemptLimiterConfig(mode="storage" if mode == "storage" else "memory")
    limiter = LoginAttemptLimiter(config, storage=storage)
    before = hasher.statistics().mismatched
    refused = 0

    async def login(i: int) -> None:
        nonlocal refused
        address = f"198.51.100.{i}"
        try:
            if mode == "before":
                await _legacy_login(hasher, limiter, account, address, stored)
            else:
                await check_login(
                    hasher,
                    limiter,
                    account=account,
                    address=address,
                    stored_hash=stored,
                    password="wrong",
                )
        except LoginLocked:
            refused += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(logins):
            tg.start_soon(login, i)
    wall = time.perf_counter() - start
    return BurstRun(mode, hasher.statistics().mismatched - before, refused, wall)


async def _run_bursts(args: argparse.Namespace) -> list[BurstRun]:
    hasher = PasswordHasher(
        PasswordHashingConfig(
            time_cost=args.time_cost,
            memory_cost=args.memory_cost,
            parallelism=args.parallelism,
            **({"max_concurrent": args.max_concurrent} if args.max_concurrent else {}),
        )
    )
    stored = await hasher.hash("correct horse battery staple")
    runs: list[BurstRun] = []
    storage: AsyncStorageBackend | None = None
    async with contextlib.AsyncExitStack() as stack:
        if args.storage_url:
            storage = await stack.enter_async_context(open_storage(args.storage_url, migrate=True))
        for repeat in range(args.repeats):
            for mode in BURST_MODES:
                if mode == "storage" and storage is None:
                    continue
                # A fresh account per run: the storage count outlives the limiter object.
                account = f"bench-{os.getpid()}-{repeat}-{mode}-{time.time_ns()}"
                runs.append(await _burst(mode, hasher, stored, args.logins, storage, account))
    return runs


def summarize_bursts(runs: Sequence[BurstRun]) -> list[dict[str, Any]]:
    rows = []
    for mode in BURST_MODES:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        rows.append(
            {
                "mode": mode,
                "repeats": len(mine),
                "verifications": statistics.median(r.verifications for r in mine),
                "verifications_max": max(r.verifications for r in mine),
                "refused": statistics.median(r.refused for r in mine),
                "wall_ms": statistics.median(r.wall_s for r in mine) * 1000,
            }
        )
    return rows


def render_burst_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| burst mode | verifications (max) | refused | wall ms |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['verifications']:.0f} ({r['verifications_max']}) "
            f"| {r['refused']:.0f} | {r['wall_ms']:.1f} |"
        )
    return "\n".join(lines)


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        p99 = [r.lag_p99_s for r in mine]
        median_p99 = statistics.median(p99)
        rows.append(
            {
                "mode": mode,
                "repeats": len(mine),
                "lag_p50_ms": statistics.median(r.lag_p50_s for r in mine) * 1000,
                "lag_p99_ms": median_p99 * 1000,
                "lag_p99_spread": (max(p99) - min(p99)) / median_p99 if median_p99 else 0.0,
                "lag_max_ms": statistics.median(r.lag_max_s for r in mine) * 1000,
                "lag_samples": statistics.median(r.lag_samples for r in mine),
                "login_p50_ms": statistics.median(r.login_p50_s for r in mine) * 1000,
                "login_p99_ms": statistics.median(r.login_p99_s for r in mine) * 1000,
                "wall_s": statistics.median(r.wall_s for r in mine),
            }
        )
    return rows


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| mode | lag p50 ms | lag p99 ms (spread) | lag max ms | lag samples "
        "| login p50 ms | login p99 ms | wall s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['lag_p50_ms']:.2f} | {r['lag_p99_ms']:.2f} "
            f"({r['lag_p99_spread']:.0%}) | {r['lag_max_ms']:.2f} | {r['lag_samples']:.0f} "
            f"| {r['login_p50_ms']:.1f} | {r['login_p99_ms']:.1f} | {r['wall_s']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = PasswordHashingConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auth_bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="A B repetitions (default 3)")
    parser.add_argument("--logins", type=int, default=50, help="concurrent verifications")
    parser.add_argument("--time-cost", type=int, default=defaults.time_cost)
    parser.add_argument("--memory-cost", type=int, default=defaults.memory_cost, help="KiB")
    parser.add_argument("--parallelism", type=int, default=defaults.parallelism)
    parser.add_argument("--max-concurrent", type=int, default=0, help="0: the config default")
    parser.add_argument("--lag-interval-ms", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--storage-url", default=None, help="also run the burst with the limiter in storage mode"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.logins < 1 or args.lag_interval_ms <= 0:
        parser.error("--repeats and --logins must be >= 1, --lag-interval-ms > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs = anyio.run(_run, args)
    rows = summarize(runs)
    burst_runs = anyio.run(_run_bursts, args)
    elapsed = time.perf_counter() - started
    burst_rows = summarize_bursts(burst_runs)
    pool = args.max_concurrent or PasswordHashingConfig().max_concurrent
    print(render_table(rows))
    print()
    print(render_burst_table(burst_rows))
    print(
        f"{args.logins} concurrent verifications, argon2id t={args.time_cost} "
        f"m={args.memory_cost} KiB p={args.parallelism}, hashing pool {pool}, lag probe "
        f"every {args.lag_interval_ms:g} ms, repeats {args.repeats}, run time {elapsed:.1f} s; "
        f"1-minute load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    if args.json is not None:
        document = {
            "benchmark": "auth_bench",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "hashing_pool": pool,
            "summary": rows,
            "runs": [asdict(r) for r in runs],
            "burst_summary": burst_rows,
            "burst_runs": [asdict(r) for r in burst_runs],
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
