"""Contract: chat messages and stream events, on both drivers."""

from __future__ import annotations

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    InvalidInput,
    LeaseLost,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    StreamAppend,
)

WEIRD_ID = "sess'; DROP TABLE chat_messages; --\u00e9\u4e2d\U0001f600%_\\"


async def test_append_assigns_gap_free_seqs_from_one(storage: AsyncStorageBackend) -> None:
    first = await storage.append_messages("s", [NewMessage("user", "a"), NewMessage("bot", "b")])
    second = await storage.append_messages("s", [NewMessage("user", {"x": [1, 2]})])
    assert [m.seq for m in first + second] == [1, 2, 3]
    loaded = await storage.load_messages("s")
    assert [(m.seq, m.role, m.content) for m in loaded] == [
        (1, "user", "a"),
        (2, "bot", "b"),
        (3, "user", {"x": [1, 2]}),
    ]
    assert [m.seq for m in await storage.load_messages("s", after_seq=1, limit=1)] == [2]
    assert await storage.load_messages("other") == []


async def test_hundred_concurrent_appenders_get_gap_free_seqs(
    storage: AsyncStorageBackend,
) -> None:
    seqs: list[int] = []

    async def append(i: int) -> None:
        rows = await storage.append_messages("hot", [NewMessage("user", i), NewMessage("bot", i)])
        seqs.extend(m.seq for m in rows)
        assert rows[1].seq == rows[0].seq + 1  # one call's messages stay contiguous

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(append, i)
    assert sorted(seqs) == list(range(1, 201))
    loaded = await storage.load_messages("hot", limit=1000)
    assert [m.seq for m in loaded] == list(range(1, 201))


async def test_append_with_outbox_is_one_transaction(storage: AsyncStorageBackend) -> None:
    await storage.append_messages(
        "s", [NewMessage("bot", "hi")], outbox=[NewOutboxMessage("slack", "acct", {"t": "hi"})]
    )
    claimed = await storage.claim_outbox("w", limit=10, lease_s=30)
    assert [(m.channel, m.account, m.payload) for m in claimed] == [("slack", "acct", {"t": "hi"})]
    with pytest.raises(InvalidInput):
        await storage.append_messages(
            "s", [NewMessage("bot", "x")], outbox=[NewOutboxMessage("", "acct", 1)]
        )
    assert len(await storage.load_messages("s")) == 1


async def test_fenced_append_refuses_stale_token(storage: AsyncStorageBackend) -> None:
    lease = await storage.acquire_lease("s", "a", 30)
    assert lease is not None
    await storage.append_messages("s", [NewMessage("user", 1)], lease_token=lease.token)
    assert await storage.release_lease("s", lease.token)
    newer = await storage.acquire_lease("s", "b", 30)
    assert newer is not None and newer.token > lease.token
    with pytest.raises(LeaseLost):
        await storage.append_messages("s", [NewMessage("user", 2)], lease_token=lease.token)
    with pytest.raises(LeaseLost):
        await storage.append_messages("never-leased", [NewMessage("user", 2)], lease_token=1)
    assert [m.content for m in await storage.load_messages("s")] == [1]
    await storage.append_messages("s", [NewMessage("user", 3)], lease_token=newer.token)
    assert [m.seq for m in await storage.load_messages("s")] == [1, 2]


async def test_unicode_and_sql_metacharacters_round_trip(storage: AsyncStorageBackend) -> None:
    payload = {"q": "'; SELECT pg_sleep(10); --", "emoji": "\U0001f680", "n": -1.5, "k": None}
    await storage.append_messages(WEIRD_ID, [NewMessage("user", payload)])
    await storage.append_stream_events([NewStreamEvent(WEIRD_ID, 1, 1, "delta", payload)])
    assert (await storage.load_messages(WEIRD_ID))[0].content == payload
    assert (await storage.load_stream_events(WEIRD_ID))[0].payload == payload
    assert await storage.delete_session(WEIRD_ID)


async def test_one_mebibyte_payload_round_trips(storage: AsyncStorageBackend) -> None:
    big = {"blob": "x" * (1024 * 1024)}
    await storage.append_stream_events([NewStreamEvent("s", 1, 1, "tool_result", big)])
    await storage.append_messages("s", [NewMessage("tool", big)])
    assert (await storage.load_stream_events("s"))[0].payload == big
    assert (await storage.load_messages("s"))[0].content == big


