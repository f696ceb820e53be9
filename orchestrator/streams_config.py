"""Stream writer settings and statistics (``StreamConfig``, ``StreamWriterStatistics``).

Split from ``orchestrator/streams.py``, which re-exports both; ``[stream]`` in TOML and
``ASYNCSTORE_STREAM__*`` set ``StreamConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from asyncstore.orchestrator.batching import (
    DROP_REASONS,
    BatchConfig,
    BatchWriterStatistics,
    OverflowPolicy,
)
from asyncstore.orchestrator.broadcast import MAX_NOTIFY_BYTES
from asyncstore.storage.families import Family, MetricSink

__all__ = ["CRITICAL_KINDS", "STREAM_BATCH", "StreamConfig", "StreamWriterStatistics"]

CRITICAL_KINDS = frozenset({"turn_completed", "tool_result", "error", "cancelled"})

STREAM_BATCH = BatchConfig(
    max_batch=500,
    max_batch_bytes=1 << 20,
    # A small batch waits at most 5 ms: other instances see events within p99 < 25 ms at
    # 20 events/s per session. Measured against group commit (``eager``), which flushes as
    # soon as the last batch is done: the same p99, 4x the inserts and notifications per
    # event at that rate (benchmarks/streams_bench.py, cross-process section). Under load
    # batches fill up to max_batch either way.
    flush_interval_s=0.005,
    capacity=50_000,
    overflow=OverflowPolicy.DROP_NEWEST,  # an ephemeral delta is dropped before it gets a seq
    block_timeout_s=5.0,
    # Ride out a database restart or failover: retry for 2 minutes of outage (while the
    # events fit in capacity) rather than a number of attempts, which a 5 s restart used
    # to exhaust in 1.5 s. Set stream.batch.retry_budget_s to change it.
    max_retries=None,
    retry_budget_s=120.0,
    retry_base_s=0.05,
    # Capped at 1 s: buffered events reach storage within about a second of its return,
    # and a process probes a down database at most once a second.
    retry_max_s=1.0,
)


class StreamConfig(BaseModel):
    """Stream writer settings (``stream.batching`` is ``batching``).

    ``batch`` given as a mapping (TOML ``[stream.batch]``, ``ASYNCSTORE_STREAM__BATCH__*``)
    changes only the keys it names; the others keep the stream writer's defaults, not the
    generic ``BatchConfig`` ones.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batching: bool = True
    batch: BatchConfig = STREAM_BATCH
    critical_kinds: frozenset[str] = CRITICAL_KINDS
    notify: bool = Field(default=True, description="tell other instances what advanced")
    notify_inline: bool = Field(
        default=True,
        description="carry the stored events in the notification when they fit, so other "
        "instances publish them without a read (off: advances only, receivers fetch)",
    )
    notify_inline_max_bytes: int = Field(
        default=4 * MAX_NOTIFY_BYTES,
        ge=0,
        description="bytes of events carried inline at most, per flush with "
        "notify_with_insert, else of what waits for the notifier (it lags); the sessions "
        "beyond it are announced as advances and fetched",
    )
    notify_with_insert: bool = Field(
        default=True,
        description="send a flush's notification with its insert, in the same statement "
        "and transaction (Postgres: pg_notify in the append; SQLite: in process right after "
        "the commit, skipped while nothing in the process listens), instead of from the "
        "separate notifier task, one round trip per payload (off: the previous path)",
    )
    channel: str = "asyncstore_stream"

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_over_stream_defaults(cls, value: object) -> object:
        # Without this, setting one key (say retry_budget_s) would silently reset the rest
        # to BatchConfig's defaults: 5 retries, a blocking 10 000-item buffer.
        if isinstance(value, Mapping):
            return {**STREAM_BATCH.model_dump(), **value}
        return value


@dataclass(frozen=True, slots=True)
class StreamWriterStatistics:
    sessions: int
    emitted: int
    dropped: Mapping[str, int]
    persisted: int
    lost: int  # dead-lettered after retries or at shutdown: published live, never stored
    notifications: int
    notify_failures: int
    refused: int  # events the database fence refused: their epoch was superseded
    fenced_sessions: int  # sessions whose current epoch the database refused (LeaseLost)
    insert_statements: int  # legacy path: one per event
    writer: BatchWriterStatistics | None

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("stream_sessions", "gauge", "Sessions with a live stream writer state."),
        Family("stream_events_emitted", "counter", "Events published."),
        Family("stream_events_persisted", "counter", "Events stored."),
        Family("stream_events_lost", "counter", "Events published but never stored."),
        Family(
            "stream_events_dropped",
            "counter",
            "Events refused, by reason.",
            ("reason",),
            known=DROP_REASONS,
        ),
        Family(
            "stream_events_refused",
            "counter",
            "Events the database fence refused: their epoch was superseded.",
        ),
        Family("stream_notifications", "counter", "Stream notifications sent."),
        Family("stream_notify_failures", "counter", "Notifications that failed."),
        Family("stream_insert_statements", "counter", "Legacy per-event INSERTs."),
        *(
            replace(f, where=f.where or "the batching writer")
            for f in BatchWriterStatistics.METRIC_FAMILIES
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("stream_sessions", {}, self.sessions)
        out.sample("stream_events_emitted", {}, self.emitted)
        out.sample("stream_events_persisted", {}, self.persisted)
        out.sample("stream_events_lost", {}, self.lost)
        out.samples("stream_events_dropped", {}, self.dropped)
        out.sample("stream_events_refused", {}, self.refused)
        out.sample("stream_notifications", {}, self.notifications)
        out.sample("stream_notify_failures", {}, self.notify_failures)
        out.sample("stream_insert_statements", {}, self.insert_statements)
        if self.writer is not None:
            self.writer.export(out)
