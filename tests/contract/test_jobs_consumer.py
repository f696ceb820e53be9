"""The shared consumer loop (``orchestrator.jobs``) as the queue worker and the outbox relay
run it, both drivers: the enqueue and its wakeup in one round trip by default, the legacy
separate notification behind a flag, and retry schedules on ``Backoff``."""

from __future__ import annotations

import random

import anyio
import pytest

from asyncstore.orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    RetryTemplate,
    SendError,
    open_outbox_relay,
)
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.orchestrator.timing import Backoff
from asyncstore.storage import AsyncStorageBackend, NewOutboxMessage, OutboxMessage, Task

# Round trips of the producer: the operations the worker or relay never call themselves.
PRODUCER_CALLS = ("enqueue_jobs", "notify")


def _calls(storage: AsyncStorageBackend) -> dict[str, int]:
    durations = storage.statistics().durations
    return {name: sum(durations[name][0]) if name in durations else 0 for name in PRODUCER_CALLS}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in PRODUCER_CALLS if after[k] != before[k]}


@pytest.mark.parametrize(
    ("mode", "round_trips"),
    [("in_statement", {"enqueue_jobs": 1}), ("separate", {"enqueue_jobs": 1, "notify": 1})],
)
async def test_an_enqueue_wakes_an_idle_worker(
    storage: AsyncStorageBackend, mode: str, round_trips: dict[str, int]
) -> None:
    # A long lease and fallback poll: only the notification can wake the worker in time.
    config = QueueConfig(lease_s=60, fallback_poll_s=60, enqueue_notify=mode)  # type: ignore[arg-type]
    queue = AgentQueue(storage, f"wake-{mode}", config)
    first, rest = anyio.Event(), anyio.Event()
    seen: list[int] = []

    async def handler(task: Task) -> None:
        seen.append(task.payload)
        (first if task.payload == -1 else rest).set()

    async with open_worker(queue, handler, max_workers=4) as worker:
        await queue.enqueue(-1)
        with anyio.fail_after(10):
            await first.wait()  # the claim came back short: the worker is idle now
        before = _calls(storage)
        await queue.enqueue_many([1, 2, 3])
        assert _delta(before, _calls(storage)) == round_trips
        with anyio.fail_after(10):
            await rest.wait()
        stats = worker.statistics()
    assert stats.notifications >= 1 and stats.fallback_polls == 0
    assert sorted(seen)[0] == -1


@pytest.mark.parametrize(
    ("fused", "round_trips"),
    [(True, {"enqueue_jobs": 1}), (False, {"enqueue_jobs": 1, "notify": 1})],
)
async def test_an_outbox_enqueue_wakes_an_idle_relay(
    storage: AsyncStorageBackend, fused: bool, round_trips: dict[str, int]
) -> None:
    outbox = Outbox(storage, notify_in_enqueue=fused)
    channel = f"ch{int(fused)}{random.randrange(10**6)}"
    sent: list[object] = []
    first, rest = anyio.Event(), anyio.Event()

    async def sender(msg: OutboxMessage) -> None:
        sent.append(msg.payload)
        (first if msg.payload == -1 else rest).set()

    config = OutboxConfig(fallback_poll_s=60)
    async with open_outbox_relay(storage, {channel: sender}, config=config) as relay:
        await outbox.enqueue([NewOutboxMessage(channel, "a", -1)])
        with anyio.fail_after(10):
            await first.wait()
        await relay.flush()
        before = _calls(storage)
        await outbox.enqueue([NewOutboxMessage(channel, "b", 1)])
        assert _delta(before, _calls(storage)) == round_trips
        with anyio.fail_after(10):
            await rest.wait()
        stats = relay.statistics()
    assert stats.fallback_polls == 0 and stats.notifications >= 1


def test_retry_schedules_are_backoffs_with_their_settings() -> None:
    cfg = QueueConfig(backoff_base_s=2.0, backoff_max_s=10.0, backoff_jitter=0.5)
    assert cfg.backoff == Backoff(base_s=2.0, max_s=10.0, jitter=0.5)
    for attempt, step in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (60, 10.0)):
        for _ in range(50):
            assert step * 0.5 <= cfg.backoff_s(attempt) <= step
    # A base above the cap means the cap, as the old formula capped every step.
    assert QueueConfig(backoff_base_s=9.0, backoff_max_s=3.0).backoff.step(1) == 3.0

    template = RetryTemplate(delays_s=(1.0, 5.0), jitter=0.2)
    error = SendError("503", status=503)
    for attempt, step in ((1, 1.0), (2, 5.0), (7, 5.0)):
        assert template.backoff(attempt) == Backoff(base_s=step, max_s=step, jitter=0.2)
        for _ in range(50):
            assert step * 0.8 <= template.delay_s(attempt, error) <= step
    # The provider's Retry-After still wins, clamped.
    assert template.delay_s(1, SendError("429", status=429, retry_after_s=7.0)) == 7.0


async def test_the_legacy_poll_loop_claims_once_per_interval(storage: AsyncStorageBackend) -> None:
    # poll_spawn runs on the shared consumer too: one poll, spawn all it returned, sleep.
    config = QueueConfig(mode="poll_spawn", poll_interval_s=60, lease_s=60)
    queue = AgentQueue(storage, "legacy-poll", config)
    await queue.enqueue_many(list(range(5)))
    done = anyio.Event()
    seen: list[int] = []

    async def handler(task: Task) -> None:
        seen.append(task.payload)
        if len(seen) == 5:
            done.set()

    async with open_worker(queue, handler) as worker:
        with anyio.fail_after(10):
            await done.wait()
        await worker.flush()
        stats = worker.statistics()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert stats.claim_statements == 1 and stats.succeeded == 5
