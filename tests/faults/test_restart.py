"""A Postgres restart (stop fast, a few seconds down, start) while a writer in one process
streams to a subscriber in another: nothing is lost below capacity, the subscriber gets every
event exactly once and in order, and the LISTEN connections come back."""

from __future__ import annotations

import time

import anyio

from orchestrator.broadcast import BroadcastHub
from storage import open_storage
from tests.faults.conftest import FaultDB
from tests.faults.procs import (
    check_stored_stream,
    check_view,
    collect,
    listening,
    load_stream,
    spawn_agent,
)

SESSION = "restart-stream"
DOWN_S = 4.0  # the outage: longer than the stream writer's old ~1.5 s of retries


def _progress(count: int) -> object:
    return lambda m: m.get("event") == "progress" and m["count"] >= count


async def test_restart_mid_stream_loses_nothing_and_remote_subscriber_catches_up_exactly(
    fault_db: FaultDB,
) -> None:
    cluster = fault_db.cluster
    async with (
        open_storage(fault_db.url) as storage,
        BroadcastHub(storage) as hub,
        listening(storage, hub.config.channel) as notes,
        collect(hub.subscribe(SESSION, after=(0, 0))) as seen,
        spawn_agent("writer", fault_db.url) as writer,
    ):
        # The writer holds the session's lease (30 s TTL) and writes under its token.
        token = (await writer.call("hold", session=SESSION))["token"]
        await writer.call("begin", session=SESSION)
        await writer.call("run", session=SESSION, every_s=0.005, report_every=20)
        await seen.wait_until(lambda c: c.last_seq() >= 100, what="100 events before the restart")

        await anyio.to_thread.run_sync(cluster.stop)
        stopped = await writer.wait_for(_progress(0), start=len(writer.messages))
        await anyio.sleep(DOWN_S)  # the outage itself, not a wait for a result
        # The writer went on emitting while the database was down: those events are only
        # in its memory now.
        during = [m for m in writer.messages if m.get("event") == "progress"][-1]
        assert during["count"] >= stopped["count"] + 100, "no emits during the outage"
        # ... and it still holds every one of them, buffered, none given up.
        down = (await writer.call("stats"))["writer"]
        await anyio.to_thread.run_sync(cluster.start)
        started = time.monotonic()
        head_at_start = during["seq"]

        # Everything emitted before and during the outage arrives, then the stream goes on live.
        await seen.wait_until(
            lambda c: c.last_seq() >= head_at_start, limit_s=90, what="catch-up after the restart"
        )
        caught_up_s = time.monotonic() - started
        await notes.wait_gap(limit_s=60)  # already there: the catch-up came through it
        gap_s = notes.first_gap_at - started if notes.first_gap_at else float("nan")
        await writer.wait_for(_progress(during["count"] + 100), start=len(writer.messages))
        halted = await writer.call("halt")
        assert halted["error"] is None, halted
        final = halted["last"]
        await writer.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= final, limit_s=60, what="the last event")
        after = await writer.call("stats")
        closed = await writer.close()
        local_reconnects = storage.statistics().listener_reconnects
        rows = await load_stream(storage, SESSION)

    print(
        f"restart: {DOWN_S} s down; gap reported {gap_s:.2f} s and subscriber caught up "
        f"{caught_up_s:.2f} s after the server was back"
    )
    assert down["lost"] == 0 and down["unsettled"] >= 100, f"while the server was down: {down}"
    stats = closed["writer"]
    # Below capacity a restart loses nothing: no dead letter, no drop, all of it stored.
    assert stats["lost"] == 0, f"stream events lost to the restart: {stats}"
    assert stats["dropped"] == {}, stats
    assert stats["emitted"] == stats["persisted"] == final, stats
    check_stored_stream(rows)
    assert len(rows) == final
    assert {row.epoch for row in rows} == {token}
    # The lease outlived the outage: its renewals failed for a while, then went through.
    assert after["leases_lost"] == 0 and after["lost"] == {SESSION: False}, after
    # The remote subscriber saw each event once, in order, as stored, with no reset: the
    # epoch never changed, so nothing justified one.
    assert seen.resets == [], seen.resets
    assert [e.seq for e in seen.events] == list(range(1, final + 1))
    check_view(seen.items, rows)
    # Both LISTEN connections (this process's hub, the writer's) reconnected after the
    # restart; the subscriber's catch-up above went through the reconnected one.
    assert local_reconnects >= 1
    # Subscriptions were told they may have missed notifications.
    assert notes.gaps() >= 1
    assert closed["listener_reconnects"] >= 1
