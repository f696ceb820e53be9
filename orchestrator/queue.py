"""AgentQueue: enqueue agent tasks and run them with a capped, leased, event-driven worker.

This module owns the worker loop on top of the storage task contract (``claim_tasks`` with
leases, ``heartbeat_tasks``, ``complete_tasks`` / ``fail_tasks`` / ``dead_letter_tasks`` /
``release_tasks``) and the storage notifications: at most ``max_workers`` long-lived
runners run handlers, the claim loop takes as many tasks as there are free slots (at most
``claim_batch``) in one statement, leases are renewed in the background, outcomes are
written in batches under the current lease, and an idle worker sleeps until an enqueue
notification, the next moment a task becomes claimable (a delayed task's due time or a
running task's lease expiry, read with one cheap query when it goes idle, so a dead
worker's tasks are re-run as soon as their lease runs out), or a rare jittered fallback
poll.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal, NamedTuple

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.batching import (
    Batch,
    BatchWriter,
    DeadLetter,
    describe_failure,
    outcome_batches,
)
from asyncstore.storage import (
    LEASE_EXPIRED,
    AsyncStorageBackend,
    Claim,
    Failure,
    InvalidInput,
    NewTask,
    StorageError,
    Task,
)
from asyncstore.storage import TaskStatus as StoredStatus
from asyncstore.storage._validate import check_channel
from asyncstore.storage.base import JSON
from asyncstore.storage.errors import is_retryable
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "AgentQueue",
    "Handler",
    "PermanentFailure",
    "QueueConfig",
    "RetryTask",
    "Worker",
    "WorkerStatistics",
    "open_worker",
]

log = logging.getLogger("asyncstore.queue")

Handler = Callable[[Task], Awaitable[None]]
"""A task handler: an async callable that receives the claimed ``Task``."""


class QueueConfig(BaseModel):
    """Settings of the agent queue and its workers (``agent_queue.*`` in the settings tree).

    ``mode`` is the ``queue.mode`` feature flag: ``claim`` (the default: capped batched
    claims, leases, NOTIFY wakeup plus a rare jittered poll) or ``poll_spawn`` (the legacy
    loop kept for rollback and benchmarks: poll every ``poll_interval_s`` and spawn every
    task the poll returns, with no worker cap and one write per finished task).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["claim", "poll_spawn"] = "claim"
    max_workers: int = Field(default=16, ge=1, le=10_000)
    claim_batch: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="claim mode: most tasks one claim statement takes (None: every free slot); "
        "below max_workers, the next claim runs while the last batch's handlers run",
    )
    lease_s: float = Field(default=30.0, gt=0)
    heartbeat_interval_s: float | None = Field(
        default=None, gt=0, description="lease renewal period; default lease_s / 3"
    )
    max_attempts: int = Field(default=5, ge=1, description="default for enqueued tasks")
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    backoff_jitter: float = Field(
        default=0.5, ge=0, le=1, description="share of each delay that is randomized"
    )
    fallback_poll_s: float = Field(default=10.0, gt=0)
    expiry_wakeup: bool = Field(
        default=True,
        description="claim mode: an idle worker reads the queue's next due time or lease "
        "expiry and wakes then (False: only notifications and the fallback poll wake it)",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="legacy poll_spawn only")
    poll_batch: int = Field(default=1000, ge=1, le=10_000, description="legacy poll_spawn only")
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    max_write_batch: int = Field(default=1000, ge=1, le=10_000)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> QueueConfig:
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s >= self.lease_s:
            raise ValueError("heartbeat_interval_s must be shorter than lease_s")
        return self

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_interval_s or self.lease_s / 3

    def backoff_s(self, attempt: int) -> float:
        """Delay before retrying after failed attempt number ``attempt`` (1-based), jittered."""
        exp = min(max(attempt - 1, 0), 62)
        delay = min(self.backoff_max_s, self.backoff_base_s * 2.0**exp)
        return delay * (1.0 - self.backoff_jitter * random.random())


