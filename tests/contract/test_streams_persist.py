"""Issue 16: the stream writer's persistence path after the per-event cuts.

``emit_nowait`` builds its ``StreamEvent`` by setting the slots (``new_stream_event``)
rather than through the frozen dataclass's ``__init__``: the event must be the same
value. ``open_stream_writer(clock=...)`` runs the writer on the clock it is given, like
``open_batch_writer``: the flush timer and the events' ``created_at`` follow it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import anyio
import pytest

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig
from asyncstore.orchestrator.streams import StreamConfig, open_stream_writer
from asyncstore.orchestrator.streams_session import new_stream_event
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import AsyncStorageBackend, StreamEvent
from tests.waiting import wait_for


def test_the_fast_event_is_the_same_value_as_the_dataclass_one() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    payload = {"text": "hi", "i": 3}
    fast = new_stream_event("s-1", 7, 42, "delta", payload, at)
    slow = StreamEvent("s-1", 7, 42, "delta", payload, at)
    assert type(fast) is StreamEvent
    assert fast == slow and repr(fast) == repr(slow)
    hashable = ("s-1", 7, 42, "delta", "text", at)  # a dict payload is not hashable
    assert hash(new_stream_event(*hashable)) == hash(StreamEvent(*hashable))
    assert dataclasses.astuple(fast) == ("s-1", 7, 42, "delta", payload, at)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.seq = 43  # type: ignore[misc]


async def test_open_stream_writer_reads_the_clock_it_is_given(
    storage: AsyncStorageBackend,
) -> None:
    clock = ManualClock()
    config = StreamConfig(batch=BatchConfig(max_batch=100, flush_interval_s=30.0))
    async with (
        BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
        open_stream_writer(storage, hub, config, clock=clock) as writer,
    ):
        await writer.begin("clocked", epoch=1)
        event = writer.emit_nowait("clocked", "delta", {"text": "t"})
        assert event.created_at == datetime.fromtimestamp(clock.time(), UTC)
        await clock.wait_sleepers(1)  # the flusher waits out the 30 s interval on the clock
        await anyio.wait_all_tasks_blocked()
        assert writer.statistics().persisted == 0
        assert await storage.load_stream_events("clocked") == []
        clock.advance(30.001)
        await wait_for(lambda: writer.statistics().persisted == 1, what="the timed flush")
        stored = await storage.load_stream_events("clocked")
        assert [(e.seq, e.payload) for e in stored] == [(1, {"text": "t"})]
