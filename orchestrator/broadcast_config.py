"""The broadcast hub's settings, records and counters.

``HubConfig`` (delivery mode, ring sizes, the slow-subscriber policy), ``StreamReset`` (what
a subscriber gets where its view cannot continue exactly), ``Position`` and the
``HubStatistics`` snapshot with its metric families. Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from asyncstore.storage.families import Family, MetricSink

Position = tuple[int, int]
"""A resume point ``(epoch, seq)``: the last event the client has. ``(0, 0)``: from the start."""

MAX_NOTIFY_BYTES = 7800  # under storage's 7900-byte notification limit


class DeliveryMode(StrEnum):
    MEMORY = "memory"  # live subscribers read the ring; the database only for resumes
    POLL = "poll"  # legacy: every subscriber polls the database at a fixed interval


class SlowSubscriberPolicy(StrEnum):
    CATCH_UP = "catch_up"  # read what left the ring from the database, then rejoin it
    DISCONNECT = "disconnect"  # raise SubscriberLagged from the iterator


class HubConfig(BaseModel):
    """Ring bounds, eviction and delivery mode (``stream.delivery`` is ``mode``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: DeliveryMode = DeliveryMode.MEMORY
    ring_max_events: int = Field(default=2048, ge=1)
    ring_max_bytes: int = Field(default=4 << 20, ge=1)
    ring_idle_ttl_s: float = Field(default=300.0, gt=0, description="evict idle rings after")
    max_rings: int = Field(default=10_000, ge=1, description="LRU cap on rings kept")
    sweep_interval_s: float = Field(default=10.0, gt=0)
    slow_subscriber: SlowSubscriberPolicy = SlowSubscriberPolicy.CATCH_UP
    page_size: int = Field(default=500, ge=1, le=10_000, description="rows per database read")
    resume_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="how long a resume point not yet visible here may take to arrive",
    )
    poll_interval_s: float = Field(default=0.2, gt=0, description="legacy poll mode only")
    channel: str = "asyncstore_stream"
    cross_instance: bool = Field(default=True, description="fetch other instances' events")


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The subscriber's view cannot be continued exactly: reload, then keep reading.

    ``seq`` is the last event the stream holds at the reset (reload up to it); the next item
    the subscription yields is the event after it. ``epoch`` is the stream's current epoch.
    ``reason``: ``epoch_changed`` (the client's events were superseded by a new lease
    holder), ``unknown_resume_point`` (never stored, or from the future), ``gap`` (events
    the subscriber needs were purged or could not be persisted).
    """

    session_id: str
    reason: str
    epoch: int
    seq: int


DB_READ_CAUSES = ("resume", "catch_up", "fan_in", "head", "poll")
"""Why a subscriber caused a database read (``HubStatistics.db_reads``)."""
RESET_REASONS = ("epoch_changed", "unknown_resume_point", "gap")
HUB_DROP_REASONS = ("stale_epoch", "duplicate", "fetch_untaken")


@dataclass(frozen=True, slots=True)
class HubStatistics:
    mode: str
    rings: int
    subscribers: int
    published: int
    delivered: int
    db_reads: Mapping[str, int]  # by cause: resume, catch_up, fan_in, head, poll
    resets: Mapping[str, int]
    dropped: Mapping[str, int]  # refused: stale_epoch, duplicate; fetch_untaken (fan-in)
    rings_evicted: int
    lagged_disconnects: int
    fetch_errors: int
    notifications: int
    inline_events: int = 0  # other instances' events taken from notifications, no read

    @property
    def db_reads_total(self) -> int:
        return sum(self.db_reads.values())

    @property
    def live_db_reads(self) -> int:
        """Reads caused by subscribers that were live (not resuming): catch-up and polling."""
        return self.db_reads.get("catch_up", 0) + self.db_reads.get("poll", 0)

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("broadcast_rings", "gauge", "Per-session ring buffers."),
        Family("broadcast_subscribers", "gauge", "Live stream subscribers (WS/SSE)."),
        Family("broadcast_published", "counter", "Events put in rings."),
        Family("broadcast_delivered", "counter", "Events handed to subscribers."),
        Family(
            "broadcast_db_reads",
            "counter",
            "Database reads caused by subscribers.",
            ("cause",),
            known=DB_READ_CAUSES,
        ),
        Family(
            "broadcast_resets", "counter", "Resets sent, by reason.", ("reason",), RESET_REASONS
        ),
        Family("broadcast_dropped", "counter", "Publishes refused.", ("reason",), HUB_DROP_REASONS),
        Family("broadcast_rings_evicted", "counter", "Idle rings evicted."),
        Family("broadcast_lagged_disconnects", "counter", "Slow subscribers cut."),
        Family("broadcast_fetch_errors", "counter", "Failed event fetches."),
        Family(
            "broadcast_inline_events",
            "counter",
            "Other instances' events taken from notifications without a read.",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("broadcast_rings", {}, self.rings)
        out.sample("broadcast_subscribers", {}, self.subscribers)
        out.sample("broadcast_published", {}, self.published)
        out.sample("broadcast_delivered", {}, self.delivered)
        out.samples("broadcast_db_reads", {}, self.db_reads)
        out.samples("broadcast_resets", {}, self.resets)
        out.samples("broadcast_dropped", {}, self.dropped)
        out.sample("broadcast_rings_evicted", {}, self.rings_evicted)
        out.sample("broadcast_lagged_disconnects", {}, self.lagged_disconnects)
        out.sample("broadcast_fetch_errors", {}, self.fetch_errors)
        out.sample("broadcast_inline_events", {}, self.inline_events)
