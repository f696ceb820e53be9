"""Cross-instance stream delivery on both drivers: two storage handles, a writer on one and
a hub on the other. Notifications carry the stored events, so a live remote subscriber
reads nothing; what they cannot carry is fetched; a superseding epoch resets subscribers
exactly as the fetch path does; old advances-only payloads are still understood."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import pytest

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig, StreamReset, encode_advances
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import (
    AsyncStorageBackend,
    NewStreamEvent,
    StreamEvent,
    encode_payload,
    open_storage,
)
from tests.waiting import wait_for

SLOW_TIMER = BatchConfig(max_batch=10_000, flush_interval_s=60, capacity=20_000)
CHANNEL = StreamConfig().channel

Item = StreamEvent | StreamReset


@asynccontextmanager
async def two_handles(url: str) -> AsyncIterator[tuple[AsyncStorageBackend, AsyncStorageBackend]]:
    async with open_storage(url) as store_a, open_storage(url) as store_b:
        yield store_a, store_b


async def take(sub: AsyncIterator[Item], n: int) -> list[Item]:
    out: list[Item] = []
    with anyio.fail_after(10):
        while len(out) < n:
            out.append(await sub.__anext__())
    return out


def view(items: list[Item]) -> list[tuple[object, ...]]:
    return [
        (i.epoch, i.seq, i.payload) if isinstance(i, StreamEvent) else (i.reason, i.epoch, i.seq)
        for i in items
    ]


async def test_remote_subscriber_reads_nothing_when_notifications_carry_the_events(
    storage_url: str,
) -> None:
    config = StreamConfig(batch=SLOW_TIMER)
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as writer,
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,  # before any write: the head is unknown here
    ):
        await writer.begin("s1", epoch=1)
        payloads = [{"i": i, "text": "héllo 日本"} for i in range(120)]
        for i, payload in enumerate(payloads):
            writer.emit_nowait("s1", "delta", payload)
            if i % 40 == 39:
                await writer.flush()
        got = await take(live, 120)
        stored = await store_a.load_stream_events("s1", limit=1000)
        assert [(e.epoch, e.seq, e.kind, e.payload) for e in got if isinstance(e, StreamEvent)] == [
            (e.epoch, e.seq, e.kind, e.payload) for e in stored
        ]
        # created_at is the writer's clock at the insert: the database's now() up to skew.
        for ev, row in zip(got, stored, strict=True):
            assert isinstance(ev, StreamEvent)
            assert abs(ev.created_at - row.created_at) < timedelta(seconds=5)
        stats = hub_b.statistics()
        assert stats.db_reads_total == 0, stats.db_reads
        assert stats.inline_events == 120
        # At most one notification per flush: the notifier merges the notes of flushes that
        # wait while it sends, so under load two flushes may share one (never more than 3).
        # The counter moves when the writer's NOTIFY returns, maybe after hub_b got it.
        await wait_for(lambda: writer.statistics().notifications >= 1)
        assert 1 <= writer.statistics().notifications <= 3


async def test_an_event_too_big_to_carry_is_fetched_once(storage_url: str) -> None:
    config = StreamConfig(batch=SLOW_TIMER)
    big = {"text": "x" * 9000}
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as writer,
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,
    ):
        await writer.begin("s1", epoch=1)
        got: list[Item] = []
        for batch in (["a", "b"], ["c", big, "d"], ["e", "f"]):
            for payload in batch:
                writer.emit_nowait("s1", "delta", payload)
            await writer.flush()
            # Wait for each flush to arrive, so the fetch of the big one has ended before
            # the next notification comes.
            got += await take(live, len(batch))
        assert [e.payload for e in got if isinstance(e, StreamEvent)] == [
            "a",
            "b",
            "c",
            big,
            "d",
            "e",
            "f",
        ]
        assert [e.seq for e in got if isinstance(e, StreamEvent)] == list(range(1, 8))
        stats = hub_b.statistics()
        assert dict(stats.db_reads) == {"fan_in": 1}
        assert stats.inline_events == 5  # all but the big one and d, which its fetch brought


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "advances-only"])
async def test_a_superseding_epoch_resets_remote_subscribers_as_the_fetch_path_does(
    storage_url: str, inline: bool
) -> None:
    config = StreamConfig(batch=SLOW_TIMER, notify_inline=inline)
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as old_holder,
        StreamEventWriter(store_a, None, config) as new_holder,
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,
    ):
        await old_holder.begin("s1", epoch=1)
        for i in range(5):
            old_holder.emit_nowait("s1", "delta", f"old{i + 1}")
        await old_holder.flush()
        first = await take(live, 5)
        # A new holder starts from the stored head (5); the old one still writes 6..8,
        # which the new epoch then replaces in part (6, 7).
        assert await new_holder.begin("s1", epoch=2) == 5
        for i in range(5, 8):
            old_holder.emit_nowait("s1", "delta", f"old{i + 1}")
        await old_holder.flush()
        second = await take(live, 3)
        new_holder.emit_nowait("s1", "delta", "new6")
        new_holder.emit_nowait("s1", "delta", "new7")
        await new_holder.flush()
        third = await take(live, 3)
        assert view(first + second + third) == [
            *[(1, s, f"old{s}") for s in range(1, 9)],
            ("epoch_changed", 2, 5),
            (2, 6, "new6"),
            (2, 7, "new7"),
        ]
        stats = hub_b.statistics()
        if inline:
            assert stats.db_reads_total == 0 and stats.inline_events == 10
        else:
            assert stats.db_reads.get("fan_in", 0) >= 3 and stats.inline_events == 0


async def test_old_advances_only_payloads_are_fetched(storage_url: str) -> None:
    async with (
        two_handles(storage_url) as (store_a, store_b),
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,
    ):
        # What a writer of the previous release does: store, then announce the advance.
        rows = [NewStreamEvent("s1", 3, s, "delta", encode_payload(s)) for s in range(1, 4)]
        assert (await store_a.append_stream_events(rows)).stored == 3
        (payload,) = encode_advances([("s1", 3, 1, 3)])
        await store_a.notify(CHANNEL, payload)
        got = await take(live, 3)
        assert view(got) == [(3, 1, 1), (3, 2, 2), (3, 3, 3)]
        assert hub_b.statistics().db_reads.get("fan_in") == 1


async def test_a_malformed_inline_body_falls_back_to_a_fetch(storage_url: str) -> None:
    async with (
        two_handles(storage_url) as (store_a, store_b),
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,
    ):
        rows = [NewStreamEvent("s1", 1, s, "delta", encode_payload(s)) for s in range(1, 3)]
        assert (await store_a.append_stream_events(rows)).stored == 2
        # The body claims one event for an advance of two: it is not trusted.
        await store_a.notify(CHANNEL, '[["s1",1,1,2],{"t":0,"e":[["delta",99]]}]')
        assert view(await take(live, 2)) == [(1, 1, 1), (1, 2, 2)]
        stats = hub_b.statistics()
        assert stats.db_reads.get("fan_in") == 1 and stats.inline_events == 0


async def test_a_remote_resume_waiter_is_served_from_an_inline_notification(
    storage_url: str,
) -> None:
    config = StreamConfig(batch=SLOW_TIMER)
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as writer,
        BroadcastHub(store_b, HubConfig(resume_wait_s=10)) as hub_b,
    ):
        await writer.begin("s1", epoch=4)
        for i in range(5):
            writer.emit_nowait("s1", "delta", i)
        # A client saw seq 3 live on the writer's instance and reconnects here before the
        # flush: its resume point is not stored yet, so it waits for the notification.
        async with hub_b.subscribe("s1", after=(4, 3)) as sub:
            async with anyio.create_task_group() as tg:
                got: list[Item] = []

                async def read() -> None:
                    got.extend(await take(sub, 2))

                tg.start_soon(read)
                # Its read found nothing once the statistics count it; it registers as a
                # waiter in the same step, before any notification can be handled.
                await wait_for(
                    lambda: hub_b.statistics().db_reads.get("resume", 0) >= 1,
                    what="the subscriber's resume read",
                )
                await writer.flush()
            assert view(got) == [(4, 4, 3), (4, 5, 4)]
        stats = hub_b.statistics()
        assert stats.inline_events == 5 and "fan_in" not in stats.db_reads


async def test_refused_events_are_never_carried_to_other_instances(storage_url: str) -> None:
    config = StreamConfig(batch=SLOW_TIMER)
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as old_holder,
        StreamEventWriter(store_a, None, config) as new_holder,
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as live,
    ):
        a = await store_a.acquire_lease("s1", "holder-a", 30)
        assert a is not None
        await old_holder.begin("s1", epoch=a.token)
        old_holder.emit_nowait("s1", "delta", "a1")
        await old_holder.flush()
        assert view(await take(live, 1)) == [(a.token, 1, "a1")]
        assert await store_a.release_lease("s1", a.token)
        b = await store_a.acquire_lease("s1", "holder-b", 30)
        assert b is not None and b.token > a.token
        # The superseded holder's next events are refused by the database: not announced.
        old_holder.emit_nowait("s1", "delta", "a2")
        old_holder.emit_nowait("s1", "delta", "a3")
        await old_holder.flush()
        assert old_holder.statistics().refused == 2
        assert await new_holder.begin("s1", epoch=b.token) == 1
        new_holder.emit_nowait("s1", "delta", "b2")
        await new_holder.flush()
        assert view(await take(live, 1)) == [(b.token, 2, "b2")]
        stats = hub_b.statistics()
        assert stats.db_reads_total == 0 and stats.inline_events == 2


async def test_events_beyond_the_inline_budget_are_announced_and_fetched(
    storage_url: str,
) -> None:
    # A budget for about two events: the rest of what waits for the notifier (as when it
    # lags) goes as the advance alone.
    config = StreamConfig(batch=SLOW_TIMER, notify_inline_max_bytes=60)
    async with (
        two_handles(storage_url) as (store_a, store_b),
        StreamEventWriter(store_a, None, config) as writer,
        BroadcastHub(store_b) as hub_b,
        hub_b.subscribe("s1") as s1,
        hub_b.subscribe("s2") as s2,
    ):
        await writer.begin("s1", epoch=1)
        await writer.begin("s2", epoch=1)
        writer.emit_nowait("s1", "delta", "small")
        for i in range(10):
            writer.emit_nowait("s2", "delta", {"i": i, "text": "x" * 20})
        await writer.flush()
        assert view(await take(s1, 1)) == [(1, 1, "small")]
        got = await take(s2, 10)
        assert [e.payload["i"] for e in got if isinstance(e, StreamEvent)] == list(range(10))
        stats = hub_b.statistics()
        assert stats.inline_events == 1 and stats.db_reads.get("fan_in") == 1
        assert writer.statistics().notifications == 1


async def test_advances_only_flag_sends_the_previous_format(storage_url: str) -> None:
    config = StreamConfig(batch=SLOW_TIMER, notify_inline=False)
    async with (
        open_storage(storage_url) as store,
        store.listen(CHANNEL) as notes,
        StreamEventWriter(store, None, config) as writer,
    ):
        await writer.begin("s1", epoch=2)
        for i in range(3):
            writer.emit_nowait("s1", "delta", i)
        await writer.flush()
        with anyio.fail_after(5):
            note = await notes.receive()
        assert note.payload == '[["s1",2,1,3]]'
