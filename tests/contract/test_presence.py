"""Instance presence (issue 19, migration 0015) on both drivers: each runtime instance
publishes its live stream subscribers per session as one row with an expiry, so a dashboard
in any process can sum them over the fleet. ``publish_presence`` is one upsert,
``list_presence`` returns live rows only (the database's clock), ``withdraw_presence``
deletes one row and ``purge_presence`` the expired ones; bad input is refused before
anything is written."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from asyncstore.storage import AsyncStorageBackend, InvalidInput
from asyncstore.storage.base import PRESENCE_MAX_BYTES, PRESENCE_MAX_SESSIONS
from tests.waiting import wait_for


async def test_publish_upserts_one_row_per_instance_and_lists_live_rows(
    storage: AsyncStorageBackend,
) -> None:
    first = await storage.publish_presence("web-1", {"chat-1": 2, "chat-2": 1}, ttl_s=60)
    assert first.instance_id == "web-1" and first.counts == {"chat-1": 2, "chat-2": 1}
    assert first.host == socket.gethostname() and first.pid == os.getpid()
    assert first.expires_at > first.seen_at
    await storage.publish_presence("web-2", {}, ttl_s=60, host="box-b", pid=7)
    again = await storage.publish_presence("web-1", {"chat-1": 3}, ttl_s=60)
    assert again.seen_at >= first.seen_at
    listed = await storage.list_presence()
    assert [(p.instance_id, p.host, p.pid, dict(p.counts)) for p in listed] == [
        ("web-1", socket.gethostname(), os.getpid(), {"chat-1": 3}),
        ("web-2", "box-b", 7, {}),
    ]
    assert await storage.withdraw_presence("web-1") is True
    assert await storage.withdraw_presence("web-1") is False
    assert [p.instance_id for p in await storage.list_presence()] == ["web-2"]


async def test_expired_rows_are_not_listed_and_are_purged(storage: AsyncStorageBackend) -> None:
    await storage.publish_presence("gone", {"chat-1": 1}, ttl_s=0.05)
    await storage.publish_presence("alive", {"chat-1": 4}, ttl_s=600)

    async def only_alive() -> bool:
        return [p.instance_id for p in await storage.list_presence()] == ["alive"]

    await wait_for(only_alive, what="the expired row left out of list_presence")
    assert await storage.purge_presence() == 1
    assert await storage.purge_presence() == 0
    # The purge removed the row itself: publishing again under that id starts afresh.
    assert await storage.withdraw_presence("gone") is False
    assert [p.instance_id for p in await storage.list_presence()] == ["alive"]


async def test_a_row_at_the_session_cap_round_trips_in_order(storage: AsyncStorageBackend) -> None:
    counts = {f"s{i}": i for i in range(PRESENCE_MAX_SESSIONS)}
    row = await storage.publish_presence("big", counts, ttl_s=60)
    assert row.counts == counts
    (listed,) = await storage.list_presence()
    assert listed.counts == counts and list(listed.counts) == list(counts)
    assert await storage.publish_presence("big", {"x" * 255: 2**31 - 1}, ttl_s=60)


def _too_many_bytes() -> dict[str, int]:
    # Few sessions, long non-ASCII ids: the byte cap, not the session cap, refuses it.
    n = PRESENCE_MAX_BYTES // 500 + 1  # each entry is over 500 bytes of JSON
    assert n <= PRESENCE_MAX_SESSIONS
    return {f"{i:06d}" + "\u00e9" * 249: 1 for i in range(n)}


@pytest.mark.parametrize(
    "args",
    [
        {"instance_id": "", "counts": {}, "ttl_s": 5},
        {"instance_id": "x" * 256, "counts": {}, "ttl_s": 5},
        {"instance_id": "a\x00b", "counts": {}, "ttl_s": 5},
        {"instance_id": 5, "counts": {}, "ttl_s": 5},
        {"instance_id": "i", "counts": [("s", 1)], "ttl_s": 5},
        {"instance_id": "i", "counts": {"s": -1}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"s": 1.0}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"s": True}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"s": 2**63}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"": 1}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"s\ud800": 1}, "ttl_s": 5},
        {"instance_id": "i", "counts": {7: 1}, "ttl_s": 5},
        {"instance_id": "i", "counts": {"s": 1}, "ttl_s": 0},
        {"instance_id": "i", "counts": {"s": 1}, "ttl_s": float("nan")},
        {"instance_id": "i", "counts": {"s": 1}, "ttl_s": 5, "host": ""},
        {"instance_id": "i", "counts": {"s": 1}, "ttl_s": 5, "pid": -1},
        {
            "instance_id": "i",
            "counts": dict.fromkeys(map(str, range(PRESENCE_MAX_SESSIONS + 1)), 1),
            "ttl_s": 5,
        },
        {"instance_id": "i", "counts": _too_many_bytes(), "ttl_s": 5},
    ],
    ids=lambda a: ",".join(f"{k}={str(v)[:12]!r}" for k, v in a.items()),
)
async def test_bad_presence_is_refused_and_nothing_is_written(
    storage: AsyncStorageBackend, args: dict[str, Any]
) -> None:
    await storage.publish_presence("i", {"kept": 1}, ttl_s=60)
    with pytest.raises(InvalidInput):
        await storage.publish_presence(**args)
    assert [(p.instance_id, dict(p.counts)) for p in await storage.list_presence()] == [
        ("i", {"kept": 1})
    ]


async def test_the_caps_are_named_in_the_refusal(storage: AsyncStorageBackend) -> None:
    many = {f"s{i}": 1 for i in range(PRESENCE_MAX_SESSIONS + 1)}
    with pytest.raises(InvalidInput, match=f"at most {PRESENCE_MAX_SESSIONS} sessions"):
        await storage.publish_presence("i", many, ttl_s=5)
    with pytest.raises(InvalidInput, match=f"the limit is {PRESENCE_MAX_BYTES} bytes"):
        await storage.publish_presence("i", _too_many_bytes(), ttl_s=5)


@pytest.mark.parametrize("bad", ["", 5, "x" * 256])
async def test_withdraw_refuses_a_bad_instance_id(storage: AsyncStorageBackend, bad: Any) -> None:
    with pytest.raises(InvalidInput):
        await storage.withdraw_presence(bad)
