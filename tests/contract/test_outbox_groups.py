"""The outbox's group rules on both drivers: in flight, retry, dead letter and redrive.

A (channel, account) group is delivered in id order with at most one claim in flight:

- nothing of a group is claimed while one of its messages is in flight under a live claim
  (whatever its id: a redriven message behind the group's in-flight ones included);
- a message waiting for its retry holds back the later messages of its group;
- a dead-lettered message holds nothing back: the rest of its group goes on;
- a redriven message goes back to its place (its id) among the group's open messages: it
  waits while a message of the group is in flight, then goes before the later ones.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg

from asyncstore.orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    RetryTemplate,
    SendError,
    open_outbox_relay,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    NewOutboxMessage,
    OutboxMessage,
    OutboxStatus,
    open_storage,
)


async def _claim(storage: AsyncStorageBackend, limit: int = 10) -> list[object]:
    return [m.payload for m in await storage.claim_outbox("w", limit=limit, lease_s=30)]


def _failure(msg: OutboxMessage, error: str, retry_at: datetime | None = None) -> Failure:
    return Failure(msg.id, msg.lease_token or 0, error, retry_at)


async def test_a_message_in_flight_holds_its_whole_group(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_outbox(
        [NewOutboxMessage("chat", "g", f"g{i}") for i in range(3)]
        + [NewOutboxMessage("chat", "h", "h0")]
    )
    assert await _claim(storage, limit=1) == ["g0"]
    assert await _claim(storage) == ["h0"]  # g1 and g2 wait while g0 is in flight


async def test_a_retry_holds_back_the_later_messages_of_its_group(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("chat", "g", f"g{i}") for i in range(3)])
    first, second, third = await storage.claim_outbox("w", limit=10, lease_s=30)
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await storage.mark_outbox_sent([first.claim]) == [first.id]
    assert await storage.fail_outbox([_failure(second, "503", later)]) == {
        second.id: OutboxStatus.PENDING
    }
    assert await storage.release_outbox([third.claim]) == [third.id]
    assert await _claim(storage) == []  # g2 is due but g1 waits for its retry
    assert await storage.fail_outbox([_failure(second, "again")]) == {}  # its claim is over


async def test_a_dead_message_lets_the_rest_of_its_group_pass(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("chat", "g", f"g{i}") for i in range(3)])
    (head,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    assert await storage.dead_letter_outbox([_failure(head, "400")]) == [head.id]
    assert await _claim(storage) == ["g1", "g2"]


async def test_a_redriven_message_waits_for_its_group_in_flight_then_goes_first(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_outbox([NewOutboxMessage("chat", "g", f"g{i}") for i in range(4)])
    (poison,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    assert await storage.dead_letter_outbox([_failure(poison, "400")]) == [poison.id]
    (second,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    assert second.payload == "g1"
    assert await storage.redrive_outbox([poison.id]) == [poison.id]
    # g0 is due again, but g1 of its group is in flight: nothing of the group may go now.
    assert await _claim(storage) == []
    assert await storage.mark_outbox_sent([second.claim]) == [second.id]
    # Then the redriven message goes before the later messages still pending.
    assert await _claim(storage) == ["g0", "g2", "g3"]


async def test_relay_dead_letters_a_poison_message_delivers_the_rest_and_redrives_it_after(
    storage: AsyncStorageBackend,
) -> None:
    outbox = Outbox(storage)
    healed = False
    sent: list[str] = []
    rest_sent = anyio.Event()
    redriven_sent = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        if msg.payload == "poison" and not healed:
            raise SendError("bad gateway", status=502)
        sent.append(msg.payload)
        if len(sent) == 4:
            rest_sent.set()
        if msg.payload == "poison":
            redriven_sent.set()

    rows = await outbox.enqueue(
        [NewOutboxMessage("chat", "g", "m0"), NewOutboxMessage("chat", "g", "poison", 2)]
        + [NewOutboxMessage("chat", "g", f"m{i}") for i in range(2, 5)]
    )
    quick = RetryTemplate(delays_s=(0.01,), jitter=0.0, max_attempts=5)
    cfg = OutboxConfig(batch_size=2, fallback_poll_s=30.0, shutdown_grace_s=5.0)
    async with open_outbox_relay(
        storage, {"chat": send}, templates={"chat": quick}, config=cfg
    ) as relay:
        with anyio.fail_after(20):
            await rest_sent.wait()
        await relay.flush()
        poison = await outbox.get(rows[1].id)
        assert poison is not None and poison.status is OutboxStatus.DEAD
        assert poison.attempts == 2  # its own max_attempts
        assert sent == ["m0", "m2", "m3", "m4"]  # the rest of the group passed, in order
        healed = True
        assert await outbox.redrive([poison.id]) == [poison.id]
        with anyio.fail_after(20):
            await redriven_sent.wait()
    assert sent == ["m0", "m2", "m3", "m4", "poison"]
    final = await outbox.get(rows[1].id)
    assert final is not None and final.status is OutboxStatus.SENT and final.attempts == 1


async def test_postgres_claims_messages_whose_group_has_no_row_yet(postgres_dsn: str) -> None:
    """Rows written by an older version (no outbox_groups row, e.g. during a rolling
    upgrade) are claimed at once, and their group gets its row."""
    channel = f"upgrade{secrets.token_hex(3)}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            "INSERT INTO outbox (channel, account, payload, max_attempts)"
            " SELECT $1, 'a', to_jsonb(i), 5 FROM generate_series(0, 2) AS i",
            channel,
        )
        async with open_storage(postgres_dsn) as storage:
            first = await storage.claim_outbox("w", limit=10, lease_s=30, channels=[channel])
            assert [m.payload for m in first] == [0, 1, 2]
            assert await storage.claim_outbox("w", limit=10, lease_s=30, channels=[channel]) == []
        version = await conn.fetchval(
            "SELECT version FROM outbox_groups WHERE channel = $1 AND account = 'a'", channel
        )
        assert version == 1
    finally:
        await conn.close()
