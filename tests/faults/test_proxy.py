"""Faults of the network between the library and Postgres, through a TCP proxy in the test.

A lease holder whose renewals are slowed keeps its lease; one whose renewals stall gives it
up, by its own clock, before anybody else can take it, so two live holders never coexist. A
cut LISTEN connection is noticed, reconnected and reported to subscribers as a gap, and a
remote subscriber still gets every event exactly once.
"""

from __future__ import annotations

import time

import anyio
from pydantic import SecretStr

from asyncstore.orchestrator.broadcast import BroadcastHub
from asyncstore.orchestrator.locks import LimiterConfig, open_session_limiter
from asyncstore.storage import (
    NewMessage,
    StorageSettings,
    open_storage,
)
from tests.faults.conftest import FaultDB
from tests.faults.procs import (
    Agent,
    check_stored_stream,
    check_view,
    collect,
    listening,
    load_stream,
    spawn_agent,
)
from tests.faults.proxy import open_proxy
from tests.waiting import wait_for

TTL_S = 4.0  # renewal every 4/3 s; the holder gives up 0.4 s before its lease expires
OUTAGE_S = 1.0  # how long the cut network refuses new connections
LIMITER = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5}


async def _renewals(agent: Agent, more_than: int, limit_s: float = 30.0) -> int:
    """Wait until the agent has renewed more than ``more_than`` times (it cannot tell us)."""
    seen = [0]

    async def renewed() -> bool:
        seen[0] = int((await agent.call("stats"))["renewals"])
        return seen[0] > more_than

    await wait_for(renewed, limit_s, what=f"more than {more_than} renewals")
    return seen[0]


async def test_stalled_renewal_never_leaves_two_live_holders(fault_db: FaultDB) -> None:
    session = "stalled-renewal"
    async with open_proxy(fault_db.cluster.port) as proxy:
        url = fault_db.url_via(proxy.port)
        async with (
            spawn_agent("A", url, lease_ttl_s=TTL_S, limiter=LIMITER) as a,
            open_storage(fault_db.url) as storage,
            open_session_limiter(storage, LimiterConfig(lease_ttl_s=TTL_S, **LIMITER)) as b,
        ):
            t1 = (await a.call("hold", session=session))["token"]
            appended = await a.call("append", session=session, text="A, before")
            assert appended["error"] is None, appended

            # Latency well under the TTL: renewals are slow, the lease is kept.
            proxy.latency_s = 0.15
            base = (await a.call("stats"))["renewals"]
            await _renewals(a, base + 1)
            proxy.latency_s = 0.0
            assert not any(m.get("event") == "lost" for m in a.messages), a.messages

            # Stalled: A's renewals hang. B, on a healthy connection, waits for the lease.
            mark = len(a.messages)
            proxy.stall()
            stalled_at = time.time()
            with anyio.fail_after(30):
                async with b.hold(session) as held_b:
                    acquired_at = time.time()
                    assert held_b.token > t1
                    lost = await a.wait_for(
                        lambda m: m.get("event") == "lost", limit_s=5, start=mark
                    )
                    # A stopped believing it held the lease before B could take it over.
                    assert lost["t"] <= acquired_at, (
                        f"A still held the lease {acquired_at - lost['t']:.3f} s after B took it"
                    )
                    assert lost["t"] - stalled_at < TTL_S + 1.0, lost
                    print(f"stalled renewal: A gave up {acquired_at - lost['t']:.3f} s before B")

                    # Unstalled, whatever A still had in flight and writes now is fenced out.
                    proxy.resume()
                    late = await a.call("append", session=session, text="A, stale")
                    assert (late["error"] or "").startswith("LeaseLost"), late
                    mine = await storage.append_messages(
                        session, [NewMessage("assistant", "B")], lease_token=held_b.token
                    )
                    assert len(mine) == 1
            messages = await storage.load_messages(session, limit=100)
            assert [m.content for m in messages] == ["A, before", "B"]


async def _notified(agent: Agent, more_than: int, limit_s: float = 30.0) -> None:
    """Wait until the agent's stream writer has sent more than ``more_than`` notifications."""

    async def notified() -> bool:
        return bool((await agent.call("stats"))["writer"]["notifications"] > more_than)

    await wait_for(notified, limit_s, what=f"more than {more_than} notifications")


async def test_cut_listen_connection_is_noticed_and_reported_as_a_gap(fault_db: FaultDB) -> None:
    session = "cut-listener"
    async with open_proxy(fault_db.cluster.port) as proxy:
        settings = StorageSettings(url=SecretStr(fault_db.url_via(proxy.port)), connect_timeout_s=3)
        async with (
            open_storage(settings) as storage,
            BroadcastHub(storage) as hub,
            listening(storage, hub.config.channel) as notes,
            collect(hub.subscribe(session, after=(0, 0))) as seen,
            spawn_agent("writer", fault_db.url) as writer,
        ):
            await writer.call("begin", session=session, epoch=1)
            await writer.call("emit", session=session, n=10, tag="before")
            await writer.call("flush")
            await seen.wait_until(lambda c: c.last_seq() >= 10, what="events before the cut")
            assert notes.gaps() == 0
            before = await writer.call("stats")

            # The network drops every connection and, for a while, refuses new ones: the
            # writer's notifications of the events below are lost to this process.
            proxy.refuse_new = True
            cut_at = time.monotonic()
            assert proxy.cut() >= 1
            await writer.call("emit", session=session, n=20, tag="during")
            stats = await writer.call("flush")
            assert stats["writer"]["persisted"] == 30
            await _notified(writer, more_than=before["writer"]["notifications"])
            # This process noticed the cut: it tried to reconnect and was refused.
            with anyio.fail_after(30):
                await proxy.wait_refused(1)
            await anyio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))  # the outage
            proxy.resume()
            resumed = time.monotonic()
            outage_s = resumed - cut_at

            await notes.wait_gap(limit_s=30)
            noticed_s = time.monotonic() - resumed
            await seen.wait_until(lambda c: c.last_seq() >= 30, what="catch-up after the gap")
            await writer.call("emit", session=session, n=10, tag="after")
            await writer.call("flush")
            await seen.wait_until(lambda c: c.last_seq() >= 40, what="live events after the gap")
            reconnects = storage.statistics().listener_reconnects
            rows = await load_stream(storage, session)

    print(
        f"cut listener: outage {outage_s:.2f} s, gap reported {noticed_s:.2f} s after the "
        "network came back"
    )
    assert reconnects >= 1
    # Noticed promptly: a short outage must not leave the listener down for seconds more
    # (an idle timer of 5 s, or a backoff grown far past the outage). A generous bound.
    assert noticed_s < max(3.0, 2 * outage_s), (noticed_s, outage_s)
    check_stored_stream(rows)
    assert len(rows) == 40
    assert seen.resets == []
    assert [e.seq for e in seen.events] == list(range(1, 41))
    check_view(seen.items, rows)
