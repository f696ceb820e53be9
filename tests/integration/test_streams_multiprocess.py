"""Two OS processes on one Postgres database: a subscriber in this process receives, in
order and exactly once, the events a writer in another process streams."""

from __future__ import annotations

import subprocess
import sys

import anyio

from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig, StreamReset
from asyncstore.storage import StreamEvent, open_storage

WRITER = """
import asyncio, sys
from asyncstore.orchestrator.broadcast import BroadcastHub
from asyncstore.orchestrator.streams import StreamEventWriter
from asyncstore.storage import open_storage

async def main(url, n):
    async with open_storage(url) as s, BroadcastHub(s) as hub:
        async with StreamEventWriter(s, hub) as w:
            await w.begin("mp-session", epoch=9)
            for i in range(n):
                await w.emit("mp-session", "delta", {"i": i})
                if i % 50 == 0:
                    await asyncio.sleep(0.03)  # a token rate, so several flushes happen
            await w.emit("mp-session", "turn_completed", {"n": n})
    print("done")

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_subscriber_receives_another_processs_events_in_order(postgres_dsn: str) -> None:
    total = 400
    async with (
        open_storage(postgres_dsn) as storage,
        BroadcastHub(storage, HubConfig(page_size=64)) as hub,
    ):
        async with hub.subscribe("mp-session") as sub:
            proc = await anyio.open_process(
                [sys.executable, "-c", WRITER, postgres_dsn, str(total)],
                stdout=subprocess.PIPE,
            )
            got: list[StreamEvent] = []
            with anyio.fail_after(60):
                async for item in sub:
                    assert not isinstance(item, StreamReset), item
                    got.append(item)
                    if item.kind == "turn_completed":
                        break
            await proc.wait()
            assert proc.returncode == 0
        assert [e.seq for e in got] == list(range(1, total + 2))
        assert [e.payload["i"] for e in got[:-1]] == list(range(total))
        assert {e.epoch for e in got} == {9}
        stats = hub.statistics()
        assert stats.db_reads.get("catch_up", 0) == 0 and stats.db_reads.get("poll", 0) == 0
        # The notifications carried every event: no read at all (the fetch path, flag
        # stream.notify_inline=False, is in tests/contract/test_streams.py).
        assert stats.notifications >= 2
        assert stats.db_reads.get("fan_in", 0) == 0 and stats.inline_events == total + 1
