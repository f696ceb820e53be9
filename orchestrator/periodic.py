"""Periodic tasks: schedules declared in code or settings, each tick enqueued exactly once.

``Periodic("*/5 * * * *", queue="reports", payload={...})`` (a cron expression, see
``orchestrator.cron``) or ``Periodic(every=timedelta(seconds=30), ...)`` (an interval: ticks
at whole multiples of ``every`` since the Unix epoch, so every process computes the same
ticks) declares a schedule; ``open_periodic(storage, schedules)`` runs them. Each tick is an
ordinary agent task on the schedule's queue (retries, dead letters and metrics apply), and
the tick is recorded in the database with the unique key (schedule name, tick time) in the
transaction that enqueues the task (``AsyncStorageBackend.record_periodic_tick``): however
many runners try a tick (two processes started at once, a restarted runner, a new leader),
one task is enqueued.

A runner that starts (or, in ``leader`` mode, becomes the leader) reads each schedule's
latest recorded tick and enqueues the ticks since then that are at most ``grace`` old (the
catch-up after a restart, a crash mid-tick or a leader change); older ones are skipped and
counted (``statistics().skipped``). A schedule never recorded starts at the first tick
within ``grace`` before the start, so a runner killed before its very first write loses
nothing either (a new schedule of period ``p`` enqueues up to ``grace / p`` ticks at once).
Between ticks the runner sleeps on its ``Clock`` until the next due tick (at most a minute
at a time, to follow steps of the wall clock), no polling of the database. Times are UTC
unless a schedule names a timezone.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.cron import Cron, load_timezone
from asyncstore.orchestrator.queue import AgentQueue
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock
from asyncstore.storage import AsyncStorageBackend, Leadership, NewTask, Task
from asyncstore.storage.base import JSON
from asyncstore.storage.errors import InvalidArgument, InvalidType, StorageError
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "Periodic",
    "PeriodicConfig",
    "PeriodicRunner",
    "PeriodicStatistics",
    "ScheduleSettings",
    "TickHook",
    "open_periodic",
]

log = logging.getLogger("asyncstore.periodic")

TickHook = Callable[["Periodic", datetime], Awaitable[None]]
"""Called with a schedule and a tick time around the tick's write (fault injection, tracing)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_DUE_SLACK = timedelta(milliseconds=1)  # a clock that wakes a hair early still runs the tick
_MAX_SLEEP_S = 60.0
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


@dataclass(frozen=True, slots=True)
class PeriodicStatistics:
    """A snapshot of a periodic runner's counters.

    ``enqueued``: ticks this runner recorded (each enqueued one task), ``caught_up`` of them
    due before the runner (re)synced with the database; ``already_recorded``: ticks another
    runner (or an earlier run) had recorded; ``skipped``: ticks older than their grace,
    never enqueued by this runner (``skipped_by_schedule`` per name); ``errors``: failed
    writes or reads (each logged and retried). ``leading`` is always True in ``all`` mode.
    """

    schedules: int
    mode: str
    leading: bool
    syncs: int
    enqueued: int
    caught_up: int
    already_recorded: int
    skipped: int
    skipped_by_schedule: Mapping[str, int]
    errors: int
    last_error: str | None
    next_tick: datetime | None

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("periodic_ticks", "counter", "Periodic ticks by outcome.", ("outcome",)),
        Family("periodic_errors", "counter", "Failed periodic tick writes or reads."),
        Family("periodic_leading", "gauge", "Whether this runner writes ticks."),
    )

    def export(self, out: MetricSink) -> None:
        outcomes = {
            "enqueued": self.enqueued,
            "already_recorded": self.already_recorded,
            "skipped": self.skipped,
        }
        out.samples("periodic_ticks", {}, outcomes)
        out.sample("periodic_errors", {}, self.errors)
        out.sample("periodic_leading", {}, int(self.leading))


@dataclass(slots=True)
class _Counters:
    syncs: int = 0
    enqueued: int = 0
    caught_up: int = 0
    already: int = 0
    errors: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


