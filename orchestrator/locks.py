"""SessionLimiter: exclusive use of a session across instances, with global and local caps.

``open_session_limiter(storage)`` owns a two-level limiter. Level one is in process: a FIFO
gate per session (so same-process contenders never ask the database who waits) and an
optional capacity limiter (``max_local``). Level two is the storage contract's session lease
with its fencing token, taken together with a numbered slot of a shared pool when a global
cap (``max_running``) is set: one statement, no COUNT(*), no DELETE. A waiter asks the
database once, then waits: for the session, a same-process contender waits at the local gate
and a remote one for the release notification its failed attempt armed; for the pool, only
the first of this process's cap waiters asks, again after a slot-release notification. A
jittered exponential backoff is only the fallback that bounds a missed wake-up. Held leases
are renewed in the background; a lost lease fires the session's cancel token
(``orchestrator.cancellation``). Expired leases are swept in the background.
``lock.mode = "db_poll"`` keeps the legacy loop (DELETE expired, COUNT(*), INSERT, fixed
sleep) as real code for rollback and benchmarks; under a global cap its INSERT takes a slot
of the same pool, so both modes count the same thing and may run side by side.

This module owns the limiter (``SessionLimiter``, ``open_session_limiter``); its settings,
statistics and ``HeldLease`` live in ``orchestrator.lock_types`` and are re-exported here.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup, TaskStatus

from asyncstore.orchestrator.cancellation import CancellationRegistry
from asyncstore.orchestrator.lock_types import (  # re-exported: their historical home
    WAIT_BUCKETS_S,
    HeldLease,
    LimiterConfig,
    LimiterStatistics,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import AsyncStorageBackend, Lease, LeaseLost, StorageError

__all__ = [
    "HeldLease",
    "LimiterConfig",
    "LimiterStatistics",
    "SessionLimiter",
    "open_session_limiter",
]

log = logging.getLogger("asyncstore.locks")


class _Session:
    """Local state of one session: its gate and the wake-up of its database waiter."""

    __slots__ = ("gate", "users", "wakeup")

    def __init__(self) -> None:
        self.gate = anyio.Lock()
        self.users = 0
        self.wakeup = anyio.Event()


class _CapWaiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()


class SessionLimiter:
    """Two-level session limiter. Build with ``open_session_limiter``; use ``hold()``."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        config: LimiterConfig,
        tg: TaskGroup,
        *,
        cancellation: CancellationRegistry | None,
        instance_id: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._storage = storage
        self._config = config
        self._clock = clock
        self._backoff = config.backoff
        self._tg = tg
        self._cancellation = cancellation
        self._instance_id = instance_id
        self._pool = config.slot_pool if config.max_running is not None else None
        self._local_cap = (
            anyio.CapacityLimiter(config.max_local)
            if config.max_local is not None and config.mode == "two_level"
            else None
        )
        self._sessions: dict[str, _Session] = {}
        self._cap_waiters: deque[_CapWaiter] = deque()
        self._holders = 0
        self._waiters = 0
        self._acquires = 0
        self._attempts = 0
        self._acquire_statements = 0
        self._release_statements = 0
        self._wakeups = 0
        self._fallback_retries = 0
        self._renewals = 0
        self._lost = 0
        self._sweeps = 0
        self._wait_total = 0.0
        self._wait_counts = [0] * (len(WAIT_BUCKETS_S) + 1)
        self._holds = 0

    @property
    def config(self) -> LimiterConfig:
        return self._config

    @property
    def instance_id(self) -> str:
        return self._instance_id

    def statistics(self) -> LimiterStatistics:
        bounds = (*WAIT_BUCKETS_S, float("inf"))
        return LimiterStatistics(
            mode=self._config.mode,
            holders=self._holders,
            waiters=self._waiters,
            cap_waiters=len(self._cap_waiters),
            sessions_tracked=len(self._sessions),
            acquires=self._acquires,
            acquire_attempts=self._attempts,
            acquire_statements=self._acquire_statements,
            release_statements=self._release_statements,
            wakeups=self._wakeups,
            fallback_retries=self._fallback_retries,
            renewals=self._renewals,
            leases_lost=self._lost,
            sweeps=self._sweeps,
            wait_total_s=self._wait_total,
            wait_histogram=tuple(zip(bounds, self._wait_counts, strict=True)),
        )

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[HeldLease]:
        """Hold the session exclusively across instances for the ``async with`` block.

        Waits (without polling the database while a wake-up can come) until the session is
        free and, with caps, until a local and a global slot are free. Cancelling the wait
        leaves nothing held. On exit the lease is released, shielded from cancellation so
        it is never left to expire. If the lease is lost while held, ``HeldLease.lost``
        turns true and the session's cancel token fires; the block is not interrupted
        otherwise, and fenced writes with the stale token are refused by storage.
        """
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _Session()
        state.users += 1
        self._waiters += 1
        waiting = True
        started = self._clock.monotonic()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._config.mode == "two_level":
                    await stack.enter_async_context(state.gate)
                    if self._local_cap is not None:
                        await stack.enter_async_context(self._local_cap)
                    lease = await self._acquire_two_level(session_id, state)
                else:
                    lease = await self._acquire_db_poll(session_id)
                waited = self._clock.monotonic() - started
                self._waiters -= 1
                waiting = False
                self._record_wait(waited)
                held = HeldLease(lease, waited)
                self._holders += 1
                self._tg.start_soon(self._renew, held)
                try:
                    yield held
                finally:
                    self._holders -= 1
                    held._renew_scope.cancel()
                    # Shielded: the release must reach the database even if we are being
                    # cancelled, or the session stays blocked until the lease expires.
                    with anyio.CancelScope(shield=True):
                        await self._release(held)
        finally:
            if waiting:
                self._waiters -= 1
            state.users -= 1
            if state.users == 0 and self._sessions.get(session_id) is state:
                del self._sessions[session_id]

    # -- two_level ---------------------------------------------------------------

    def _holder(self) -> str:
        self._holds += 1
        return f"{self._instance_id}#{self._holds}"

    async def _acquire_two_level(self, session_id: str, state: _Session) -> Lease:
        cfg = self._config
        waiter: _CapWaiter | None = None
        failures = 0
        try:
            if self._pool is not None and self._cap_waiters:
                # The pool was full when the first local cap waiter last asked, and it is
                # woken when a slot frees: queue behind it rather than ask the database.
                waiter = _CapWaiter()
                self._cap_waiters.append(waiter)
                await waiter.event.wait()
            while True:
                # Fresh events before the attempt: a release during the attempt is not lost.
                state.wakeup = anyio.Event()
                if waiter is not None:
                    waiter.event = anyio.Event()
                self._attempts += 1
                self._acquire_statements += 1
                attempt = await self._storage.acquire_lease_slot(
                    session_id,
                    self._holder(),
                    cfg.lease_ttl_s,
                    pool=self._pool,
                    slots=cfg.max_running or 0,
                )
                if attempt.lease is not None:
                    return attempt.lease
                failures += 1
                # Jitter: waiters that failed together do not retry together.
                delay = self._backoff.delay(failures)
                if self._pool is not None and not attempt.slot_ok:
                    # The pool is full; the attempt armed its release notification.
                    if waiter is None:
                        waiter = _CapWaiter()
                        self._cap_waiters.append(waiter)
                    if self._cap_waiters[0] is not waiter:
                        # Only the first cap waiter asks; the others wait for their turn.
                        await waiter.event.wait()
                        continue
                    wakeup = waiter.event
                else:
                    # The session is busy on another instance; the attempt marked its lease
                    # contended, so the holder's release notifies. Give up the pool's turn.
                    if waiter is not None:
                        self._leave_cap_queue(waiter)
                        waiter = None
                    wakeup = state.wakeup
                with self._clock.move_on_after(delay):
                    await wakeup.wait()
                if wakeup.is_set():
                    self._wakeups += 1
                else:
                    self._fallback_retries += 1
        finally:
            if waiter is not None:
                self._leave_cap_queue(waiter)

    def _leave_cap_queue(self, waiter: _CapWaiter) -> None:
        was_first = self._cap_waiters[0] is waiter
        self._cap_waiters.remove(waiter)
        if was_first and self._cap_waiters:
            # The next one asks at once: the slot that served us may not have been the last.
            self._cap_waiters[0].event.set()

    def _wake_cap_waiter(self) -> None:
        if self._cap_waiters:
            self._cap_waiters[0].event.set()

    # -- db_poll (legacy) --------------------------------------------------------------

    async def _acquire_db_poll(self, session_id: str) -> Lease:
        cfg = self._config
        while True:
            self._attempts += 1
            self._acquire_statements += 3
            await self._storage.expire_leases(0)
            running = await self._storage.count_leases()
            if cfg.max_running is None or running < cfg.max_running:
                lease = await self._take_db_poll(session_id)
                if lease is not None:
                    return lease
            else:
                self._acquire_statements -= 1  # the INSERT was not sent
            await self._clock.sleep(cfg.poll_interval_s)

    async def _take_db_poll(self, session_id: str) -> Lease | None:
        cfg = self._config
        if self._pool is None:
            return await self._storage.acquire_lease(session_id, self._holder(), cfg.lease_ttl_s)
        # With a global cap the legacy loop takes a slot of the same pool as two_level, in
        # the same statement as the lease: the COUNT(*) above is only its old pre-check (it
        # races with other instances' INSERTs), the slot is what holds the cap, so legacy
        # and optimized sessions of a partial rollout are counted against one pool.
        attempt = await self._storage.acquire_lease_slot(
            session_id, self._holder(), cfg.lease_ttl_s, pool=self._pool, slots=cfg.max_running or 0
        )
        return attempt.lease

    # -- holding -------------------------------------------------------------------

    async def _release(self, held: HeldLease) -> None:
        if held.lost:
            return
        self._release_statements += 1
        try:
            # Both modes release through the notifying statement (one statement either
            # way): a legacy hold's release must wake the two_level waiters of a mixed
            # rollout (of any instance) that wait for this session or, when capped, for a
            # slot; it notifies only when someone waits.
            await self._storage.release_lease_slot(
                held.session_id, held.token, channel=self._config.channel, pool=self._pool
            )
        finally:
            if self._pool is not None:
                # The pool's notification covers most releases, but not one that ran while
                # our first cap waiter's attempt skipped the locked slot (SKIP LOCKED) and
                # armed the notification after this release had looked: wake it ourselves.
                self._wake_cap_waiter()

    def _lose(self, held: HeldLease, reason: str) -> None:
        if held.lost:
            return
        self._lost += 1
        held._lost_reason = reason
        held._lost.set()
        log.warning("session %r: %s (token %d)", held.session_id, reason, held.token)
        if self._cancellation is not None:
            self._cancellation.fire_local(held.session_id, reason)

    async def _renew(self, held: HeldLease) -> None:
        """Renew every ``renew_interval_s`` while held; declare the lease lost in time.

        The lease is treated as ours until the local estimate of its expiry (the start of
        the last successful renewal plus the TTL) minus a margin. Each renewal call is bounded
        by that moment, so a call that hangs (a stuck pool, a slow database) cannot keep a
        holder running past its lease; a failed call is retried after a short pause, never
        in a tight loop.
        """
        cfg = self._config
        ttl = cfg.lease_ttl_s
        interval = cfg.effective_renew_interval_s
        margin = min(0.1 * ttl, 1.0)
        expires = self._clock.monotonic() + ttl
        next_at = self._clock.monotonic() + interval
        with held._renew_scope:
            while True:
                await self._clock.sleep(max(0.0, next_at - self._clock.monotonic()))
                give_up = expires - margin
                started = self._clock.monotonic()
                lease: Lease | None = None
                error: Exception | None = None
                with self._clock.move_on_after(give_up - started):
                    try:
                        self._renewals += 1
                        if cfg.mode == "two_level" or self._pool is not None:
                            lease = await self._storage.renew_lease_slot(
                                held.session_id, held.token, ttl, pool=self._pool
                            )
                        else:
                            lease = await self._storage.renew_lease(
                                held.session_id, held.token, ttl
                            )
                    except LeaseLost:
                        self._lose(held, "lease lost: superseded or expired")
                        return
                    except StorageError as exc:
                        error = exc
                if lease is None:
                    if self._clock.monotonic() >= give_up:
                        why = error or "the renewal did not answer in time"
                        self._lose(held, f"lease lost: could not renew before expiry ({why})")
                        return
                    log.warning("session %r: renewal failed, retrying: %s", held.session_id, error)
                    next_at = self._clock.monotonic() + min(interval, 0.5)
                    continue
                held._lease = lease
                expires = started + ttl
                next_at = started + interval

    # -- background --------------------------------------------------------------

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        async with self._storage.listen(self._config.channel) as stream:
            task_status.started()
            async for note in stream:
                if note.gap:
                    # Releases may have been missed: let every waiter retry now.
                    for state in self._sessions.values():
                        state.wakeup.set()
                    self._wake_cap_waiter()
                    continue
                kind, _, name = note.payload.partition(":")
                if kind == "s":
                    waiting = self._sessions.get(name)
                    if waiting is not None:
                        waiting.wakeup.set()
                elif kind == "p" and name == self._pool:
                    self._wake_cap_waiter()

    async def _sweep(self) -> None:
        while True:
            await self._clock.sleep(self._config.sweep_interval_s)
            try:
                await self._storage.expire_leases(self._config.sweep_grace_s)
                self._sweeps += 1
            except StorageError as exc:
                log.warning("lease sweep failed, will retry: %s", exc)

    def _record_wait(self, waited: float) -> None:
        self._acquires += 1
        self._wait_total += waited
        self._wait_counts[bisect.bisect_left(WAIT_BUCKETS_S, waited)] += 1


