"""The ``cancel_task`` notices addressed to one queue worker (``CancelNotices``).

``AgentQueue.cancel`` ends a task ``cancelled`` in storage and notifies
``TASK_CANCEL_CHANNEL`` naming the worker that holds it. This module owns that worker's
side of the channel: listening, keeping only the notices that name this worker, reading
the held tasks back after a gap (a listener reconnect, an overflow), and remembering,
boundedly, notices for tasks this worker does not hold yet (a notice can overtake the
claim's answer on its way: the claim committed first). What a cancel does to a running
handler is the worker's (``orchestrator.queue_worker``), passed in as ``cancelled``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import TaskStatus

from asyncstore.storage import AsyncStorageBackend
from asyncstore.storage import TaskStatus as StoredStatus
from asyncstore.storage.base import TASKS
from asyncstore.storage.errors import StorageError
from asyncstore.storage.task_cancel import TASK_CANCEL_CHANNEL, decode_task_cancel

__all__ = ["RECENT_CANCELS", "CancelNotices"]

log = logging.getLogger("asyncstore.queue")

RECENT_CANCELS = 1024
"""How many cancel notices for tasks this worker did not hold yet it remembers (a notice
can overtake the claim's answer on its way: the claim committed first)."""


class CancelNotices:
    """One worker's ``cancel_task`` notices.

    ``held()`` is the worker's held leases (task id -> lease token); ``cancelled(task_id)``
    is called for each task storage cancelled that this worker holds, or may hold. ``notes``
    counts the notices that named this worker, ``errors`` the failed catch-up reads.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        worker_id: str,
        queue_name: str,
        *,
        held: Callable[[], Mapping[int, int]],
        cancelled: Callable[[int], None],
    ) -> None:
        self._storage = storage
        self._worker_id = worker_id
        self._queue_name = queue_name
        self._held = held
        self._cancelled = cancelled
        self.notes = 0
        self.errors = 0
        # Notices for tasks not held yet (bounded, oldest forgotten first).
        self._recent: collections.OrderedDict[int, None] = collections.OrderedDict()

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Report the tasks ``cancel_task`` cancelled; notices name the worker.

        After a gap the held tasks are read back and those found cancelled are reported;
        the lease renewal is the last resort (a cancelled row is no longer running, so its
        renewal fails and the handler stops). Runs until cancelled.
        """
        async with self._storage.listen(TASK_CANCEL_CHANNEL) as stream:
            task_status.started()
            async for note in stream:
                if note.gap:
                    await self._catch_up()
                    continue
                notice = decode_task_cancel(note.payload)
                if notice is not None and notice[1] == self._worker_id:
                    self.notes += 1
                    self._cancelled(notice[0])

    async def _catch_up(self) -> None:
        for task_id, token in list(self._held().items()):
            try:
                task = await self._storage.get_job(TASKS, task_id)
            except StorageError as exc:
                self.errors += 1
                log.warning("cancel catch-up on queue %s failed: %s", self._queue_name, exc)
                return
            cancelled = task is not None and task.status is StoredStatus.CANCELLED
            if cancelled and self._held().get(task_id) == token:
                self._cancelled(task_id)

    def remember(self, task_id: int) -> None:
        """A notice for a task not held (yet): keep it for the claim whose answer it overtook."""
        self._recent[task_id] = None
        while len(self._recent) > RECENT_CANCELS:
            self._recent.popitem(last=False)

    @property
    def remembered(self) -> bool:
        """Whether any remembered notice waits for its claim."""
        return bool(self._recent)

    def overtook(self, task_id: int) -> bool:
        """True (once) if a remembered notice names ``task_id``: its claim came too late."""
        if task_id not in self._recent:
            return False
        del self._recent[task_id]
        return True
