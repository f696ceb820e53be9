"""Two OS processes on one Postgres database: session exclusivity and cancellation across them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import anyio

from asyncstore.orchestrator.cancellation import open_cancellation
from asyncstore.storage import open_storage

HOLDER = """
import anyio, sys
from asyncstore.orchestrator.locks import LimiterConfig, open_session_limiter
from asyncstore.storage import NewMessage, open_storage

async def main(url, name):
    config = LimiterConfig()  # default fallback backoff: release notifications do the waking
    async with open_storage(url) as s, open_session_limiter(s, config) as limiter:
        async def worker(i):
            for round_ in range(4):
                session = f"mp{(i + round_) % 3}"
                async with limiter.hold(session) as held:
                    await s.append_messages(session, [NewMessage("enter", name)],
                                            lease_token=held.token)
                    await anyio.sleep(0.002)
                    await s.append_messages(session, [NewMessage("exit", name)],
                                            lease_token=held.token)
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(worker, i)

anyio.run(main, sys.argv[1], sys.argv[2])
"""

WAITER = """
import anyio, json, sys, time
from asyncstore.orchestrator.cancellation import open_cancellation
from asyncstore.storage import open_storage

async def main(url):
    async with open_storage(url) as s, open_cancellation(s) as registry:
        async with registry.open_token("remote") as token:
            print("ready", flush=True)
            with anyio.fail_after(20):
                reason = await token.wait()
            fired = time.time()
    print(json.dumps({"reason": reason, "fired": fired}), flush=True)

anyio.run(main, sys.argv[1])
"""


async def test_two_processes_never_hold_one_session_at_once(postgres_dsn: str) -> None:
    def run() -> None:
        procs = [
            subprocess.Popen([sys.executable, "-c", HOLDER, postgres_dsn, name])
            for name in ("p1", "p2")
        ]
        for proc in procs:
            assert proc.wait(timeout=120) == 0

    await asyncio.to_thread(run)
    async with open_storage(postgres_dsn) as storage:
        total = 0
        for session in ("mp0", "mp1", "mp2"):
            messages = await storage.load_messages(session, limit=1000)
            total += len(messages)
            # Holds never interleave: every enter is followed by the same process's exit.
            for enter, leave in zip(messages[::2], messages[1::2], strict=True):
                assert (enter.role, leave.role) == ("enter", "exit")
                assert enter.content == leave.content
            await storage.delete_session(session)
    assert total == 2 * 6 * 4 * 2


async def test_cancel_reaches_a_token_in_another_process(postgres_dsn: str) -> None:
    args = [sys.executable, "-c", WAITER, postgres_dsn]
    proc = await asyncio.to_thread(subprocess.Popen, args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = await asyncio.to_thread(proc.stdout.readline)
        assert ready.strip() == "ready"
        async with open_storage(postgres_dsn) as storage, open_cancellation(storage) as registry:
            before = storage.statistics().statements
            requested = time.time()
            await registry.request_cancel("remote", "stop from another process")
            after = storage.statistics().statements
            issued = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
            # One round trip: the request and its NOTIFY are one statement.
            assert issued == {"request_cancel": 1}
            out = await asyncio.to_thread(proc.stdout.readline)
            await storage.clear_cancel("remote")
        result = json.loads(out)
        assert result["reason"] == "stop from another process"
        # No poll exists in notify mode; this bound is only a generous sanity check.
        assert result["fired"] - requested < 5.0
        with anyio.fail_after(30):
            assert await asyncio.to_thread(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
