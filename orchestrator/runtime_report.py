"""What a runtime reports: ``RuntimeReport`` at close and ``RuntimeStatistics`` while open.

This module owns the two records: what closing could not deliver (stream events, webhook
batches, queue and outbox outcomes, cancelled turns) and the snapshot of the runtime and of
every per-session component's running paths. ``orchestrator.runtime`` re-exports both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from asyncstore.orchestrator.broadcast import HubStatistics
from asyncstore.orchestrator.cancellation import CancellationStatistics
from asyncstore.orchestrator.config import Flags
from asyncstore.orchestrator.lock_types import LimiterStatistics
from asyncstore.orchestrator.streams import StreamWriterStatistics
from asyncstore.orchestrator.webhooks.records import WebhookDrainReport

__all__ = ["RuntimeReport", "RuntimeStatistics"]


@dataclass(frozen=True, slots=True)
class RuntimeReport:
    """What closing the runtime could not deliver (all zero: everything was delivered)."""

    stream_events_lost: int
    webhooks: tuple[WebhookDrainReport, ...]
    queue_outcomes_undelivered: int
    outbox_results_undelivered: int
    turns_cancelled: int

    @property
    def webhooks_undelivered(self) -> int:
        return sum(r.undelivered for r in self.webhooks)

    @property
    def complete(self) -> bool:
        return not (
            self.stream_events_lost
            or self.webhooks_undelivered
            or self.queue_outcomes_undelivered
            or self.outbox_results_undelivered
        )


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    """A snapshot of the runtime and of the running paths of every per-session component.

    The mappings are keyed ``optimized`` / ``legacy``, for the instances built so far (a
    path no session could take under the flags so far is absent). ``tracked`` adds up the
    per-session state held in memory (stream sessions, rings, lock sessions, cancel tokens,
    turns): it must stay flat however many sessions came and went.
    """

    flags: Flags
    flags_version: int
    turns_started: int
    turns_active: int
    turns_by_path: Mapping[str, Mapping[str, int]]
    streams: Mapping[str, StreamWriterStatistics]
    broadcast: Mapping[str, HubStatistics]
    limiter: Mapping[str, LimiterStatistics]
    cancellation: Mapping[str, CancellationStatistics]

    @property
    def tracked(self) -> int:
        return (
            sum(s.sessions for s in self.streams.values())
            + sum(s.rings for s in self.broadcast.values())
            + sum(s.sessions_tracked for s in self.limiter.values())
            + sum(s.tokens for s in self.cancellation.values())
            + self.turns_active
        )
