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

This module owns the running (``PeriodicRunner``, ``open_periodic``, its statistics); the
declarations (``Periodic``, ``ScheduleSettings``, ``PeriodicConfig``) live in
``orchestrator.schedules`` and are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import ClassVar

import anyio

from asyncstore.orchestrator.queue import AgentQueue
from asyncstore.orchestrator.schedules import (  # re-exported: their historical home
    Periodic,
    PeriodicConfig,
    ScheduleSettings,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock
from asyncstore.storage import AsyncStorageBackend, Leadership, NewTask, Task
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

_DUE_SLACK = timedelta(milliseconds=1)  # a clock that wakes a hair early still runs the tick
_MAX_SLEEP_S = 60.0


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
