"""Durable async webhooks: batches persisted through the storage outbox, then delivered.

For ``durable = true`` endpoints each fired event is first committed to the webhook
journal (one write for all events waiting, so a caller waits one round trip and ``fire``
says queued only then); the batcher then forms HTTP batches as for any endpoint, and writes
each batch as one outbox row (channel ``webhook``, account = the endpoint's name; the
payload holds the delivery id and the exact body) before deleting its journaled events.
Journal rows their owner did not batch within ``orphan_after_secs`` (it crashed) are taken
over by a live process. ``durable_mode = "direct"`` keeps the previous path (each fire
writes its own batch row). An outbox relay (``orchestrator.outbox``)
claims the rows and POSTs them in order per endpoint, with the same signing, Retry-After
and 410 handling; events a full queue spills go the same way. Rows are retried by the
``[durable_retry]`` policy (capped exponential, minutes); a row that runs out of attempts
while its receiver is down is redriven automatically by the next successful delivery to
that endpoint. Every attempt (time, status, error) goes to the delivery log
(``webhook_attempts``, written in batches off the send path) for ``asyncstore webhooks log``
and ``resend``. A crash loses nothing already written; undelivered rows are picked up by
the next relay. Uses the outbox through its public API only.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime

import anyio

from asyncstore.orchestrator.batching import Batch, BatchWriter, DeadLetter, outcome_batches
from asyncstore.orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    RetryTemplate,
    SendError,
    open_outbox_relay,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.orchestrator.webhooks.batcher import AsyncWebhookBatcher, AttemptFailed
from asyncstore.orchestrator.webhooks.config import AsyncWebhookConfig, DurableRetry
from asyncstore.storage import AsyncStorageBackend, NewOutboxMessage, OutboxMessage, WebhookAttempt
from asyncstore.storage.errors import InvalidArgument

__all__ = ["OUTBOX_CHANNEL", "DurableDelivery", "open_durable_delivery"]

log = logging.getLogger("asyncstore.webhooks")

OUTBOX_CHANNEL = "webhook"
# Dead rows remembered per endpoint for the automatic redrive, and how many successful
# deliveries may find one not dead yet (its result still being written) before it is
# forgotten (then an operator redrives it).
_MAX_REMEMBERED = 10_000
_REDRIVE_TRIES = 5


class _Redrive:
    """Rows that went dead while their endpoint was failing, redriven once it answers."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._dead: dict[str, dict[int, int]] = {}  # endpoint -> row id -> tries left

    def remember(self, endpoint: str, row_id: int) -> None:
        rows = self._dead.setdefault(endpoint, {})
        if len(rows) < _MAX_REMEMBERED:
            rows[row_id] = _REDRIVE_TRIES

    async def recovered(self, endpoint: str) -> None:
        rows = self._dead.get(endpoint)
        if not rows:
            return
        moved = set(await self._outbox.redrive(sorted(rows)))
        for row_id in list(rows):
            rows[row_id] -= 1
            if row_id in moved or rows[row_id] <= 0:
                del rows[row_id]
        if moved:
            log.info("durable webhook %r recovered: %d dead row(s) redriven", endpoint, len(moved))


