"""What the session limiter is configured with and hands out; no limiting.

This module owns ``LimiterConfig`` (``lock.*`` in the settings tree, including the legacy
``db_poll`` mode flag), ``LimiterStatistics`` (the limiter's counters and metric families,
``WAIT_BUCKETS_S`` its wait histogram) and ``HeldLease`` (a held session lease, its fencing
token and its loss). The limiter itself is ``orchestrator.locks``, which re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.timing import Backoff
from asyncstore.storage import Lease
from asyncstore.storage.families import Family, MetricSink

__all__ = ["WAIT_BUCKETS_S", "HeldLease", "LimiterConfig", "LimiterStatistics"]

WAIT_BUCKETS_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class LimiterConfig(BaseModel):
    """Settings of the session limiter (``lock.*`` in the settings tree).

    ``mode``: ``two_level`` (default) or ``db_poll`` (legacy loop; ignores ``max_local``).
    ``max_running`` caps running sessions across every instance that shares ``slot_pool``;
    ``max_local`` caps them in this process. ``renew_interval_s`` defaults to a third of
    ``lease_ttl_s``. A waiter waits for a wake-up (the release of the session or a slot) and
    retries without one only after a jittered exponential backoff from ``backoff_initial_s``
    to ``backoff_max_s``: a fallback that bounds what a missed wake-up (a crashed holder, a
    lost notification) can cost, not a poll. ``poll_interval_s`` is the legacy loop's fixed
    sleep; 200 ms is the old limiter's ``SESSION_LOCK_POLL_INTERVAL_S``.

    ``max_running`` is held by the pool's numbered slots in both modes: ``db_poll`` keeps
    its DELETE / COUNT(*) pre-check and fixed sleep but takes its lease together with a slot
    (``acquire_lease_slot``), so a partial rollout of the lock flag, where both modes run
    side by side, never runs more than ``max_running`` sessions. ``sweep_leases``: a
    ``two_level`` limiter deletes leases expired for ``sweep_grace_s`` every
    ``sweep_interval_s``; the runtime turns it off and leaves that sweep to the maintenance
    leader, one sweeper per fleet (``orchestrator.maintenance``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["two_level", "db_poll"] = "two_level"
    lease_ttl_s: float = Field(default=30.0, gt=0)
    renew_interval_s: float | None = Field(default=None, gt=0)
    max_running: int | None = Field(default=None, ge=1)
    max_local: int | None = Field(default=None, ge=1)
    slot_pool: str = Field(default="default", min_length=1, max_length=255)
    sweep_leases: bool = True
    sweep_interval_s: float = Field(default=30.0, gt=0)
    sweep_grace_s: float = Field(default=60.0, ge=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=5.0, gt=0)
    poll_interval_s: float = Field(default=0.2, gt=0)
    channel: str = Field(default="asyncstore.lease", min_length=1, max_length=63)

    @model_validator(mode="after")
    def _check(self) -> LimiterConfig:
        if self.renew_interval_s is not None and self.renew_interval_s >= self.lease_ttl_s:
            raise ValueError("renew_interval_s must be shorter than lease_ttl_s")
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s must not exceed backoff_max_s")
        return self

    @property
    def effective_renew_interval_s(self) -> float:
        return self.renew_interval_s or self.lease_ttl_s / 3

    @property
    def backoff(self) -> Backoff:
        """A waiter's fallback retry: ``backoff_initial_s`` doubling, equal jitter."""
        return Backoff(self.backoff_initial_s, self.backoff_max_s, jitter=0.5)


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a limiter's counters.

    ``acquire_statements`` counts the storage calls made on the acquire path (each one
    statement on Postgres); ``wakeups`` counts waits ended by a wake-up and
    ``fallback_retries`` those ended by the fallback backoff; ``wait_histogram`` maps a
    bucket's upper bound in seconds (the last is ``inf``) to the number of acquisitions whose
    wait fell in it.
    """

    mode: str
    holders: int
    waiters: int
    cap_waiters: int
    sessions_tracked: int
    acquires: int
    acquire_attempts: int
    acquire_statements: int
    release_statements: int
    wakeups: int
    fallback_retries: int
    renewals: int
    leases_lost: int
    sweeps: int
    wait_total_s: float
    wait_histogram: tuple[tuple[float, int], ...]

    @property
    def statements_per_acquire(self) -> float:
        return self.acquire_statements / self.acquires if self.acquires else 0.0

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("lock_holders", "gauge", "Session leases held."),
        Family("lock_waiters", "gauge", "Tasks waiting for a session."),
        Family("lock_cap_waiters", "gauge", "Tasks waiting for a global slot."),
        Family("lock_acquires", "counter", "Leases acquired."),
        Family("lock_acquire_attempts", "counter", "Acquire attempts."),
        Family("lock_acquire_statements", "counter", "Statements on the acquire path."),
        Family("lock_wakeups", "counter", "Waits ended by a wake-up."),
        Family("lock_fallback_retries", "counter", "Waits ended by the backoff."),
        Family("lock_leases_lost", "counter", "Held leases lost."),
        Family("lock_wait_seconds", "histogram", "Wait to acquire a session."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("lock_holders", {}, self.holders)
        out.sample("lock_waiters", {}, self.waiters)
        out.sample("lock_cap_waiters", {}, self.cap_waiters)
        out.sample("lock_acquires", {}, self.acquires)
        out.sample("lock_acquire_attempts", {}, self.acquire_attempts)
        out.sample("lock_acquire_statements", {}, self.acquire_statements)
        out.sample("lock_wakeups", {}, self.wakeups)
        out.sample("lock_fallback_retries", {}, self.fallback_retries)
        out.sample("lock_leases_lost", {}, self.leases_lost)
        out.histogram("lock_wait_seconds", {}, self.wait_histogram, self.wait_total_s)


class HeldLease:
    """The lease of a session held by ``SessionLimiter.hold``.

    ``token`` is the fencing token to pass to fenced writes (``append_messages(...,
    lease_token=held.token)``). ``lost`` turns true, and ``wait_lost()`` returns, when the
    lease could not be renewed or was superseded; the session's cancel token fires then.
    """

    __slots__ = ("_lease", "_lost", "_lost_reason", "_renew_scope", "session_id", "waited_s")

    def __init__(self, lease: Lease, waited_s: float) -> None:
        self.session_id = lease.session_id
        self.waited_s = waited_s
        self._lease = lease
        self._lost = anyio.Event()
        self._lost_reason: str | None = None
        self._renew_scope = anyio.CancelScope()

    @property
    def token(self) -> int:
        return self._lease.token

    @property
    def expires_at(self) -> datetime:
        """When the lease expires unless renewed (as of the last renewal)."""
        return self._lease.expires_at

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self) -> str:
        """Wait until the lease is lost and return why; cancelling the wait is harmless."""
        await self._lost.wait()
        return self._lost_reason or ""
