"""AgentQueue: enqueue agent tasks and run them with a capped, leased, event-driven worker.

This module owns the agent queue on top of the storage job engine (kind ``TASKS``): the
producer (``AgentQueue``: enqueue, the rows and their wakeup notification in one statement)
and the worker's handler side (``Worker``, ``open_worker``): at most ``max_workers``
long-lived runners run handlers, and a handler's outcome (done, a retry at its
``Backoff`` delay, dead, released) is recorded for the shared consumer loop
(``orchestrator.jobs.JobConsumer``), which claims as many tasks as there are free slots
(at most ``claim_batch``) in one statement, renews leases, writes outcomes in batches under
the current lease, and sleeps while idle until an enqueue notification, the next moment a
task becomes claimable (a delayed task's due time or a running task's lease expiry, read
with one cheap query when it goes idle, so a dead worker's tasks are re-run as soon as
their lease runs out), or a rare jittered fallback poll.

A queue with fleet-wide limits (``QueueConfig.max_running`` / ``max_per_second`` /
``max_per_group``, declared in the database when a worker starts) or with grouped tasks
(``enqueue(..., group=...)``) is coordinated: its workers claim through
``claim_limited_tasks`` (the queue's row locked per claim, fleet-wide), a claim that a
limit or a group refused waits for a finish notification or for the time the limits
allow the next start, and finishing workers send that notification only when a claim was
refused (``wake_task_queue``). Retries, dead letters and redrives of grouped tasks follow
the outbox's group rules (see ``storage._queue_limits``).

``AgentQueue.cancel`` ends a task
``cancelled`` from any process (``cancel_task``); each worker listens for those
notifications and cancels the named handler at once (``QueueConfig.cancel_listen``).

The parts live in their own modules and are re-exported here: the settings and the
handler's exceptions (``queue_config``), the worker (``queue_worker``) and its counters
(``queue_stats``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from asyncstore.orchestrator.queue_config import Handler, PermanentFailure, QueueConfig, RetryTask
from asyncstore.orchestrator.queue_stats import WorkerStatistics
from asyncstore.orchestrator.queue_worker import Worker, open_worker
from asyncstore.storage import AsyncStorageBackend, InvalidInput, NewTask, Task
from asyncstore.storage import TaskStatus as StoredStatus
from asyncstore.storage._queue_limits import task_queue_channel
from asyncstore.storage._validate import check_channel
from asyncstore.storage.base import JSON, TASKS
from asyncstore.storage.task_cancel import TaskCancellation

log = logging.getLogger("asyncstore.queue")

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


class AgentQueue:
    """A named task queue on a storage backend: enqueue here, run with ``open_worker``.

    Every enqueue call sends one notification on the queue's channel with its rows
    (payload: the earliest ``run_after`` of the batch as a Unix timestamp), so idle workers
    wake at once for due tasks and know when delayed ones become due. By default the rows
    and the notification are one statement (``enqueue_notify="in_statement"``); the legacy
    ``separate`` sends the notification in a second round trip after the commit.
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
        self.channel = task_queue_channel(name)
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
        group: str | None = None,
    ) -> Task:
        """Enqueue one task (see ``enqueue_many``)."""
        new = NewTask(
            self.name,
            payload,
            priority,
            run_after,
            idempotency_key,
            max_attempts or self.config.max_attempts,
            group,
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
        group: str | None = None,
    ) -> list[Task]:
        """Enqueue a batch in one transaction and send one notification; one row per payload.

        ``group``: every task of the batch joins that ordering group (run in enqueue order,
        at most the queue's ``max_per_group`` at once, fleet-wide); the queue becomes
        coordinated (see ``open_worker``).

        A payload whose idempotency key matches an unfinished task of this queue returns that
        task instead of a new one. If cancelled, the batch was either committed (announced
        with it; with the legacy ``separate`` notify maybe not, and the workers' fallback
        poll finds it) or not written at all.
        """
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(payloads)
        if len(keys) != len(payloads):
            raise InvalidInput("idempotency_keys must have one entry per payload")
        attempts = max_attempts or self.config.max_attempts
        return await self.enqueue_tasks(
            [
                NewTask(self.name, p, priority, run_after, k, attempts, group)
                for p, k in zip(payloads, keys, strict=True)
            ]
        )

    async def enqueue_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        """Enqueue fully specified ``NewTask`` rows of this queue; see ``enqueue_many``."""
        for task in tasks:
            if task.queue != self.name:
                raise InvalidInput(f"task for queue {task.queue!r} given to queue {self.name!r}")
        if self.config.enqueue_notify == "in_statement":
            return await self.storage.enqueue_jobs(TASKS, tasks, notify=self.channel)
        rows = await self.storage.enqueue_jobs(TASKS, tasks)  # legacy: a second round trip
        queued = [t.run_after for t in rows if t.status is StoredStatus.QUEUED]
        if queued:
            await self.storage.notify(self.channel, f"{min(queued).timestamp():.6f}")
        return rows

    async def get(self, task_id: int) -> Task | None:
        """One task of any state by id."""
        return await self.storage.get_job(TASKS, task_id)

    async def cancel(self, task_id: int, reason: str = "cancelled") -> TaskCancellation:
        """Cancel a task from any process (``AsyncStorageBackend.cancel_task``).

        A queued task never starts; a running one ends ``cancelled`` at once in storage and
        its worker, wherever it runs, cancels the handler when the notification arrives
        (the same LISTEN/NOTIFY path as session cancellation). A handler that catches the
        cancellation and returns normally is still recorded ``cancelled``: the storage
        row decided when this call committed, and the worker's later outcome changes
        nothing. Idempotent; the answer says whether this call cancelled the task, an
        earlier one had, or the task had already finished (and how), or does not exist.
        ``task_id`` may be of any queue.
        """
        return await self.storage.cancel_task(task_id, reason)
