"""A runtime process for the mixed-rollout cap test: runs turns on command, reports each one.

Run as ``python -m tests.integration.cap_agent '<options json>'`` through
``tests.faults.procs.spawn_agent``. Options: ``url``, ``max_running``, ``slot_pool``,
``lock`` (the lock flag the runtime starts with) and ``live_lock`` (if set, applied with
``update_flags`` once the runtime runs, as an operator's live change would). Commands, one
JSON line each on stdin: ``{"op": "run", "id": n, "sessions": [...], "hold_s": s}`` runs
one turn per session, all at once, and answers with what it saw; ``close`` ends the
process. While a run goes, every turn prints ``{"event": "enter"|"exit", "session",
"optimized", "t"}`` (``t`` is ``time.monotonic()``, one clock for every process of the
machine): ``enter`` once the lease is held, ``exit`` before it is released, so the printed
interval lies inside the real one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import Runtime, open_runtime
from tests.faults.agent import out


async def _run(rt: Runtime, sessions: list[str], hold_s: float) -> dict[str, Any]:
    running: set[str] = set()
    peak = 0
    ran: list[str] = []

    async def one(session: str) -> None:
        nonlocal peak
        async with rt.turn(session) as turn:
            running.add(session)
            peak = max(peak, len(running))
            optimized = turn.paths["lock"]
            out({"event": "enter", "session": session, "optimized": optimized,
                 "t": time.monotonic()})  # fmt: skip
            await anyio.sleep(hold_s)  # the turn's work
            out({"event": "exit", "session": session, "t": time.monotonic()})
            running.discard(session)
            ran.append(session)

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(one, session)
    stats = rt.statistics()
    return {
        "ran": ran,
        "local_peak": peak,
        "acquires": {path: s.acquires for path, s in stats.limiter.items()},
    }


async def main(options: dict[str, Any]) -> None:
    settings = load_settings(
        storage={"url": options["url"]},
        flags={"lock": options.get("lock", "two_level")},
        lock={
            "max_running": options["max_running"],
            "slot_pool": options["slot_pool"],
            "poll_interval_s": 0.02,
            "backoff_max_s": 0.5,
        },
        runtime={"reload_on_sighup": False},
    )
    async with open_runtime(settings) as rt:
        if options.get("live_lock") is not None:
            rt.update_flags(lock=options["live_lock"])
        out({"event": "ready", "pid": os.getpid(), "lock": rt.flags.model_dump()["lock"]})
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["op"] == "close":
                break
            try:
                answer = await _run(rt, cmd["sessions"], cmd["hold_s"])
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            out({"id": cmd["id"], **answer})
    out({"event": "closed"})


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
