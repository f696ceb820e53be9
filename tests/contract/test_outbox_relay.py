"""OutboxRelay on both drivers: order per group, bounded concurrency, retries, dead letters."""

from __future__ import annotations

import time
from collections import defaultdict

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    RetryTemplate,
    SendError,
    open_outbox_relay,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    NewMessage,
    NewOutboxMessage,
    OutboxMessage,
    OutboxStatus,
)

CFG = OutboxConfig(batch_size=50, max_in_flight=8, fallback_poll_s=30.0, shutdown_grace_s=5.0)
QUICK = RetryTemplate(delays_s=(0.05,), jitter=0.0, max_attempts=5)


class Deliveries:
    """What a fake provider received, and an event once ``target`` messages arrived."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.by_group: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.count = 0
        self.done = anyio.Event()

    def add(self, msg: OutboxMessage) -> None:
        self.by_group[(msg.channel, msg.account)].append(msg.payload)
        self.count += 1
        if self.count >= self.target:
            self.done.set()


async def test_order_is_kept_within_each_group_while_groups_run_concurrently(
    storage: AsyncStorageBackend,
) -> None:
    outbox = Outbox(storage)
    got = Deliveries(6 * 15)
    active: dict[tuple[str, str], int] = defaultdict(int)
    per_group_peak = 0

    async def send(msg: OutboxMessage) -> None:
        nonlocal per_group_peak
        key = (msg.channel, msg.account)
        active[key] += 1
        per_group_peak = max(per_group_peak, active[key])
        await anyio.sleep(0.002 * (msg.payload % 3))  # uneven send times
        active[key] -= 1
        got.add(msg)

    rows = [NewOutboxMessage("chat", f"acct{g}", i) for i in range(15) for g in range(6)]
    for start in range(0, len(rows), 30):  # several enqueues: order spans claims
        await outbox.enqueue(rows[start : start + 30])
    async with open_outbox_relay(storage, {"chat": send}, config=CFG) as relay:
        with anyio.fail_after(30):
            await got.done.wait()
    for g in range(6):
        assert got.by_group[("chat", f"acct{g}")] == list(range(15))
    assert per_group_peak == 1
    stats = relay.statistics()
    assert stats.sent == 90 and stats.stale_writes == 0 and stats.peak_in_flight > 1


async def test_concurrency_across_groups_is_bounded_exactly(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    got = Deliveries(20)
    sending = peak = 0
    full = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        nonlocal sending, peak
        sending += 1
        peak = max(peak, sending)
        if sending == 5:
            full.set()
        await full.wait()  # the first five hold until five sends overlap
        await anyio.lowlevel.checkpoint()
        sending -= 1
        got.add(msg)

    await outbox.enqueue([NewOutboxMessage("chat", f"a{i}", i) for i in range(20)])
    cfg = CFG.model_copy(update={"max_in_flight": 5})
    async with open_outbox_relay(storage, {"chat": send}, config=cfg):
        with anyio.fail_after(20):
            await got.done.wait()
    assert peak == 5


async def test_per_channel_limit_caps_one_provider(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    got = Deliveries(24)
    active: dict[str, int] = defaultdict(int)
    peaks: dict[str, int] = defaultdict(int)

    async def send(msg: OutboxMessage) -> None:
        active[msg.channel] += 1
        peaks[msg.channel] = max(peaks[msg.channel], active[msg.channel])
        await anyio.sleep(0.01)
        active[msg.channel] -= 1
        got.add(msg)

    await outbox.enqueue(
        [NewOutboxMessage(ch, f"a{i}", i) for i in range(12) for ch in ("slack", "sms")]
    )
    cfg = CFG.model_copy(update={"max_per_channel": 2})
    async with open_outbox_relay(storage, {"slack": send, "sms": send}, config=cfg) as relay:
        with anyio.fail_after(20):
            await got.done.wait()
    assert peaks == {"slack": 2, "sms": 2}
    assert relay.statistics().peak_in_flight == 4


async def test_sender_failing_for_a_while_then_recovering_delivers_in_order(
    storage: AsyncStorageBackend,
) -> None:
    outbox = Outbox(storage)
    got = Deliveries(4)
    calls = 0

    async def flaky(msg: OutboxMessage) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise SendError("provider down", status=503)
        got.add(msg)

    rows = await outbox.enqueue([NewOutboxMessage("chat", "a", i) for i in range(4)])
    async with open_outbox_relay(
        storage, {"chat": flaky}, templates={"chat": QUICK}, config=CFG
    ) as relay:
        with anyio.fail_after(20):
            await got.done.wait()
    assert got.by_group[("chat", "a")] == [0, 1, 2, 3]
    first = await outbox.get(rows[0].id)
    assert first is not None and first.status is OutboxStatus.SENT and first.attempts == 4
    assert first.last_error == "SendError: provider down"
    later = await outbox.get(rows[1].id)
    assert later is not None and later.attempts == 1  # held back, never charged an attempt
    stats = relay.statistics()
    assert stats.retried == 3 and stats.sent == 4 and stats.dead == 0


async def test_retry_after_is_honoured_within_bounds(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    times: dict[int, list[float]] = defaultdict(list)
    both = anyio.Event()

    async def limited(msg: OutboxMessage) -> None:
        times[msg.payload].append(time.monotonic())
        if len(times[msg.payload]) == 1:
            # 0: the provider asks for 0.4 s; 1: it asks for an hour, capped at 0.6 s.
            raise SendError("429", status=429, retry_after_s=0.4 if msg.payload == 0 else 3600)
        if all(len(t) == 2 for t in times.values()) and len(times) == 2:
            both.set()

    template = RetryTemplate(delays_s=(0.01,), retry_after_max_s=0.6)
    await outbox.enqueue([NewOutboxMessage("chat", f"a{i}", i) for i in range(2)])
    async with open_outbox_relay(
        storage, {"chat": limited}, templates={"chat": template}, config=CFG
    ):
        with anyio.fail_after(20):
            await both.wait()
    assert times[0][1] - times[0][0] >= 0.35
    assert 0.55 <= times[1][1] - times[1][0] < 5  # clamped to 0.6 s, not an hour


async def test_dead_letter_then_redrive(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    attempts = 0
    broken = True
    dead = anyio.Event()
    delivered = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        nonlocal attempts
        if msg.payload == "bad":
            raise SendError("400 bad request", status=400)  # not retryable: dead at once
        if broken:
            attempts += 1
            if attempts == 3:
                dead.set()
            raise ConnectionError("reset by peer")
        delivered.set()

    bad, flaky = await outbox.enqueue(
        [NewOutboxMessage("chat", "x", "bad"), NewOutboxMessage("chat", "y", "ok", max_attempts=3)]
    )
    async with open_outbox_relay(
        storage, {"chat": send}, templates={"chat": QUICK}, config=CFG
    ) as relay:
        with anyio.fail_after(20):
            await dead.wait()
        await relay.flush()
        rows = [await outbox.get(bad.id), await outbox.get(flaky.id)]
        assert [r.status if r else None for r in rows] == [OutboxStatus.DEAD] * 2
        assert rows[0] is not None and rows[0].attempts == 1
        assert rows[1] is not None and rows[1].last_error == "ConnectionError: reset by peer"
        broken = False
        assert await outbox.redrive([flaky.id]) == [flaky.id]
        with anyio.fail_after(20):
            await delivered.wait()
    row = await outbox.get(flaky.id)
    assert row is not None and row.status is OutboxStatus.SENT and row.attempts == 1


async def test_delivery_written_with_the_chat_append_is_sent(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    got = Deliveries(1)

    async def send(msg: OutboxMessage) -> None:
        got.add(msg)

    async with open_outbox_relay(storage, {"chat": send}, config=CFG):
        stored = await outbox.append_messages(
            "s1",
            [NewMessage("assistant", "hello")],
            deliveries=[NewOutboxMessage("chat", "acct", 7)],
        )
        with anyio.fail_after(10):
            await got.done.wait()
    assert [m.seq for m in stored] == [1]
    assert got.by_group[("chat", "acct")] == [7]


async def test_shutdown_releases_unsent_messages_without_charging_attempts(
    storage: AsyncStorageBackend,
) -> None:
    outbox = Outbox(storage)
    started = anyio.Event()

    async def hang(msg: OutboxMessage) -> None:
        started.set()
        await anyio.sleep_forever()

    rows = await outbox.enqueue([NewOutboxMessage("chat", "a", i) for i in range(3)])
    cfg = CFG.model_copy(update={"shutdown_grace_s": 0.05})
    async with open_outbox_relay(storage, {"chat": hang}, config=cfg) as relay:
        with anyio.fail_after(10):
            await started.wait()
    assert relay.statistics().released == 3
    for row in rows:
        now = await outbox.get(row.id)
        assert now is not None and now.status is OutboxStatus.PENDING and now.attempts == 0


async def test_serial_mode_sends_one_at_a_time(storage: AsyncStorageBackend) -> None:
    outbox = Outbox(storage)
    got = Deliveries(10)

    async def send(msg: OutboxMessage) -> None:
        await anyio.sleep(0.001)
        got.add(msg)

    await outbox.enqueue([NewOutboxMessage("chat", f"a{i}", i) for i in range(10)])
    cfg = CFG.model_copy(update={"mode": "serial"})
    async with open_outbox_relay(storage, {"chat": send}, config=cfg) as relay:
        with anyio.fail_after(20):
            await got.done.wait()
    stats = relay.statistics()
    assert stats.peak_in_flight == 1 and stats.claim_statements >= 10


async def test_a_message_whose_claim_aged_waiting_for_a_slot_is_given_back(
    storage: AsyncStorageBackend,
) -> None:
    outbox = Outbox(storage)
    sent: list[str] = []
    all_sent = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        if msg.payload == "slow":
            await anyio.sleep(0.5)  # within its send timeout, but past the other claim's margin
        sent.append(msg.payload)
        if len(sent) == 2:
            all_sent.set()

    await outbox.enqueue(
        [NewOutboxMessage("chat", "a", "slow"), NewOutboxMessage("chat", "b", "x")]
    )
    config = OutboxConfig(
        batch_size=10, max_in_flight=1, lease_s=1.0, send_timeout_s=0.6, fallback_poll_s=0.2
    )
    async with open_outbox_relay(storage, {"chat": send}, config=config) as relay:
        with anyio.fail_after(10):
            await all_sent.wait()
        await relay.flush()
        stats = relay.statistics()
    assert sorted(sent) == ["slow", "x"]  # each sent exactly once
    assert stats.released >= 1  # "x" waited too long for the slot and was given back first
