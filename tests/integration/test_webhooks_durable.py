"""Durable async webhooks: batches go through the storage outbox before delivery."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator.webhooks import HooksConfig, open_webhooks, parse_hooks
from orchestrator.webhooks.testing import Answer, open_test_receiver
from storage import AsyncStorageBackend, OutboxStatus


def durable(url: str, **extra: Any) -> HooksConfig:
    entry = {
        "name": "ledger",
        "url": url,
        "trigger": "error",
        "durable": True,
        "flush_interval_ms": 20,
        **extra,
    }
    return parse_hooks({"async_webhooks": [entry]}, environ={})


async def test_durable_events_are_persisted_then_delivered(storage: AsyncStorageBackend) -> None:
    async with (
        open_test_receiver() as rx,
        open_webhooks(durable(rx.url), storage=storage) as webhooks,
    ):
        decision = await webhooks.fire("error", {"n": 1})  # returns once persisted
        assert decision.outcomes[0].queued
        row = await storage.get_outbox(1)
        assert row is not None and row.channel == "webhook" and row.account == "ledger"
        (request,) = await rx.wait_for(1)
        for _ in range(250):  # the relay records results in the background
            sent = await storage.get_outbox(1)
            if sent is not None and sent.status is OutboxStatus.SENT:
                break
            await anyio.sleep(0.02)
        else:
            raise AssertionError("the outbox row was never marked sent")
    event = request.json()["events"][0]
    assert event["context"] == {"n": 1} and event["event"] == "on_error"
    assert request.headers["webhook-id"] == row.payload["delivery_id"]  # type: ignore[index]


async def test_durable_rows_survive_a_restart(storage: AsyncStorageBackend) -> None:
    async with open_test_receiver(lambda r: Answer(status=503)) as down:
        config = durable(down.url, retries=5)
        async with open_webhooks(config, storage=storage) as webhooks:
            for n in range(3):
                await webhooks.fire("error", {"n": n})
    # The receiver was down for the whole first run; the rows wait in the outbox.
    async with open_test_receiver() as rx:
        config = durable(rx.url, retries=5)
        async with open_webhooks(config, storage=storage):
            await rx.wait_until(
                lambda _: sorted(e["context"]["n"] for e in rx.events()) == [0, 1, 2], 15
            )


async def test_durable_without_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="storage"):
        async with open_webhooks(durable("https://example.invalid")):
            pass


async def test_durable_fire_reports_a_failed_outbox_write(storage: AsyncStorageBackend) -> None:
    async with (
        open_test_receiver() as rx,
        open_webhooks(durable(rx.url, retries=0), storage=storage) as webhooks,
    ):
        # The storage refuses a payload over 8 MB: the write fails for real.
        decision = await webhooks.fire("error", {"blob": "x" * (9 * 1024 * 1024)})
        (outcome,) = decision.outcomes
        assert not outcome.queued and outcome.result == "error"
        assert "not persisted" in outcome.message and decision.action == "warning"
        assert webhooks.batchers["ledger"].statistics().not_persisted == 1
        ok = await webhooks.fire("error", {"n": 1})  # the next event is unaffected
        assert ok.outcomes[0].queued
        await rx.wait_for(1)
    assert [e["context"] for e in rx.events()] == [{"n": 1}]