class PeriodicRunner:
    """Enqueues the ticks of its schedules. Build with ``open_periodic``; read ``statistics()``."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        schedules: Sequence[Periodic],
        config: PeriodicConfig,
        role: Leadership | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        before_record: TickHook | None = None,
        after_record: TickHook | None = None,
    ) -> None:
        self._storage = storage
        self._schedules = list(schedules)
        self._config = config
        self._role = role
        self._clock = clock
        self._before = before_record
        self._after = after_record
        self._queues = {s.queue: AgentQueue(storage, s.queue) for s in self._schedules}
        self._next: dict[str, datetime] = {}
        self._synced_at: datetime | None = None
        self._leading = role is None
        self._counts = _Counters(skipped=dict.fromkeys((s.name for s in schedules), 0))
        self._progress = anyio.Event()
        self._backoff = Backoff(config.retry_base_s, config.retry_max_s, jitter=0.5)

    @property
    def schedules(self) -> list[Periodic]:
        return list(self._schedules)

    def statistics(self) -> PeriodicStatistics:
        """A frozen snapshot of this runner's counters."""
        c = self._counts
        return PeriodicStatistics(
            schedules=len(self._schedules),
            mode=self._config.mode,
            leading=self._leading,
            syncs=c.syncs,
            enqueued=c.enqueued,
            caught_up=c.caught_up,
            already_recorded=c.already,
            skipped=sum(c.skipped.values()),
            skipped_by_schedule=MappingProxyType(dict(c.skipped)),
            errors=c.errors,
            last_error=c.last_error,
            next_tick=min(self._next.values(), default=None),
        )

    async def wait_handled(self, ticks: int) -> None:
        """Wait until ``enqueued + already_recorded + skipped`` reaches ``ticks``.

        Cancelling the wait is harmless.
        """
        while self._handled() < ticks:
            await self._progress.wait()

    def _handled(self) -> int:
        c = self._counts
        return c.enqueued + c.already + sum(c.skipped.values())

    def _moved(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.time(), UTC)

    def _fail(self, step: str, exc: Exception) -> None:
        self._counts.errors += 1
        self._counts.last_error = f"{step}: {type(exc).__name__}: {exc}"
        log.warning("periodic %s failed, retrying: %s", step, exc, exc_info=exc)
        self._moved()

    async def _sync(self) -> None:
        """Read each schedule's latest recorded tick and set where this runner resumes.

        Ticks after the latest recorded one and within their grace are due now (the
        catch-up); those older than their grace are skipped and counted.
        """
        last = await self._storage.last_periodic_ticks([s.name for s in self._schedules])
        now = self._now()
        for s in self._schedules:
            start = s.first_from(now - s.grace)
            recorded = last.get(s.name)
            if recorded is not None:
                resume = s.next_after(recorded)
                missed = s.count_between(resume, start)
                if missed:
                    self._skip(s, missed, f"after {recorded.isoformat()}")
                start = max(start, resume)
            self._next[s.name] = start
        self._synced_at = now
        self._counts.syncs += 1

    def _skip(self, schedule: Periodic, count: int, where: str) -> None:
        self._counts.skipped[schedule.name] += count
        log.warning(
            "periodic schedule %r: %d tick(s) %s older than the grace of %s skipped",
            schedule.name,
            count,
            where,
            schedule.grace,
        )
        self._moved()

    async def _lead(self) -> bool:
        """Leader mode: keep or take the role; on taking it, re-sync from the database."""
        if self._role is None:
            return True
        was = self._leading
        try:
            self._leading = await self._role.try_lead()
        except StorageError as exc:
            self._leading = False
            self._fail("leadership", exc)
            return False
        if self._leading and not was:
            try:
                await self._sync()
            except StorageError as exc:
                self._leading = False  # not synced: try again (and sync) at the next tick
                self._fail("sync", exc)
        return self._leading

    async def _record(self, schedule: Periodic, tick: datetime) -> None:
        """Write one tick and its task; retried (on this clock) while within its grace."""
        queue = self._queues[schedule.queue]
        task = NewTask(
            schedule.queue,
            schedule.payload,
            schedule.priority,
            None,
            schedule.idempotency_key(tick),
            schedule.max_attempts or queue.config.max_attempts,
        )
        attempt = 0
        while True:
            if tick + schedule.grace < self._now() - _DUE_SLACK:
                self._skip(schedule, 1, f"at {tick.isoformat()}, its writes failing,")
                return
            try:
                if self._before is not None:
                    await self._before(schedule, tick)
                # Shielded: the write is one short transaction that commits even when its
                # caller is cancelled, so the counters below must see its outcome.
                with anyio.CancelScope(shield=True):
                    written: Task | None = await self._storage.record_periodic_tick(
                        schedule.name, tick, task, notify=queue.channel
                    )
            except StorageError as exc:
                attempt += 1
                self._fail(f"tick {schedule.name!r} at {tick.isoformat()}", exc)
                await self._clock.sleep(self._backoff.delay(attempt))
                continue
            break
        if written is None:
            self._counts.already += 1
        else:
            self._counts.enqueued += 1
            if self._synced_at is not None and tick < self._synced_at:
                self._counts.caught_up += 1
            log.debug("periodic %r tick %s enqueued as task %d", schedule.name, tick, written.id)
        if self._after is not None:
            await self._after(schedule, tick)
        self._moved()

    async def _run_due(self, now: datetime) -> None:
        """Handle every tick due by ``now``, oldest first."""
        while True:
            name, tick = min(self._next.items(), key=lambda item: (item[1], item[0]))
            if tick > now + _DUE_SLACK:
                return
            schedule = next(s for s in self._schedules if s.name == name)
            if tick + schedule.grace < now - _DUE_SLACK:
                resume = schedule.first_from(now - schedule.grace)
                self._skip(schedule, schedule.count_between(tick, resume), "stalled")
                self._next[name] = resume
                continue
            await self._record(schedule, tick)
            self._next[name] = schedule.next_after(tick)

    async def _run(self) -> None:
        attempt = 0
        while not self._next:
            try:
                if self._role is None:
                    await self._sync()
                elif not await self._lead():
                    now = self._now()
                    self._next = {s.name: s.next_after(now) for s in self._schedules}
            except StorageError as exc:
                attempt += 1
                self._fail("sync", exc)
                await self._clock.sleep(self._backoff.delay(attempt))
        while True:
            now = self._now()
            due = min(self._next.values())
            if due > now + _DUE_SLACK:
                # At most a minute at a time: a long sleep runs on the monotonic clock, so
                # waking each minute notices a step of the wall clock the ticks follow.
                await self._clock.sleep(min((due - now).total_seconds(), _MAX_SLEEP_S))
                continue
            if await self._lead():
                await self._run_due(self._now())
            else:
                # A follower: the leader writes these ticks; try to take over at the next.
                for s in self._schedules:
                    if self._next[s.name] <= now + _DUE_SLACK:
                        self._next[s.name] = s.next_after(now)
                self._moved()


