"""Background maintenance: one database sweeper per fleet, one evictor per process.

``open_maintenance(storage, config, evictors=...)`` runs a loop on a jittered schedule. Each
round, every instance runs its evictors (idle per-process state such as broadcast rings),
and only the instance that holds the fleet-wide ``storage.open_leadership`` role sweeps the
database: stream events past their TTL in bounded batches (or, when ``stream_events`` is
partitioned, ``storage.stream_partitioning`` on Postgres, by rotating its partitions:
creating them ahead, dropping those whose sessions have all expired), succeeded tasks and
sent outbox messages past their retention, expired leases, idle login attempt counts,
periodic ticks past their retention (each schedule's latest kept), instance presence rows
past their expiry. It relies only on the storage contract and never runs on a request
path. It is also the
fleet's one lease sweeper: the runtime's session limiters sweep nothing themselves, and
when the rounds do not expire leases (maintenance disabled, or ``lease_grace_s`` unset) a
``LeaseSweep`` keeps a lease-only loop running, still on the leader only. The settings
and counters (``MaintenanceConfig``, ``LeaseSweep``, ``MaintenanceStatistics``) are pure
data in ``orchestrator.maintenance_config``; this module re-exports them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from types import MappingProxyType

import anyio
from anyio.abc import TaskStatus

from asyncstore.orchestrator.maintenance_config import (
    PURGE_KINDS,
    LeaseSweep,
    MaintenanceConfig,
    MaintenanceStatistics,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock, jittered
from asyncstore.storage import AsyncStorageBackend, Leadership

__all__ = [
    "PURGE_KINDS",
    "Evictor",
    "LeaseSweep",
    "MaintenanceConfig",
    "MaintenanceStatistics",
    "MaintenanceSweeper",
    "open_maintenance",
]

log = logging.getLogger("asyncstore.maintenance")

Evictor = Callable[[], int | Awaitable[int | None] | None]
"""Drops idle per-process state and returns how many entries it dropped (or None)."""


class MaintenanceSweeper:
    """The maintenance loop's state and one round of work. Build with ``open_maintenance``."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        config: MaintenanceConfig,
        role: Leadership,
        evictors: Sequence[Evictor] = (),
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._storage = storage
        self._config = config
        self._clock = clock
        self._role = role
        self._evictors: list[Evictor] = list(evictors)
        self._round_lock = anyio.Lock()
        self._round_done = anyio.Event()
        self._rounds = 0
        self._sweeps_run = 0
        self._sweeps_skipped = 0
        self._purged = dict.fromkeys(PURGE_KINDS, 0)
        self._stream_batches = 0
        self._evictor_runs = 0
        self._evicted = 0
        self._errors = 0
        self._last_error: str | None = None
        self._last_duration: float | None = None
        self._lease_sweeps = 0
        self._partitions = dict.fromkeys(("created", "dropped", "kept"), 0)

    @property
    def config(self) -> MaintenanceConfig:
        return self._config

    def add_evictor(self, evictor: Evictor) -> None:
        """Run ``evictor`` every round from now on (on every instance, leader or not)."""
        self._evictors.append(evictor)

    def statistics(self) -> MaintenanceStatistics:
        return MaintenanceStatistics(
            rounds=self._rounds,
            sweeps_run=self._sweeps_run,
            sweeps_skipped=self._sweeps_skipped,
            leading=self._role.leading,
            purged=MappingProxyType(dict(self._purged)),
            stream_batches=self._stream_batches,
            evictor_runs=self._evictor_runs,
            evicted=self._evicted,
            errors=self._errors,
            last_error=self._last_error,
            last_sweep_duration_s=self._last_duration,
            lease_sweeps=self._lease_sweeps,
            partitions_created=self._partitions["created"],
            partitions_dropped=self._partitions["dropped"],
            partitions_kept=self._partitions["kept"],
        )

    async def wait_rounds(self, rounds: int) -> None:
        """Wait until ``rounds`` rounds have finished in total; cancelling the wait is harmless."""
        while self._rounds < rounds:
            await self._round_done.wait()

    async def run_once(self) -> bool:
        """Run one round now: the evictors, then a sweep if this instance leads.

        Returns whether this instance swept. Rounds never overlap (the background loop
        waits for this one). Failures are logged and counted in ``statistics()``, never
        raised. If cancelled, the round stops at its next statement boundary: a batch in
        flight finishes or rolls back as a whole, and the rows purged so far stay purged.
        """
        async with self._round_lock:
            try:
                await self._evict()
                return await self._sweep_if_leading()
            finally:
                self._end_round()

    def _end_round(self) -> None:
        """Count a finished round (of either kind) and wake ``wait_rounds``."""
        self._rounds += 1
        self._round_done.set()
        self._round_done = anyio.Event()

    def _fail(self, step: str, exc: Exception) -> None:
        self._errors += 1
        self._last_error = f"{step}: {type(exc).__name__}: {exc}"
        log.warning("maintenance step %s failed, continuing: %s", step, exc, exc_info=exc)

    async def _evict(self) -> None:
        for evictor in list(self._evictors):
            self._evictor_runs += 1
            try:
                result = evictor()
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                self._fail(f"evictor {getattr(evictor, '__qualname__', evictor)!r}", exc)
                continue
            if isinstance(result, int):
                self._evicted += result

    async def _purge_outbox(self, retention_s: float) -> int:
        """Sent outbox rows and the webhook delivery log, under the same retention."""
        deleted = await self._storage.purge_outbox(retention_s)
        return deleted + await self._storage.purge_webhook_attempts(retention_s)

    async def _lead(self) -> bool:
        """Keep or take the leadership for this round; count the round skipped otherwise.

        False when another instance leads (``sweeps_skipped``) or when the role could not
        be asked (an error, counted and logged): either way this instance does not sweep.
        """
        try:
            leading = await self._role.try_lead()
        except Exception as exc:
            self._fail("leadership", exc)
            return False
        if not leading:
            self._sweeps_skipped += 1
        return leading

    async def _sweep_if_leading(self) -> bool:
        if not await self._lead():
            return False
        started = time.perf_counter()
        cfg = self._config
        steps: list[tuple[str, Callable[[], Awaitable[int]]]] = []
        if cfg.task_retention_s is not None:
            steps.append(("tasks", partial(self._storage.purge_tasks, cfg.task_retention_s)))
        if cfg.outbox_retention_s is not None:
            steps.append(("outbox", partial(self._purge_outbox, cfg.outbox_retention_s)))
        if cfg.lease_grace_s is not None:
            steps.append(("leases", partial(self._storage.expire_leases, cfg.lease_grace_s)))
        if cfg.login_attempts_retention_s is not None:
            purge_logins = self._storage.purge_login_attempts
            steps.append(("login_attempts", partial(purge_logins, cfg.login_attempts_retention_s)))
        if cfg.periodic_tick_retention_s is not None:
            purge_ticks = partial(self._storage.purge_periodic_ticks, cfg.periodic_tick_retention_s)
            steps.append(("periodic_ticks", purge_ticks))
        # Presence rows of instances that stopped without withdrawing (their own TTL, no
        # retention setting: an expired row is never read again).
        steps.append(("presence", self._storage.purge_presence))
        try:
            try:
                await self._expire_stream_events(cfg.stream_ttl_s)
            except Exception as exc:
                self._fail("stream_events", exc)
            for kind, step in steps:
                try:
                    deleted = await step()
                except Exception as exc:
                    self._fail(kind, exc)
                    continue
                self._purged[kind] += deleted
        finally:
            self._sweeps_run += 1
            self._last_duration = time.perf_counter() - started
        return True

    async def _expire_stream_events(self, ttl_s: float | None) -> None:
        """Rotate the partitions of a partitioned ``stream_events``, else purge in batches."""
        partitioned = bool(await self._storage.list_stream_partitions())
        drops = partitioned and self._config.stream_drop_partitions
        if partitioned:
            await self._rotate_stream_partitions(ttl_s if drops else None)
        if ttl_s is not None and not drops:
            await self._purge_stream_events(ttl_s)

    async def _rotate_stream_partitions(self, ttl_s: float | None) -> None:
        """Create the partitions ahead (and for sessions waiting in the default one), then
        drop the expired ones, oldest first, one transaction each.

        A failed creation (say, a lock wait that timed out) is counted and the drops still
        run; a failed drop is counted and the next partition tried. Drops are counted one
        by one, so ``statistics()`` keeps what a failed, cancelled or killed rotation did;
        whatever it did not finish, the next round (of any leader) does.
        """
        cfg = self._config
        ahead_s = float(cfg.stream_partition_s * cfg.stream_partitions_ahead)
        try:
            self._partitions["created"] += await self._storage.create_stream_partitions(
                cfg.stream_partition_s, ahead_s=ahead_s
            )
        except Exception as exc:
            self._fail("stream_partitions", exc)
        if ttl_s is None:
            return
        cutoff = time.time() - ttl_s  # wall time, as partition bounds are (the drop rechecks)
        for partition in await self._storage.list_stream_partitions():
            if partition.upper is None or partition.upper.timestamp() > cutoff:
                continue  # the default partition, or a range still taking new sessions
            try:
                rows = await self._storage.drop_stream_partition(partition.name, ttl_s)
            except Exception as exc:
                self._fail(f"stream_partitions {partition.name}", exc)
                continue
            if rows is None:
                self._partitions["kept"] += 1
            else:
                self._partitions["dropped"] += 1
                self._purged["stream_events"] += rows
            # A checkpoint between drops: other work runs and cancellation gets in.
            await self._clock.sleep(cfg.batch_pause_s)

    async def _purge_stream_events(self, ttl_s: float) -> None:
        """Delete expired events batch by batch until a batch comes back short.

        Counted per batch, so ``statistics()`` keeps what a failed or cancelled purge did.
        """
        size = self._config.purge_batch_size
        for _ in range(self._config.purge_max_batches):
            deleted = await self._storage.purge_stream_events_batch(ttl_s, limit=size)
            self._stream_batches += 1
            self._purged["stream_events"] += deleted
            if deleted < size:
                break
            # A checkpoint between batches: other work runs and cancellation gets in.
            await self._clock.sleep(self._config.batch_pause_s)

    def sweeps_leases(self) -> bool:
        """Whether this sweeper's rounds expire leases (enabled, ``lease_grace_s`` set)."""
        return self._config.enabled and self._config.lease_grace_s is not None

    async def sweep_leases_once(self, grace_s: float) -> bool:
        """A lease-only round: expire leases past ``grace_s`` if this instance leads.

        Returns whether it swept. Counted as a round (``sweeps_skipped`` when another
        instance leads, ``lease_sweeps`` when this one swept); never overlaps a round.
        Failures are logged and counted, never raised. If cancelled, the statement runs to
        completion or not at all.
        """
        async with self._round_lock:
            try:
                return await self._expire_leases_if_leading(grace_s)
            finally:
                self._end_round()

    async def _expire_leases_if_leading(self, grace_s: float) -> bool:
        if not await self._lead():
            return False
        try:
            deleted = await self._storage.expire_leases(grace_s)
        except Exception as exc:
            self._fail("leases", exc)
            return True
        self._lease_sweeps += 1
        self._purged["leases"] += deleted
        return True

    async def _run_lease_sweeps(self, sweep: LeaseSweep) -> None:
        jitter = self._config.jitter
        while True:
            await self._clock.sleep(jittered(sweep.interval_s, jitter))
            await self.sweep_leases_once(sweep.grace_s)

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        cfg = self._config
        while True:
            await self._clock.sleep(jittered(cfg.interval_s, cfg.jitter))
            await self.run_once()


