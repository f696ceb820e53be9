"""Issue 14: one number policy on both drivers: JSON values round-trip exactly.

What is stored is what comes back, to the type and the bit: ``1e16`` stays a float,
``-0.0`` keeps its sign, integers keep every digit, object keys keep their order. A value
orjson cannot encode (an integer beyond 64 bits, NaN, a lone surrogate) is refused with
``InvalidInput`` on both drivers. The oracle is driver-independent (orjson's own encoding),
so passing on both drivers means both return the same value for the same input.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asyncstore.storage import (
    AsyncStorageBackend,
    InvalidInput,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
)

SPECIAL_FLOATS = [-0.0, 0.0, 1e16, 5.942375405004405e16, 1e308, 5e-324, -1.5e-7, 2.0**63, 1e22]
SPECIAL_INTS = [2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]

NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(SPECIAL_FLOATS),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(SPECIAL_INTS),
)
KEYS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=4)
JSON_VALUES = st.recursive(
    NUMBERS | st.booleans() | st.none() | KEYS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def _exact(value: Any) -> bytes:
    # orjson's text tells 1e16 from 10000000000000000, -0.0 from 0.0, and keeps key order.
    return orjson.dumps(value)


async def _round_trips(storage: AsyncStorageBackend, value: Any) -> list[Any]:
    """Store ``value`` in every JSON column and read each back."""
    sid = f"n-{uuid.uuid4().hex[:12]}"
    [msg] = await storage.append_messages(sid, [NewMessage("user", value)])
    [loaded] = await storage.load_messages(sid)
    await storage.append_stream_events([NewStreamEvent(sid, 0, 1, "delta", value)])
    [event] = await storage.load_stream_events(sid)
    [task] = await storage.enqueue_tasks([NewTask(sid, value)])
    got_task = await storage.get_task(task.id)
    [out] = await storage.enqueue_outbox([NewOutboxMessage(sid, "a", value)])
    got_out = await storage.get_outbox(out.id)
    assert got_task is not None and got_out is not None
    return [
        msg.content,
        loaded.content,
        event.payload,
        task.payload,
        got_task.payload,
        out.payload,
        got_out.payload,
    ]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=JSON_VALUES)
@example(value=1e16)
@example(value=5.942375405004405e16)
@example(value=-0.0)
@example(value=[-0.0, {"b": 1e16, "a": 2**63 - 1}])
@example(value={"z": 1, "a": 2})
async def test_json_values_round_trip_exactly(storage: AsyncStorageBackend, value: Any) -> None:
    try:
        expected = _exact(value)
    except orjson.JSONEncodeError:
        with pytest.raises(InvalidInput):
            await _round_trips(storage, value)
        return
    for got in await _round_trips(storage, value):
        assert _exact(got) == expected


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30, [1, {"k": 2**65}]])
async def test_integers_beyond_64_bits_are_refused(
    storage: AsyncStorageBackend, value: Any
) -> None:
    with pytest.raises(InvalidInput):
        await storage.append_messages("big", [NewMessage("user", value)])
    with pytest.raises(InvalidInput):
        await storage.enqueue_tasks([NewTask("big", value)])
    assert await storage.load_messages("big") == []
    assert await storage.next_task_due_s("big") is None
