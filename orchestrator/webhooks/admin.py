"""Operator tools for durable webhooks: read the delivery log, re-send a delivery.

``delivery_log`` lists attempts (newest first) per webhook-id with time, status and error;
``resend`` puts a delivery back in the outbox with the same webhook-id and the same body,
so the application's running relay delivers it again, signed afresh at send time (a
receiver de-duplicating on the webhook-id sees a repeat, not a new event). Both use the
storage contract and the outbox's public API only; ``asyncstore webhooks`` wraps them.
"""

from __future__ import annotations

from asyncstore.orchestrator.errors import ResendRefused
from asyncstore.orchestrator.outbox import Outbox
from asyncstore.orchestrator.webhooks.durable import OUTBOX_CHANNEL
from asyncstore.storage import AsyncStorageBackend, NewOutboxMessage, WebhookAttempt

__all__ = ["ResendRefused", "delivery_log", "format_attempt", "resend"]


async def delivery_log(
    storage: AsyncStorageBackend,
    *,
    endpoint: str | None = None,
    failed: bool = False,
    limit: int = 100,
) -> list[WebhookAttempt]:
    """Attempts, newest first; ``failed``: only webhook-ids no attempt delivered."""
    return await storage.list_webhook_attempts(endpoint=endpoint, failed=failed, limit=limit)


def format_attempt(attempt: WebhookAttempt) -> str:
    """One log line: time, endpoint, webhook-id, outbox row, status and error."""
    status = str(attempt.status) if attempt.status is not None else "-"
    outcome = "delivered" if attempt.ok else (attempt.error or "failed")
    return (
        f"{attempt.attempted_at.isoformat(timespec='milliseconds')}  {attempt.endpoint}  "
        f"{attempt.webhook_id}  row={attempt.outbox_id}  status={status}  {outcome}"
    )


async def resend(storage: AsyncStorageBackend, webhook_id: str) -> int:
    """Queue ``webhook_id``'s delivery again (same id and body); returns the new outbox row.

    ``ResendRefused`` when the log does not know the id or the outbox row holding the body
    is gone (purged by retention). If cancelled, the row is either queued or not written.
    """
    found = await storage.list_webhook_attempts(webhook_id=webhook_id, limit=1)
    if not found or found[0].outbox_id is None:
        raise ResendRefused(f"no delivery {webhook_id!r} in the delivery log")
    row = await storage.get_outbox(found[0].outbox_id)
    payload = row.payload if row is not None else None
    if row is None or not isinstance(payload, dict) or payload.get("delivery_id") != webhook_id:
        raise ResendRefused(
            f"the body of {webhook_id!r} is no longer stored (outbox row "
            f"{found[0].outbox_id} was purged)"
        )
    (queued,) = await Outbox(storage).enqueue(
        [NewOutboxMessage(OUTBOX_CHANNEL, row.account, payload, max_attempts=row.max_attempts)]
    )
    return queued.id
