"""Durable async webhooks: batches persisted through the storage outbox, then delivered.

For ``durable = true`` endpoints the batcher's sink writes each batch as one outbox row
(channel ``webhook``, account = the endpoint's name; the payload holds the delivery id and
the exact body) instead of POSTing it, and an outbox relay (``orchestrator.outbox``)
claims the rows and POSTs them in order per endpoint, with the same signing, Retry-After
and 410 handling. A crash loses nothing already written; undelivered rows are picked up
by the next relay. Dead rows stay in the outbox (``redrive`` puts them back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    RetryTemplate,
    SendError,
    open_outbox_relay,
)
from orchestrator.webhooks.batcher import AsyncWebhookBatcher, AttemptFailed, PersistBatch
from orchestrator.webhooks.config import AsyncWebhookConfig
from storage import AsyncStorageBackend, NewOutboxMessage, OutboxMessage

__all__ = ["OUTBOX_CHANNEL", "open_durable_delivery"]

OUTBOX_CHANNEL = "webhook"

# The seed's 100 ms, 200 ms, 400 ms, ... (the relay jitters each step by up to half).
_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0)


@asynccontextmanager
async def open_durable_delivery(
    storage: AsyncStorageBackend,
    hooks: Sequence[AsyncWebhookConfig],
    batchers: Mapping[str, AsyncWebhookBatcher],
    *,
    retry_after_max_s: float = 60.0,
) -> AsyncIterator[PersistBatch]:
    """Run an outbox relay for the async ``hooks``; yields the batchers' persist function.

    ``batchers`` (filled in by the caller once built) do the POSTs. Leaving the block
    stops the relay: sends in flight finish within its grace period, the rest stay in the
    outbox for the next run. If cancelled, sends are abandoned and their rows released.
    """
    by_name = {h.name: h for h in hooks}
    outbox = Outbox(storage)

    async def persist(endpoint: str, msg_id: str, body: bytes, count: int) -> None:
        hook = by_name[endpoint]
        row = NewOutboxMessage(
            OUTBOX_CHANNEL,
            endpoint,
            {"delivery_id": msg_id, "events": count, "body": body.decode()},
            max_attempts=hook.retries + 1,
        )
        await outbox.enqueue([row])

    async def send(message: OutboxMessage) -> None:
        batcher = batchers.get(message.account)
        payload = message.payload
        if batcher is None or not isinstance(payload, dict):
            raise SendError(f"no durable webhook {message.account!r} here", retryable=True)
        try:
            await batcher.deliver(str(payload["delivery_id"]), str(payload["body"]).encode())
        except AttemptFailed as exc:
            raise SendError(
                str(exc),
                status=exc.status,
                retryable=exc.retryable,
                retry_after_s=exc.retry_after_s,
            ) from None

    template = RetryTemplate(
        delays_s=_DELAYS_S,
        max_attempts=max((h.retries for h in by_name.values()), default=0) + 1,
        jitter=0.5,
        retry_after_max_s=retry_after_max_s,
    )
    timeout = max((h.timeout_secs for h in by_name.values()), default=10.0)
    config = OutboxConfig(
        send_timeout_s=timeout + 1.0,
        lease_s=max(120.0, 4 * timeout),
        # Rows left waiting for a retry by a previous run are only found by polling.
        fallback_poll_s=1.0,
    )
    async with open_outbox_relay(
        storage, {OUTBOX_CHANNEL: send}, templates={OUTBOX_CHANNEL: template}, config=config
    ):
        yield persist
