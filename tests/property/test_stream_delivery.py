"""Hypothesis: under random interleavings of emits, flushes, connects and disconnects-with-
resume, every subscriber sees each seq exactly once and in order, with no reset."""

from __future__ import annotations

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig, StreamReset, Subscription
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import StreamEvent, open_storage

SUBSCRIBERS = 3

op = st.one_of(
    st.tuples(st.just("emit"), st.integers(1, 12)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, SUBSCRIBERS - 1)),
    st.tuples(st.just("disconnect"), st.integers(0, SUBSCRIBERS - 1)),
    st.tuples(st.just("connect"), st.integers(0, SUBSCRIBERS - 1)),
)


async def _read_available(sub: Subscription, seen: list[int]) -> None:
    """Read whatever the subscription can give without waiting for new events."""
    while True:
        with anyio.move_on_after(0.005):
            item = await sub.__anext__()
            if isinstance(item, StreamReset):
                raise AssertionError(f"unexpected reset {item}")
            assert isinstance(item, StreamEvent)
            seen.append(item.seq)
            continue
        return


async def _scenario(ops: list[tuple[str, int]], ring_size: int, interval_ms: int) -> None:
    batch = BatchConfig(max_batch=7, flush_interval_s=interval_ms / 1000, capacity=10_000)
    hub_config = HubConfig(ring_max_events=ring_size, page_size=5, cross_instance=False)
    async with (
        open_storage("sqlite:///:memory:", migrate=True) as storage,
        BroadcastHub(storage, hub_config) as hub,
        StreamEventWriter(storage, hub, StreamConfig(batch=batch)) as writer,
    ):
        await writer.begin("s", epoch=1)
        emitted = 0
        seen: list[list[int]] = [[] for _ in range(SUBSCRIBERS)]
        subs: list[Subscription | None] = [
            hub.subscribe("s", after=(0, 0)) for _ in range(SUBSCRIBERS)
        ]
        for name, arg in ops:
            if name == "emit":
                for _ in range(arg):
                    emitted += 1
                    writer.emit_nowait("s", "delta", emitted)
            elif name == "flush":
                await writer.flush()
            elif name == "read" and (sub := subs[arg]) is not None:
                await _read_available(sub, seen[arg])
            elif name == "disconnect" and (sub := subs[arg]) is not None:
                await sub.aclose()
                subs[arg] = None
            elif name == "connect" and subs[arg] is None:
                last = seen[arg][-1] if seen[arg] else 0
                subs[arg] = hub.subscribe("s", after=(1 if last else 0, last))
        await writer.flush()
        for i in range(SUBSCRIBERS):
            sub = subs[i]
            if sub is None:
                last = seen[i][-1] if seen[i] else 0
                sub = hub.subscribe("s", after=(1 if last else 0, last))
            with anyio.fail_after(5):
                while len(seen[i]) < emitted:
                    item = await sub.__anext__()
                    assert isinstance(item, StreamEvent), item
                    seen[i].append(item.seq)
            await sub.aclose()
            assert seen[i] == list(range(1, emitted + 1)), (i, seen[i])
        assert hub.statistics().resets == {}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(op, max_size=40),
    ring_size=st.integers(1, 16),
    interval_ms=st.sampled_from([1, 20, 1000]),
)
def test_every_subscriber_sees_each_seq_once_in_order(
    ops: list[tuple[str, int]], ring_size: int, interval_ms: int
) -> None:
    anyio.run(_scenario, ops, ring_size, interval_ms)
