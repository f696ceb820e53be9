"""Issue 16: the stream writer's flush notification sent with its insert, on both drivers.

With ``stream.notify_with_insert`` (the default) a flush's notification goes out in the
append itself: on Postgres ``pg_notify`` in the append statement (delivered on commit, one
round trip with the rows), on SQLite in process right after the commit, and not at all
while nothing in the process listens. No separate ``notify`` call is issued. When the fence
refuses part of a batch, the insert sends nothing and the writer announces the events it
stored before the next flush. Off, the separate notifier sends it, as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import decode_advance, decode_stream_notes
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import (
    AsyncStorageBackend,
    InvalidInput,
    NotificationStream,
    StreamAppend,
)

SLOW_TIMER = BatchConfig(max_batch=10_000, flush_interval_s=60, capacity=20_000)
CHANNEL = StreamConfig().channel


@asynccontextmanager
async def writer(
    storage: AsyncStorageBackend, **config: object
) -> AsyncIterator[StreamEventWriter]:
    async with StreamEventWriter(storage, None, StreamConfig(batch=SLOW_TIMER, **config)) as w:
        yield w


async def receive(notes: NotificationStream) -> str:
    with anyio.fail_after(5):
        return (await notes.receive()).payload


async def nothing_more(notes: NotificationStream) -> None:
    with anyio.move_on_after(0.2):
        extra = await notes.receive()
        raise AssertionError(f"an unexpected notification: {extra}")


def statements(storage: AsyncStorageBackend, name: str) -> int:
    return storage.statistics().statements.get(name, 0)


async def test_the_flush_notification_rides_with_the_insert(storage: AsyncStorageBackend) -> None:
    async with storage.listen(CHANNEL) as notes, writer(storage) as w:
        for s in range(3):
            await w.begin(f"s{s}", epoch=4)
        for i in range(30):
            w.emit_nowait(f"s{i % 3}", "delta", {"i": i})
        notify_before = statements(storage, "notify")
        await w.flush()
        payload = await receive(notes)
        # The events themselves, inline, once stored: a receiver needs no read.
        decoded = {n.session_id: n for n in decode_stream_notes(payload)}
        assert sorted(decoded) == ["s0", "s1", "s2"]
        for s in range(3):
            note = decoded[f"s{s}"]
            assert (note.epoch, note.first, note.last) == (4, 1, 10)
            assert note.events is not None
            assert [e.payload["i"] for e in note.events] == list(range(s, 30, 3))
        await nothing_more(notes)
        assert statements(storage, "notify") == notify_before  # no separate NOTIFY
        assert w.statistics().notifications == 1
        stored = await storage.load_stream_events("s1")
        assert [e.payload["i"] for e in stored] == list(range(1, 30, 3))


async def test_the_previous_path_sends_it_from_the_notifier(storage: AsyncStorageBackend) -> None:
    async with storage.listen(CHANNEL) as notes, writer(storage, notify_with_insert=False) as w:
        await w.begin("s1", epoch=2)
        for i in range(5):
            w.emit_nowait("s1", "delta", i)
        notify_before = statements(storage, "notify")
        await w.flush()
        notes_got = decode_stream_notes(await receive(notes))
        assert [(n.session_id, n.epoch, n.first, n.last) for n in notes_got] == [("s1", 2, 1, 5)]
        assert statements(storage, "notify") == notify_before + 1


async def test_a_refused_batch_announces_what_it_stored_before_the_next_flush(
    storage: AsyncStorageBackend,
) -> None:
    old = await storage.acquire_lease("old", "holder-a", 30)
    assert old is not None
    assert await storage.release_lease("old", old.token)
    new = await storage.acquire_lease("old", "holder-b", 30)
    assert new is not None and new.token > old.token
    async with storage.listen(CHANNEL) as notes, writer(storage) as w:
        await w.begin("old", epoch=old.token)  # superseded: the fence refuses it
        await w.begin("kept", epoch=3)  # no lease row: accepted
        for i in range(4):
            w.emit_nowait("old", "delta", i)
            w.emit_nowait("kept", "delta", i)
        await w.flush()
        first = decode_stream_notes(await receive(notes))
        assert [(n.session_id, n.first, n.last) for n in first] == [("kept", 1, 4)]
        assert first[0].events is not None
        assert [e.payload for e in first[0].events] == [0, 1, 2, 3]
        assert w.statistics().refused == 4 and w.fenced("old")
        w.emit_nowait("kept", "delta", 4)
        await w.flush()
        second = decode_stream_notes(await receive(notes))
        assert [(n.session_id, n.first, n.last) for n in second] == [("kept", 5, 5)]
        await nothing_more(notes)
        assert await storage.load_stream_events("old") == []


async def test_advances_only_with_the_insert(storage: AsyncStorageBackend) -> None:
    async with storage.listen(CHANNEL) as notes, writer(storage, notify_inline=False) as w:
        await w.begin("s1", epoch=1)
        await w.begin("s2", epoch=1)
        for i in range(6):
            w.emit_nowait(f"s{i % 2 + 1}", "delta", i)
        await w.flush()
        assert sorted(decode_advance(await receive(notes))) == [("s1", 1, 1, 3), ("s2", 1, 1, 3)]


async def test_past_the_inline_budget_sessions_are_announced_by_their_advance(
    storage: AsyncStorageBackend,
) -> None:
    # Room for one session's events inline: the other is announced by its advance.
    async with storage.listen(CHANNEL) as notes, writer(storage, notify_inline_max_bytes=400) as w:
        await w.begin("a", epoch=1)
        await w.begin("b", epoch=1)
        for i in range(4):
            w.emit_nowait("a", "delta", {"text": "x" * 40, "i": i})
        for i in range(4):
            w.emit_nowait("b", "delta", {"text": "y" * 40, "i": i})
        await w.flush()
        got = {n.session_id: n for n in decode_stream_notes(await receive(notes))}
        assert (got["a"].first, got["a"].last, got["b"].first, got["b"].last) == (1, 4, 1, 4)
        assert got["a"].events is not None and len(got["a"].events) == 4
        assert got["b"].events is None


async def test_nothing_is_encoded_or_sent_while_nobody_listens_on_sqlite(
    storage: AsyncStorageBackend,
) -> None:
    async with writer(storage) as w:
        await w.begin("s1", epoch=1)
        for i in range(5):
            w.emit_nowait("s1", "delta", i)
        await w.flush()
        assert w.statistics().persisted == 5
        if storage.dialect == "sqlite":
            # In process only: with no subscriber nobody could receive it.
            assert w.statistics().notifications == 0
        else:
            # Other processes may listen: always sent.
            assert w.statistics().notifications == 1
        async with storage.listen(CHANNEL) as notes:
            w.emit_nowait("s1", "delta", 5)
            await w.flush()
            got = decode_stream_notes(await receive(notes))
            assert [(n.first, n.last) for n in got] == [(6, 6)]


@pytest.mark.parametrize("with_insert", [True, False])
async def test_the_storage_sends_payloads_only_if_nothing_is_refused(
    storage: AsyncStorageBackend, with_insert: bool
) -> None:
    """The trusted path's contract the writer relies on."""
    lease = await storage.acquire_lease("fenced", "holder", 30)
    assert lease is not None
    notify = (CHANNEL, ["one", "two"]) if with_insert else None
    async with storage.listen(CHANNEL) as notes:
        ok = await storage._append_stream_rows([("free", 1, 1, "delta", b"1")], notify=notify)
        assert ok == StreamAppend(1)
        if with_insert:
            assert [await receive(notes), await receive(notes)] == ["one", "two"]
        refused = await storage._append_stream_rows(
            [("free", 2, 1, "delta", b"2"), ("fenced", 1, lease.token + 1, "delta", b"3")],
            notify=notify,
        )
        assert refused == StreamAppend(1, frozenset({("fenced", lease.token + 1)}))
        await nothing_more(notes)


async def test_a_bad_channel_is_refused_when_the_writer_is_made(
    storage: AsyncStorageBackend,
) -> None:
    with pytest.raises(InvalidInput, match="channel"):
        StreamEventWriter(storage, None, StreamConfig(channel="no spaces"))
    # The previous path checks it at each notify (a counted failure), as before.
    StreamEventWriter(storage, None, StreamConfig(channel="no spaces", notify_with_insert=False))
