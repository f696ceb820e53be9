"""A Postgres restart (stop fast, a few seconds down, start) while a writer in one process
streams to a subscriber in another: nothing is lost below capacity, the subscriber gets every
event exactly once and in order, and the LISTEN connections come back. And what callers see
of a restart: only retryable storage errors."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import anyio

from asyncstore.orchestrator.broadcast import BroadcastHub
from asyncstore.storage import NewStreamEvent, StorageError, encode_payload, open_storage
from asyncstore.storage.errors import is_retryable
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
RESTARTS = 3
CALLERS = 16  # concurrent callers: enough to have calls in flight when the server stops
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


class _Calls:
    """Outcomes of storage calls made in a loop by several tasks, and a wake-up per outcome."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.leaked: list[BaseException] = []
        self.changed = anyio.Event()

    def note(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        try:
            with anyio.fail_after(60):
                while not predicate():
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not in 60 s ({self.ok} ok, {self.errors})") from None


async def test_every_call_that_fails_during_a_restart_raises_a_retryable_storage_error(
    fault_db: FaultDB,
) -> None:
    """Callers (the writers' retry rule among them) can only tell an outage from a bug by
    the error: during a restart each failing call must raise a retryable ``StorageError``,
    never a driver exception."""
    calls = _Calls()
    async with open_storage(fault_db.url) as storage:
        stop = anyio.Event()

        async def appender(i: int) -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                event = NewStreamEvent(f"calls-{i}", 1, seq, "delta", encode_payload({"n": seq}))
                try:
                    await storage.append_stream_events([event])
                    calls.ok += 1
                except StorageError as exc:
                    calls.errors[type(exc).__name__] += 1
                    if not is_retryable(exc):
                        calls.leaked.append(exc)
                except Exception as exc:  # what must not happen: a driver error escapes
                    calls.errors[type(exc).__name__] += 1
                    calls.leaked.append(exc)
                calls.note()
                await anyio.sleep(0.001)  # a steady trickle of calls

        async with anyio.create_task_group() as tg:
            for i in range(CALLERS):
                tg.start_soon(appender, i)
            # Each restart catches a few calls in flight; three make a driver error that
            # escapes in some of them very likely to show (one showed it 4 times out of 5).
            for _ in range(RESTARTS):
                ok, failed = calls.ok, calls.errors.total()
                await calls.until(lambda n=ok: calls.ok >= n + 200, "calls before a stop")
                await anyio.to_thread.run_sync(fault_db.cluster.stop)
                await calls.until(
                    lambda n=failed: calls.errors.total() >= n + 100, "failures while down"
                )
                await anyio.to_thread.run_sync(fault_db.cluster.start)
            ok_at_start = calls.ok
            await calls.until(lambda: calls.ok >= ok_at_start + 200, "calls after the restarts")
            stop.set()

    print(f"calls during a restart: {calls.ok} ok, errors {dict(calls.errors)}")
    assert not calls.leaked, (
        f"{len(calls.leaked)} calls failed with an error that is not a retryable StorageError "
        f"(errors by type: {dict(calls.errors)}; first: {calls.leaked[0]!r})"
    )
