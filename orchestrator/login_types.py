"""What the login attempt limiter is configured with, reports and hands out; no counting.

This module owns ``AttemptLimiterConfig`` (``auth.attempts.*`` in the settings tree, with the
``memory`` / ``storage`` mode flag), ``AttemptLimiterStatistics`` (its counters and metric
families) and ``LoginAttempt`` (a reserved attempt, finished once), with the per-key state
the memory mode keeps. The limiter and ``check_login`` are ``orchestrator.auth``'s, which
re-exports these names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from asyncstore.storage.base import LoginPolicy
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "AttemptLimiterConfig",
    "AttemptLimiterStatistics",
    "LoginAttempt",
    "Outcome",
    "Scope",
]

Scope = Literal["account", "address"]


Outcome = Literal["failure", "success", "release"]


class AttemptLimiterConfig(BaseModel):
    """Login throttling (``auth.attempts.*``): counting window, exponential lockout.

    ``max_failures_per_account`` failures plus attempts in flight of one key within
    ``window_s`` refuse further attempts, and the failure that reaches the limit locks the key
    for ``lockout_base_s``; each further lockout of that key multiplies the time by
    ``lockout_factor`` up to ``lockout_max_s``. A key's lockout growth is forgotten after
    ``forget_after_s`` without a failure; a successful login resets its account (not its
    address: one good account must not launder an address that sprays others).

    ``mode``: ``memory`` (the default) counts in this process, in a sliding window, with at
    most ``max_keys`` keys per scope (the least recently used go first); a fleet of N
    processes then allows N times the attempts. ``storage`` counts in the storage backend's
    ``login_attempts`` table, in fixed windows of ``window_s`` (so up to twice the limit
    across a window boundary), shared by every process on that database: Postgres for a
    fleet, SQLite for the processes of one host. Storage mode costs two short statements
    before and two after each verification, and fails closed: if the database cannot be
    reached, logins fail with the storage error instead of going uncounted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    mode: Literal["memory", "storage"] = "memory"
    window_s: float = Field(default=300.0, gt=0)
    max_failures_per_account: int = Field(default=5, ge=1)
    max_failures_per_address: int = Field(default=20, ge=1)
    lockout_base_s: float = Field(default=30.0, gt=0)
    lockout_factor: float = Field(default=2.0, ge=1)
    lockout_max_s: float = Field(default=3600.0, gt=0)
    forget_after_s: float = Field(default=86400.0, gt=0)
    max_keys: int = Field(default=100_000, ge=1)

    def policy(self, scope: Scope) -> LoginPolicy:
        """The storage-mode limits of one scope."""
        by_scope = {"account": self.max_failures_per_account}
        return LoginPolicy(
            limit=by_scope.get(scope, self.max_failures_per_address),
            window_s=self.window_s,
            lockout_base_s=self.lockout_base_s,
            lockout_factor=self.lockout_factor,
            lockout_max_s=self.lockout_max_s,
            forget_after_s=self.forget_after_s,
        )


@dataclass(frozen=True, slots=True)
class AttemptLimiterStatistics:
    accounts_tracked: int  # memory mode; 0 in storage mode (the table holds them)
    addresses_tracked: int
    allowed: int
    rejected: Mapping[str, int]  # by scope: account, address
    failures: int
    successes: int
    lockouts: Mapping[str, int]  # by scope (storage mode: the lockouts this process started)
    evicted: int
    in_flight: int  # attempts this process reserved and has not finished

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("auth_limiter_keys", "gauge", "Tracked keys.", ("scope",)),
        Family(
            "auth_limiter_in_flight",
            "gauge",
            "Login attempts this process reserved and has not finished (verifying now).",
        ),
        Family("auth_logins_allowed", "counter", "Login attempts the limiter let through."),
        Family("auth_logins_rejected", "counter", "Refused: locked out.", ("scope",)),
        Family("auth_lockouts", "counter", "Lockouts started.", ("scope",)),
        Family("auth_login_failures", "counter", "Failed logins."),
        Family("auth_login_successes", "counter", "Successful logins."),
        Family(
            "auth_limiter_evicted",
            "counter",
            "Memory mode: tracked keys forgotten (idle, or beyond max_keys).",
        ),
    )

    def export(self, out: MetricSink) -> None:
        keys = {"account": self.accounts_tracked, "address": self.addresses_tracked}
        out.samples("auth_limiter_keys", {}, keys)
        out.sample("auth_limiter_in_flight", {}, self.in_flight)
        out.sample("auth_logins_allowed", {}, self.allowed)
        out.samples("auth_logins_rejected", {}, self.rejected)
        out.samples("auth_lockouts", {}, self.lockouts)
        out.sample("auth_login_failures", {}, self.failures)
        out.sample("auth_login_successes", {}, self.successes)
        out.sample("auth_limiter_evicted", {}, self.evicted)


class _Key:
    __slots__ = ("failures", "in_flight", "last_failure", "level", "locked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.locked_until = 0.0
        self.level = 0
        self.last_failure = 0.0
        self.in_flight = 0


class LoginAttempt:
    """A reserved login attempt (from ``LoginAttemptLimiter.reserve``); finish it once."""

    __slots__ = ("_finished", "_states", "_windows", "account", "address")

    def __init__(
        self,
        account: str,
        address: str,
        *,
        states: tuple[_Key, _Key] | None = None,
        windows: tuple[float, float] | None = None,
    ) -> None:
        self.account = account
        self.address = address
        self._states = states
        self._windows = windows
        self._finished = False
