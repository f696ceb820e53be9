"""The operator dashboard's actions, and the per-client budget of refused-attempt audit rows.

``ACTIONS`` maps an action's name (the last segment of ``POST /api/actions/{name}``) to an
``Action``: which rows show its button and what it does through the storage contract.
``orchestrator.dashboard`` checks the token and the confirmation, runs the action and
writes the audit row; ``RefusalBudget`` decides whether a refused attempt's row is written.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from asyncstore.orchestrator.errors import ActionRefused, ResendRefused
from asyncstore.orchestrator.webhooks.admin import resend
from asyncstore.storage import (
    TASKS,
    AsyncStorageBackend,
    NewTask,
    OutboxStatus,
    Task,
    TaskStatus,
)
from asyncstore.storage._validate import check_id, check_int
from asyncstore.storage.task_cancel import TaskCancelOutcome

__all__ = ["ACTIONS", "Action", "RefusalBudget"]


@dataclass(frozen=True, slots=True)
class Action:
    """One operator action: what it applies to and what it does.

    ``parse`` turns the request's ``target`` into the argument of ``run`` (raising
    ``InvalidArgument`` for a malformed one: 400); ``run`` does the action through the
    storage contract and returns what the page shows, or raises ``ActionRefused`` (409).
    ``applies_to`` names the rows that show its button (``task:dead``, ``webhook``), one
    name or several (``("task:queued", "task:running")``); the first one's prefix names
    the target in the audit log.
    """

    label: str
    applies_to: str | tuple[str, ...]
    parse: Callable[[object], Any]
    run: Callable[[AsyncStorageBackend, Any], Awaitable[dict[str, Any]]]

    @property
    def rows(self) -> tuple[str, ...]:
        """``applies_to`` as a tuple."""
        return (self.applies_to,) if isinstance(self.applies_to, str) else self.applies_to

    def target_name(self, target: Any) -> str:
        """How the audit log names the target: ``task:17``, ``webhook:msg_...``."""
        return f"{self.rows[0].split(':')[0]}:{target}"


def _outbox_id(raw: object) -> int:
    return check_int(raw, "target (an outbox message id)", minimum=1)


def _task_id(raw: object) -> int:
    return check_int(raw, "target (a task id)", minimum=1)


def _webhook_id(raw: object) -> str:
    return check_id(raw, "target (a webhook-id)")


async def _dead_task(storage: AsyncStorageBackend, task_id: int, verb: str) -> Task:
    task = await storage.get_task(task_id)
    if task is None:
        raise ActionRefused(f"there is no task {task_id}")
    if task.status is not TaskStatus.DEAD:
        raise ActionRefused(
            f"task {task_id} is {task.status.value}: only a dead-lettered task can be {verb}"
        )
    return task


async def _retry_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Enqueue a fresh copy of a dead task (same queue, payload, priority and attempt
    budget; its idempotency key too, so a repeated retry does not queue two copies). The
    dead row stays as the record of what failed."""
    task = await _dead_task(storage, task_id, "retried")
    (copy,) = await storage.enqueue_tasks(
        [
            NewTask(
                task.queue,
                task.payload,
                priority=task.priority,
                idempotency_key=task.idempotency_key,
                max_attempts=task.max_attempts,
            )
        ]
    )
    return {"task": task_id, "new_task": copy.id}