@pytest.mark.parametrize(
    ("session_id", "payload", "match"),
    [
        ("", 1, "must not be empty"),
        ("x" * 256, 1, "limit is 255"),
        ("a\x00b", 1, "NUL"),
        (123, 1, "must be a str"),
        ("s", {1, 2}, "not a JSON value"),
        ("s", float("nan"), "NaN"),
        ("s", {"a": [float("inf")]}, "NaN"),
        ("s", "nul\x00inside", "NUL"),
        ("s", object(), "not a JSON value"),
        ("s", 2**70, "not a JSON value"),
    ],
)
async def test_bad_input_is_rejected_before_writing(
    storage: AsyncStorageBackend, session_id: object, payload: object, match: str
) -> None:
    good = NewStreamEvent("good", 1, 1, "delta", "fine")
    bad = NewStreamEvent(session_id, 1, 2, "delta", payload)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=match):
        await storage.append_stream_events([good, bad])
    with pytest.raises(InvalidInput, match=match):
        await storage.append_messages(
            session_id if session_id != "s" else "good",  # type: ignore[arg-type]
            [NewMessage("user", "ok"), NewMessage("user", payload)],
        )
    assert await storage.load_stream_events("good") == []
    assert await storage.load_messages("good") == []


async def test_negative_or_zero_seq_and_bad_limits_are_rejected(
    storage: AsyncStorageBackend,
) -> None:
    with pytest.raises(InvalidInput, match="seq"):
        await storage.append_stream_events([NewStreamEvent("s", 1, -1, "delta", 1)])
    with pytest.raises(InvalidInput, match="seq"):
        await storage.append_stream_events([NewStreamEvent("s", 1, 0, "delta", 1)])
    with pytest.raises(InvalidInput, match="epoch"):
        await storage.append_stream_events([NewStreamEvent("s", -1, 1, "delta", 1)])
    with pytest.raises(InvalidInput, match="limit"):
        await storage.load_stream_events("s", limit=0)
    with pytest.raises(InvalidInput, match="after_seq"):
        await storage.load_messages("s", after_seq=-1)
    with pytest.raises(InvalidInput, match="messages"):
        await storage.append_messages("s", [])
    with pytest.raises(InvalidInput, match="kind"):
        await storage.append_stream_events([NewStreamEvent("s", 1, 1, "", 1)])


async def test_stream_batch_for_many_sessions_is_idempotent(storage: AsyncStorageBackend) -> None:
    batch = [NewStreamEvent(f"s{i % 3}", 7, i // 3 + 1, "delta", {"i": i}) for i in range(30)]
    assert await storage.append_stream_events(batch) == StreamAppend(30)
    # A retried batch (same seqs, even with other content) stores nothing new.
    retry = [NewStreamEvent(e.session_id, e.epoch, e.seq, e.kind, "changed") for e in batch]
    assert await storage.append_stream_events(retry) == StreamAppend(0)
    appended = await storage.append_stream_events([*retry[:2], NewStreamEvent("s0", 8, 11, "d", 1)])
    assert appended.stored == 1 and not appended.refused
    events = await storage.load_stream_events("s0")
    assert [e.seq for e in events] == list(range(1, 12))
    assert events[0].payload == {"i": 0} and events[0].epoch == 7
    assert events[-1].epoch == 8
    assert await storage.last_stream_seq("s0") == 11
    assert await storage.last_stream_seq("none") == 0
    assert await storage.append_stream_events([]) == StreamAppend(0)


async def test_stream_load_pages_in_order(storage: AsyncStorageBackend) -> None:
    await storage.append_stream_events(
        [NewStreamEvent("s", 1, seq, "delta", seq) for seq in range(250, 0, -1)]
    )
    seen: list[int] = []
    after = 0
    while page := await storage.load_stream_events("s", after_seq=after, limit=100):
        seen.extend(e.seq for e in page)
        after = page[-1].seq
    assert seen == list(range(1, 251))


async def test_purge_removes_only_old_events(storage: AsyncStorageBackend) -> None:
    await storage.append_stream_events([NewStreamEvent("s", 1, i, "d", i) for i in range(1, 6)])
    assert await storage.purge_stream_events(3600) == 0
    await anyio.sleep(0.05)
    assert await storage.purge_stream_events(0.01) == 5
    assert await storage.load_stream_events("s") == []


async def test_delete_session_removes_everything_of_the_session(
    storage: AsyncStorageBackend,
) -> None:
    await storage.append_messages("s", [NewMessage("user", 1)])
    await storage.append_stream_events([NewStreamEvent("s", 1, 1, "d", 1)])
    await storage.request_cancel("s", "bye")
    assert await storage.acquire_lease("s", "h", 30) is not None
    await storage.append_messages("keep", [NewMessage("user", 1)])
    assert await storage.delete_session("s")
    assert await storage.load_messages("s") == []
    assert await storage.load_stream_events("s") == []
    assert await storage.get_cancel("s") is None
    assert await storage.get_lease("s") is None
    assert not await storage.delete_session("s")
    assert len(await storage.load_messages("keep")) == 1
    # A deleted session starts again at seq 1.
    assert (await storage.append_messages("s", [NewMessage("user", 2)]))[0].seq == 1
