"""StreamEventWriter + BroadcastHub on both drivers: memory-first delivery, exact resume,
resets, slow subscribers, eviction, two instances, and the legacy paths behind the flags."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from asyncstore.orchestrator.batching import BatchConfig, OverflowPolicy
from asyncstore.orchestrator.broadcast import (
    BroadcastHub,
    DeliveryMode,
    HubConfig,
    SlowSubscriberPolicy,
    StreamReset,
    Subscription,
    decode_advance,
)
from asyncstore.orchestrator.errors import Dropped, StreamNotStarted, SubscriberLagged
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import (
    AsyncStorageBackend,
    InvalidInput,
    LeaseLost,
    StreamEvent,
    open_storage,
)
from tests.waiting import wait_for

SLOW_TIMER = BatchConfig(max_batch=10_000, flush_interval_s=60, capacity=20_000)


@asynccontextmanager
async def instance(
    storage: AsyncStorageBackend,
    hub_config: HubConfig | None = None,
    stream_config: StreamConfig | None = None,
) -> AsyncIterator[tuple[BroadcastHub, StreamEventWriter]]:
    async with (
        BroadcastHub(storage, hub_config or HubConfig(resume_wait_s=0.05)) as hub,
        StreamEventWriter(storage, hub, stream_config or StreamConfig()) as writer,
    ):
        yield hub, writer


async def take(sub: Subscription, n: int) -> list[StreamEvent | StreamReset]:
    out: list[StreamEvent | StreamReset] = []
    with anyio.fail_after(5):
        while len(out) < n:
            out.append(await sub.__anext__())
    return out


def seqs(items: list[StreamEvent | StreamReset]) -> list[int]:
    return [i.seq for i in items if isinstance(i, StreamEvent)]


async def test_live_subscriber_gets_events_before_they_are_persisted(
    storage: AsyncStorageBackend,
) -> None:
    async with instance(storage, stream_config=StreamConfig(batch=SLOW_TIMER)) as (hub, w):
        await w.begin("s1", epoch=1)
        async with hub.subscribe("s1") as sub:
            for i in range(3):
                w.emit_nowait("s1", "delta", {"text": f"t{i}", "i": i})
            got = await take(sub, 3)
            assert seqs(got) == [1, 2, 3]
            assert [e.payload["i"] for e in got if isinstance(e, StreamEvent)] == [0, 1, 2]
            assert await storage.load_stream_events("s1") == []  # not persisted yet
            await w.flush()
            stored = await storage.load_stream_events("s1")
            assert [(e.epoch, e.seq) for e in stored] == [(1, 1), (1, 2), (1, 3)]
        assert hub.statistics().db_reads_total == 0


async def test_critical_event_flushes_at_once(storage: AsyncStorageBackend) -> None:
    async with instance(storage, stream_config=StreamConfig(batch=SLOW_TIMER)) as (_, w):
        await w.begin("s1", epoch=1)
        w.emit_nowait("s1", "delta", "a")
        w.emit_nowait("s1", "turn_completed", {"ok": True})

        async def both_stored() -> bool:
            return len(await storage.load_stream_events("s1")) >= 2

        # Well within the 60 s timer: only the critical event's own flush stores them.
        await wait_for(both_stored, timeout_s=30, what="the critical event's flush")


async def test_one_notification_per_flush_for_many_sessions(storage: AsyncStorageBackend) -> None:
    config = StreamConfig(batch=SLOW_TIMER)
    async with (
        storage.listen(config.channel) as notes,
        instance(storage, stream_config=config) as (_, w),
    ):
        for s in range(5):
            await w.begin(f"s{s}", epoch=7)
        for i in range(100):
            w.emit_nowait(f"s{i % 5}", "delta", i)
        await w.flush()
        with anyio.fail_after(5):
            note = await notes.receive()
        advances = decode_advance(note.payload)
        assert sorted(advances) == [(f"s{s}", 7, 1, 20) for s in range(5)]
        with anyio.move_on_after(0.2):
            extra = await notes.receive()
            raise AssertionError(f"a second notification for one flush: {extra}")
        assert w.statistics().notifications == 1
        assert w.statistics().persisted == 100


async def test_resume_inside_the_ring_reads_no_database(storage: AsyncStorageBackend) -> None:
    async with instance(storage) as (hub, w):
        await w.begin("s1", epoch=3)
        for i in range(10):
            await w.emit("s1", "delta", i)
        async with hub.subscribe("s1", after=(3, 4)) as sub:
            assert seqs(await take(sub, 6)) == [5, 6, 7, 8, 9, 10]
        assert hub.statistics().db_reads_total == 0


async def test_resume_from_database_and_across_the_ring_boundary(
    storage: AsyncStorageBackend,
) -> None:
    hub_config = HubConfig(ring_max_events=5, page_size=7, resume_wait_s=0.05)
    async with instance(storage, hub_config) as (hub, w):
        await w.begin("s1", epoch=2)
        for i in range(50):
            await w.emit("s1", "delta", i)
        await w.flush()
        async with hub.subscribe("s1", after=(2, 3)) as sub:
            got = await take(sub, 47)
            assert seqs(got) == list(range(4, 51))
            for i in range(50, 55):  # and it carries on live
                await w.emit("s1", "delta", i)
            assert seqs(await take(sub, 5)) == list(range(51, 56))
        reads = hub.statistics().db_reads
        assert reads["resume"] == 1 and reads.get("catch_up", 0) >= 1


async def test_resume_from_an_old_epoch_gets_reset_or_exact_continuation(
    storage: AsyncStorageBackend,
) -> None:
    async with instance(storage) as (_, w):
        await w.begin("s1", epoch=1)
        for i in range(5):
            await w.emit("s1", "delta", i)
        await w.flush()
    # A new holder on a fresh instance: epoch 2 continues after the stored seq 5.
    async with instance(storage) as (hub, w):
        assert await w.begin("s1", epoch=2) == 5
        for i in range(3):
            await w.emit("s1", "delta", i)
        await w.flush()
        # A client that saw seq 5 of epoch 1 (stored) continues exactly.
        async with hub.subscribe("s1", after=(1, 5)) as sub:
            got = await take(sub, 3)
            assert [(e.epoch, e.seq) for e in got if isinstance(e, StreamEvent)] == [
                (2, 6),
                (2, 7),
                (2, 8),
            ]
        # One that claims seq 7 of epoch 1 saw events a superseded writer never stored.
        async with hub.subscribe("s1", after=(1, 7)) as sub:
            first = (await take(sub, 1))[0]
            assert isinstance(first, StreamReset)
            assert first.reason == "epoch_changed" and first.seq == 8
        # One from the future cannot be served either.
        async with hub.subscribe("s1", after=(2, 99)) as sub:
            first = (await take(sub, 1))[0]
            assert isinstance(first, StreamReset) and first.reason == "unknown_resume_point"
            await w.emit("s1", "delta", "after reset")
            assert seqs(await take(sub, 1)) == [9]


async def test_new_epoch_in_the_ring_resets_subscribers_that_saw_superseded_events(
    storage: AsyncStorageBackend,
) -> None:
    async with (
        BroadcastHub(storage) as hub,
        StreamEventWriter(storage, hub, StreamConfig(batch=SLOW_TIMER)) as old,
        StreamEventWriter(storage, hub, StreamConfig(batch=SLOW_TIMER)) as new,
    ):
        await old.begin("s1", epoch=1)
        async with hub.subscribe("s1") as sub:
            for i in range(4):
                old.emit_nowait("s1", "delta", i)  # never persisted: the holder "dies"
            assert seqs(await take(sub, 4)) == [1, 2, 3, 4]
            assert await new.begin("s1", epoch=2) == 0
            new.emit_nowait("s1", "delta", "fresh")
            got = await take(sub, 2)
            assert isinstance(got[0], StreamReset) and got[0].reason == "epoch_changed"
            assert got[0].seq == 0
            assert isinstance(got[1], StreamEvent) and (got[1].epoch, got[1].seq) == (2, 1)
            assert old.emit_nowait("s1", "delta", "zombie") is not None
            assert hub.statistics().dropped["stale_epoch"] == 1  # not delivered


async def test_slow_subscriber_does_not_slow_the_producer_and_catches_up(
    storage: AsyncStorageBackend,
) -> None:
    async with instance(storage, HubConfig(ring_max_events=10, page_size=100)) as (hub, w):
        await w.begin("s1", epoch=1)
        async with hub.subscribe("s1", after=(0, 0)) as slow:
            for i in range(1000):  # no await: the producer never waits for the subscriber
                assert w.emit_nowait("s1", "delta", i) is not None
            await w.flush()
            got = await take(slow, 1000)
            assert seqs(got) == list(range(1, 1001))
        assert hub.statistics().db_reads.get("catch_up", 0) >= 1


async def test_lagging_subscriber_is_disconnected_when_configured(
    storage: AsyncStorageBackend,
) -> None:
    config = HubConfig(ring_max_events=5, slow_subscriber=SlowSubscriberPolicy.DISCONNECT)
    async with instance(storage, config) as (hub, w):
        await w.begin("s1", epoch=1)
        async with hub.subscribe("s1") as sub:
            for i in range(20):
                await w.emit("s1", "delta", i)
            await w.flush()
            with pytest.raises(SubscriberLagged, match="fell behind"):
                await take(sub, 20)
        assert hub.statistics().lagged_disconnects == 1


async def test_idle_rings_are_evicted_and_capped(storage: AsyncStorageBackend) -> None:
    # The hub's time is a ManualClock: its sweeper cannot evict a ring behind the test's
    # back on a slow run, and idleness is a clock step, not a sleep.
    clock = ManualClock()
    config = HubConfig(ring_idle_ttl_s=60.0, max_rings=10)
    async with (
        BroadcastHub(storage, config, clock=clock) as hub,
        StreamEventWriter(storage, hub, StreamConfig()) as w,
    ):
        for s in range(30):
            await w.begin(f"s{s}", epoch=1)
            await w.emit(f"s{s}", "delta", s)
            w.end(f"s{s}")
        assert hub.statistics().rings == 10  # the LRU cap
        await w.flush()
        assert w.statistics().sessions == 0  # ended sessions leave once persisted
        assert hub.evict_idle() == 0  # not idle for the TTL yet
        clock.advance(59.0)
        assert hub.evict_idle() == 0
        clock.advance(2.0)
        assert hub.evict_idle() == 10
        assert hub.statistics().rings == 0


async def test_two_instances_deliver_each_others_events_in_order(storage_url: str) -> None:
    # Advances only (the fetch path; inline delivery: tests/contract/test_stream_delivery.py).
    advances_only = StreamConfig(notify_inline=False)
    async with (
        open_storage(storage_url) as store_a,
        open_storage(storage_url) as store_b,
        instance(store_a, stream_config=advances_only) as (_, writer_a),
        instance(store_b) as (hub_b, _),
    ):
        async with hub_b.subscribe("shared") as sub:
            await writer_a.begin("shared", epoch=1)
            for i in range(120):
                await writer_a.emit("shared", "delta", {"i": i})
                if i % 40 == 39:
                    await writer_a.flush()
            got = await take(sub, 120)
            assert seqs(got) == list(range(1, 121))
            assert [e.payload["i"] for e in got if isinstance(e, StreamEvent)] == list(range(120))
        stats = hub_b.statistics()
        # One read per session per notification, never one per event.
        assert 1 <= stats.db_reads["fan_in"] <= stats.notifications


async def test_resume_point_in_flight_from_another_instance_is_awaited(storage_url: str) -> None:
    hub_config = HubConfig(resume_wait_s=5)
    async with (
        open_storage(storage_url) as store_a,
        open_storage(storage_url) as store_b,
        instance(store_a, stream_config=StreamConfig(batch=SLOW_TIMER)) as (_, writer_a),
        instance(store_b, hub_config) as (hub_b, _),
    ):
        await writer_a.begin("s1", epoch=4)
        for i in range(5):
            writer_a.emit_nowait("s1", "delta", i)
        # A client saw seq 3 live on instance A and reconnects to B before A flushed.
        got: list[StreamEvent | StreamReset] = []

        async def read(sub: Subscription) -> None:
            got.extend(await take(sub, 2))

        async with hub_b.subscribe("s1", after=(4, 3)) as sub, anyio.create_task_group() as tg:
            tg.start_soon(read, sub)
            # B read the database, did not find seq 3 and waits for it: only then A flushes.
            await wait_for(
                lambda: hub_b.statistics().db_reads.get("resume", 0) >= 1,
                what="the subscriber's resume read",
            )
            await writer_a.flush()
        assert seqs(got) == [4, 5]
        assert hub_b.statistics().resets == {}  # awaited, not reset to the head


async def test_legacy_poll_delivery_reads_the_database(storage: AsyncStorageBackend) -> None:
    config = HubConfig(mode=DeliveryMode.POLL, poll_interval_s=0.01)
    async with instance(storage, config) as (hub, w):
        await w.begin("s1", epoch=1)
        await w.emit("s1", "delta", 0)
        await w.flush()
        got: list[StreamEvent | StreamReset] = []

        async def read(sub: Subscription) -> None:
            got.extend(await take(sub, 4))

        async with hub.subscribe("s1", after=(1, 1)) as sub, anyio.create_task_group() as tg:
            tg.start_soon(read, sub)
            # The subscriber polls an empty result before the events exist.
            await wait_for(lambda: hub.statistics().db_reads.get("poll", 0) >= 1, what="a poll")
            for i in range(1, 5):
                await w.emit("s1", "delta", i)
            await w.flush()
        assert seqs(got) == [2, 3, 4, 5]
        stats = hub.statistics()
        # Every delivery came from the database (on a slow machine the resume read may
        # already find them all), and no ring was used.
        assert stats.db_reads_total >= 1 and stats.live_db_reads + stats.db_reads["resume"] >= 1
        assert stats.rings == 0


async def test_legacy_poll_live_start_is_fixed_by_anchor(storage: AsyncStorageBackend) -> None:
    """``anchor()`` fixes where a live poll subscription starts (the endpoints call it before
    their ``ready``): events stored after it, before any iteration, are all delivered. In
    memory mode it reads nothing (the ring fixed the start at ``subscribe``)."""
    config = HubConfig(mode=DeliveryMode.POLL, poll_interval_s=0.01)
    async with instance(storage, config) as (hub, w):
        await w.begin("s1", epoch=1)
        await w.emit("s1", "delta", 0)
        await w.flush()
        async with hub.subscribe("s1") as sub:
            await sub.anchor()  # the stored head: seq 1
            await sub.anchor()  # fixed already: reads nothing
            assert hub.statistics().db_reads == {"poll": 1}
            for i in range(1, 4):
                await w.emit("s1", "delta", i)
            await w.flush()
            assert seqs(await take(sub, 3)) == [2, 3, 4]
    async with instance(storage) as (hub, _), hub.subscribe("s1") as sub:
        reads = storage.statistics().statements.get("last_stream_seq", 0)
        await sub.anchor()
        assert storage.statistics().statements.get("last_stream_seq", 0) == reads
        assert hub.statistics().db_reads == {}


async def test_legacy_unbatched_writes_insert_each_event(storage: AsyncStorageBackend) -> None:
    async with instance(storage, stream_config=StreamConfig(batching=False)) as (hub, w):
        await w.begin("s1", epoch=1)
        async with hub.subscribe("s1") as sub:
            for i in range(5):
                await w.emit("s1", "delta", i)
                assert len(await storage.load_stream_events("s1")) == i + 1
            assert seqs(await take(sub, 5)) == [1, 2, 3, 4, 5]
        stats = w.statistics()
        assert stats.insert_statements == 5 and stats.persisted == 5


async def test_bad_input_is_refused_and_consumes_no_seq(storage: AsyncStorageBackend) -> None:
    async with instance(storage) as (_, w):
        with pytest.raises(StreamNotStarted):
            w.emit_nowait("nobody", "delta", 1)
        await w.begin("s1", epoch=1)
        with pytest.raises(InvalidInput, match="NaN"):
            w.emit_nowait("s1", "delta", {"x": float("nan")})
        with pytest.raises(InvalidInput):
            w.emit_nowait("s1", "", 1)
        with pytest.raises(InvalidInput, match="JSON"):
            w.emit_nowait("s1", "delta", {1, 2})
        ev = w.emit_nowait("s1", "delta", "ok")
        assert ev is not None and ev.seq == 1
        with pytest.raises(InvalidInput, match="older"):
            await w.begin("s1", epoch=0)


async def test_full_writer_drops_ephemeral_events_without_a_gap(
    storage: AsyncStorageBackend,
) -> None:
    tiny = BatchConfig(
        max_batch=5, flush_interval_s=60, capacity=5, overflow=OverflowPolicy.DROP_NEWEST
    )
    async with instance(storage, stream_config=StreamConfig(batch=tiny)) as (hub, w):
        await w.begin("s1", epoch=1)
        async with hub.subscribe("s1") as sub:
            # max_batch=5 makes the first five due at once; hold them by filling first.
            results: list[StreamEvent | None] = []
            for i in range(8):
                try:
                    results.append(w.emit_nowait("s1", "delta", i))
                except Dropped as exc:  # a WouldBlock, counted: the *_nowait rule
                    assert isinstance(exc, anyio.WouldBlock) and exc.reason == "overflow_newest"
                    results.append(None)
            kept = [r.seq for r in results if r is not None]
            assert kept == list(range(1, len(kept) + 1))  # contiguous: drops take no seq
            assert w.statistics().dropped.get("overflow_newest", 0) == 8 - len(kept)
            await w.flush()
            final = await w.emit("s1", "turn_completed", {"ok": True})  # critical: waits
            assert final is not None and final.seq == len(kept) + 1
            got = await take(sub, len(kept) + 1)
            assert seqs(got) == list(range(1, len(kept) + 2))


async def test_events_that_cannot_be_stored_are_counted_as_lost(storage_url: str) -> None:
    retry_fast = BatchConfig(max_batch=100, flush_interval_s=60, max_retries=1, retry_base_s=0.001)
    async with open_storage(storage_url) as store:
        hub = BroadcastHub(store, HubConfig(cross_instance=False))
        async with hub, StreamEventWriter(store, hub, StreamConfig(batch=retry_fast)) as w:
            await w.begin("s1", epoch=1)
            for i in range(3):
                w.emit_nowait("s1", "delta", i)
            await store.aclose()  # the database goes away under the writer
            await w.flush()
            stats = w.statistics()
            assert stats.lost == 3 and stats.persisted == 0
            assert stats.writer is not None and stats.writer.dead_lettered == 3


async def test_session_handle_begins_and_ends(storage: AsyncStorageBackend) -> None:
    async with instance(storage) as (_, w):
        async with w.session("s1", epoch=1) as stream:
            await stream.emit("delta", "a")
            stream.emit_nowait("tool_result", {"r": 1})
        await w.flush()
        assert [e.kind for e in await storage.load_stream_events("s1")] == ["delta", "tool_result"]
        assert w.statistics().sessions == 0


async def test_a_subscription_dropped_without_closing_does_not_pin_its_ring(
    storage: AsyncStorageBackend,
) -> None:
    import gc

    async with instance(storage, HubConfig(ring_idle_ttl_s=0.01)) as (hub, _):
        sub = hub.subscribe("forgotten")
        del sub
        gc.collect()
        await anyio.sleep(0.02)
        assert hub.evict_idle() == 1


async def test_a_superseded_writer_never_overwrites_the_new_holders_events(
    storage: AsyncStorageBackend,
) -> None:
    async with (
        BroadcastHub(storage) as hub_a,
        BroadcastHub(storage) as hub_b,
        StreamEventWriter(storage, hub_a, StreamConfig(batch=SLOW_TIMER)) as old,
        StreamEventWriter(storage, hub_b, StreamConfig(batch=SLOW_TIMER)) as new,
    ):
        # A (epoch 1) lost its lease without noticing; B (epoch 2) took the session over.
        await old.begin("s", epoch=1)
        await new.begin("s", epoch=2)
        new.emit_nowait("s", "delta", "B first")
        await new.flush()
        old.emit_nowait("s", "delta", "late zombie from A")  # same seq 1, older epoch
        await old.flush()
        assert old.statistics().refused == 1
        # The refused writer stops: it may not emit under its lost epoch any more.
        with pytest.raises(LeaseLost):
            old.emit_nowait("s", "delta", "zombie from A")
        new.emit_nowait("s", "turn_completed", "B's real event")  # seq 2, epoch 2
        await new.flush()
        stored = await storage.load_stream_events("s")
        assert [(e.epoch, e.seq, e.payload) for e in stored] == [
            (2, 1, "B first"),
            (2, 2, "B's real event"),
        ]
        assert new.statistics().refused == 0 and new.statistics().lost == 0
