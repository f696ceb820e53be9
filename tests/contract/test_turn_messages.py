"""``Turn.append_messages``: chat history written under the turn's lease, on every driver.

The append is fenced by ``turn.lease.token`` in the database: once another holder took
the session over (as after an expiry), the superseded turn's append is refused with
``LeaseLost`` and writes nothing (neither the messages nor their outbox deliveries), even
before this process noticed that its lease was lost.
"""

from __future__ import annotations

import pytest

import asyncstore


def _settings(url: str) -> asyncstore.Settings:
    # Renewal far away: the runtime does not notice the takeover, so only the database can
    # refuse the superseded turn's append.
    return asyncstore.load_settings(
        storage={"url": url},
        runtime={"reload_on_sighup": False},
        lock={"lease_ttl_s": 60.0, "renew_interval_s": 30.0},
    )


async def test_a_turn_appends_its_messages_under_its_lease(storage_url: str) -> None:
    delivery = asyncstore.NewOutboxMessage("chat", "acct", {"text": "sent"})
    async with asyncstore.open_runtime(_settings(storage_url)) as rt:
        async with rt.turn("s") as turn:
            first = await turn.append_messages([asyncstore.NewMessage("user", "hi")])
            second = await turn.append_messages(
                [asyncstore.NewMessage("assistant", "hello")], deliveries=[delivery]
            )
        stored = await rt.storage.load_messages("s")
        claimed = await rt.storage.claim_outbox("probe", limit=10, lease_s=30)
    assert [(m.seq, m.role, m.content) for m in first + second] == [
        (1, "user", "hi"),
        (2, "assistant", "hello"),
    ]
    assert [(m.seq, m.content) for m in stored] == [(1, "hi"), (2, "hello")]
    assert [m.payload for m in claimed] == [{"text": "sent"}]


async def test_a_turn_whose_lease_was_taken_over_cannot_append(storage_url: str) -> None:
    delivery = asyncstore.NewOutboxMessage("chat", "acct", {"text": "never"})
    async with (
        asyncstore.open_runtime(_settings(storage_url)) as rt,
        asyncstore.open_storage(storage_url) as other,
    ):
        async with rt.turn("s") as turn:
            await turn.append_messages([asyncstore.NewMessage("user", "before")])
            # Another holder takes the session over (as after an expiry).
            assert await other.release_lease("s", turn.lease.token)
            assert await other.acquire_lease("s", "thief", 30) is not None
            assert not turn.lease.lost  # the runtime has not noticed: the database refuses
            with pytest.raises(asyncstore.LeaseLost):
                await turn.append_messages([asyncstore.NewMessage("assistant", "late")])
            with pytest.raises(asyncstore.LeaseLost):
                await turn.append_messages(
                    [asyncstore.NewMessage("assistant", "late")], deliveries=[delivery]
                )
        stored = await other.load_messages("s")
        claimed = await other.claim_outbox("probe", limit=10, lease_s=30)
    assert [(m.role, m.content) for m in stored] == [("user", "before")]
    assert claimed == []
