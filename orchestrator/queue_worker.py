"""The agent queue's worker: run handlers for claimed tasks (``Worker``, ``open_worker``).

At most ``max_workers`` long-lived runners run handlers, and a handler's outcome (done, a
retry at its ``Backoff`` delay, dead, released) is recorded for the shared consumer loop
(``orchestrator.jobs.JobConsumer``), which claims, renews leases, writes outcomes in
batches and sleeps while idle. A worker of a coordinated queue (limits or groups) claims
through ``claim_limited_tasks`` and announces finishes to refused claimers; a worker
started before its queue became coordinated switches at its next claim (the plain claim
refuses such a queue: ``QueueCoordinated``). Each worker listens for ``cancel_task``
notices and cancels the named handler. The scheduling of claimed tasks onto the runners
is ``orchestrator.queue_runners``' ``RunnerPool``, the notices' listener
``orchestrator.queue_cancels``' ``CancelNotices``; this module owns what a task's run
means (lease check, handler, outcome, stop reasons). Its timing reads the ``Clock`` given
to ``open_worker``. Moved out of ``orchestrator.queue``, which re-exports ``Worker`` and
``open_worker``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus as StartStatus

from asyncstore.orchestrator.batching import describe_failure
from asyncstore.orchestrator.jobs import ConsumerSpec, JobConsumer, Outcome, OutcomeKind
from asyncstore.orchestrator.queue_cancels import CancelNotices
from asyncstore.orchestrator.queue_config import Handler, PermanentFailure, QueueConfig, RetryTask
from asyncstore.orchestrator.queue_runners import RunnerPool
from asyncstore.orchestrator.queue_stats import WorkerStatistics
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import LEASE_EXPIRED, Claim, Task
from asyncstore.storage.base import TASKS
from asyncstore.storage.errors import QueueCoordinated, StorageError, UsageError

if TYPE_CHECKING:
    from asyncstore.orchestrator.queue import AgentQueue

log = logging.getLogger("asyncstore.queue")

__all__ = ["Worker", "open_worker"]


class _Stop(enum.Enum):
    SHUTDOWN = "shutdown"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"
    CANCEL_TASK = "cancel_task"  # the task was cancelled in storage (cancel_task)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker(JobConsumer[Task]):
    """Runs handlers for claimed tasks. Build it with ``open_worker``; read ``statistics()``.

    The claim loop, idle wait, lease renewal and outcome writes are the shared
    ``JobConsumer``'s; this class runs the handlers: claim mode hands claimed tasks to at
    most ``max_workers`` long-lived runners, the legacy ``poll_spawn`` mode spawns one task
    per handler.
    """

    def __init__(
        self,
        queue: AgentQueue,
        handler: Handler,
        config: QueueConfig,
        worker_id: str,
        *,
        coordinated: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        legacy = config.mode == "poll_spawn"
        if legacy and coordinated:
            raise UsageError(
                f"queue {queue.name!r} has limits or ordering groups: the legacy poll_spawn "
                "mode cannot honour them (use mode='claim')"
            )
        spec = ConsumerSpec(
            kind=TASKS,
            name=f"queue {queue.name}",
            writer_name="queue-outcomes",
            queues=(queue.name,),
            channel=None if legacy else queue.channel,
            lease_s=config.lease_s,
            fallback_poll_s=config.fallback_poll_s,
            max_write_batch=config.max_write_batch,
            heartbeat_s=config.heartbeat_s,
            next_due=(
                functools.partial(queue.storage.next_task_due_s, queue.name)
                if config.expiry_wakeup
                else None
            ),
            notify_on_release=not legacy,
            write_each=legacy,
            wake_on_finish=coordinated,  # a finished task lets its group's next one go
        )
        super().__init__(queue.storage, spec, worker_id, clock=clock)
        self._coordinated = coordinated
        self._retry_held_back: float | None = None
        self._held_back_claims = 0
        self.queue = queue
        self.config = config
        self.worker_id = worker_id
        self._handler = handler
        self._legacy = legacy
        self._free = config.max_workers  # claim mode: handler slots not taken
        self._pool: RunnerPool[Task] = RunnerPool(config.max_workers, self._run_claimed)
        self._scopes: dict[int, anyio.CancelScope] = {}
        self._stop_reason: dict[int, tuple[_Stop, str]] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._running = 0
        self._peak = 0
        self._cancelled = 0
        self._reruns = 0
        self._notices = CancelNotices(
            queue.storage,
            worker_id,
            queue.name,
            held=lambda: self._held,
            cancelled=self._cancelled_in_storage,
        )

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
            succeeded=self._counts[OutcomeKind.DONE],
            retried=self._counts[OutcomeKind.RETRY],
            dead=self._counts[OutcomeKind.DEAD],
            released=self._counts[OutcomeKind.RELEASE],
            cancelled=self._cancelled,
            lease_lost=self._lease_lost,
            stale_writes=self._stale,
            pending_writes=self._writer.statistics().unsettled if self._writer else 0,
            undelivered_writes=self._undelivered,
            notifications=self._notifications,
            fallback_polls=self._polls,
            storage_errors=self._errors + self._notices.errors,
            reruns=self._reruns,
            due_queries=self._due_queries,
            expiry_wakeups=self._expiry_wakeups,
            coordinated=self._coordinated,
            held_back=self._held_back_claims,
            cancel_notifications=self._notices.notes,
        )

    def cancel(self, task_id: int, reason: str = "cancelled") -> bool:
        """Cancel a running handler of this worker; its task is dead-lettered with
        ``cancelled: <reason>`` (and can be redriven).

        Returns False if this worker is not running that task. To cancel a task from any
        process and end it ``cancelled`` (not dead), use ``AgentQueue.cancel``.
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
        await super().flush()

    # -- cancel_task notices ---------------------------------------------------

    async def _serve(self, *, task_status: StartStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The consumer's loop, with the cancel listener subscribed before it starts."""
        if not self.config.cancel_listen:
            await super()._serve(task_status=task_status)
            return
        async with anyio.create_task_group() as tg:
            await tg.start(self._notices.listen)
            await super()._serve(task_status=task_status)
            tg.cancel_scope.cancel()

    def _cancelled_in_storage(self, task_id: int) -> None:
        """Storage ended the task ``cancelled``: stop its handler, or never start it.

        Its lease is dropped (no renewal, and a runner skips a task it does not hold); a
        notice for a task not held yet is remembered, for the claim whose answer it
        overtook.
        """
        if self._held.pop(task_id, None) is None:
            self._notices.remember(task_id)
            return
        scope = self._scopes.get(task_id)
        if scope is None:
            # Claimed and not started (a runner skips it), or finished with its outcome not
            # yet written (that write finds the row cancelled and changes nothing).
            self._cancelled += 1
            return
        self._stop_reason[task_id] = (_Stop.CANCEL_TASK, "")
        scope.cancel()

    # -- the consumer's part ---------------------------------------------------

    def _room(self) -> int:
        if self.config.claim_batch is not None:
            return min(self._free, self.config.claim_batch)
        return self._free

    def _release_unstarted(self) -> None:
        """Release claimed tasks no runner has started (recorded now, written by the writer)."""
        for task in self._pool.take_unstarted():
            self._finish(Outcome(OutcomeKind.RELEASE, task.claim))

    async def _drain(self) -> None:
        # Claimed but not started: given back at once, not started during the grace.
        self._release_unstarted()
        with self._clock.move_on_after(self.config.shutdown_grace_s):
            await self._idle.wait()
        for task_id, scope in list(self._scopes.items()):
            self._stop_reason.setdefault(task_id, (_Stop.SHUTDOWN, ""))
            scope.cancel()
        # Cancelled handlers record their release synchronously as they unwind.
        await self._idle.wait()

    def _on_lease_lost(self, job_id: int) -> None:
        scope = self._scopes.get(job_id)
        if scope is not None:
            self._stop_reason[job_id] = (_Stop.LEASE_LOST, "")
            scope.cancel()

    async def _claim(self, limit: int) -> list[Task] | None:
        """A coordinated queue claims through its limits row (``claim_limited_tasks``);
        others run the shared loop's plain claim, which refuses (``QueueCoordinated``) once
        the queue has limits or groups: from then on this worker claims coordinated."""
        if not self._coordinated:
            try:
                return await super()._claim(limit)
            except QueueCoordinated:
                if self._legacy:
                    return self._legacy_refused()
                self._become_coordinated()
        self._claims += 1
        self._retry_held_back = None
        try:
            with anyio.CancelScope(shield=True):  # as the plain claim: never strand rows
                result = await self._storage.claim_limited_tasks(
                    self.queue.name, self.worker_id, limit=limit, lease_s=self.config.lease_s
                )
        except StorageError as exc:
            self._errors += 1
            log.warning("claim on queue %s failed: %s", self.queue.name, exc)
            return None
        if result.refused:
            self._held_back_claims += 1
            self._retry_held_back = result.retry_after_s
        return result.tasks

    def _become_coordinated(self) -> None:
        """Limits were declared (or a grouped task enqueued) after this worker started:
        claim through the limits row, and announce finishes to refused claimers."""
        log.info(
            "queue %s became coordinated: worker %s claims under its limits",
            self.queue.name,
            self.worker_id,
        )
        self._coordinated = True
        self._spec = dataclasses.replace(self._spec, wake_on_finish=True)

    def _legacy_refused(self) -> list[Task]:
        """The legacy ``poll_spawn`` loop cannot honour limits: it claims nothing (counted
        as held back, logged once) and keeps polling; the queue's other workers run it."""
        if not self._held_back_claims:
            log.error(
                "queue %s has limits or ordering groups: the legacy poll_spawn worker "
                "%s claims nothing (use mode='claim')",
                self.queue.name,
                self.worker_id,
            )
        self._held_back_claims += 1
        return []

    def _held_back_s(self) -> float | None:
        return self._retry_held_back

    async def _after_outcomes(self) -> None:
        """Finished tasks of a coordinated queue free slots: one statement notifies the
        queue's channel if a claim was refused since the last finish (else no notify)."""
        if not self._coordinated:
            return
        try:
            await self._storage.wake_task_queue(self.queue.name, self.queue.channel)
        except StorageError as exc:
            self._errors += 1
            log.warning("wake of queue %s failed: %s", self.queue.name, exc)

    async def _loop(self) -> None:
        if self._legacy:
            await self._poll_spawn()
        else:
            await self._claim_loop()

    # -- the legacy loop -------------------------------------------------------

    async def _poll_spawn(self) -> None:
        """Legacy ``poll_spawn``: every ``poll_interval_s``, spawn all that the poll returns."""
        cfg = self.config
        while not self._stopping.is_set():
            tasks = await self._claim(cfg.poll_batch) or []
            if not self._take(tasks):
                await self._sleep_or_stop(cfg.poll_interval_s)

    # -- running handlers ------------------------------------------------------

    def _dispatch(self, jobs: Sequence[Task]) -> None:
        """Hand claimed tasks to runners.

        Claim mode queues them for the pool's long-lived runners (at most ``max_workers``,
        started as the work needs them); the legacy mode spawns one task per handler.
        """
        if self._tasks is None:
            raise UsageError("worker is not running: use open_worker first")
        for task in jobs:
            if task.attempts > 1 and task.last_error == LEASE_EXPIRED:
                self._reruns += 1
        if self._notices.remembered:
            jobs = [task for task in jobs if not self._cancelled_before_claim(task)]
            if not jobs:
                return
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += len(jobs)
        self._peak = max(self._peak, self._running)
        if self._legacy:
            for task in jobs:
                self._tasks.start_soon(self._run_one, task)
            return
        self._free -= len(jobs)  # never below 0: we claimed only free slots
        self._pool.put(jobs, self._tasks)

    def _cancelled_before_claim(self, task: Task) -> bool:
        """True if a cancel notice for ``task`` overtook its claim: it is not started."""
        if not self._notices.overtook(task.id):
            return False
        self._forget(task.claim)
        self._cancelled += 1
        return True

    async def _run_claimed(self, task: Task, scope: anyio.CancelScope) -> None:
        """Claim mode: run one task on a runner of the pool, under ``scope``."""
        if self._held.get(task.id) != task.claim.token:
            self._finish(None)  # its lease was lost before it started
            return
        self._finish(await self._execute(task, scope), slot=True)

    async def _run_one(self, task: Task) -> None:
        """Legacy ``poll_spawn``: one spawned task per handler."""
        if self._held.get(task.id) != task.claim.token:
            self._finish(None, slot=False)  # cancelled or its lease lost before it started
            return
        with anyio.CancelScope() as scope:
            self._finish(await self._execute(task, scope), slot=False)

    async def _execute(self, task: Task, scope: anyio.CancelScope) -> Outcome | None:
        """Run the handler under ``scope``; the outcome to record (None: nothing to write).

        If ``scope`` (or the worker) is cancelled, the task's release or dead-letter is
        returned synchronously as the handler unwinds and the cancellation propagates after
        it is recorded.
        """
        claim = task.claim
        finished: Outcome | None = None
        self._scopes[task.id] = scope
        try:
            try:
                await self._handler(task)
                finished = Outcome(OutcomeKind.DONE, claim)
            except RetryTask as retry:
                finished = Outcome(OutcomeKind.RETRY, claim, retry.reason, retry.at)
            except PermanentFailure as exc:
                finished = Outcome(OutcomeKind.DEAD, claim, describe_failure(exc))
            except Exception as exc:
                at = time.time() + self.config.backoff_s(task.attempts)
                finished = Outcome(
                    OutcomeKind.RETRY, claim, describe_failure(exc), datetime.fromtimestamp(at, UTC)
                )
            if self._stop_reason.get(task.id, (None, ""))[0] is _Stop.CANCEL_TASK:
                # The handler caught the cancellation and ended on its own: the task is
                # still cancelled (storage decided), and its outcome is not written.
                finished = self._after_stop(task.id, claim)
        except BaseException:
            # Cancelled (this task, a lost lease, or the worker stopping): record its final
            # state here, synchronously; the writer's shielded final flush writes it.
            self._finish(self._after_stop(task.id, claim), slot=not self._legacy)
            raise
        finally:
            del self._scopes[task.id]
            self._stop_reason.pop(task.id, None)
        return finished

    def _finish(self, finished: Outcome | None, *, slot: bool = True) -> None:
        """A claimed task is done here: free its slot, record its outcome."""
        self._running -= 1
        if slot and not self._legacy:
            self._free += 1
            self._progress.set()
        if self._running == 0:
            self._idle.set()
        if finished is not None:
            self._record(finished)

    def _after_stop(self, task_id: int, claim: Claim) -> Outcome | None:
        reason, why = self._stop_reason.get(task_id, (_Stop.SHUTDOWN, ""))
        if reason is _Stop.LEASE_LOST:
            return None  # another worker holds the task now; its state is theirs to write
        if reason is _Stop.CANCELLED:
            self._cancelled += 1
            return Outcome(OutcomeKind.DEAD, claim, f"cancelled: {why}")
        if reason is _Stop.CANCEL_TASK:
            self._cancelled += 1
            return None  # storage ended it cancelled already; nothing left to write
        return Outcome(OutcomeKind.RELEASE, claim)


async def _coordinate(queue: AgentQueue, cfg: QueueConfig) -> bool:
    """Declare the config's limits, or read whether the queue has a limits row.

    A queue with a row (declared limits, or a grouped task enqueued) is claimed through it
    by every worker started after the row appeared (one started before switches at its
    next claim); the legacy ``poll_spawn`` mode is then refused at open.
    """
    if cfg.declares_limits:
        await queue.storage.set_queue_limits(
            queue.name,
            max_running=cfg.max_running,
            max_per_second=cfg.max_per_second,
            max_per_group=cfg.max_per_group or 1,
        )
        return True
    return await queue.storage.get_queue_limits(queue.name) is not None


@asynccontextmanager
async def open_worker(
    queue: AgentQueue,
    handler: Handler,
    *,
    max_workers: int | None = None,
    config: QueueConfig | None = None,
    worker_id: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[Worker]:
    """Run a worker for ``queue`` while the ``async with`` body runs.

    ``max_workers`` (default ``config.max_workers``) caps concurrently running handlers.
    On leaving the block normally the worker stops claiming, lets running handlers finish
    for up to ``shutdown_grace_s``, then cancels them and releases their leases (so other
    workers take those tasks at once) and writes every outcome before returning. If the
    block raises or is cancelled, handlers are cancelled at once; their releases and every
    finished outcome are still written (shielded, bounded by a timeout).

    ``clock`` is what the worker's timing reads: the lease renewal every ``heartbeat_s``,
    the idle wait and its fallback poll, the pause after a failed claim, the wait while a
    limit holds tasks back, the legacy mode's poll interval, the outcome writer's retries
    and the shutdown grace. A failed handler's ``retry_at`` is stored in wall time, which
    the database compares with its own ``now()``.
    """
    cfg = config or queue.config
    if max_workers is not None:
        cfg = QueueConfig.model_validate({**cfg.model_dump(), "max_workers": max_workers})
    coordinated = await _coordinate(queue, cfg)
    worker = Worker(
        queue, handler, cfg, worker_id or _default_worker_id(), coordinated=coordinated, clock=clock
    )
    async with anyio.create_task_group() as tg:
        await tg.start(worker._serve)
        try:
            yield worker
        finally:
            worker.stop()
