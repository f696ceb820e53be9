"""SIGSTOP / SIGCONT of a lease holder past its TTL while another process takes over.

Holder A (token t1) writes seqs 1..3 and is paused past its TTL; holder B, another process,
takes the lease (token t2 > t1) and writes 4..8. A resumes without having noticed and emits
10 more events. The database is the fence: nothing of epoch t1 may be stored after B's
events, A learns it on its next emit (``LeaseLost``) and counts what was refused, and a hub in
a third process (this one) that hears of A's writes does not re-read the session forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from asyncstore.orchestrator.broadcast import BroadcastHub, StreamReset
from asyncstore.storage import StreamEvent, open_storage
from asyncstore.storage.postgres import PostgresBackend
from tests.faults.conftest import FaultDB
from tests.faults.procs import (
    check_stored_stream,
    check_view,
    collect,
    load_stream,
    spawn_agent,
    view_of,
)
from tests.waiting import wait_for

SESSION = "paused-holder"
TTL_S = 2.0
IDLE_WINDOW_S = 1.5  # how long the idle session is watched for reads after the stale writes
# Cheap fallback retries so B asks again soon after A's lease expired (B never hears of the
# expiry: nobody releases the lease).
LIMITER = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5}


@dataclass
class Superseded:
    t1: int
    t2: int
    stale_emit: dict[str, Any]  # A's answer to emitting 10 events after it resumed
    next_emit: dict[str, Any]  # A's answer to one more emit after its flush
    a_stats: dict[str, Any]
    rows_after_stale: list[StreamEvent]  # the stored stream right after A's stale writes
    fan_in_during_stale: int  # the hub's fan-in reads from A's resume to the window's end
    db_reads: dict[str, int]  # the hub's reads by cause at the window's end
    more_emit: dict[str, Any]  # B's answer to emitting 5 more events afterwards
    b_stats: dict[str, Any]
    final_rows: list[StreamEvent]
    seen: list[StreamEvent | StreamReset]  # what the live subscriber in this process got
    a_view: list[StreamEvent | StreamReset]  # what a live subscriber in A's process got


async def superseded_holder(fault_db: FaultDB) -> Superseded:
    """Run the scenario of the module docstring; the checks are left to the tests."""
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
        await a.call("subscribe", session=SESSION, after=[0, 0])
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
        reads = hub.statistics().db_reads
        fan_in = reads.get("fan_in", 0) - reads_before

        # B goes on: its next seq is its own, after 8.
        more_emit = await b.call("emit", session=SESSION, n=5, tag="B")
        b_stats = await b.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= 13, what="B's events 9..13")
        final_rows = await load_stream(storage, SESSION)
        a_view = await a.call("seen", session=SESSION, head=13, limit_s=30)
        return Superseded(
            t1, t2, stale_emit, next_emit, a_stats, rows_after_stale, fan_in, dict(reads),
            more_emit, b_stats, final_rows, list(seen.items), view_of(a_view["items"]),
        )  # fmt: skip


async def test_superseded_holder_stores_nothing_after_the_new_holders_events(
    fault_db: FaultDB,
) -> None:
    s = await superseded_holder(fault_db)
    print(f"stale writes: A's answers {s.stale_emit}, {s.next_emit}; A {s.a_stats['writer']}")
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

    # B went on at seq 9 and the stream stayed one stream, live and stored alike.
    assert s.more_emit["seqs"] == [9, 10, 11, 12, 13], s.more_emit
    assert s.b_stats["writer"]["refused"] == 0 and s.b_stats["writer"]["lost"] == 0, s.b_stats
    check_stored_stream(s.final_rows)
    assert [r.epoch for r in s.final_rows] == [s.t1] * 3 + [s.t2] * 10
    check_view(s.seen, s.final_rows)
    # A's own live subscriber may have seen A's refused events, but then a reset.
    print("A's local view:", " ".join(_brief(item) for item in s.a_view))
    check_view(s.a_view, s.final_rows)


async def test_hub_in_another_process_does_not_reread_an_idle_session_after_stale_writes(
    fault_db: FaultDB,
) -> None:
    s = await superseded_holder(fault_db)
    print(f"stale writes: {s.fan_in_during_stale} fan-in reads in the window; {s.db_reads}")
    assert s.fan_in_during_stale <= 5, (
        f"{s.fan_in_during_stale} fan-in reads of an idle session within {IDLE_WINDOW_S} s "
        f"of the stale writes (reads by cause: {s.db_reads})"
    )
    # What the subscriber in that hub saw is still one consistent stream.
    check_stored_stream(s.final_rows)
    check_view(s.seen, s.final_rows)


async def test_runtime_turn_that_lost_its_lease_emits_nothing_with_the_lost_epoch(
    fault_db: FaultDB,
) -> None:
    session = "paused-turn"
    turn_opts = {"module": "tests.faults.turn_agent", "session": session, "lease_ttl_s": TTL_S}
    async with (
        open_storage(fault_db.url) as storage,
        spawn_agent("A", fault_db.url, **turn_opts) as a,
        spawn_agent("B", fault_db.url, lease_ttl_s=TTL_S, limiter=LIMITER) as b,
    ):
        t1 = (await a.wait_for(lambda m: m.get("event") == "turn"))["token"]
        a.pause()
        t2 = (await b.call("hold", session=session, limit_s=30))["token"]
        assert t2 > t1
        assert (await b.call("begin", session=session))["last"] == 3
        await b.call("emit", session=session, n=5, tag="B")
        await b.call("flush")
        a.resume()
        # A's renewal finds the lease gone; the lost lease cancels the turn, which ends.
        ended = await a.wait_for(lambda m: m.get("event") == "ended", limit_s=30)
        more = await b.call("emit", session=session, n=2, tag="B")
        await b.call("flush")
        rows = await load_stream(storage, session)

    assert ended["lease_lost"] is True, ended
    # The turn ended without emitting anything under the epoch it no longer held: no
    # `cancelled` event of epoch t1, neither published live nor sent to storage.
    assert ended["emitted"] == 3 and ended["refused"] == 0, ended
    assert ended["lost"] == 0, ended
    assert more["seqs"] == [9, 10], more
    check_stored_stream(rows)
    assert [(r.epoch, r.payload["tag"]) for r in rows] == [(t1, "turn")] * 3 + [(t2, "B")] * 7


async def test_hub_fan_in_ends_on_stale_rows_it_cannot_take(fault_db: FaultDB) -> None:
    """Defence in depth: rows of a superseded epoch that are stored anyway (written by a
    version without the fence, during a rolling upgrade) must not make a hub read forever
    when a listener reconnect makes it re-read every watched session."""
    session = "stale-rows"
    async with (
        open_storage(fault_db.url) as storage,
        BroadcastHub(storage) as hub,
        collect(hub.subscribe(session, after=(0, 0))) as seen,
        spawn_agent("W", fault_db.url) as w,
    ):
        token = (await w.call("hold", session=session))["token"]
        await w.call("begin", session=session)
        await w.call("emit", session=session, n=5, tag="W")
        await w.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= 5, what="W's first events")
        conn = await asyncpg.connect(fault_db.url)
        try:
            # Raw SQL on purpose: the library's own append would refuse these rows.
            await conn.execute(
                "INSERT INTO stream_events (session_id, seq, epoch, kind, payload)"
                " SELECT $1, g, $2, 'delta', '{\"tag\": \"pre-fence\"}'::jsonb"
                " FROM generate_series(6, 10) AS g",
                session,
                token - 1,
            )
        finally:
            await conn.close()

        backend = storage
        assert isinstance(backend, PostgresBackend)
        reads_before = hub.statistics().db_reads.get("fan_in", 0)
        await backend.terminate_listener_for_tests()
        # The reconnect reports a gap; the hub re-reads the watched session once.
        await wait_for(lambda: hub.statistics().db_reads.get("fan_in", 0) > reads_before)
        await anyio.sleep(IDLE_WINDOW_S)  # the observation window
        fan_in = hub.statistics().db_reads.get("fan_in", 0) - reads_before
        reconnects = storage.statistics().listener_reconnects

        # The holder's next events replace the stale rows; the subscriber gets them.
        more = await w.call("emit", session=session, n=5, tag="W")
        await w.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= 10, what="W's events 6..10")
        rows = await load_stream(storage, session)

    assert reconnects >= 1
    assert fan_in <= 5, f"{fan_in} fan-in reads of an idle session in {IDLE_WINDOW_S} s"
    assert more["seqs"] == [6, 7, 8, 9, 10], more
    check_stored_stream(rows)
    assert {(r.epoch, r.payload["tag"]) for r in rows} == {(token, "W")}
    check_view(seen.items, rows)


def _brief(item: StreamEvent | StreamReset) -> str:
    if isinstance(item, StreamReset):
        return f"reset({item.reason},{item.seq}@{item.epoch})"
    return f"{item.seq}@{item.epoch}"
