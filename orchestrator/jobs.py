"""JobConsumer: the one consumer loop of the leased-job engine, for the queue and the outbox.

This module owns what the agent queue's worker (``orchestrator.queue``) and the outbox
relay (``orchestrator.outbox``) share on top of the storage job contract (``claim_jobs``,
``heartbeat_jobs``, ``complete_jobs`` / ``fail_jobs`` / ``dead_letter_jobs`` /
``release_jobs``, each taking a ``JobKind``): the claim loop (claim as many rows as the
consumer has room for in one statement, hand them over), the idle wait (a notification
on the kind's channel, the next known due time, the next lease expiry read from the
database when the consumer can, or a rare jittered fallback poll), lease renewal,
outcomes written in batches by one ``BatchWriter`` (one statement per outcome kind, each
effective only under the current claim), and the drain on exit. A consumer configures it
with a ``ConsumerSpec`` and implements how much room it has (``_room``), what it does with
claimed rows (``_dispatch``) and how it drains its own work (``_drain``). The loop's
timing (idle waits, the fallback poll, lease renewals, the horizon of the next due row)
reads an injectable ``Clock`` (``clock=``), so tests drive it with ``ManualClock``. The
spec and outcome types live in ``orchestrator.consumer_spec`` and are re-exported here.
"""

from __future__ import annotations

