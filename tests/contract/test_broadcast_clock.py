"""``BroadcastHub(clock=...)``: the hub's timing logic runs on the injected ``Clock``.

A ``ManualClock`` drives it: idle rings are evicted once ``ring_idle_ttl_s`` of that clock
passed (by ``evict_idle`` and by the sweeper, which sleeps on it), and a resume point that
is not stored waits ``resume_wait_s`` of that clock before its ``unknown_resume_point``
reset. A legacy poll subscription (``stream.delivery`` poll) that found nothing new reads
again once ``poll_interval_s`` of that clock passed. Real storage; nothing here waits on wall
time.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.broadcast import BroadcastHub, DeliveryMode, HubConfig, StreamReset
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import AsyncStorageBackend, NewStreamEvent, StreamEvent

BOUND_S = 30.0  # a correctness bound for a loaded machine, not a timing


def _event(session_id: str, seq: int, epoch: int = 1) -> StreamEvent:
    return StreamEvent(
        session_id=session_id,
        epoch=epoch,
        seq=seq,
        kind="delta",
        payload={"i": seq},
        created_at=datetime.now(UTC),
    )


async def test_idle_rings_are_evicted_on_the_hubs_clock(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    config = HubConfig(ring_idle_ttl_s=60, sweep_interval_s=3600)
    async with BroadcastHub(storage, config, clock=clock) as hub:
        hub.publish(_event("idle", 1), persisted=True)
        clock.advance(59)
        assert hub.evict_idle() == 0  # wall time is irrelevant: 59 s of the hub's clock
        hub.publish(_event("idle", 2), persisted=True)  # a publish is a use
        clock.advance(59)
        assert hub.evict_idle() == 0
        clock.advance(2)
        assert hub.evict_idle() == 1
        assert hub.statistics().rings_evicted == 1


async def test_the_sweeper_sleeps_on_the_hubs_clock(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    config = HubConfig(ring_idle_ttl_s=5, sweep_interval_s=10)
    async with BroadcastHub(storage, config, clock=clock) as hub:
        with anyio.fail_after(BOUND_S):
            await clock.wait_sleepers(1)  # the sweeper is asleep on this clock
        hub.publish(_event("idle", 1), persisted=True)
        clock.advance(10)  # wakes the sweeper: it evicts the ring idle for 10 s
        with anyio.fail_after(BOUND_S):
            await clock.wait_sleepers(1)  # asleep again: its sweep is done
        assert hub.statistics().rings_evicted == 1


async def test_a_resume_point_not_stored_waits_resume_wait_s_of_the_hubs_clock(
    storage: AsyncStorageBackend,
) -> None:
    clock = ManualClock()
    config = HubConfig(resume_wait_s=30, sweep_interval_s=3600)
    async with BroadcastHub(storage, config, clock=clock) as hub:
        hub.publish(_event("r", 1), persisted=True)
        got: list[StreamEvent | StreamReset] = []
        arrived = anyio.Event()
        async with hub.subscribe("r", after=(1, 5)) as sub, anyio.create_task_group() as tg:

            async def read() -> None:
                got.append(await sub.__anext__())
                arrived.set()

            tg.start_soon(read)
            with anyio.fail_after(BOUND_S):
                await clock.wait_sleepers(2)  # the sweeper, and the resume wait
            clock.advance(29)
            # Still waiting for seq 5 to arrive from another instance: its timer is armed.
            assert clock.sleepers == 2 and got == []
            clock.advance(1)
            with anyio.fail_after(BOUND_S):
                await arrived.wait()
        (item,) = got
        assert isinstance(item, StreamReset) and item.reason == "unknown_resume_point"
        assert item.seq == 1


async def test_a_poll_subscription_polls_again_on_the_hubs_clock(
    storage: AsyncStorageBackend,
) -> None:
    clock = ManualClock()
    config = HubConfig(mode=DeliveryMode.POLL, poll_interval_s=600, sweep_interval_s=3600)
    await storage.append_stream_events([NewStreamEvent("p", 1, 1, "delta", {"i": 1})])
    async with BroadcastHub(storage, config, clock=clock) as hub:
        got: list[StreamEvent | StreamReset] = []
        arrived = anyio.Event()
        async with hub.subscribe("p", after=(1, 1)) as sub, anyio.create_task_group() as tg:

            async def read() -> None:
                got.append(await sub.__anext__())
                arrived.set()

            tg.start_soon(read)
            with anyio.fail_after(BOUND_S):
                await clock.wait_sleepers(2)  # the sweeper, and the poll that found nothing
            polls = hub.statistics().db_reads.get("poll", 0)
            # Stored by another instance: only the next poll finds it.
            await storage.append_stream_events([NewStreamEvent("p", 1, 2, "delta", {"i": 2})])
            clock.advance(599)
            await anyio.lowlevel.checkpoint()
            assert got == [] and hub.statistics().db_reads.get("poll", 0) == polls
            clock.advance(1)
            with anyio.fail_after(BOUND_S):
                await arrived.wait()
        (item,) = got
        assert isinstance(item, StreamEvent) and (item.epoch, item.seq) == (1, 2)
        assert hub.statistics().db_reads.get("poll", 0) == polls + 1
