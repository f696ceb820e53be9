"""Per-receiver circuit breakers: a receiver that is down costs one probe, not every call.

A ``CircuitBreaker`` counts consecutive failures of one receiver (connection errors,
timeouts, 5xx; an answer such as 4xx or 429 proves the receiver is up). After
``failure_threshold`` of them it opens: attempts fail at once, without a request, for
1 s at first, doubling after each failed probe up to ``reset_timeout_secs``; then one
probe is let through (half-open), and its result closes or re-opens the circuit.
``Breakers`` keeps one per origin (scheme, host, port), so the synchronous and
asynchronous hooks of one receiver share what they learn. Pure state, no I/O and no
tasks; the transport consults it around each attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock

__all__ = ["BreakerConfig", "BreakerState", "Breakers", "CircuitBreaker"]


class BreakerConfig(BaseModel):
    """``[circuit_breaker]`` in hooks.toml. ``enabled = false`` restores the old behaviour
    (every attempt is sent, however long the receiver has been down)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    reset_timeout_secs: float = Field(default=30.0, gt=0, le=3600)

    @property
    def open_for(self) -> Backoff:
        """How long the circuit stays open: 1 s, doubled after each failed probe, capped at
        ``reset_timeout_secs``; no jitter (the probe is one request, not a crowd)."""
        return Backoff(min(1.0, self.reset_timeout_secs), self.reset_timeout_secs, jitter=0)


@dataclass(frozen=True, slots=True)
class BreakerState:
    origin: str
    state: str  # closed, open, half_open
    consecutive_failures: int
    opened: int  # times the circuit opened
    short_circuited: int  # attempts refused without a request


class CircuitBreaker:
    """The breaker of one receiver; see the module docstring."""

    def __init__(
        self,
        origin: str,
        config: BreakerConfig,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.origin = origin
        self.config = config
        self._clock = clock
        self._backoff = config.open_for
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False
        self._openings = 1  # 1-based: the opening of this outage the circuit is at
        self._open_for = self._backoff.delay(1)
        self._opened = 0
        self._short = 0

    def retry_in_s(self) -> float:
        """0 when an attempt may go now, else the seconds until the next probe."""
        if not self.config.enabled or self._open_until is None:
            return 0.0
        remaining = self._open_until - self._clock.monotonic()
        if remaining > 0:
            return remaining
        return self._open_for if self._probing else 0.0

    def allow(self) -> bool:
        """May an attempt go now? In half-open state only one probe is in flight."""
        if self.retry_in_s() > 0:
            self._short += 1
            return False
        if self._open_until is not None:
            self._probing = True  # the one probe of this half-open period
        return True

    def record(self, receiver_up: bool | None) -> None:
        """The outcome of an allowed attempt: did the receiver answer like a live one?

        ``None``: no verdict (the attempt was cancelled or refused before sending); a
        half-open probe slot is given back.
        """
        self._probing = False
        if receiver_up is None:
            return
        if receiver_up:
            self._failures = 0
            self._open_until = None
            self._openings = 1
            self._open_for = self._backoff.delay(1)
            return
        self._failures += 1
        was_open = self._open_until is not None
        if was_open or self._failures >= self.config.failure_threshold:
            if was_open:  # a failed probe: wait twice as long before the next one
                self._openings += 1
                self._open_for = self._backoff.delay(self._openings)
            self._opened += 0 if was_open else 1
            self._open_until = self._clock.monotonic() + self._open_for

    @property
    def closed(self) -> bool:
        return self._open_until is None

    def state(self) -> BreakerState:
        if self._open_until is None:
            name = "closed"
        else:
            name = "open" if self._open_until > self._clock.monotonic() else "half_open"
        return BreakerState(self.origin, name, self._failures, self._opened, self._short)


class Breakers:
    """One ``CircuitBreaker`` per receiver origin."""

    def __init__(self, config: BreakerConfig | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._by_origin: dict[str, CircuitBreaker] = {}

    def for_url(self, url: str) -> CircuitBreaker:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        origin = f"{parts.scheme}://{parts.hostname}:{port}"
        breaker = self._by_origin.get(origin)
        if breaker is None:
            breaker = self._by_origin[origin] = CircuitBreaker(origin, self.config, self._clock)
        return breaker

    def states(self) -> list[BreakerState]:
        return [b.state() for b in self._by_origin.values()]
