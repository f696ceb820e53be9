"""What a BatchWriter hands out: the batch its sink receives, dead letters, the drain report,
health and statistics (with their metric families). Split from ``orchestrator/batching.py``,
which re-exports them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Generic, TypeVar

from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "DEAD_LETTER_REASONS",
    "DROP_REASONS",
    "Batch",
    "BatchWriterStatistics",
    "DeadLetter",
    "DrainReport",
    "Health",
]

T = TypeVar("T")

DROP_REASONS = ("overflow", "overflow_oldest", "overflow_newest")
"""Why an item is dropped: a full buffer under the policy raise/drop-newest/drop-oldest."""
DEAD_LETTER_REASONS = ("retries_exhausted", "retry_budget_exhausted", "not_retryable", "shutdown")
"""Why items are dead-lettered (``DeadLetter.reason``)."""


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """What the sink receives: the items in arrival order, and the same items per key."""

    items: list[T]
    groups: Mapping[Hashable, list[T]]
    nbytes: int
    attempt: int  # 0 on the first try, 1 on the first retry, ...


@dataclass(frozen=True, slots=True)
class DeadLetter(Generic[T]):
    """Items the writer gave up on, with the reason and the last sink error."""

    items: list[T]
    # "retries_exhausted" (max_retries), "retry_budget_exhausted" (the outage outlasted
    # retry_budget_s), "not_retryable" (retry_if said no) or "shutdown" (drain timed out)
    reason: str
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What ``aclose()`` achieved: written items and what could not be written."""

    flushed: int
    dead_lettered: int
    dropped: Mapping[str, int]
    # dead-lettered items by reason
    dead_letters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def complete(self) -> bool:
        return self.dead_lettered == 0


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BatchWriterStatistics:
    name: str
    pending: int  # waiting for a flush
    in_flight: int  # handed to the sink, not yet confirmed (retries included)
    buffered_bytes: int
    accepted: int
    flushed: int  # items the sink confirmed
    batches: int
    dropped: Mapping[str, int]
    retries: int
    dead_lettered: int
    blocked_puts: int  # puts waiting for room right now
    oldest_pending_age_s: float
    last_flush_latency_s: float
    # dead-lettered items by reason
    dead_letters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    consecutive_failures: int = 0  # failed sink calls since the last success
    failing_for_s: float = 0.0  # since the first of those failures; 0.0 while healthy
    failing_since: float | None = None  # the same moment as a Unix timestamp
    last_error: str = ""  # the latest failure's text while failing, else ""

    @property
    def unsettled(self) -> int:
        """Items not yet confirmed by the sink: waiting plus in flight."""
        return self.pending + self.in_flight

    @property
    def sink_unavailable(self) -> bool:
        """The sink's latest call failed and none has succeeded since."""
        return self.consecutive_failures > 0

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("writer_pending", "gauge", "Items waiting for a flush.", ("writer",)),
        Family("writer_in_flight", "gauge", "Items handed to the sink.", ("writer",)),
        Family("writer_buffered_bytes", "gauge", "Bytes buffered.", ("writer",)),
        Family("writer_blocked_puts", "gauge", "Puts waiting for room.", ("writer",)),
        Family(
            "writer_oldest_pending_age_seconds", "gauge", "Age of the oldest item.", ("writer",)
        ),
        Family("writer_last_flush_latency_seconds", "gauge", "Last flush duration.", ("writer",)),
        Family("writer_accepted", "counter", "Items accepted.", ("writer",)),
        Family("writer_flushed", "counter", "Items the sink confirmed (writes).", ("writer",)),
        Family("writer_batches", "counter", "Batches confirmed.", ("writer",)),
        Family(
            "writer_dropped",
            "counter",
            "Items dropped, by reason.",
            ("writer", "reason"),
            known=DROP_REASONS,
        ),
        Family("writer_retries", "counter", "Batch retries.", ("writer",)),
        Family("writer_dead_lettered", "counter", "Items dead-lettered.", ("writer",)),
        Family(
            "writer_dead_letters",
            "counter",
            "Items dead-lettered, by reason.",
            ("writer", "reason"),
            known=DEAD_LETTER_REASONS,
        ),
        Family(
            "writer_sink_unavailable",
            "gauge",
            "1 while the sink's latest write failed (storage unavailable), else 0.",
            ("writer",),
        ),
        Family(
            "writer_sink_failing_seconds",
            "gauge",
            "How long the sink has been failing (0 while healthy).",
            ("writer",),
        ),
        Family(
            "writer_sink_consecutive_failures",
            "gauge",
            "Failed sink calls since the last success.",
            ("writer",),
        ),
        Family("writer_buffered", "gauge", "Items buffered: waiting plus in flight.", ("writer",)),
    )

    def export(self, out: MetricSink) -> None:
        labels = {"writer": self.name}
        out.sample("writer_pending", labels, self.pending)
        out.sample("writer_in_flight", labels, self.in_flight)
        out.sample("writer_buffered_bytes", labels, self.buffered_bytes)
        out.sample("writer_blocked_puts", labels, self.blocked_puts)
        out.sample("writer_oldest_pending_age_seconds", labels, self.oldest_pending_age_s)
        out.sample("writer_last_flush_latency_seconds", labels, self.last_flush_latency_s)
        out.sample("writer_accepted", labels, self.accepted)
        out.sample("writer_flushed", labels, self.flushed)
        out.sample("writer_batches", labels, self.batches)
        out.samples("writer_dropped", labels, self.dropped)
        out.sample("writer_retries", labels, self.retries)
        out.sample("writer_dead_lettered", labels, self.dead_lettered)
        out.samples("writer_dead_letters", labels, self.dead_letters)
        out.sample("writer_sink_unavailable", labels, 1.0 if self.sink_unavailable else 0.0)
        out.sample("writer_sink_failing_seconds", labels, self.failing_for_s)
        out.sample("writer_sink_consecutive_failures", labels, self.consecutive_failures)
        out.sample("writer_buffered", labels, self.unsettled)
