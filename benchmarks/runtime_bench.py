"""Memory after many short sessions through the runtime: RSS after 100,000 vs after 1,000.

Each session is a full ``rt.turn``: the session lease, its cancel token, a stream session
with two events (a delta and the critical ``turn_completed``), the flush before release.
Sessions run ``--concurrency`` at a time. Reported per driver: RSS (from /proc, Linux;
``ru_maxrss`` elsewhere) after the first 1,000 sessions and after all of them, the growth
per 1,000 sessions past the first thousand, the runtime's tracked per-session state, and
the rate. Rings are LRU-capped by ``broadcast.max_rings`` (default 10,000), so RSS is
expected to rise until that cap and then stay flat.

    python -m benchmarks.runtime_bench [--sessions N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import open_runtime
from benchmarks._common import rss_mb


async def run_one(url: str, sessions: int, concurrency: int) -> dict[str, float]:
    settings = load_settings(
        storage={"url": url}, migrate_on_start=True, runtime={"reload_on_sighup": False}
    )
    marks: dict[str, float] = {}
    async with open_runtime(settings) as rt:
        counter = 0
        next_mark = 1_000

        async def worker(first: int) -> None:
            nonlocal counter
            for i in range(first, sessions, concurrency):
                async with rt.turn(f"bench-{i}") as turn:
                    await turn.emit("delta", {"text": "hello"})
                    await turn.emit("turn_completed", {"text": "hello"})
                counter += 1

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for first in range(concurrency):
                tg.start_soon(worker, first)
            while counter < sessions:
                await anyio.sleep(0.05)
                if counter >= next_mark and "rss_1k_mb" not in marks:
                    gc.collect()
                    marks["rss_1k_mb"] = rss_mb()
                    marks["tracked_1k"] = rt.statistics().tracked
        elapsed = time.perf_counter() - started
        gc.collect()
        marks["rss_end_mb"] = rss_mb()
        marks["tracked_end"] = rt.statistics().tracked
        marks["sessions_per_s"] = sessions / elapsed
    return marks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runtime_bench", description=__doc__)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--postgres", help="also run on this (empty or migrated) database")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asyncstore-runtime-bench-") as tmp:
        targets = [("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}")]
        if args.postgres:
            targets.append(("postgres", args.postgres))
        print(f"{args.sessions} sessions, {args.concurrency} at a time; RSS in MiB")
        print("driver    rss@1k  rss@end  growth/1k  tracked@1k  tracked@end  sessions/s")
        for name, url in targets:
            m = anyio.run(run_one, url, args.sessions, args.concurrency)
            growth = (m["rss_end_mb"] - m["rss_1k_mb"]) / max(1, (args.sessions - 1000) / 1000)
            print(
                f"{name:<8} {m['rss_1k_mb']:7.1f} {m['rss_end_mb']:8.1f} {growth:10.3f} "
                f"{m['tracked_1k']:11.0f} {m['tracked_end']:12.0f} {m['sessions_per_s']:11.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