import abc
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from asyncstore.orchestrator.batching import Batch, BatchWriter, DeadLetter, outcome_batches
from asyncstore.orchestrator.consumer_spec import (
    BUSY_RETRY,
    STORAGE_RETRY,
    Claimed,
    ConsumerSpec,
    Outcome,
    OutcomeKind,
    first_of,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock, jittered
from asyncstore.storage import AsyncStorageBackend, Claim, Failure, StorageError
from asyncstore.storage.errors import UsageError, is_retryable

__all__ = [
    "BUSY_RETRY",
    "STORAGE_RETRY",
    "Claimed",
    "ConsumerSpec",
    "JobConsumer",
    "Outcome",
    "OutcomeKind",
    "first_of",
]

J = TypeVar("J", bound=Claimed)

log = logging.getLogger("asyncstore.jobs")


class JobConsumer(abc.ABC, Generic[J]):
    """The claim / idle-wait / listen / heartbeat / outcome loop of one consumer."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        spec: ConsumerSpec,
        consumer_id: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._spec = spec
        self._consumer_id = consumer_id
        self._held: dict[int, int] = {}  # job id -> lease token, until its outcome is written
        self._wake = anyio.Event()  # a notification or a finished group member: claim again
        self._rearm = anyio.Event()  # a nearer due time became known: re-arm the idle timer
        self._progress = anyio.Event()  # room was freed: the claim loop may claim again
        self._stopping = anyio.Event()
        self._loop_done = anyio.Event()
        self._due: list[float] = []  # heap of known future run_after timestamps
        self._writer: BatchWriter[Outcome] | None = None
        self._tasks: TaskGroup | None = None
        self._last_renewal = self._clock.monotonic()
        # Until this monotonic time no row can become claimable unannounced: the earliest
        # due time or lease expiry read by the last next-due query, capped by that query's
        # time plus lease_s (a lease taken by anyone later expires no sooner).
        self._horizon = 0.0
        self._busy_retries = 0
        self._claimed = 0
        self._claims = 0
        self._counts = dict.fromkeys(OutcomeKind, 0)
        self._stale = 0
        self._undelivered = 0
        self._notifications = 0
        self._polls = 0
        self._errors = 0
        self._lease_lost = 0
        self._due_queries = 0
        self._expiry_wakeups = 0

    # -- what a consumer implements ------------------------------------------------

    @abc.abstractmethod
    def _room(self) -> int:
        """How many rows to claim now; 0: wait until ``_progress`` is set."""

    @abc.abstractmethod
    def _dispatch(self, jobs: Sequence[J]) -> None:
        """Start work on claimed rows (not called once stopping: they are released)."""

    @abc.abstractmethod
    async def _drain(self) -> None:
        """On stop, after the loop ended: let work finish within the grace, then cancel it.
        Every claimed row must have its outcome recorded when this returns."""

    def _release_unstarted(self) -> None:
        """Record the release of rows claimed but not started (on exit, even cancelled)."""

    def _on_lease_lost(self, job_id: int) -> None:
        """The lease of ``job_id`` is gone: stop working on it (its state is not ours)."""

    async def _loop(self) -> None:
        """The claim loop; a legacy mode may replace it."""
        await self._claim_loop()

    def _held_back_s(self) -> float | None:
        """After a claim: seconds until a limit may allow the rows it held back (a
        fleet-wide limit or an ordering group refused them), or None when nothing was held
        back. The loop then waits that long, or until a wakeup (a finish notification)."""
        return None

    async def _after_outcomes(self) -> None:
        """Called after a batch of outcomes was written (a coordinated queue announces
        the freed slots here)."""

    # -- lifecycle -----------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until the outcomes recorded so far are written. Cancelling loses nothing."""
        if self._writer is not None:
            await self._writer.flush()

    def stop(self) -> None:
        """Stop claiming; ``_serve`` drains and returns."""
        self._stopping.set()

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The consumer's own task group: listener, heartbeat, loop, the consumer's work.

        Cancelling it cancels the work; the releases are still written (the writer's final
        flush is shielded).
        """
        spec = self._spec
        async with BatchWriter(
            self._write_batch,
            outcome_batches(spec.max_write_batch),
            retry_if=is_retryable,
            on_dead_letter=self._undeliverable,
            name=spec.writer_name,
            clock=self._clock,
        ) as writer:
            self._writer = writer
            try:
                async with anyio.create_task_group() as tg:
                    self._tasks = tg
                    if spec.channel is not None:
                        await tg.start(self._listen, spec.channel)
                    if spec.heartbeat_s is not None:
                        tg.start_soon(self._heartbeat, spec.heartbeat_s)
                    tg.start_soon(self._run_loop)
                    task_status.started()
                    await self._stopping.wait()
                    await self._loop_done.wait()
                    await self._drain()
                    tg.cancel_scope.cancel()
            finally:
                self._release_unstarted()

    async def _run_loop(self) -> None:
        try:
            await self._loop()
        finally:
            self._loop_done.set()

    # -- claiming ------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            room = self._room()
            if room <= 0:
                self._progress = anyio.Event()
                await first_of(self._progress, self._stopping)
                continue
            self._wake = anyio.Event()
            jobs = await self._claim(room)
            if jobs is None:
                await self._sleep_or_stop(STORAGE_RETRY.delay(1))
                continue
            if jobs:
                self._busy_retries = 0
            if self._take(jobs):
                continue
            held_back = self._held_back_s()
            if held_back is not None:
                await self._wait_held_back(held_back)
            elif len(jobs) < room:
                await self._idle_wait()

    async def _claim(self, limit: int) -> list[J] | None:
        """One claim statement; None after a storage error (logged and counted)."""
        self._claims += 1
        spec = self._spec
        try:
            # Shielded: a claim that commits must hand its rows to us, not strand them
            # under a lease nobody renews (shutdown releases them instead).
            with anyio.CancelScope(shield=True):
                jobs: list[J] = await self._storage.claim_jobs(
                    spec.kind,
                    self._consumer_id,
                    limit=limit,
                    lease_s=spec.lease_s,
                    queues=spec.queues,
                )
        except StorageError as exc:
            self._errors += 1
            log.warning("claim on %s failed: %s", spec.name, exc)
            return None
        return jobs

    def _take(self, jobs: Sequence[J]) -> bool:
        """Hold the claimed rows and dispatch them; True if stopping (then they are released)."""
        self._claimed += len(jobs)
        for job in jobs:
            self._held[job.claim.id] = job.claim.token
        if self._stopping.is_set():
            for job in jobs:
                self._record(Outcome(OutcomeKind.RELEASE, job.claim))
            return True
        if jobs:
            self._dispatch(jobs)
        return False

    async def _idle_wait(self) -> None:
        """Sleep until woken, stopped, the next known due time or lease expiry, or the
        jittered fallback poll.

        With ``next_due``, the next due time of the rows as a whole (other consumers' leases
        included) is read when the last reading's horizon has passed, so an idle consumer
        re-runs a dead consumer's rows when their lease runs out, not at its next fallback
        poll; while consumers stay alive that costs one small read per idle consumer per
        lease renewal. A known due time that passed already (a retry written while the last
        claim ran) ends the wait at once.
        """
        if self._spec.next_due is None:
            self._horizon = math.inf
        elif self._clock.monotonic() >= self._horizon:
            await self._read_horizon(self._spec.next_due)
        timeout = jittered(self._spec.fallback_poll_s, 0.5)
        deadline = min(self._clock.monotonic() + timeout, self._horizon)
        while True:
            now = self._clock.time()
            if self._due and self._due[0] <= now:
                while self._due and self._due[0] <= now:
                    heapq.heappop(self._due)
                return
            known = self._due[0] - now if self._due else math.inf
            self._rearm = anyio.Event()
            with self._clock.move_on_after(min(deadline - self._clock.monotonic(), known)) as scope:
                await first_of(self._wake, self._stopping, self._rearm)
            if not scope.cancelled_caught and not (self._wake.is_set() or self._stopping.is_set()):
                continue  # a nearer due time became known: re-arm the timer
            if scope.cancelled_caught and self._clock.monotonic() >= deadline:
                if deadline >= self._horizon:
                    self._expiry_wakeups += 1
                else:
                    self._polls += 1
            return

    async def _read_horizon(self, next_due: Callable[[], Awaitable[float | None]]) -> None:
        """Read when the next row becomes claimable; set ``_horizon``.

        Assumes every consumer of the rows uses a lease no shorter than this one's. A due
        time of zero right after a claim found nothing means the rows are being claimed by
        another consumer's uncommitted statement: back off briefly instead of spinning.
        """
        self._due_queries += 1
        started = self._clock.monotonic()
        try:
            due = await next_due()
        except StorageError as exc:
            self._errors += 1
            log.warning("next-due read on %s failed: %s", self._spec.name, exc)
            self._horizon = started + STORAGE_RETRY.delay(1)
            return
        lease = self._spec.lease_s
        if due is None or due > 0:
            self._busy_retries = 0
            self._horizon = started + min(lease, math.inf if due is None else due)
        else:
            self._busy_retries += 1
            self._horizon = started + min(BUSY_RETRY.delay(self._busy_retries), lease)

    async def _wait_held_back(self, seconds: float) -> None:
        """Wait for a wakeup (set during the claim: at once), the stop, or ``seconds``:
        no polling while a limit holds rows back."""
        with self._clock.move_on_after(seconds):
            await first_of(self._wake, self._stopping)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with self._clock.move_on_after(seconds):
            await self._stopping.wait()

    async def _listen(
        self, channel: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Turn notifications into wakeups; reconnects are the storage's job.

        A payload that is a future Unix time (an enqueue's earliest ``run_after``) becomes
        a known due time; anything else (due now, empty, a gap) wakes the claim loop.
        The payload is database (wall) time, so it is compared with the real wall clock,
        and a future one is remembered as that many seconds from now on this consumer's
        clock: a ``ManualClock`` whose wall time is behind the database's still reads an
        ordinary enqueue as due now. (On the system clock both readings are the same.)
        """
        async with self._storage.listen(channel) as stream:
            task_status.started()
            async for note in stream:
                self._notifications += 1
                due = 0.0
                if not note.gap and note.payload:
                    try:
                        due = float(note.payload)
                    except ValueError:
                        due = 0.0
                wait_s = due - time.time()  # database (wall) time, as the payload
                if wait_s > 0:
                    self._expect(self._clock.time() + wait_s)
                else:
                    self._wake.set()

    def _expect(self, at: float) -> None:
        """Remember that a row becomes due at ``at``: the idle wait ends then.

        A retry's due time is remembered once the retry is committed, not when it is
        queued for writing: a claim made at the due time before the write lands would find
        the row still in flight, and the due time would be forgotten until the fallback
        poll.
        """
        heapq.heappush(self._due, at)
        if len(self._due) > 1024:
            self._due = heapq.nsmallest(512, self._due)
        if self._due[0] == at:
            self._rearm.set()

    # -- outcomes ------------------------------------------------------------------

    def _record(self, outcome: Outcome) -> None:
        if self._writer is None:
            raise UsageError(f"{self._spec.name} is not running: use its open_* first")
        self._writer.put_nowait(outcome, critical=True)

    async def _write_batch(self, batch: Batch[Outcome]) -> None:
        await self._write_outcomes(batch.items)

    def _undeliverable(self, letter: DeadLetter[Outcome]) -> None:
        """Outcomes that could not be written: stop renewing their leases, so they expire
        and the rows are claimed again (at least once, never silently lost)."""
        self._undelivered += len(letter.items)
        log.error(
            "%d %s outcomes could not be written (%s): %r",
            len(letter.items),
            self._spec.name,
            letter.reason,
            letter.error,
        )
        for item in letter.items:
            self._forget(item.claim)

    def _forget(self, claim: Claim) -> None:
        if self._held.get(claim.id) == claim.token:
            del self._held[claim.id]

    async def _write_outcomes(self, batch: list[Outcome]) -> None:
        """One statement per outcome kind (``write_each``: per outcome), effective only
        under current claims (else counted stale). A ``StorageError`` makes the writer
        retry the batch; the leases stay held (and renewed) until the write succeeds.

        Done and failed rows are written before released ones, so a released row never
        overtakes the failed row ahead of it in its group.
        """
        groups: dict[OutcomeKind, list[Outcome]] = {k: [] for k in OutcomeKind}
        for item in batch:
            groups[item.kind].append(item)
        for kind, items in groups.items():
            chunks = [[i] for i in items] if self._spec.write_each else [items] if items else []
            for chunk in chunks:
                await self._write_kind(kind, chunk)
        if groups[OutcomeKind.RELEASE] and self._spec.notify_on_release:
            await self._notify_quietly()
        if batch:
            await self._after_outcomes()

    async def _write_kind(self, outcome: OutcomeKind, items: list[Outcome]) -> None:
        kind = self._spec.kind
        storage = self._storage
        claims = [i.claim for i in items]
        failures = [Failure(i.claim.id, i.claim.token, i.error, i.retry_at) for i in items]
        if outcome is OutcomeKind.DONE:
            done: Sequence[int] = await storage.complete_jobs(kind, claims)
        elif outcome is OutcomeKind.RELEASE:
            done = await storage.release_jobs(kind, claims)
        elif outcome is OutcomeKind.DEAD:
            done = await storage.dead_letter_jobs(kind, failures)
        else:
            statuses = await storage.fail_jobs(kind, failures)
            done = list(statuses)
            for item in items:
                if statuses.get(item.claim.id) == kind.waiting:
                    self._expect(item.retry_at.timestamp() if item.retry_at else self._clock.time())
            dead = sum(1 for s in statuses.values() if s == kind.dead)
            self._counts[OutcomeKind.DEAD] += dead
            self._counts[OutcomeKind.RETRY] -= dead
        self._counts[outcome] += len(done)
        self._stale += len(items) - len(done)
        for claim in claims:
            self._forget(claim)
        if done and outcome is not OutcomeKind.RETRY and self._spec.wake_on_finish:
            self._wake.set()  # finished rows unblock the next rows of their groups

    async def _notify_quietly(self) -> None:
        if self._spec.channel is None:
            return
        try:
            await self._storage.notify(self._spec.channel, "0")
        except StorageError as exc:
            log.warning("notify on %s failed: %s", self._spec.name, exc)

    # -- leases --------------------------------------------------------------------

    async def _heartbeat(self, every_s: float) -> None:
        """Renew every held lease each ``every_s``; drop the work whose lease is gone.

        Each renewal is bounded by the time the leases would run out (the last successful
        renewal plus ``lease_s``, less a margin): if renewals fail, or hang on a stalled
        pool, until then, the work is dropped (the rows may be claimed elsewhere soon), so
        a row is never worked on twice live.
        """
        lease_s = self._spec.lease_s
        margin = min(0.1 * lease_s, 1.0)
        while True:
            await self._clock.sleep(every_s)
            held = [Claim(i, t) for i, t in self._held.items()]
            started = self._clock.monotonic()
            if not held:
                self._last_renewal = started
                continue
            give_up = self._last_renewal + lease_s - margin
            live: set[int] | None = None
            with self._clock.move_on_after(give_up - started):
                try:
                    live = set(await self._storage.heartbeat_jobs(self._spec.kind, held, lease_s))
                except StorageError as exc:
                    self._errors += 1
                    log.warning("heartbeat on %s failed: %s", self._spec.name, exc)
            if live is None:
                if self._clock.monotonic() >= give_up:
                    for claim in held:
                        self._lose(claim)
                continue
            self._last_renewal = started
            for claim in held:
                if claim.id not in live:
                    self._lose(claim)

    def _lose(self, claim: Claim) -> None:
        if self._held.get(claim.id) != claim.token:
            return  # its outcome was written meanwhile
        self._lease_lost += 1
        del self._held[claim.id]
        self._on_lease_lost(claim.id)