@asynccontextmanager
async def open_maintenance(
    storage: AsyncStorageBackend,
    config: MaintenanceConfig | None = None,
    *,
    evictors: Sequence[Evictor] = (),
    lease_sweep: LeaseSweep | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[MaintenanceSweeper]:
    """Run the maintenance loop for the ``async with`` block.

    The first round starts one jittered interval (of ``clock``) after entering. Evictors
    run on every instance; the database sweep runs only on the instance holding the leadership named
    ``config.leadership_name``. ``lease_sweep`` (the session limiters' lease expiry) adds a
    lease-only loop, also leader-only, when the rounds do not expire leases themselves:
    so a fleet has one lease sweeper even with ``enabled`` False. Leaving the block (or
    cancelling it) stops the loop at its next await, a purge batch in flight included
    (Postgres cancels the statement; SQLite finishes its short transaction), then gives
    the leadership up, shielded.
    """
    cfg = config or MaintenanceConfig()
    async with storage.open_leadership(
        cfg.leadership_name, ttl_s=cfg.effective_leader_ttl_s
    ) as role:
        sweeper = MaintenanceSweeper(storage, cfg, role, evictors, clock=clock)
        async with anyio.create_task_group() as tg:
            if cfg.enabled:
                await tg.start(sweeper._run)
            if lease_sweep is not None and not sweeper.sweeps_leases():
                tg.start_soon(sweeper._run_lease_sweeps, lease_sweep)
            try:
                yield sweeper
            finally:
                tg.cancel_scope.cancel()
