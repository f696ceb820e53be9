"""Asynchronous batched webhooks against a real local receiver."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from standardwebhooks.webhooks import Webhook

from asyncstore.orchestrator.errors import Dropped
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.orchestrator.webhooks import (
    HooksConfig,
    WebhookDrainReport,
    open_webhooks,
    parse_hooks,
)
from asyncstore.orchestrator.webhooks.testing import Answer, ReceivedRequest, open_test_receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def config(url: str, **extra: Any) -> HooksConfig:
    entry = {"name": "audit", "url": url, "trigger": "tool_call_start,error", **extra}
    return parse_hooks({"async_webhooks": [entry]}, environ={})


def events(requests: list[ReceivedRequest]) -> list[dict[str, Any]]:
    return [e for r in requests for e in r.json()["events"]]


def queued(batcher: Any, trigger: str, context: dict[str, Any]) -> bool:
    """``send_nowait``'s outcome: True if queued, False if the policy dropped it (``Dropped``)."""
    try:
        batcher.send_nowait(trigger, context)
    except Dropped:
        return False
    return True


async def test_timer_flush_delivers_lone_event() -> None:
    async with open_test_receiver() as rx:
        hooks = config(rx.url, batch_size=100, flush_interval_ms=50)
        async with open_webhooks(hooks) as webhooks:
            started = time.monotonic()
            decision = await webhooks.fire("tool_call_start", {"tool_name": "ls"})
            assert decision.outcomes[0].queued
            await rx.wait_for(1, timeout_s=5)  # no flush(), no close
            waited = time.monotonic() - started
            body = rx.requests[0].json()
    assert waited < 2.0
    (event,) = body["events"]
    assert event["event"] == "on_tool_call_start" and event["hook_name"] == "audit"
    assert event["trigger"] == "tool_call_start,error"
    assert event["context"] == {"tool_name": "ls"} and event["timestamp_ms"] > 0
    assert set(body) == {"events"}


async def test_hundred_events_batch_ten_make_exactly_ten_requests() -> None:
    async with open_test_receiver() as rx:
        hooks = config(rx.url, batch_size=10, flush_interval_ms=60_000)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            for i in range(100):
                assert queued(batcher, "tool_call_start", {"i": i})
            await rx.wait_for(10)
            await batcher.flush()  # the tenth answer may still be on its way
            stats = batcher.statistics()
    assert len(rx.requests) == 10
    assert [len(r.json()["events"]) for r in rx.requests] == [10] * 10
    assert [e["context"]["i"] for e in events(rx.requests)] == list(range(100))
    assert stats.delivered == 100 and stats.batches == 10 and stats.requests == 10
    assert len({r.headers["webhook-id"] for r in rx.requests}) == 10


async def test_outage_of_one_second_loses_nothing() -> None:
    async with open_test_receiver() as rx:
        outage_until = time.monotonic() + 1.0
        rx.handler = lambda r: Answer(status=500 if r.at < outage_until else 200)
        hooks = config(rx.url, batch_size=5, flush_interval_ms=50, retries=8)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            for i in range(40):
                batcher.send_nowait("tool_call_start", {"i": i})
                await anyio.sleep(0.03)
            await batcher.flush()
            stats = batcher.statistics()
    accepted = [r for r in rx.requests if r.at >= outage_until]
    assert any(r.at < outage_until for r in rx.requests)  # the outage was seen
    assert sorted(e["context"]["i"] for e in events(accepted)) == list(range(40))
    assert stats.dead_lettered == 0 and stats.delivered == 40 and stats.failed_attempts > 0
    # Each batch kept its delivery id across its retries.
    ids_by_first_event: dict[str, set[str]] = {}
    for r in rx.requests:
        first = r.json()["events"][0]["id"]
        ids_by_first_event.setdefault(first, set()).add(r.headers["webhook-id"])
    assert all(len(ids) == 1 for ids in ids_by_first_event.values())


async def test_gone_disables_the_endpoint_and_dead_letters() -> None:
    async with open_test_receiver(lambda r: Answer(status=410)) as rx:
        hooks = config(rx.url, batch_size=1, flush_interval_ms=10)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher.send_nowait("tool_call_start", {"n": 1})
            await batcher.flush()
            assert batcher.disabled
            with pytest.raises(Dropped) as dropped:  # a WouldBlock: the *_nowait rule
                batcher.send_nowait("tool_call_start", {"n": 2})
            assert dropped.value.reason == "disabled"
            assert isinstance(dropped.value, anyio.WouldBlock)
            decision = await webhooks.fire("tool_call_start", {"n": 3})
            stats = batcher.statistics()
    assert len(rx.requests) == 1
    assert not stats.enabled and stats.dropped["disabled"] == 2
    assert decision.action == "warning"
    (dead,) = batcher.dead_letters
    assert dead.reason == "gone" and "410" in dead.error and len(dead.events) == 1