class DurableDelivery:
    """The ``DurableStore`` of the batchers: journal, outbox batch rows, orphan takeover."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        hooks: Mapping[str, AsyncWebhookConfig],
        policy: DurableRetry,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._storage = storage
        self._hooks = hooks
        self._policy = policy
        self._clock = clock
        self._outbox = Outbox(storage)
        self.owner = f"webhooks:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.log_dropped = 0  # delivery-log entries that could not be written

    async def journal(self, endpoint: str, bodies: Sequence[bytes]) -> list[int]:
        return await self._storage.journal_webhook_events(endpoint, self.owner, bodies)

    async def persist(
        self, endpoint: str, msg_id: str, body: bytes, count: int, journal_ids: Sequence[int]
    ) -> None:
        if endpoint not in self._hooks:
            raise InvalidArgument(f"no async webhook {endpoint!r}")
        row = NewOutboxMessage(
            OUTBOX_CHANNEL,
            endpoint,
            {"delivery_id": msg_id, "events": count, "body": body.decode()},
            max_attempts=self._policy.max_attempts,
        )
        await self._outbox.enqueue([row])
        if journal_ids:
            try:
                await self._storage.delete_webhook_events(journal_ids)
            except Exception as exc:
                # The batch is safely in the outbox; left in the journal, its events would
                # be sent again after orphan_after_secs (receivers de-duplicate on the
                # event ids). Not raised: a retry would write the batch row twice.
                log.error("webhook journal: could not forget %d events: %r", len(journal_ids), exc)

    async def adopt_orphans(self, batchers: Mapping[str, AsyncWebhookBatcher]) -> int:
        """Take over journal events nobody batched in time; returns how many were handed on."""
        names = [n for n, b in batchers.items() if b.config.durable]
        if not names:
            return 0
        orphans = await self._storage.claim_webhook_orphans(
            names, self.owner, older_than_s=self._policy.orphan_after_secs, limit=1000
        )
        taken = sum(1 for o in orphans if batchers[o.endpoint].adopt(o.id, o.body))
        if orphans:
            log.warning("webhook journal: took over %d orphaned event(s)", taken)
        return taken

    async def scan_orphans(self, batchers: Mapping[str, AsyncWebhookBatcher]) -> None:
        """Every half ``orphan_after_secs``, adopt orphans; runs until cancelled."""
        while True:
            try:
                while await self.adopt_orphans(batchers) >= 1000:
                    pass
            except Exception as exc:  # storage down: the next scan tries again
                log.warning("webhook journal: orphan scan failed: %r", exc)
            await self._clock.sleep(self._policy.orphan_after_secs / 2)


@asynccontextmanager
async def open_durable_delivery(
    storage: AsyncStorageBackend,
    hooks: Sequence[AsyncWebhookConfig],
    batchers: Mapping[str, AsyncWebhookBatcher],
    *,
    retry: DurableRetry | None = None,
    retry_after_max_s: float = 60.0,
    delivery_log: bool = True,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[DurableDelivery]:
    """Run an outbox relay (and the journal's orphan scan) for the async ``hooks``.

    Yields the batchers' ``DurableStore``. ``batchers`` (filled in by the caller once built)
    do the POSTs. Leaving the block stops the scan and the relay: sends in flight finish
    within its grace period, the rest stay in the outbox (and the journal) for the next
    run. If cancelled, sends are abandoned and their rows released.
    """
    policy = retry or DurableRetry()
    by_name = {h.name: h for h in hooks}
    store = DurableDelivery(storage, by_name, policy, clock)
    redrive = _Redrive(store._outbox)
    template = RetryTemplate(
        delays_s=policy.delays_s(),
        max_attempts=policy.max_attempts,
        jitter=policy.jitter,
        retry_after_max_s=retry_after_max_s,
    )

    def record(message: OutboxMessage, webhook_id: str, status: int | None, error: str) -> None:
        if attempts is None:
            return
        entry = WebhookAttempt(
            message.account, webhook_id, message.id, datetime.now(UTC), status, error, not error
        )
        try:
            attempts.put_nowait(entry)
        except anyio.WouldBlock:  # a million entries waiting: storage is down; counted
            store.log_dropped += 1

    async def send(message: OutboxMessage) -> None:
        batcher = batchers.get(message.account)
        payload = message.payload
        if batcher is None or not isinstance(payload, dict):
            raise SendError(f"no durable webhook {message.account!r} here", retryable=True)
        webhook_id = str(payload["delivery_id"])
        try:
            status = await batcher.deliver(webhook_id, str(payload["body"]).encode())
        except AttemptFailed as exc:
            record(message, webhook_id, exc.status, str(exc))
            budget = min(message.max_attempts, template.max_attempts)
            if exc.retryable and message.attempts >= budget:
                redrive.remember(message.account, message.id)
            raise SendError(
                str(exc),
                status=exc.status,
                retryable=exc.retryable,
                # An open circuit's probe time is not the receiver's Retry-After: the
                # policy's delay applies (minutes, not a burnt attempt every second).
                retry_after_s=None if exc.circuit_open else exc.retry_after_s,
            ) from None
        record(message, webhook_id, status, "")
        await redrive.recovered(message.account)

    timeout = max((h.timeout_secs for h in by_name.values()), default=10.0)
    config = OutboxConfig(
        send_timeout_s=timeout + 1.0,
        lease_s=max(120.0, 4 * timeout),
        # Rows left waiting for a retry by a previous run are only found by polling.
        fallback_poll_s=1.0,
    )

    async def write_log(batch: Batch[WebhookAttempt]) -> None:
        await storage.record_webhook_attempts(batch.items)

    def log_lost(dead: DeadLetter[WebhookAttempt]) -> None:
        store.log_dropped += len(dead.items)

    attempts: BatchWriter[WebhookAttempt] | None = None
    async with AsyncExitStack() as stack:
        if delivery_log:
            # Group commit, off the send path: the log never delays a delivery.
            attempts = await stack.enter_async_context(
                BatchWriter(
                    write_log,
                    outcome_batches(500),
                    on_dead_letter=log_lost,
                    name="webhook-delivery-log",
                    clock=clock,
                )
            )
        await stack.enter_async_context(
            open_outbox_relay(
                storage,
                {OUTBOX_CHANNEL: send},
                templates={OUTBOX_CHANNEL: template},
                config=config,
            )
        )
        tg = await stack.enter_async_context(anyio.create_task_group())
        if any(h.durable for h in hooks):
            tg.start_soon(store.scan_orphans, batchers)
        try:
            yield store
        finally:
            tg.cancel_scope.cancel()
