"""A periodic runner in its own process, for the multi-process tests of ``test_periodic_fleet``.

Started by ``tests.faults.procs.spawn_agent`` with a JSON argument (``url``, ``schedule``,
``every_s``, ``grace_s``, ``mode``, ``hang``), it runs one interval schedule named ``schedule``
on queue ``periodic`` with the real clock. It prints JSON lines: ``ready``; ``before`` /
``recorded`` with the tick around each write, ``hanging`` where it hangs; and, when a line
arrives on stdin (``close``), ``closed`` with its statistics, then exits. ``hang``
``before`` or ``after`` makes the write of the first tick due after the start (not a
catch-up) hang forever just before or just after it (the test SIGKILLs the process there).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import anyio

from asyncstore.orchestrator.periodic import Periodic, PeriodicConfig, open_periodic
from asyncstore.storage import open_storage


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


async def main(options: dict[str, Any]) -> None:
    url, name, hang = options["url"], options["schedule"], options.get("hang", "")
    schedule = Periodic(
        every=options["every_s"], queue="periodic", name=name, grace=options["grace_s"]
    )
    config = PeriodicConfig(mode=options.get("mode", "all"), leader_ttl_s=5.0)
    started = datetime.now(UTC)  # ticks before this are catch-ups; the hang waits for a live one

    async def before(_: Periodic, tick: datetime) -> None:
        say("before", tick=tick.isoformat())
        if hang == "before" and tick >= started:
            say("hanging", tick=tick.isoformat())
            await anyio.sleep_forever()

    async def after(_: Periodic, tick: datetime) -> None:
        say("recorded", tick=tick.isoformat())
        if hang == "after" and tick >= started:
            say("hanging", tick=tick.isoformat())
            await anyio.sleep_forever()

    async with (
        open_storage(url) as storage,
        open_periodic(
            storage, [schedule], config, before_record=before, after_record=after
        ) as runner,
    ):
        say("ready")
        await anyio.to_thread.run_sync(sys.stdin.readline)
    stats = runner.statistics()  # the runner has stopped: nothing is written after this
    say(
        "closed",
        leading=stats.leading,
        syncs=stats.syncs,
        enqueued=stats.enqueued,
        caught_up=stats.caught_up,
        already_recorded=stats.already_recorded,
        skipped=stats.skipped,
        errors=stats.errors,
    )


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