async def test_retry_after_is_honoured_within_bounds() -> None:
    async with open_test_receiver() as rx:
        rx.handler = lambda r: (
            Answer(status=429, headers={"Retry-After": "1"}) if len(rx.requests) == 1 else Answer()
        )
        hooks = config(rx.url, batch_size=1, flush_interval_ms=10)
        async with open_webhooks(hooks) as webhooks:
            webhooks.batchers["audit"].send_nowait("error", {})
            await webhooks.flush()
    first, second = rx.requests
    assert 0.9 <= second.at - first.at < 3.0  # the backoff alone would be ~0.1 s
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_exhausted_retries_go_to_a_dead_letter_record() -> None:
    seen = []
    async with open_test_receiver(lambda r: Answer(status=500)) as rx:
        hooks = config(rx.url, batch_size=2, flush_interval_ms=10, retries=2)
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            batcher._on_dead_letter = seen.append
            batcher.send_nowait("tool_call_start", {"a": 1})
            batcher.send_nowait("tool_call_start", {"a": 2})
            await batcher.flush()
            stats = batcher.statistics()
    assert len(rx.requests) == 3  # one try and two retries
    assert stats.dead_lettered == 2 and stats.delivered == 0
    (dead,) = batcher.dead_letters
    assert dead.reason == "retries_exhausted" and dead.error == "HTTP 500"
    assert dead.delivery_id == rx.requests[0].headers["webhook-id"]
    assert seen == [dead]


async def test_shutdown_flushes_what_remains() -> None:
    reports: list[WebhookDrainReport] = []
    async with open_test_receiver() as rx:
        hooks = config(rx.url, batch_size=100, flush_interval_ms=60_000)
        async with open_webhooks(hooks, reports=reports) as webhooks:
            for i in range(7):
                webhooks.batchers["audit"].send_nowait("tool_call_start", {"i": i})
            assert rx.requests == []
    assert len(events(rx.requests)) == 7
    (report,) = reports
    assert report.complete and report.delivered == 7


async def test_shutdown_reports_what_it_could_not_deliver() -> None:
    reports: list[WebhookDrainReport] = []
    async with open_test_receiver(lambda r: Answer(status=503)) as rx:
        hooks = config(
            rx.url, batch_size=100, flush_interval_ms=60_000, retries=10, shutdown_timeout_secs=0.5
        )
        async with open_webhooks(hooks, reports=reports) as webhooks:
            for i in range(3):
                webhooks.batchers["audit"].send_nowait("tool_call_start", {"i": i})
        assert rx.requests
    (report,) = reports
    assert not report.complete and report.undelivered == 3
    (dead,) = webhooks.dead_letters
    assert dead.reason == "shutdown" and len(dead.events) == 3


async def test_sync_webhook_with_the_same_name_routes_through_the_batcher() -> None:
    async with open_test_receiver(lambda r: Answer(delay_s=0.3)) as rx:
        hooks = parse_hooks(
            {
                "async_webhooks": [{"name": "audit", "url": rx.url, "flush_interval_ms": 20}],
                "webhooks": [{"name": "audit", "url": rx.url, "trigger": "post_tool"}],
            },
            environ={},
        )
        # The batcher's clock stands still: its 20 ms timer cannot send before the check.
        async with open_webhooks(hooks, clock=ManualClock()) as webhooks:
            decision = await webhooks.fire("post_tool", {"tool": "x"}, result={"ok": True})
            assert rx.requests == []  # queued, not sent (a direct call waits for its answer)
            await webhooks.flush()
    assert decision.action == "ok" and decision.outcomes[0].queued
    (event,) = events(rx.requests)
    assert event["event"] == "post_tool_execution" and event["trigger"] == "post_tool"
    assert event["context"] == {"tool": "x", "ok": True}


async def test_overflow_drops_are_counted_and_critical_events_kept() -> None:
    async with open_test_receiver(lambda r: Answer(delay_s=0.2)) as rx:
        hooks = config(
            rx.url, batch_size=2, capacity=4, flush_interval_ms=60_000, block_timeout_ms=5000
        )
        async with open_webhooks(hooks) as webhooks:
            batcher = webhooks.batchers["audit"]
            accepted = [queued(batcher, "tool_call_start", {"i": i}) for i in range(6)]
            with pytest.raises(anyio.WouldBlock):  # critical: never dropped, never evicts
                batcher.send_nowait("error", {"critical": True})
            assert await batcher.send("error", {"critical": True})  # waits for room
            stats = batcher.statistics()
    assert accepted == [True] * 6  # drop_oldest: the newest get in, the oldest go
    assert stats.dropped == {"overflow_oldest": 2}
    delivered = events(rx.requests)
    assert delivered[-1]["context"] == {"critical": True} and len(delivered) == 5


async def test_batches_are_signed_and_verify_with_standardwebhooks() -> None:
    async with open_test_receiver() as rx:
        hooks = config(rx.url, batch_size=3, flush_interval_ms=20, secret=[SECRET])
        async with open_webhooks(hooks) as webhooks:
            for i in range(3):
                webhooks.batchers["audit"].send_nowait("tool_call_start", {"i": i})
            await webhooks.flush()
    (request,) = rx.requests
    payload = Webhook(SECRET).verify(request.body, dict(request.headers))
    assert [e["context"]["i"] for e in payload["events"]] == [0, 1, 2]


async def test_batcher_used_directly() -> None:
    import httpx

    from asyncstore.orchestrator.webhooks import Transport, open_webhook_batcher

    async with open_test_receiver() as rx, httpx.AsyncClient() as client:
        hook = config(rx.url, batch_size=2, flush_interval_ms=1000).async_webhooks[0]
        async with open_webhook_batcher(hook, Transport(client)) as batcher:
            batcher.send_nowait("error", {"e": 1})
            batcher.send_nowait("error", {"e": 2})
            await rx.wait_for(1)
        report = await batcher.aclose()
    assert report.complete and report.delivered == 2
