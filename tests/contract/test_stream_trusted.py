"""Issue 16: the stream writer's trusted append path, on both drivers.

The batched ``StreamEventWriter`` stores the rows its own ``emit`` built and checked,
without validating them again in ``append_stream_events``. That is safe only if ``emit``
(and ``begin``) refuse everything the public storage method would refuse: these tests
give them every kind of bad input the storage contract names and check that it is refused
with ``InvalidInput`` at the call, before anything is published, buffered or written, on
the batched path, the waiting ``emit`` and the legacy path alike. They also check that
what the trusted path stores is exactly what was emitted, and that it is the path taken.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig, Subscription
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import (
    AsyncStorageBackend,
    InvalidInput,
    NewStreamEvent,
    StreamEvent,
    _validate,
    open_storage,
)

SLOW_TIMER = BatchConfig(max_batch=10_000, flush_interval_s=60, capacity=20_000)

BAD_KINDS: list[Any] = ["", "k" * 65, "bad\x00kind", "lone \ud800 surrogate", 7, None]
BAD_PAYLOADS: list[Any] = [
    float("nan"),
    {"x": float("inf")},
    {1, 2},
    b"bytes",
    "NUL \x00 inside",
    {"text": "lone \udc80 surrogate"},
    2**64,
    [-(2**63) - 1],
]


@asynccontextmanager
async def writer(
    storage: AsyncStorageBackend, **config: Any
) -> AsyncIterator[tuple[BroadcastHub, StreamEventWriter]]:
    async with (
        BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
        StreamEventWriter(storage, hub, StreamConfig(batch=SLOW_TIMER, **config)) as w,
    ):
        yield hub, w


async def assert_nothing_happened(
    storage: AsyncStorageBackend, w: StreamEventWriter, sub: Subscription, session: str
) -> None:
    """Nothing was published, buffered, stored or lost, and no seq was used up."""
    await w.flush()
    stats = w.statistics()
    assert (stats.emitted, stats.persisted, stats.lost) == (0, 0, 0)
    assert stats.writer is None or stats.writer.accepted == 0
    assert await storage.load_stream_events(session) == []
    event = await w.emit(session, "delta", "the next good one")
    assert event is not None and event.seq == 1
    with anyio.fail_after(10):
        first = await sub.__anext__()
    assert isinstance(first, StreamEvent) and first.payload == "the next good one"
    await w.flush()
    assert [e.seq for e in await storage.load_stream_events(session)] == [1]


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "legacy"])
@pytest.mark.parametrize("kind", BAD_KINDS, ids=repr)
async def test_a_bad_kind_is_refused_at_emit_and_nothing_is_written(
    storage: AsyncStorageBackend, kind: Any, batching: bool
) -> None:
    async with writer(storage, batching=batching) as (hub, w):
        await w.begin("s", epoch=1)
        async with hub.subscribe("s") as sub:
            if batching:
                with pytest.raises(InvalidInput, match="kind"):
                    w.emit_nowait("s", kind, {"text": "t"})
            with pytest.raises(InvalidInput, match="kind"):
                await w.emit("s", kind, {"text": "t"})
            await assert_nothing_happened(storage, w, sub, "s")


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "legacy"])
@pytest.mark.parametrize("payload", BAD_PAYLOADS, ids=repr)
async def test_a_bad_payload_is_refused_at_emit_and_nothing_is_written(
    storage: AsyncStorageBackend, payload: Any, batching: bool
) -> None:
    async with writer(storage, batching=batching) as (hub, w):
        await w.begin("s", epoch=1)
        async with hub.subscribe("s") as sub:
            if batching:
                with pytest.raises(InvalidInput, match="payload"):
                    w.emit_nowait("s", "delta", payload)
            with pytest.raises(InvalidInput, match="payload"):
                await w.emit("s", "delta", payload)
            await assert_nothing_happened(storage, w, sub, "s")


@pytest.mark.parametrize("epoch", [2**63, -1, True, 1.0, "1"], ids=repr)
async def test_begin_refuses_an_epoch_the_database_cannot_store(
    storage: AsyncStorageBackend, epoch: Any
) -> None:
    async with writer(storage) as (hub, w):
        with pytest.raises(InvalidInput, match="epoch"):
            await w.begin("s", epoch=epoch)
        assert w.statistics().sessions == 0
        async with hub.subscribe("s") as sub:
            await w.begin("s", epoch=1)
            await assert_nothing_happened(storage, w, sub, "s")


@pytest.mark.parametrize("session", ["", "x" * 256, "nul\x00id", "lone \ud800", 3], ids=repr)
async def test_begin_refuses_a_bad_session_id(storage: AsyncStorageBackend, session: Any) -> None:
    async with writer(storage) as (_, w):
        with pytest.raises(InvalidInput, match="session_id"):
            await w.begin(session, epoch=1)
        assert w.statistics().sessions == 0


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "legacy"])
async def test_a_seq_beyond_64_bits_is_refused_at_emit(
    storage: AsyncStorageBackend, batching: bool
) -> None:
    top = 2**63 - 1
    await storage.append_stream_events([NewStreamEvent("full", 1, top, "delta", "last")])
    async with writer(storage, batching=batching) as (hub, w):
        assert await w.begin("full", epoch=1) == top
        if batching:
            with pytest.raises(InvalidInput, match="seq"):
                w.emit_nowait("full", "delta", "one too many")
        with pytest.raises(InvalidInput, match="seq"):
            await w.emit("full", "delta", "one too many")
        await w.flush()
        stats = w.statistics()
        assert (stats.emitted, stats.persisted, stats.lost) == (0, 0, 0)
        assert hub.statistics().published == 0
        assert [e.seq for e in await storage.load_stream_events("full")] == [top]


async def test_the_trusted_path_stores_exactly_what_was_emitted(
    storage: AsyncStorageBackend,
) -> None:
    values: list[Any] = [
        1e16,
        -0.0,
        2**63 - 1,
        -(2**63),
        {"b": 1.5e-7, "a": [True, None, "é 😀 \u2028"]},
        "",
        [],
    ]
    sessions = ["plain", "ünï 😀 code", "x" * 255]
    kinds = ["delta", "k" * 64, "ключ 😀"]
    async with writer(storage) as (_, w):
        for n, sid in enumerate(sessions):
            await w.begin(sid, epoch=n)
        for i, value in enumerate(values):
            for n, sid in enumerate(sessions):
                w.emit_nowait(sid, kinds[(i + n) % len(kinds)], value)
        await w.flush()
        assert w.statistics().persisted == len(values) * len(sessions)
    for n, sid in enumerate(sessions):
        stored = await storage.load_stream_events(sid)
        assert [(e.session_id, e.epoch, e.seq) for e in stored] == [
            (sid, n, seq) for seq in range(1, len(values) + 1)
        ]
        assert [e.kind for e in stored] == [kinds[(i + n) % len(kinds)] for i in range(len(values))]
        assert [orjson.dumps(e.payload) for e in stored] == [orjson.dumps(v) for v in values]


async def test_the_batched_writer_does_not_validate_its_rows_twice(
    storage: AsyncStorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched writer takes the trusted path; the legacy one the public, checked one."""
    calls: list[int] = []
    check = _validate.prepare_stream_events

    def counting(events: object) -> list[tuple[str, int, int, str, bytes]]:
        rows = check(events)
        calls.append(len(rows))
        return rows

    monkeypatch.setattr(_validate, "prepare_stream_events", counting)
    async with writer(storage) as (_, w):
        await w.begin("b", epoch=1)
        for i in range(20):
            w.emit_nowait("b", "delta", i)
        await w.flush()
        assert w.statistics().persisted == 20
    assert calls == []
    async with writer(storage, batching=False) as (_, w):
        await w.begin("l", epoch=1)
        for i in range(3):
            await w.emit("l", "delta", i)
    assert calls == [1, 1, 1]
    assert len(await storage.load_stream_events("b")) == 20


async def test_a_failed_sqlite_append_writes_nothing_and_leaves_no_transaction(
    tmp_path: Path,
) -> None:
    """SQLite runs the whole append transaction in one call on its thread: a statement that
    fails half-way through the batch rolls all of it back, and the writer connection is
    free for the next write (a real failure: a trigger refuses one row)."""
    path = tmp_path / "fail.db"
    async with open_storage(f"sqlite:///{path}", migrate=True) as store:
        other = sqlite3.connect(path)
        other.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON stream_events WHEN NEW.kind = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom refused'); END"
        )
        other.commit()
        async with writer(store) as (_, w):
            await w.begin("s", epoch=1)
            w.emit_nowait("s", "delta", "stored with the batch or not at all")
            w.emit_nowait("s", "boom", "refused by the trigger")
            await w.flush()
            stats = w.statistics()
            assert (stats.persisted, stats.lost) == (0, 2)
            assert await store.load_stream_events("s") == []
        other.execute("DROP TRIGGER boom")
        other.commit()
        other.close()
        result = await store.append_stream_events([NewStreamEvent("s", 1, 1, "delta", "again")])
        assert result.stored == 1
        assert [e.payload for e in await store.load_stream_events("s")] == ["again"]
