"""What the async webhook batcher takes, reports and retries on; no sending.

This module owns the batcher's records: ``WebhookEvent`` (one event as POSTed),
``Submission`` (what ``submit`` did with it), ``WebhookDeadLetter`` and
``WebhookDrainReport`` (what could not be delivered, and the drain at close),
``AsyncWebhookStatistics`` (its counters and metric families), which triggers are critical,
which HTTP statuses a later attempt can fix, and ``DurableStore`` (the journal a durable
batcher writes through). The batcher itself is ``orchestrator.webhooks.batcher``, which
re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from asyncstore.orchestrator.batching import (
    DROP_REASONS,
    BatchWriterStatistics,
)
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "CRITICAL_TRIGGERS",
    "RETRYABLE_STATUSES",
    "AsyncWebhookStatistics",
    "DurableStore",
    "Submission",
    "WebhookDeadLetter",
    "WebhookDrainReport",
    "WebhookEvent",
    "is_retryable_status",
]

CRITICAL_TRIGGERS = frozenset({"error", "turn_complete", "session_end"})
"""Events of these triggers are never dropped by the overflow policy: ``submit`` waits at
most ``block_timeout_ms`` for room, then spills them to the outbox or counts them."""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One queued event, in the seed's batch shape plus its stable ``id``."""

    id: str
    event: str
    hook_name: str
    trigger: str  # the configured trigger value, as in the seed
    context: Mapping[str, Any]
    timestamp_ms: int
    journal_id: int | None = None  # durable: its row in the journal until it is batched

    @classmethod
    def from_json(cls, data: Mapping[str, Any], journal_id: int | None = None) -> WebhookEvent:
        return cls(
            str(data["id"]),
            str(data["event"]),
            str(data["hook_name"]),
            str(data["trigger"]),
            dict(data["context"]),
            int(data["timestamp_ms"]),
            journal_id,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "hook_name": self.hook_name,
            "trigger": self.trigger,
            "context": self.context,
            "timestamp_ms": self.timestamp_ms,
        }


@dataclass(frozen=True, slots=True)
class WebhookDeadLetter:
    """A batch the batcher gave up on: its delivery id, events, reason and last error."""

    endpoint: str
    delivery_id: str
    events: tuple[WebhookEvent, ...]
    reason: str  # retries_exhausted, shutdown, gone, disabled, refused
    error: str
    status: int | None = None  # the receiver's last HTTP status, if it answered


@dataclass(frozen=True, slots=True)
class WebhookDrainReport:
    """What closing achieved: delivered events and the ones that could not be delivered."""

    endpoint: str
    delivered: int
    undelivered: int
    dropped: Mapping[str, int]

    @property
    def complete(self) -> bool:
        return self.undelivered == 0


@dataclass(frozen=True, slots=True)
class AsyncWebhookStatistics:
    endpoint: str
    enabled: bool
    accepted: int
    delivered: int  # events the receiver confirmed with 2xx (or persisted, when durable)
    batches: int  # batches confirmed
    requests: int  # HTTP requests sent, retries included
    failed_attempts: int
    dead_lettered: int  # events
    dropped: Mapping[str, int]  # overflow (the writer's reasons, overflow_critical...), disabled
    writer: BatchWriterStatistics
    spilled: int = 0  # events written straight to the outbox because the queue stayed full
    not_persisted: int = 0  # durable events whose outbox write failed (callers were told)
    journaled: int = 0  # durable events committed to the journal
    adopted: int = 0  # orphaned journal events this batcher took over

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("webhook_enabled", "gauge", "1 while the endpoint is enabled.", ("endpoint",)),
        Family("webhook_events_accepted", "counter", "Events queued.", ("endpoint",)),
        Family("webhook_events_delivered", "counter", "Events confirmed.", ("endpoint",)),
        Family("webhook_requests", "counter", "HTTP requests, retries included.", ("endpoint",)),
        Family("webhook_failed_attempts", "counter", "Failed attempts.", ("endpoint",)),
        Family("webhook_events_dead_lettered", "counter", "Events given up.", ("endpoint",)),
        Family(
            "webhook_events_dropped",
            "counter",
            "Events dropped.",
            ("endpoint", "reason"),
            known=(*DROP_REASONS, "overflow_critical", "overflow_blocked", "disabled"),
        ),
        Family(
            "webhook_events_spilled",
            "counter",
            "Events written straight to the outbox because the queue stayed full.",
            ("endpoint",),
        ),
        Family(
            "webhook_events_not_persisted",
            "counter",
            "Durable events whose outbox write failed (the caller was told).",
            ("endpoint",),
        ),
        *BatchWriterStatistics.METRIC_FAMILIES,
    )

    def export(self, out: MetricSink) -> None:
        labels = {"endpoint": self.endpoint}
        out.sample("webhook_enabled", labels, float(self.enabled))
        out.sample("webhook_events_accepted", labels, self.accepted)
        out.sample("webhook_events_delivered", labels, self.delivered)
        out.sample("webhook_requests", labels, self.requests)
        out.sample("webhook_failed_attempts", labels, self.failed_attempts)
        out.sample("webhook_events_dead_lettered", labels, self.dead_lettered)
        out.samples("webhook_events_dropped", labels, self.dropped)
        out.sample("webhook_events_spilled", labels, self.spilled)
        out.sample("webhook_events_not_persisted", labels, self.not_persisted)
        self.writer.export(out)


@dataclass(frozen=True, slots=True)
class Submission:
    """What became of one event handed to ``submit``.

    ``status``: ``queued`` (in memory; durable: its outbox row committed), ``spilled`` (the
    queue stayed full, the event's own outbox row committed), ``overflow`` (the queue stayed
    full and no outbox took it: counted), ``dropped`` (the overflow policy), ``disabled``
    (after a 410), ``failed`` (durable: the outbox write failed) or ``closed``.
    """

    status: str
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.status in ("queued", "spilled")


RETRYABLE_STATUSES = frozenset({408, 425, 429})
"""Besides every 5xx: the statuses that say "try again later". Any other status that is not
2xx means the receiver refused the request itself, and sending it again cannot help."""


def is_retryable_status(status: int) -> bool:
    """True for 408, 425, 429 and 5xx: the statuses a later attempt can turn into a 2xx."""
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


class DurableStore(Protocol):
    """Where durable events go (``orchestrator.webhooks.durable`` implements it)."""

    async def journal(self, endpoint: str, bodies: Sequence[bytes]) -> list[int]:
        """Commit single events (group commit); their journal ids, in order."""

    async def persist(
        self, endpoint: str, msg_id: str, body: bytes, count: int, journal_ids: Sequence[int]
    ) -> None:
        """Write one batch as an outbox row, then forget its journaled events."""