class RetryTask(Exception):
    """Raise from a handler to retry the task at ``at`` (or after ``delay_s``).

    The attempt counts toward ``max_attempts``: on the last attempt the task is dead-lettered.
    """

    def __init__(
        self,
        reason: str = "retry requested",
        *,
        at: datetime | None = None,
        delay_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        if at is not None and delay_s is not None:
            raise InvalidInput("RetryTask takes at= or delay_s=, not both")
        if at is not None and at.tzinfo is None:
            raise InvalidInput("RetryTask(at=...) needs a timezone-aware datetime")
        self.reason = reason
        self.at = (
            at if at is not None else datetime.fromtimestamp(time.time() + (delay_s or 0.0), UTC)
        )


class PermanentFailure(Exception):
    """Raise from a handler to dead-letter the task now, without further attempts."""


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of one worker's counters."""

    worker_id: str
    mode: str
    max_workers: int
    running: int
    peak_running: int
    held_leases: int
    claimed: int
    claim_statements: int
    succeeded: int
    retried: int
    dead: int
    released: int
    cancelled: int
    lease_lost: int
    stale_writes: int
    pending_writes: int
    undelivered_writes: int  # outcomes given up at shutdown: their leases expire
    notifications: int
    fallback_polls: int
    storage_errors: int
    reruns: int  # tasks claimed because their previous worker's lease expired
    due_queries: int  # next-due reads made on going idle
    expiry_wakeups: int  # idle waits ended at the next known due time or lease expiry

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("queue_running", "gauge", "Tasks running."),
        Family("queue_max_workers", "gauge", "The worker's concurrency cap."),
        Family("queue_pending_writes", "gauge", "Outcomes not yet stored."),
        Family("queue_claimed", "counter", "Tasks claimed."),
        Family("queue_claim_statements", "counter", "Claim statements."),
        Family("queue_tasks_finished", "counter", "Task outcomes.", ("outcome",)),
        Family("queue_fallback_polls", "counter", "Fallback polls."),
        Family("queue_storage_errors", "counter", "Storage errors."),
        Family("queue_reruns", "counter", "Tasks re-run after their worker's lease expired."),
        Family("queue_due_queries", "counter", "Next-due reads on going idle."),
        Family("queue_expiry_wakeups", "counter", "Idle waits ended at a due time."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("queue_running", {}, self.running)
        out.sample("queue_max_workers", {}, self.max_workers)
        out.sample("queue_pending_writes", {}, self.pending_writes)
        out.sample("queue_claimed", {}, self.claimed)
        out.sample("queue_claim_statements", {}, self.claim_statements)
        outcomes = {
            "succeeded": self.succeeded,
            "retried": self.retried,
            "dead": self.dead,
            "released": self.released,
            "cancelled": self.cancelled,
            "lease_lost": self.lease_lost,
        }
        out.samples("queue_tasks_finished", {}, outcomes)
        out.sample("queue_fallback_polls", {}, self.fallback_polls)
        out.sample("queue_storage_errors", {}, self.storage_errors)
        out.sample("queue_reruns", {}, self.reruns)
        out.sample("queue_due_queries", {}, self.due_queries)
        out.sample("queue_expiry_wakeups", {}, self.expiry_wakeups)


class _Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    DEAD = "dead"
    RELEASE = "release"


class _Finished(NamedTuple):
    kind: _Outcome
    claim: Claim
    error: str = ""
    retry_at: datetime | None = None


class _Stop(enum.Enum):
    SHUTDOWN = "shutdown"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"


class AgentQueue:
    """A named task queue on a storage backend: enqueue here, run with ``open_worker``.

    Every enqueue call commits its rows and then sends one notification on the queue's
    channel (payload: the earliest ``run_after`` of the batch as a Unix timestamp), so idle
    workers wake at once for due tasks and know when delayed ones become due.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        name: str = "default",
        config: QueueConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 40:
            raise InvalidInput("queue name must be a str of 1..40 characters")
        self.storage = storage
        self.name = name
        self.config = config or QueueConfig()
        self.channel = f"asyncstore.queue.{name}"
        try:  # refused now, not at the first enqueue's notification
            check_channel(self.channel)
        except InvalidInput as exc:
            raise InvalidInput(f"queue name {name!r} does not make a channel name: {exc}") from None

    async def enqueue(
        self,
        payload: JSON,
        *,
        priority: int = 0,
        run_after: datetime | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> Task:
        """Enqueue one task (see ``enqueue_many``)."""
        new = NewTask(
            self.name,
            payload,
            priority,
            run_after,
            idempotency_key,
            max_attempts or self.config.max_attempts,
        )
        return (await self.enqueue_tasks([new]))[0]

    async def enqueue_many(
        self,
        payloads: Sequence[JSON],
        *,
        priority: int = 0,
        run_after: datetime | None = None,
        idempotency_keys: Sequence[str | None] | None = None,
        max_attempts: int | None = None,
    ) -> list[Task]:
        """Enqueue a batch in one transaction and send one notification; one row per payload.

        A payload whose idempotency key matches an unfinished task of this queue returns that
        task instead of a new one. If cancelled, the batch was either committed (and maybe
        not announced: the workers' fallback poll finds it) or not written at all.
        """
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(payloads)
        if len(keys) != len(payloads):
            raise InvalidInput("idempotency_keys must have one entry per payload")
        attempts = max_attempts or self.config.max_attempts
        return await self.enqueue_tasks(
            [
                NewTask(self.name, p, priority, run_after, k, attempts)
                for p, k in zip(payloads, keys, strict=True)
            ]
        )

    async def enqueue_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        """Enqueue fully specified ``NewTask`` rows of this queue; see ``enqueue_many``."""
        for task in tasks:
            if task.queue != self.name:
                raise InvalidInput(f"task for queue {task.queue!r} given to queue {self.name!r}")
        rows = await self.storage.enqueue_tasks(tasks)
        queued = [t.run_after for t in rows if t.status is StoredStatus.QUEUED]
        if queued:
            await self.storage.notify(self.channel, f"{min(queued).timestamp():.6f}")
        return rows

    async def get(self, task_id: int) -> Task | None:
        """One task of any state by id."""
        return await self.storage.get_task(task_id)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Runs handlers for claimed tasks. Build it with ``open_worker``; read ``statistics()``."""

    def __init__(
        self, queue: AgentQueue, handler: Handler, config: QueueConfig, worker_id: str
    ) -> None:
        self.queue = queue
        self.config = config
        self.worker_id = worker_id
        self._handler = handler
        self._storage = queue.storage
        self._legacy = config.mode == "poll_spawn"
        self._free = config.max_workers  # claim mode: handler slots not taken
        self._ready: collections.deque[Task] = collections.deque()  # claimed, not started
        self._sleepers: collections.deque[anyio.Event] = collections.deque()  # idle runners
        self._runners = 0
        # One runner at a time is being woken (or started); it wakes the next if work is left.
        self._wake_pending = False
        self._held: dict[int, int] = {}  # task id -> lease token, until its outcome is written
        self._scopes: dict[int, anyio.CancelScope] = {}
        self._stop_reason: dict[int, tuple[_Stop, str]] = {}
        self._wake = anyio.Event()
        self._rearm = anyio.Event()
        self._freed = anyio.Event()
        self._stopping = anyio.Event()
        self._loop_done = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._due: list[float] = []  # heap of known future run_after timestamps
        self._writer: BatchWriter[_Finished] | None = None
        self._undelivered = 0
        self._tasks: TaskGroup | None = None
        self._last_renewal = time.monotonic()
        self._running = 0
        self._peak = 0
        self._claimed = 0
        self._claims = 0
        self._counts = dict.fromkeys(_Outcome, 0)
        self._cancelled = 0
        self._lease_lost = 0
        self._stale = 0
        self._notifications = 0
        self._polls = 0
        self._errors = 0
        self._reruns = 0
        self._due_queries = 0
        self._expiry_wakeups = 0
        # Until this monotonic time no task of the queue can become claimable unannounced:
        # the earliest due time or lease expiry read by the last next-due query, capped by
        # that query's time plus lease_s (a lease taken by anyone later expires no sooner).
        self._horizon = 0.0
        self._busy_retries = 0  # consecutive idle entries that found due rows locked

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of this worker's counters."""
        return WorkerStatistics(
            worker_id=self.worker_id,
            mode=self.config.mode,
            max_workers=self.config.max_workers,
            running=self._running,
            peak_running=self._peak,
            held_leases=len(self._held),
            claimed=self._claimed,
            claim_statements=self._claims,
            succeeded=self._counts[_Outcome.SUCCEEDED],
            retried=self._counts[_Outcome.RETRY],
            dead=self._counts[_Outcome.DEAD],
            released=self._counts[_Outcome.RELEASE],
            cancelled=self._cancelled,
            lease_lost=self._lease_lost,
            stale_writes=self._stale,
            pending_writes=self._writer.statistics().unsettled if self._writer else 0,
            undelivered_writes=self._undelivered,
            notifications=self._notifications,
            fallback_polls=self._polls,
            storage_errors=self._errors,
            reruns=self._reruns,
            due_queries=self._due_queries,
            expiry_wakeups=self._expiry_wakeups,
        )

    def cancel(self, task_id: int, reason: str = "cancelled") -> bool:
        """Cancel a running handler; its task is dead-lettered with ``cancelled: <reason>``.

        Returns False if this worker is not running that task.
        """
        scope = self._scopes.get(task_id)
        if scope is None:
            return False
        self._stop_reason.setdefault(task_id, (_Stop.CANCELLED, reason))
        scope.cancel()
        return True

    async def flush(self) -> None:
        """Wait until the outcomes of every handler finished so far are written.

        Cancelling the wait leaves them queued; they are still written.
        """
        if self._writer is not None:
            await self._writer.flush()

    # -- lifecycle -------------------------------------------------------------

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The worker's own task group: listener, heartbeat, claim or poll loop, handlers.

        Cancelling it cancels the handlers; their release is still written (the writer's
        final flush is shielded).
        """
        async with BatchWriter(
            self._write_batch,
            outcome_batches(self.config.max_write_batch),
            retry_if=is_retryable,
            on_dead_letter=self._undeliverable,
            name="queue-outcomes",
        ) as writer:
            self._writer = writer
            try:
                async with anyio.create_task_group() as tg:
                    self._tasks = tg
                    if not self._legacy:
                        await tg.start(self._listen)
                    tg.start_soon(self._heartbeat)
                    tg.start_soon(self._poll_spawn if self._legacy else self._claim_loop)
                    task_status.started()
                    await self._stopping.wait()
                    await self._loop_done.wait()
                    await self._drain_handlers()
                    tg.cancel_scope.cancel()
            finally:
                # Cancelled mid-run: tasks claimed but not started are given back too.
                self._release_ready()

    def _release_ready(self) -> None:
        """Release claimed tasks no runner has started (recorded now, written by the writer)."""
        while self._ready:
            task = self._ready.popleft()
            self._finish(_Finished(_Outcome.RELEASE, task.claim))

    async def _drain_handlers(self) -> None:
        # Claimed but not started: given back at once, not started during the grace.
        self._release_ready()
        with anyio.move_on_after(self.config.shutdown_grace_s):
            await self._idle.wait()
        for task_id, scope in list(self._scopes.items()):
            self._stop_reason.setdefault(task_id, (_Stop.SHUTDOWN, ""))
            scope.cancel()
        # Cancelled handlers record their release synchronously as they unwind.
        await self._idle.wait()

    # -- the claim loop --------------------------------------------------------

    async def _claim_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._free == 0:
                    self._freed = anyio.Event()
                    await _first_of(self._freed, self._stopping)
                    continue
                free = self._free
                if self.config.claim_batch is not None:
                    free = min(free, self.config.claim_batch)
                self._wake = anyio.Event()
                tasks = await self._claim(free)
                if tasks:
                    self._busy_retries = 0
                if tasks is None:
                    await self._sleep_or_stop(random.uniform(0.5, 1.5))
                elif not self._start(tasks) and len(tasks) < free:
                    await self._idle_wait()
        finally:
            self._loop_done.set()

    async def _claim(self, limit: int) -> list[Task] | None:
        """One claim statement; None after a storage error (logged and counted)."""
        self._claims += 1
        try:
            # Shielded: a claim that commits must hand its rows to us, not strand them
            # under a lease nobody renews (shutdown releases them instead).
            with anyio.CancelScope(shield=True):
                tasks = await self._storage.claim_tasks(
                    self.queue.name, self.worker_id, limit=limit, lease_s=self.config.lease_s
                )
        except StorageError as exc:
            self._errors += 1
            log.warning("claim on %s failed: %s", self.queue.name, exc)
            return None
        return tasks

    async def _idle_wait(self) -> None:
        """Sleep until woken, stopped, the next known run_after or lease expiry, or the
        jittered fallback poll.

        The next due time of the queue as a whole (other workers' leases included) is read
        when the last reading's horizon has passed, so an idle worker re-runs a dead
        worker's tasks when their lease runs out, not at its next fallback poll; while
        workers stay alive that costs one small read per idle worker per lease renewal.
        """
        if not self.config.expiry_wakeup:
            self._horizon = math.inf
        elif time.monotonic() >= self._horizon:
            await self._read_horizon()
        timeout = self.config.fallback_poll_s * random.uniform(0.5, 1.5)
        deadline = min(time.monotonic() + timeout, self._horizon)
        while True:
            now = time.time()
            while self._due and self._due[0] <= now:
                heapq.heappop(self._due)
            known = self._due[0] - now if self._due else math.inf
            self._rearm = anyio.Event()
            with anyio.move_on_after(min(deadline - time.monotonic(), known)) as scope:
                await _first_of(self._wake, self._stopping, self._rearm)
            if not scope.cancelled_caught and not (self._wake.is_set() or self._stopping.is_set()):
                continue  # a nearer run_after became known: re-arm the timer
            if scope.cancelled_caught and time.monotonic() >= deadline:
                if deadline >= self._horizon:
                    self._expiry_wakeups += 1
                else:
                    self._polls += 1
            return

    async def _read_horizon(self) -> None:
        """Read when the next task of the queue becomes claimable; set ``_horizon``.

        Assumes every worker of the queue uses a lease no shorter than this one's. A due
        time of zero right after a claim found nothing means the rows are being claimed by
        another worker's uncommitted statement: back off briefly instead of spinning.
        """
        self._due_queries += 1
        started = time.monotonic()
        try:
            due = await self._storage.next_task_due_s(self.queue.name)
        except StorageError as exc:
            self._errors += 1
            log.warning("next-due read on %s failed: %s", self.queue.name, exc)
            self._horizon = started + random.uniform(0.5, 1.5)
            return
        lease = self.config.lease_s
        if due is None or due > 0:
            self._busy_retries = 0
            self._horizon = started + min(lease, math.inf if due is None else due)
        else:
            self._busy_retries += 1
            self._horizon = started + min(0.005 * 2.0**self._busy_retries, 1.0, lease)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    async def _listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Turn queue notifications into wakeups; reconnects are the storage's job."""
        async with self._storage.listen(self.queue.channel) as stream:
            task_status.started()
            async for note in stream:
                self._notifications += 1
                due = 0.0
                if not note.gap:
                    with contextlib.suppress(ValueError):
                        due = float(note.payload)
                if due > time.time():
                    self._add_due(due)
                else:
                    self._wake.set()

    # -- the legacy loop -------------------------------------------------------

    async def _poll_spawn(self) -> None:
        """Legacy ``poll_spawn``: every ``poll_interval_s``, spawn all that the poll returns."""
        cfg = self.config
        try:
            while not self._stopping.is_set():
                tasks = await self._claim(cfg.poll_batch) or []
                if not self._start(tasks):
                    await self._sleep_or_stop(cfg.poll_interval_s)
        finally:
            self._loop_done.set()

    # -- running handlers ------------------------------------------------------

    def _start(self, tasks: Sequence[Task]) -> bool:
        """Hand claimed tasks to runners; True if stopping (then they are released).

        Claim mode queues them for the long-lived runners (at most ``max_workers``, started
        as the work needs them); the legacy mode spawns one task per handler, as it did.
        """
        if self._tasks is None:
            raise RuntimeError("worker is not running")
        self._claimed += len(tasks)
        for task in tasks:
            self._held[task.id] = task.claim.token
            if task.attempts > 1 and task.last_error == LEASE_EXPIRED:
                self._reruns += 1
        if self._stopping.is_set():
            for task in tasks:
                self._record(_Finished(_Outcome.RELEASE, task.claim))
            return True
        if not tasks:
            return False
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += len(tasks)
        self._peak = max(self._peak, self._running)
        if self._legacy:
            for task in tasks:
                self._tasks.start_soon(self._run_one, task)
            return False
        self._free -= len(tasks)  # never below 0: we claimed only free slots
        self._ready.extend(tasks)
        self._wake_one()
        return False

    def _wake_one(self) -> None:
        """Wake an idle runner, or start one (up to ``max_workers``), unless one is on its way.

        Runners are woken one after the other, each as the previous one takes a task and
        sees more waiting, so a batch of handlers that never wait is run by the first runner
        without waking the others for nothing; handlers that wait still start at once.
        """
        if self._wake_pending or self._tasks is None:
            return
        if self._sleepers:
            self._wake_pending = True
            self._sleepers.popleft().set()
        elif self._runners < self.config.max_workers:
            self._wake_pending = True
            self._runners += 1
            self._tasks.start_soon(self._runner)

    async def _runner(self) -> None:
        """A long-lived handler runner (claim mode): runs queued tasks one at a time.

        Each task runs under the runner's current cancel scope, registered under the task's
        id, so ``cancel`` and a lost lease cancel just that handler; a scope that was
        cancelled is replaced before the next task. Cancelled with the worker's task group.
        """
        self._wake_pending = False  # this is the runner that was started
        since_yield = 0
        while True:
            with anyio.CancelScope() as scope:
                while not scope.cancel_called:
                    if not self._ready:
                        since_yield = 0
                        await self._sleep()
                        continue
                    task = self._ready.popleft()
                    if self._ready:
                        self._wake_one()  # more work: a helper, in case this handler waits
                    if self._held.get(task.id) != task.claim.token:
                        self._finish(None)  # its lease was lost before it started
                        continue
                    self._finish(await self._execute(task, scope), slot=True)
                    since_yield += 1
                    if since_yield >= 64:
                        # Handlers that never wait must not starve the claim loop and writer.
                        since_yield = 0
                        await anyio.lowlevel.checkpoint()

    async def _sleep(self) -> None:
        """Wait until ``_wake_one`` picks this runner."""
        woken = anyio.Event()
        self._sleepers.append(woken)
        try:
            await woken.wait()
        finally:
            if woken.is_set():
                self._wake_pending = False
            else:  # cancelled while idle
                self._sleepers.remove(woken)

    async def _run_one(self, task: Task) -> None:
        """Legacy ``poll_spawn``: one spawned task per handler."""
        with anyio.CancelScope() as scope:
            self._finish(await self._execute(task, scope), slot=False)

    async def _execute(self, task: Task, scope: anyio.CancelScope) -> _Finished | None:
        """Run the handler under ``scope``; the outcome to record (None: nothing to write).

        If ``scope`` (or the worker) is cancelled, the task's release or dead-letter is
        returned synchronously as the handler unwinds and the cancellation propagates after
        it is recorded.
        """
        claim = task.claim
        finished: _Finished | None = None
        self._scopes[task.id] = scope
        try:
            try:
                await self._handler(task)
                finished = _Finished(_Outcome.SUCCEEDED, claim)
            except RetryTask as retry:
                finished = _Finished(_Outcome.RETRY, claim, retry.reason, retry.at)
            except PermanentFailure as exc:
                finished = _Finished(_Outcome.DEAD, claim, describe_failure(exc))
            except Exception as exc:
                at = time.time() + self.config.backoff_s(task.attempts)
                finished = _Finished(
                    _Outcome.RETRY, claim, describe_failure(exc), datetime.fromtimestamp(at, UTC)
                )
        except BaseException:
            # Cancelled (this task, a lost lease, or the worker stopping): record its final
            # state here, synchronously; the writer's shielded final flush writes it.
            self._finish(self._after_stop(task.id, claim), slot=not self._legacy)
            raise
        finally:
            del self._scopes[task.id]
            self._stop_reason.pop(task.id, None)
        return finished

    def _finish(self, finished: _Finished | None, *, slot: bool = True) -> None:
        """A claimed task is done here: free its slot, record its outcome."""
        self._running -= 1
        if slot and not self._legacy:
            self._free += 1
            self._freed.set()
        if self._running == 0:
            self._idle.set()
        if finished is not None:
            self._record(finished)

    def _after_stop(self, task_id: int, claim: Claim) -> _Finished | None:
        reason, why = self._stop_reason.get(task_id, (_Stop.SHUTDOWN, ""))
        if reason is _Stop.LEASE_LOST:
            return None  # another worker holds the task now; its state is theirs to write
        if reason is _Stop.CANCELLED:
            self._cancelled += 1
            return _Finished(_Outcome.DEAD, claim, f"cancelled: {why}")
        return _Finished(_Outcome.RELEASE, claim)

    def _add_due(self, when: float) -> None:
        heapq.heappush(self._due, when)
        if len(self._due) > 1024:
            self._due = heapq.nsmallest(512, self._due)
        if self._due[0] == when:
            self._rearm.set()

    def _record(self, finished: _Finished) -> None:
        if finished.retry_at is not None:
            self._add_due(finished.retry_at.timestamp())
        if self._writer is None:
            raise RuntimeError("worker is not running")
        self._writer.put_nowait(finished, critical=True)

    async def _write_batch(self, batch: Batch[_Finished]) -> None:
        await self._write_outcomes(batch.items)

    def _undeliverable(self, letter: DeadLetter[_Finished]) -> None:
        """Outcomes that could not be written: stop renewing their leases, so they expire
        and the work runs again elsewhere (at least once, never silently lost)."""
        self._undelivered += len(letter.items)
        log.error(
            "%d outcomes could not be written (%s): %r",
            len(letter.items),
            letter.reason,
            letter.error,
        )
        for item in letter.items:
            self._forget_claim(item.claim)

    def _forget_claim(self, claim: Claim) -> None:
        if self._held.get(claim.id) == claim.token:
            del self._held[claim.id]

    async def _write_outcomes(self, batch: list[_Finished]) -> None:
        """Write one batch of outcomes: one statement per kind, effective only under live leases.

        In legacy mode each item is written by its own statement, as the old loop did.
        A ``StorageError`` makes the writer retry the batch; the leases stay held (and
        renewed) until the write succeeds.
        """
        groups: dict[_Outcome, list[_Finished]] = {}
        for item in batch:
            groups.setdefault(item.kind, []).append(item)
        for kind, items in groups.items():
            chunks = [[i] for i in items] if self._legacy else [items]
            for chunk in chunks:
                await self._write_kind(kind, chunk)
        if groups.get(_Outcome.RELEASE) and not self._legacy:
            # Released tasks are due now: one notification lets other workers take them.
            await self._notify_quietly()

    async def _write_kind(self, kind: _Outcome, items: list[_Finished]) -> None:
        claims = [i.claim for i in items]
        failures = [Failure(i.claim.id, i.claim.token, i.error, i.retry_at) for i in items]
        if kind is _Outcome.SUCCEEDED:
            done: Sequence[int] = await self._storage.complete_tasks(claims)
            self._counts[kind] += len(done)
        elif kind is _Outcome.RELEASE:
            done = await self._storage.release_tasks(claims)
            self._counts[kind] += len(done)
        elif kind is _Outcome.DEAD:
            done = await self._storage.dead_letter_tasks(failures)
            self._counts[kind] += len(done)
        else:
            statuses = await self._storage.fail_tasks(failures)
            done = list(statuses)
            dead = sum(1 for s in statuses.values() if s is StoredStatus.DEAD)
            self._counts[_Outcome.DEAD] += dead
            self._counts[_Outcome.RETRY] += len(done) - dead
        self._stale += len(items) - len(done)
        for claim in claims:
            if self._held.get(claim.id) == claim.token:
                del self._held[claim.id]

    async def _notify_quietly(self) -> None:
        try:
            await self._storage.notify(self.queue.channel, "0")
        except StorageError as exc:
            log.warning("notify on %s failed: %s", self.queue.name, exc)

    # -- leases ----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Renew every held lease each ``heartbeat_s``; cancel handlers whose lease is gone.

        Each renewal is bounded by the time the leases would run out (the last successful
        renewal plus ``lease_s``, less a margin): if renewals fail, or hang on a stalled
        pool, until then, the handlers are cancelled (their tasks may be claimed elsewhere
        soon), so a task is never run twice live.
        """
        cfg = self.config
        margin = min(0.1 * cfg.lease_s, 1.0)
        while True:
            await anyio.sleep(cfg.heartbeat_s)
            held = [Claim(i, t) for i, t in self._held.items()]
            started = time.monotonic()
            if not held:
                self._last_renewal = started
                continue
            give_up = self._last_renewal + cfg.lease_s - margin
            live: set[int] | None = None
            with anyio.move_on_after(give_up - started):
                try:
                    live = set(await self._storage.heartbeat_tasks(held, cfg.lease_s))
                except StorageError as exc:
                    self._errors += 1
                    log.warning("heartbeat on %s failed: %s", self.queue.name, exc)
            if live is None:
                if time.monotonic() >= give_up:
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
        scope = self._scopes.get(claim.id)
        if scope is not None:
            self._stop_reason[claim.id] = (_Stop.LEASE_LOST, "")
            scope.cancel()


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    if any(e.is_set() for e in events):
        return
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)



@asynccontextmanager
async def open_worker(
    queue: AgentQueue,
    handler: Handler,
    *,
    max_workers: int | None = None,
    config: QueueConfig | None = None,
    worker_id: str | None = None,
) -> AsyncIterator[Worker]:
    """Run a worker for ``queue`` while the ``async with`` body runs.

    ``max_workers`` (default ``config.max_workers``) caps concurrently running handlers.
    On leaving the block normally the worker stops claiming, lets running handlers finish
    for up to ``shutdown_grace_s``, then cancels them and releases their leases (so other
    workers take those tasks at once) and writes every outcome before returning. If the
    block raises or is cancelled, handlers are cancelled at once; their releases and every
    finished outcome are still written (shielded, bounded by a timeout).
    """
    cfg = config or queue.config
    if max_workers is not None:
        cfg = QueueConfig.model_validate({**cfg.model_dump(), "max_workers": max_workers})
    worker = Worker(queue, handler, cfg, worker_id or _default_worker_id())
    async with anyio.create_task_group() as tg:
        await tg.start(worker._serve)
        try:
            yield worker
        finally:
            worker._stopping.set()