async def _redrive_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Put the dead task itself back in its queue, due now, with a fresh attempt budget."""
    await _dead_task(storage, task_id, "redriven")
    moved = await storage.redrive_jobs(TASKS, [task_id])
    if not moved:  # a concurrent redrive took it first
        raise ActionRefused(f"task {task_id} was no longer dead-lettered")
    return {"task": task_id, "status": TaskStatus.QUEUED.value}


async def _resend_webhook(storage: AsyncStorageBackend, webhook_id: str) -> dict[str, Any]:
    """Queue the delivery again (same webhook-id and body), as ``asyncstore webhooks resend``."""
    try:
        row = await resend(storage, webhook_id)
    except ResendRefused as exc:
        raise ActionRefused(str(exc)) from exc
    return {"webhook_id": webhook_id, "outbox_row": row}


async def _cancel_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Cancel a queued or running task from the page (``cancel_task``: a queued task never
    starts, a running task's worker is notified and cancels its handler); a task that
    already ended is refused."""
    answer = await storage.cancel_task(task_id, "cancelled by an operator")
    if answer.outcome is TaskCancelOutcome.NOT_FOUND:
        raise ActionRefused(f"there is no task {task_id}")
    if answer.outcome is not TaskCancelOutcome.CANCELLED:
        state = answer.status.value if answer.status is not None else "gone"
        raise ActionRefused(f"task {task_id} had already ended ({state})")
    cancelled = TaskStatus.CANCELLED.value
    return {"task": task_id, "status": cancelled, "was_running": answer.was_running}


async def _redrive_outbox(storage: AsyncStorageBackend, message_id: int) -> dict[str, Any]:
    """Put a dead-lettered outbox message back (``redrive_outbox``: pending, due now, a fresh
    attempt budget, its place in its group kept); one statement, only if it is still dead."""
    message = await storage.get_outbox(message_id)
    if message is None:
        raise ActionRefused(f"there is no outbox message {message_id}")
    if message.status is not OutboxStatus.DEAD:
        raise ActionRefused(
            f"outbox message {message_id} is {message.status.value}: only a dead-lettered"
            " message can be redriven"
        )
    if not await storage.redrive_outbox([message_id]):  # a concurrent redrive took it first
        raise ActionRefused(f"outbox message {message_id} was no longer dead-lettered")
    return {"outbox": message_id, "status": OutboxStatus.PENDING.value}


ACTIONS: Mapping[str, Action] = {
    "task.retry": Action("Retry", "task:dead", _task_id, _retry_task),
    "task.redrive": Action("Redrive", "task:dead", _task_id, _redrive_task),
    "webhook.resend": Action("Resend", "webhook", _webhook_id, _resend_webhook),
    "task.cancel": Action("Cancel", ("task:queued", "task:running"), _task_id, _cancel_task),
    "outbox.redrive": Action("Redrive", "outbox:dead", _outbox_id, _redrive_outbox),
}
"""The actions the dashboard offers, by name (the URL's last segment)."""


class RefusalBudget:
    """How many refused action attempts of one client get an audit row: a token bucket per
    client address (``burst`` rows at once, then ``per_minute``), so a flood of refused
    requests (a wrong token, no confirmation) cannot fill ``operator_audit``.

    ``take(client)`` says whether to write the row and how many of that client's refusals
    were skipped since its last written one (said in that row). ``skipped`` counts every
    refusal not written. At most ``max_clients`` addresses are tracked, least recently
    seen dropped first (a dropped address starts again with a full bucket). ``per_minute``
    None: no limit, every refusal is written (the behaviour before the budget).
    """

    def __init__(
        self,
        burst: int,
        per_minute: float | None,
        *,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.skipped = 0
        self._clock = clock
        # client -> (tokens, when they were counted, refusals skipped since the last write)
        self._clients: OrderedDict[str, tuple[float, float, int]] = OrderedDict()

    def take(self, client: str) -> tuple[bool, int]:
        if self.per_minute is None:
            return True, 0
        now = self._clock()
        tokens, then, missed = self._clients.pop(client, (float(self.burst), now, 0))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_minute / 60.0)
        if tokens >= 1.0:
            self._remember(client, (tokens - 1.0, now, 0))
            return True, missed
        self.skipped += 1
        self._remember(client, (tokens, now, missed + 1))
        return False, missed + 1

    def _remember(self, client: str, entry: tuple[float, float, int]) -> None:
        self._clients[client] = entry
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
