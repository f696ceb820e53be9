"""Periodic schedules as declared: ``Periodic`` and its settings, no running.

This module owns what a schedule *is*: ``Periodic`` (a cron expression or an interval,
the queue and payload of its tasks, its grace and timezone), the tick arithmetic on it
(``next_after``, ``first_from``, ``count_between``, ``idempotency_key``), and the
settings that declare schedules (``ScheduleSettings``, ``PeriodicConfig``). Running them
(enqueueing each tick exactly once) is ``orchestrator.periodic``'s, which re-exports
these names.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.cron import Cron, load_timezone
from asyncstore.storage.base import JSON
from asyncstore.storage.errors import InvalidArgument, InvalidType

__all__ = ["Periodic", "PeriodicConfig", "ScheduleSettings"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_SKIP_COUNT_LIMIT = 100_000  # a cron schedule's skipped ticks are counted up to this many


@dataclass(frozen=True, slots=True, init=False)
class Periodic:
    """A periodic schedule: a cron expression or an interval, and the task each tick enqueues.

    ``cron`` (5 fields, evaluated in ``timezone``, default UTC) or ``every`` (a
    ``timedelta`` or seconds, at least one second; ticks at whole multiples of it since
    the Unix epoch in UTC), exactly one. ``name`` keys the ticks in the database: keep it
    stable across deploys (the default is built from the queue, the schedule and the
    payload, so changing either starts a new schedule). ``grace`` is how late a tick may
    still be enqueued (after a restart, a crash or a stall; at least one second, as a
    runner wakes a little after each tick); older ticks are skipped and counted. The task
    gets ``payload``, ``priority``, ``max_attempts`` (None: the queue's default) and the
    idempotency key ``periodic:<name>@<tick in ISO 8601>``, from which a handler can read
    the tick it runs for.
    """

    name: str
    queue: str
    payload: JSON
    cron: Cron | None
    every: timedelta | None
    grace: timedelta
    timezone: str
    priority: int
    max_attempts: int | None

    def __init__(
        self,
        cron: str | None = None,
        *,
        every: timedelta | float | None = None,
        queue: str = "default",
        payload: JSON = None,
        name: str | None = None,
        grace: timedelta | float = timedelta(minutes=1),
        timezone: str = "UTC",
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> None:
        if (cron is None) == (every is None):
            raise InvalidArgument("a Periodic schedule needs exactly one of cron= and every=")
        parsed = None if cron is None else Cron(cron, timezone)
        interval = None if every is None else _duration(every, "every")
        if interval is not None:
            load_timezone(timezone)  # an interval ignores it, but a typo is still an error
            if interval < timedelta(seconds=1):
                raise InvalidArgument("every= must be at least one second")
        grace_td = _duration(grace, "grace")
        if grace_td < timedelta(seconds=1):
            # A runner on a real clock wakes a little after the tick (scheduling latency):
            # a smaller grace would skip ticks that were not late in any useful sense.
            raise InvalidArgument("grace must be at least one second")
        try:
            encoded = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise InvalidType(f"Periodic payload is not JSON: {exc}") from exc
        if name is None:
            spec = cron if cron is not None else f"every {interval}"
            zone = "" if timezone.upper() == "UTC" or cron is None else f" {timezone}"
            digest = hashlib.sha256(encoded).hexdigest()[:12]
            name = f"{queue}:{spec}{zone}:{digest}"
        if not isinstance(name, str) or not 1 <= len(name) <= 200 or "\x00" in name:
            raise InvalidArgument("a Periodic name must be a str of 1..200 characters")
        if max_attempts is not None and not 1 <= max_attempts <= 10_000:
            raise InvalidArgument("max_attempts must be in 1..10000")
        values = {
            "name": name,
            "queue": queue,
            "payload": payload,
            "cron": parsed,
            "every": interval,
            "grace": grace_td,
            "timezone": timezone,
            "priority": priority,
            "max_attempts": max_attempts,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def next_after(self, instant: datetime) -> datetime:
        """The first tick strictly after ``instant`` (aware), in UTC."""
        if self.cron is not None:
            return self.cron.next_after(instant)
        step = self._step_us()
        return _EPOCH + _MICRO * ((_micros(instant) // step + 1) * step)

    def first_from(self, instant: datetime) -> datetime:
        """The first tick at or after ``instant``."""
        return self.next_after(instant - _MICRO)

    def count_between(self, start: datetime, end: datetime) -> int:
        """How many ticks fall in ``[start, end)`` (a cron count stops at 100,000)."""
        if end <= start:
            return 0
        if self.cron is None:
            step = self._step_us()
            return max(0, -(-_micros(end) // step) - -(-_micros(start) // step))
        count, tick = 0, self.first_from(start)
        while tick < end and count < _SKIP_COUNT_LIMIT:
            count += 1
            tick = self.next_after(tick)
        return count

    def idempotency_key(self, tick: datetime) -> str:
        return f"periodic:{self.name}@{tick.astimezone(UTC).isoformat()}"

    def _step_us(self) -> int:
        if self.every is None:
            raise InvalidArgument("not an interval schedule")
        return self.every // _MICRO


def _duration(value: object, what: str) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidType(f"{what} must be a timedelta or seconds, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be finite")
    return timedelta(seconds=value)


def _micros(instant: datetime) -> int:
    if instant.tzinfo is None:
        raise InvalidArgument("a schedule needs a timezone-aware datetime")
    return (instant - _EPOCH) // _MICRO


class ScheduleSettings(BaseModel):
    """One schedule in the settings (``periodic.schedules``): the fields of ``Periodic``,
    durations in seconds (``every_s``, ``grace_s``; None: ``periodic.default_grace_s``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    cron: str | None = None
    every_s: float | None = Field(default=None, ge=1)
    queue: str = "default"
    payload: Any = None
    grace_s: float | None = Field(default=None, ge=1)
    timezone: str = "UTC"
    priority: int = 0
    max_attempts: int | None = Field(default=None, ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSettings:
        self.to_periodic(60.0)  # refuse a bad expression, timezone or payload when loaded
        return self

    def to_periodic(self, default_grace_s: float) -> Periodic:
        """The ``Periodic`` this entry declares."""
        return Periodic(
            self.cron,
            every=self.every_s,
            queue=self.queue,
            payload=self.payload,
            name=self.name,
            grace=self.grace_s if self.grace_s is not None else default_grace_s,
            timezone=self.timezone,
            priority=self.priority,
            max_attempts=self.max_attempts,
        )


class PeriodicConfig(BaseModel):
    """Settings of the periodic runner (``periodic.*`` in the settings tree).

    ``mode`` ``all`` (default): every runner tries every tick and the database's unique key
    lets one through, so a paused or partitioned process never holds ticks back.
    ``leader``: only the holder of the leadership ``leadership_name`` writes ticks (the
    others try to take it over at each tick), one write per tick instead of one per
    process; a new leader catches up the ticks its predecessor left within their grace.
    ``leader_ttl_s`` is the leadership's expiry on SQLite (Postgres ends it with the
    holder's session). A failed tick write is retried after ``retry_base_s`` doubling up
    to ``retry_max_s`` while the tick is within its grace.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    mode: Literal["all", "leader"] = "all"
    leadership_name: str = "asyncstore.periodic"
    leader_ttl_s: float = Field(default=30.0, gt=0)
    default_grace_s: float = Field(default=60.0, ge=1)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    schedules: tuple[ScheduleSettings, ...] = ()

    def periodics(self) -> list[Periodic]:
        """The schedules declared here, as ``Periodic`` objects."""
        return [s.to_periodic(self.default_grace_s) for s in self.schedules]
