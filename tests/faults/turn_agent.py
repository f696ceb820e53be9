"""A fault-test process running one runtime turn: ``python -m tests.faults.turn_agent '<json>'``.

Options: ``url``, ``session``, ``lease_ttl_s``. It opens a runtime, prints ``ready``, runs
one turn of ``session`` that emits 3 events, flushes, prints ``turn`` (with the lease token)
and then waits until the turn is cancelled (a lost lease cancels it). When the turn has
ended it prints ``ended`` with the stream writer's statistics, then exits on ``close``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import open_runtime
from tests.faults.agent import out


async def main(options: dict[str, Any]) -> None:
    settings = load_settings(
        storage={"url": options["url"]},
        runtime={"reload_on_sighup": False},
        lock={"lease_ttl_s": options["lease_ttl_s"]},
    )
    session = options["session"]
    stdin = anyio.wrap_file(sys.stdin)
    async with open_runtime(settings) as rt:
        out({"event": "ready", "pid": os.getpid()})
        writer = rt._streams.optimized
        async with rt.turn(session) as turn:
            for i in range(3):
                await turn.emit("delta", {"tag": "turn", "i": i})
            await writer.flush()
            out({"event": "turn", "token": turn.lease.token})
            await anyio.sleep_forever()  # until the turn is cancelled
        await writer.flush()
        stats = writer.statistics()
        out({
            "event": "ended", "t": time.time(), "lease_lost": turn.lease.lost,
            "emitted": stats.emitted, "persisted": stats.persisted, "refused": stats.refused,
            "lost": stats.lost,
        })  # fmt: skip
        async for line in stdin:
            if json.loads(line)["op"] == "close":
                break
    out({"event": "closed"})


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
