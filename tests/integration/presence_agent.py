"""A runtime with live stream subscribers in its own process, for ``test_presence_fleet``.

Started by ``tests.faults.procs.spawn_agent`` with a JSON argument (``url``,
``instance_id``, ``interval_s``, ``subscribers``: session id to how many subscriptions to
hold open), it opens a runtime publishing its presence every ``interval_s`` (the real
clock), opens those subscriptions, publishes at once and prints ``ready``. When a
line arrives on stdin (``close``) it closes the subscriptions and the runtime (which
withdraws its presence row) and prints ``closed`` with its presence statistics.
"""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack
from typing import Any

import anyio

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import open_runtime


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


async def main(options: dict[str, Any]) -> None:
    settings = load_settings(
        storage={"url": options["url"]},
        runtime={
            "reload_on_sighup": False,
            "instance_id": options["instance_id"],
            "presence_interval_s": options["interval_s"],
            "shutdown_grace_s": 0.5,
        },
    )
    async with open_runtime(settings) as rt, AsyncExitStack() as subscriptions:
        for session_id, n in options["subscribers"].items():
            for _ in range(n):
                await subscriptions.enter_async_context(rt.subscribe(session_id))
        await rt.presence.publish()  # now, not an interval later: the test may wait long
        say("ready")
        await anyio.to_thread.run_sync(sys.stdin.readline)
    stats = rt.presence.statistics()
    say("closed", publishes=stats.publishes, failures=stats.failures, withdrawn=stats.withdrawn)


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