@asynccontextmanager
async def open_periodic(
    storage: AsyncStorageBackend,
    schedules: Sequence[Periodic] = (),
    config: PeriodicConfig | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    before_record: TickHook | None = None,
    after_record: TickHook | None = None,
) -> AsyncIterator[PeriodicRunner]:
    """Run ``schedules`` (and those of ``config.schedules``) for the ``async with`` block.

    On entering, the runner reads the latest recorded tick of each schedule and enqueues
    the missed ticks within their grace at once; then it sleeps on ``clock`` until the
    next tick. Duplicate schedule names are refused (``InvalidArgument``). With
    ``config.enabled`` False nothing runs. ``before_record`` / ``after_record`` are called
    around each tick's write (fault injection, tracing). Leaving the block (or cancelling
    it) stops the runner at its next await: a tick write in flight commits or rolls back
    as a whole (a rolled back tick is caught up by the next runner within its grace); in
    ``leader`` mode the leadership is then given up, shielded.
    """
    cfg = config or PeriodicConfig()
    every = [*schedules, *cfg.periodics()]
    for s in every:
        if not isinstance(s, Periodic):
            raise InvalidType(f"schedules must be Periodic objects, not {type(s).__name__}")
    names = [s.name for s in every]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"periodic schedule names must be unique: {dupes}")
    if cfg.mode == "leader":
        async with storage.open_leadership(cfg.leadership_name, ttl_s=cfg.leader_ttl_s) as role:
            runner = PeriodicRunner(
                storage,
                every,
                cfg,
                role,
                clock=clock,
                before_record=before_record,
                after_record=after_record,
            )
            async with _running(runner, cfg):
                yield runner
        return
    runner = PeriodicRunner(
        storage,
        every,
        cfg,
        None,
        clock=clock,
        before_record=before_record,
        after_record=after_record,
    )
    async with _running(runner, cfg):
        yield runner


@asynccontextmanager
async def _running(runner: PeriodicRunner, cfg: PeriodicConfig) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        if cfg.enabled and runner.schedules:
            tg.start_soon(runner._run)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
