"""Durable async webhooks: batches go through the storage outbox before delivery."""

from __future__ import annotations

import time
from typing import Any

import anyio
import orjson
import pytest

from asyncstore.orchestrator.webhooks import HooksConfig, open_webhooks, parse_hooks
from asyncstore.orchestrator.webhooks.testing import Answer, open_test_receiver
from asyncstore.storage import AsyncStorageBackend, OutboxStatus
from tests.waiting import wait_for


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
        decision = await webhooks.fire("error", {"n": 1})  # returns once journaled
        assert decision.outcomes[0].queued
        assert webhooks.batchers["ledger"].statistics().journaled == 1
        (request,) = await rx.wait_for(1)
        row = await storage.get_outbox(1)  # the batch went through the outbox
        assert row is not None and row.channel == "webhook" and row.account == "ledger"

        async def marked_sent() -> bool:  # the relay records results in the background
            sent = await storage.get_outbox(1)
            return sent is not None and sent.status is OutboxStatus.SENT

        await wait_for(marked_sent, what="the outbox row marked sent")
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


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def test_ten_second_outage_loses_nothing_and_retries_keep_the_body(
    storage: AsyncStorageBackend,
) -> None:
    """A real receiver answers 503 for 10 s; the default durable retry policy rides it out."""
    from standardwebhooks.webhooks import Webhook

    async with open_test_receiver() as rx:
        # Decided on the request's recorded arrival time, so the checks below agree with it.
        down_until = time.monotonic() + 10.0
        rx.handler = lambda r: Answer(status=503 if r.at < down_until else 200)
        config = durable(rx.url, batch_size=5, secret=[SECRET])
        async with open_webhooks(config, storage=storage) as webhooks:
            for n in range(20):
                decision = await webhooks.fire("error", {"n": n})
                assert decision.outcomes[0].queued
                if n % 5 == 4:
                    await anyio.sleep(0.5)  # some batches start during the outage

            def delivered(requests: list[Any]) -> set[int]:
                ok = [r for r in requests if r.at >= down_until]
                return {e["context"]["n"] for r in ok for e in r.json()["events"]}

            await rx.wait_until(lambda rs: delivered(rs) >= set(range(20)), timeout_s=60)
    bodies: dict[str, set[bytes]] = {}
    for request in rx.requests:
        bodies.setdefault(request.headers["webhook-id"], set()).add(request.body)
    assert any(r.at < down_until for r in rx.requests)  # the outage was seen
    assert all(len(b) == 1 for b in bodies.values())  # byte-identical across retries
    last = {}
    for request in rx.requests:
        last[request.headers["webhook-id"]] = request
    for request in last.values():  # every webhook-id's last attempt was accepted and verifies
        assert request.at >= down_until
        Webhook(SECRET).verify(request.body, dict(request.headers))
    assert sorted(e["context"]["n"] for r in last.values() for e in r.json()["events"]) == list(
        range(20)
    )


async def test_dead_rows_are_redriven_when_the_endpoint_recovers(
    storage: AsyncStorageBackend,
) -> None:
    down = True
    async with open_test_receiver() as rx:
        rx.handler = lambda r: Answer(status=503 if down else 200)
        config = parse_hooks(
            {
                "async_webhooks": [
                    {
                        "name": "ledger",
                        "url": rx.url,
                        "trigger": "error",
                        "durable": True,
                        "batch_size": 1,
                        "flush_interval_ms": 10,
                    }
                ],
                "durable_retry": {"first_delay_secs": 0.05, "max_attempts": 2},
                # Every attempt reaches the receiver, so the test can count them.
                "circuit_breaker": {"enabled": False},
            },
            environ={},
        )
        async with open_webhooks(config, storage=storage) as webhooks:
            for n in range(3):
                await webhooks.fire("error", {"n": n})
            await rx.wait_for(6, timeout_s=30)  # two attempts each: the rows are dead
            down = False
            await webhooks.fire("error", {"n": 3})  # its success shows the receiver is back
            await rx.wait_until(
                lambda rs: (
                    {e["context"]["n"] for r in rs[6:] for e in r.json()["events"]} == {0, 1, 2, 3}
                ),
                timeout_s=30,
            )


