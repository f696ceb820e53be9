"""Issue 13: what the async batcher retries, and critical events under a full queue."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from asyncstore.orchestrator.webhooks import HooksConfig, open_webhooks, parse_hooks
from asyncstore.orchestrator.webhooks.testing import Answer, ReceivedRequest, open_test_receiver


def config(url: str, **extra: Any) -> HooksConfig:
    entry = {"name": "audit", "url": url, "trigger": "tool_call_start,error", **extra}
    return parse_hooks({"async_webhooks": [entry]}, environ={})


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_permanent_failures_dead_letter_at_once_with_their_status(status: int) -> None:
    async with open_test_receiver(lambda r: Answer(status=status)) as rx:
        hooks = config(rx.url, batch_size=1, flush_interval_ms=10, retries=5)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher.send_nowait("tool_call_start", {"n": 1})
            await batcher.flush()
            stats = batcher.statistics()
    assert len(rx.requests) == 1  # no retry: the receiver refused the request itself
    (dead,) = batcher.dead_letters
    assert (dead.reason, dead.status, dead.error) == ("refused", status, f"HTTP {status}")
    assert stats.dead_lettered == 1 and stats.writer.retries == 0


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_transient_failures_are_retried(status: int) -> None:
    def answer(request: ReceivedRequest) -> Answer:
        return Answer(status=status) if len(rx.requests) == 1 else Answer()

    async with open_test_receiver(answer) as rx:
        hooks = config(rx.url, batch_size=1, flush_interval_ms=10, retries=3)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher.send_nowait("tool_call_start", {"n": 1})
            await batcher.flush()
            stats = batcher.statistics()
    assert len(rx.requests) == 2 and stats.delivered == 1 and not batcher.dead_letters
    assert rx.requests[0].headers["webhook-id"] == rx.requests[1].headers["webhook-id"]


async def test_exhausted_transient_failure_keeps_its_last_status() -> None:
    async with open_test_receiver(lambda r: Answer(status=503)) as rx:
        hooks = config(rx.url, batch_size=1, flush_interval_ms=10, retries=1)
        async with open_webhooks(hooks) as webhooks:
            webhooks.batchers["audit"].send_nowait("error", {})
            await webhooks.flush()
    (dead,) = webhooks.dead_letters
    assert (dead.reason, dead.status, len(rx.requests)) == ("retries_exhausted", 503, 2)


async def test_critical_fire_on_a_full_queue_neither_blocks_nor_raises() -> None:
    gate = anyio.Event()

    async def held(request: ReceivedRequest) -> Answer:
        await gate.wait()
        return Answer()

    async with open_test_receiver(held) as rx:
        hooks = config(rx.url, batch_size=1, capacity=2, flush_interval_ms=10)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher.send_nowait("tool_call_start", {"i": 0})  # raises unless queued
            batcher.send_nowait("tool_call_start", {"i": 1})  # full: 1 sending, 1 waiting
            with anyio.fail_after(3):  # the old code waited 5 s, then raised WriterOverloaded
                decision = await webhooks.fire("error", {"critical": True})
            stats = batcher.statistics()
            gate.set()
    (outcome,) = decision.outcomes
    assert outcome.overflow and not outcome.queued and decision.action == "warning"
    assert "overflow" in decision.warnings[0]
    assert stats.dropped["overflow_critical"] == 1
    assert stats.accepted == 2


async def test_critical_fire_on_a_full_queue_spills_to_the_outbox(storage: Any) -> None:
    gate = anyio.Event()

    async def held(request: ReceivedRequest) -> Answer:
        await gate.wait()
        return Answer()

    async with open_test_receiver(held) as rx:
        hooks = config(rx.url, batch_size=1, capacity=2, flush_interval_ms=10)
        async with open_webhooks(hooks, storage=storage) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher.send_nowait("tool_call_start", {"i": 0})
            batcher.send_nowait("tool_call_start", {"i": 1})
            with anyio.fail_after(3):
                decision = await webhooks.fire("error", {"critical": True})
            (outcome,) = decision.outcomes
            assert outcome.queued and outcome.spilled and not outcome.overflow
            assert batcher.statistics().spilled == 1
            gate.set()
            await rx.wait_until(
                lambda _: {"critical": True} in [e["context"] for e in rx.events()], 15
            )