def default_instance_id() -> str:
    """A process-unique holder prefix: host, pid and a random suffix."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(3)}"


@asynccontextmanager
async def open_session_limiter(
    storage: AsyncStorageBackend,
    config: LimiterConfig | None = None,
    *,
    cancellation: CancellationRegistry | None = None,
    instance_id: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[SessionLimiter]:
    """Open a session limiter; its listener, sweeper and renewals run within the block.

    In ``two_level`` mode the slot pool is created (``max_running``) and the release
    channel is subscribed before the block starts. With ``cancellation``, a lost lease
    fires the session's token in that registry. ``clock`` times the renewals, the fallback
    retries, the legacy poll and the sweep (tests pass a ``ManualClock``; lease expiry itself
    is the database's time). Leaving the block stops the background tasks; holds still open
    then are released by their own ``async with``.
    """
    cfg = config or LimiterConfig()
    async with anyio.create_task_group() as tg:
        limiter = SessionLimiter(
            storage,
            cfg,
            tg,
            cancellation=cancellation,
            instance_id=instance_id or default_instance_id(),
            clock=clock,
        )
        if cfg.max_running is not None:
            # Both modes take slots of the pool when capped (see ``_take_db_poll``).
            await storage.ensure_lease_slots(cfg.slot_pool, cfg.max_running)
        if cfg.mode == "two_level":
            await tg.start(limiter._listen)
            if cfg.sweep_leases:
                tg.start_soon(limiter._sweep)
        try:
            yield limiter
        finally:
            tg.cancel_scope.cancel()