@pytest.mark.parametrize(("mode", "requests"), [("journal", 10), ("direct", 100)])
async def test_hundred_sequential_durable_fires_at_batch_ten(
    storage: AsyncStorageBackend, mode: str, requests: int
) -> None:
    """Seed 000's table in durable mode: each caller waits for its journal commit only."""
    async with open_test_receiver() as rx:
        config = durable(rx.url, batch_size=10, flush_interval_ms=60_000, durable_mode=mode)
        async with open_webhooks(config, storage=storage) as webhooks:
            for i in range(100):
                decision = await webhooks.fire("error", {"i": i})
                assert decision.outcomes[0].queued
            await rx.wait_until(lambda _: len(rx.events()) >= 100, 30)
            # The receiver can see a batch before its sink call has returned and counted it.
            await webhooks.flush()
            stats = webhooks.batchers["ledger"].statistics()
    assert len(rx.requests) == requests  # journal: 10; the legacy direct path: 100
    assert sorted(e["context"]["i"] for e in rx.events()) == list(range(100))
    assert stats.batches == requests and stats.journaled == (100 if mode == "journal" else 0)
    leftovers = await storage.claim_webhook_orphans(["ledger"], "t", older_than_s=0, limit=10)
    assert leftovers == []  # every batched event left the journal


async def test_orphaned_journal_events_are_taken_over(storage: AsyncStorageBackend) -> None:
    # What a process that crashed after committing two events leaves behind.
    bodies = [
        orjson.dumps(
            {
                "id": f"evt_dead_{n}",
                "event": "on_error",
                "hook_name": "ledger",
                "trigger": "error",
                "context": {"n": n},
                "timestamp_ms": 1,
            }
        )
        for n in range(2)
    ]
    await storage.journal_webhook_events("ledger", "crashed-process", bodies)
    async with open_test_receiver() as rx:
        config = parse_hooks(
            {
                "async_webhooks": [
                    {
                        "name": "ledger",
                        "url": rx.url,
                        "trigger": "error",
                        "durable": True,
                        "flush_interval_ms": 20,
                    }
                ],
                "durable_retry": {"orphan_after_secs": 0.2},
            },
            environ={},
        )
        async with open_webhooks(config, storage=storage) as webhooks:
            await rx.wait_until(lambda _: len(rx.events()) >= 2, 15)
            assert webhooks.batchers["ledger"].statistics().adopted == 2
    assert sorted(e["id"] for e in rx.events()) == ["evt_dead_0", "evt_dead_1"]


async def test_delivery_log_records_every_attempt_and_resend_keeps_id_and_body(
    storage: AsyncStorageBackend,
) -> None:
    from standardwebhooks.webhooks import Webhook

    from asyncstore.orchestrator.webhooks.admin import (
        ResendRefused,
        delivery_log,
        format_attempt,
        resend,
    )

    async with open_test_receiver() as rx:
        rx.handler = lambda r: Answer(status=503) if len(rx.requests) == 1 else Answer()
        config = parse_hooks(
            {
                "async_webhooks": [
                    {
                        "name": "ledger",
                        "url": rx.url,
                        "trigger": "error",
                        "durable": True,
                        "flush_interval_ms": 10,
                        "secret": SECRET,
                    }
                ],
                "durable_retry": {"first_delay_secs": 0.05},
            },
            environ={},
        )
        async with open_webhooks(config, storage=storage) as webhooks:
            await webhooks.fire("error", {"n": 1})
            await rx.wait_for(2)
        # Leaving the block drained the log writer.
        first, delivered = rx.requests
        webhook_id = delivered.headers["webhook-id"]
        assert first.headers["webhook-id"] == webhook_id and first.body == delivered.body
        log = await delivery_log(storage, endpoint="ledger")
        assert [(a.webhook_id, a.status, a.ok) for a in log] == [
            (webhook_id, 200, True),
            (webhook_id, 503, False),
        ]
        assert log[1].error == "HTTP 503" and "status=503" in format_attempt(log[1])
        assert await delivery_log(storage, failed=True) == []
        row = await resend(storage, webhook_id)
        assert row > (log[0].outbox_id or 0)
        with pytest.raises(ResendRefused, match="no delivery"):
            await resend(storage, "msg_unknown")
        async with open_webhooks(config, storage=storage):  # a running app delivers it
            await rx.wait_for(3)
    again = rx.requests[2]
    assert again.headers["webhook-id"] == webhook_id and again.body == delivered.body
    assert again.headers["webhook-signature"]  # freshly signed, and it verifies
    Webhook(SECRET).verify(again.body, dict(again.headers))
