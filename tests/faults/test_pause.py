"""SIGSTOP / SIGCONT of a lease holder past its TTL while another process takes over.

Holder A (token t1) writes seqs 1..3 and is paused past its TTL; holder B, another process,
takes the lease (token t2 > t1) and writes 4..8. A resumes without having noticed and emits
10 more events. The database is the fence: nothing of epoch t1 may be stored after B's
events, A learns it on its next emit (``LeaseLost``) and counts what was refused, and a hub in
a third process (this one) that hears of A's writes does not re-read the session forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from orchestrator.broadcast import BroadcastHub
from storage import AsyncStorageBackend, StreamEvent, open_storage
from tests.faults.conftest import FaultDB
from tests.faults.procs import (
    Agent,
    Collector,
    check_stored_stream,
    check_view,
    collect,
    load_stream,
    spawn_agent,
)

SESSION = "paused-holder"
TTL_S = 2.0
IDLE_WINDOW_S = 1.5  # how long the idle session is watched for reads after the stale writes
# Cheap fallback retries so B asks again soon after A's lease expired (B never hears of the
# expiry: nobody releases the lease).
LIMITER = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5}


@dataclass
class Superseded:
    storage: AsyncStorageBackend
    hub: BroadcastHub
    seen: Collector
    a: Agent
    b: Agent
    t1: int
    t2: int
    stale_emit: dict[str, Any]  # A's answer to emitting 10 events after it resumed
    next_emit: dict[str, Any]  # A's answer to one more emit after its flush
    a_stats: dict[str, Any]
    rows_after_stale: list[StreamEvent]  # the stored stream right after A's stale writes
    fan_in_during_stale: int  # the hub's fan-in reads from A's resume to the window's end


@asynccontextmanager
async def superseded_holder(fault_db: FaultDB) -> AsyncIterator[Superseded]:
    opts = {"lease_ttl_s": TTL_S, "limiter": LIMITER}
    async with (
        open_storage(fault_db.url) as storage,
        BroadcastHub(storage) as hub,
        collect(hub.subscribe(SESSION, after=(0, 0))) as seen,
        spawn_agent("A", fault_db.url, **opts) as a,
        spawn_agent("B", fault_db.url, **opts) as b,
    ):
        t1 = (await a.call("hold", session=SESSION))["token"]
        await a.call("begin", session=SESSION)
        await a.call("emit", session=SESSION, n=3, tag="A")
        await a.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= 3, what="A's first 3 events")

        a.pause()
        # B waits for the lease: it is free only once A's TTL has run out in the database.
        t2 = (await b.call("hold", session=SESSION, limit_s=30))["token"]
        assert t2 > t1
        assert (await b.call("begin", session=SESSION))["last"] == 3
        emitted = await b.call("emit", session=SESSION, n=5, tag="B")
        assert emitted["seqs"] == [4, 5, 6, 7, 8], emitted
        await b.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= 8, what="B's events 4..8")

        reads_before = hub.statistics().db_reads.get("fan_in", 0)
        a.resume()
        stale_emit = await a.call("emit", session=SESSION, n=10, tag="A-stale")
        a_stats = await a.call("flush")
        next_emit = await a.call("emit", session=SESSION, n=1, tag="A-after")
        await a.call("flush")
        rows_after_stale = await load_stream(storage, SESSION)
        # A's flush notified this hub (if it notified at all) well inside this window; a
        # fan-in that loops reads thousands of times in it, a correct one a few times.
        await anyio.sleep(IDLE_WINDOW_S)
        fan_in = hub.statistics().db_reads.get("fan_in", 0) - reads_before
        yield Superseded(
            storage, hub, seen, a, b, t1, t2, stale_emit, next_emit, a_stats,
            rows_after_stale, fan_in,
        )  # fmt: skip


async def test_superseded_holder_stores_nothing_after_the_new_holders_events(
    fault_db: FaultDB,
) -> None:
    async with superseded_holder(fault_db) as s:
        # Nothing of the stale epoch is stored after B's events: seqs 1..3 are A's, 4..8 B's.
        rows = s.rows_after_stale
        check_stored_stream(rows)
        assert [(r.seq, r.epoch) for r in rows] == [(i, s.t1) for i in (1, 2, 3)] + [
            (i, s.t2) for i in range(4, 9)
        ], rows
        assert all(r.payload["tag"] == "B" for r in rows[3:])
        # A was refused by the database and told so: counted, then LeaseLost on its next emit.
        assert s.a_stats["writer"]["refused"] >= 1, s.a_stats
        assert s.a_stats["writer"]["lost"] == 0, s.a_stats
        stale_error = s.stale_emit["error"]
        assert stale_error is None or stale_error.startswith("LeaseLost"), s.stale_emit
        assert (s.next_emit["error"] or "").startswith("LeaseLost"), s.next_emit

        # B goes on at seq 9 and the stream stays one stream, live and stored alike.
        more = await s.b.call("emit", session=SESSION, n=5, tag="B")
        assert more["seqs"] == [9, 10, 11, 12, 13], more
        b_stats = await s.b.call("flush")
        assert b_stats["writer"]["refused"] == 0 and b_stats["writer"]["lost"] == 0, b_stats
        await s.seen.wait_until(lambda c: c.last_seq() >= 13, what="B's events 9..13")
        final = await load_stream(s.storage, SESSION)
        check_stored_stream(final)
        assert [r.epoch for r in final] == [s.t1] * 3 + [s.t2] * 10
        check_view(s.seen.items, final)


async def test_hub_in_another_process_does_not_reread_an_idle_session_after_stale_writes(
    fault_db: FaultDB,
) -> None:
    async with superseded_holder(fault_db) as s:
        assert s.fan_in_during_stale <= 5, (
            f"{s.fan_in_during_stale} fan-in reads of an idle session within "
            f"{IDLE_WINDOW_S} s of the stale writes (by cause: {dict(s.hub.statistics().db_reads)})"
        )
        # And the reads stay bounded afterwards, once B writes past the stale seqs.
        await s.b.call("emit", session=SESSION, n=5, tag="B")
        await s.b.call("flush")
        await s.seen.wait_until(lambda c: c.last_seq() >= 13, what="B's events 9..13")
        final = await load_stream(s.storage, SESSION)
        check_stored_stream(final)
        check_view(s.seen.items, final)
