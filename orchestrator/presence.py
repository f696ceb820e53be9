"""Publish this instance's live stream subscribers so any process can see the fleet's.

A session's subscribers are open connections held in the memory of the process serving
them; ``PresencePublisher`` writes that process's counts (``Runtime.subscriber_counts``) to
the database every ``runtime.presence_interval_s`` as one presence row with a TTL of three
intervals (``storage.publish_presence``), so an operator dashboard in any process sums them
over every live instance (``orchestrator.dashboard_views``). A killed instance's row
expires on the database's clock; a clean close withdraws it at once. It relies on the
storage contract and the runtime's ``Clock`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import orjson

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import AsyncStorageBackend, StorageError
from asyncstore.storage.base import PRESENCE_MAX_BYTES, PRESENCE_MAX_SESSIONS
from asyncstore.storage.families import Family, MetricSink

__all__ = ["TTL_INTERVALS", "PresencePublisher", "PresenceStatistics", "fit_counts"]

log = logging.getLogger("asyncstore.presence")

TTL_INTERVALS = 3
"""A presence row counts for this many publish intervals: one or two late or failed
publishes do not make an instance's subscribers vanish from the dashboard."""


def fit_counts(
    counts: Mapping[str, int],
    *,
    max_sessions: int = PRESENCE_MAX_SESSIONS,
    max_bytes: int = PRESENCE_MAX_BYTES,
) -> tuple[dict[str, int], int]:
    """The busiest sessions of ``counts`` that fit one presence row, and how many did not.

    Sessions are taken by subscriber count (most first, then by id) while the row stays
    within ``max_sessions`` and ``max_bytes`` of JSON; sessions with no subscriber are
    left out and not counted as dropped.
    """
    live = sorted(((s, n) for s, n in counts.items() if n > 0), key=lambda e: (-e[1], e[0]))
    kept: dict[str, int] = {}
    size = 2  # {}
    for session_id, n in live:
        entry = len(orjson.dumps(session_id)) + 1 + len(str(n)) + (1 if kept else 0)  # ,"id":n
        if len(kept) >= max_sessions or size + entry > max_bytes:
            break
        kept[session_id] = n
        size += entry
    return kept, len(live) - len(kept)


@dataclass(frozen=True, slots=True)
class PresenceStatistics:
    """A snapshot of the publisher's counters.

    ``publishes`` counts rows written and ``failures`` publishes that raised (each logged;
    the next interval tries again), ``last_error`` the latest failure. ``sessions`` and
    ``subscribers`` are what the last written row held; ``sessions_left_out`` counts, over
    every publish, sessions that did not fit a row (the busiest are kept). ``withdrawn``
    says whether a clean close deleted the row.
    """

    interval_s: float  # 0: off
    ttl_s: float
    publishes: int
    failures: int
    last_error: str | None
    sessions: int
    subscribers: int
    sessions_left_out: int
    withdrawn: bool

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family(
            "presence_publishes",
            "counter",
            "Presence rows written (runtime.presence_interval_s): this instance's subscribers.",
        ),
        Family("presence_failures", "counter", "Presence publishes that failed (logged)."),
        Family("presence_sessions", "gauge", "Sessions in the last presence row written."),
        Family("presence_subscribers", "gauge", "Subscribers in the last presence row written."),
        Family(
            "presence_sessions_left_out",
            "counter",
            "Sessions that did not fit a presence row (the busiest are kept).",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("presence_publishes", {}, self.publishes)
        out.sample("presence_failures", {}, self.failures)
        out.sample("presence_sessions", {}, self.sessions)
        out.sample("presence_subscribers", {}, self.subscribers)
        out.sample("presence_sessions_left_out", {}, self.sessions_left_out)


class PresencePublisher:
    """Writes ``counts()`` as ``instance_id``'s presence row every ``interval_s`` of
    ``clock`` while ``run`` runs; ``withdraw`` deletes the row. ``interval_s`` 0: off."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        instance_id: str,
        counts: Callable[[], Mapping[str, int]],
        interval_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.storage = storage
        self.instance_id = instance_id
        self.interval_s = interval_s
        self.ttl_s = TTL_INTERVALS * interval_s
        self.clock = clock
        self._counts = counts
        self._publishes = 0
        self._failures = 0
        self._last_error: str | None = None
        self._sessions = 0
        self._subscribers = 0
        self._left_out = 0
        self._withdrawn = False

    async def publish(self) -> bool:
        """Write the row now; True if it was written. A failure is logged and counted,
        never raised. If cancelled, the row is either written whole or left as it was."""
        kept, left_out = fit_counts(self._counts())
        try:
            await self.storage.publish_presence(self.instance_id, kept, self.ttl_s)
        except StorageError as exc:
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning("publishing this instance's presence failed, retrying: %s", exc)
            return False
        self._publishes += 1
        self._sessions = len(kept)
        self._subscribers = sum(kept.values())
        self._left_out += left_out
        if left_out:
            log.warning("presence: %d sessions did not fit the row (the busiest kept)", left_out)
        return True

    async def run(self) -> None:
        """Publish at once, then every ``interval_s``, until cancelled (between or during
        a publish: the row is then written whole or not at all). Returns at once if off."""
        if self.interval_s <= 0:
            return
        while True:
            await self.publish()
            await self.clock.sleep(self.interval_s)

    async def withdraw(self) -> bool:
        """Delete the row (a clean close, after ``run`` stopped); True if one was deleted.

        Does nothing when publishing is off or never succeeded. A failure is logged, never
        raised: the row then expires after its TTL. If cancelled, the row is either gone or
        expires on its own.
        """
        if self.interval_s <= 0 or not self._publishes:
            return False
        try:
            self._withdrawn = await self.storage.withdraw_presence(self.instance_id)
        except StorageError as exc:
            log.warning("withdrawing this instance's presence failed (it expires): %s", exc)
            return False
        return self._withdrawn

    def statistics(self) -> PresenceStatistics:
        return PresenceStatistics(
            interval_s=self.interval_s,
            ttl_s=self.ttl_s,
            publishes=self._publishes,
            failures=self._failures,
            last_error=self._last_error,
            sessions=self._sessions,
            subscribers=self._subscribers,
            sessions_left_out=self._left_out,
            withdrawn=self._withdrawn,
        )
