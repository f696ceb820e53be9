"""Cancelling an agent task from any process: the result records and the notification format.

``AsyncStorageBackend.cancel_task`` ends a queued or running task ``cancelled`` (a
terminal status: never claimed again, not retried, not dead-lettered) in one statement,
under the row's lock, so a cancel and a worker's outcome write that commit at the same time
leave exactly one terminal state, and the caller is told which (``TaskCancellation``). A
running task's cancel also notifies ``TASK_CANCEL_CHANNEL`` (in the same statement on
Postgres; in-process after the commit on SQLite) with ``[task id, worker id]``, so the
worker that runs it cancels its handler at once. This module owns those records, the
payload's encoding and decoding, and the argument checks; the drivers own the statements.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from asyncstore.storage import _validate as v
from asyncstore.storage.job_records import TaskStatus

__all__ = [
    "TASK_CANCEL_CHANNEL",
    "TaskCancelOutcome",
    "TaskCancellation",
    "decode_task_cancel",
    "encode_task_cancel",
    "prepare_task_cancel",
]
TASK_CANCEL_CHANNEL = "asyncstore.task_cancel"
"""The channel ``cancel_task`` announces a running task's cancellation on (workers listen)."""


class TaskCancelOutcome(enum.StrEnum):
    """What a ``cancel_task`` call did.

    ``CANCELLED``: this call ended the task (it was queued or running); ``ALREADY_CANCELLED``:
    an earlier cancel had; ``ALREADY_FINISHED``: it had succeeded or been dead-lettered
    before this call took the row's lock (``TaskCancellation.status`` says which);
    ``NOT_FOUND``: no task has that id (never enqueued, or purged).
    """

    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class TaskCancellation:
    """The answer of ``cancel_task``: what the call did, and the task's state before it.

    ``status`` is the task's status when the cancel took its lock (None: not found), so
    ``CANCELLED`` with ``status`` ``running`` means a worker was running it (``worker_id``)
    and was notified; with ``queued``, it never started. A task always ends in the one
    terminal state this answer implies: ``cancelled`` unless ``ALREADY_FINISHED``.
    """

    task_id: int
    outcome: TaskCancelOutcome
    status: TaskStatus | None
    worker_id: str | None = None

    @property
    def was_running(self) -> bool:
        """True if this call cancelled a task a worker was running."""
        return self.outcome is TaskCancelOutcome.CANCELLED and self.status is TaskStatus.RUNNING

    @classmethod
    def of(cls, task_id: int, status: str | None, worker_id: str | None) -> TaskCancellation:
        """The answer for a task whose status was ``status`` when the cancel locked it."""
        if status is None:
            return cls(task_id, TaskCancelOutcome.NOT_FOUND, None)
        before = TaskStatus(status)
        if before in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            outcome = TaskCancelOutcome.CANCELLED
        elif before is TaskStatus.CANCELLED:
            outcome = TaskCancelOutcome.ALREADY_CANCELLED
        else:
            outcome = TaskCancelOutcome.ALREADY_FINISHED
        return cls(task_id, outcome, before, worker_id)


def prepare_task_cancel(
    task_id: object, reason: object, notify_channel: object
) -> tuple[int, str, str | None]:
    """``cancel_task``'s arguments, checked: the reason cut to 1000 characters."""
    checked = v.check_int(task_id, "task_id", minimum=1)
    kept = v.check_text(reason, "reason", max_chars=v.MAX_REASON_CHARS)
    channel = None if notify_channel is None else v.check_channel(notify_channel)
    return checked, kept, channel


def encode_task_cancel(task_id: int, worker_id: str | None) -> str:
    """The notification payload: the JSON text ``["<task id>", "<worker id>"]``.

    The Postgres statement builds the same text with ``to_json`` of a text array.
    """
    return orjson.dumps([str(task_id), worker_id]).decode()


def decode_task_cancel(payload: str) -> tuple[int, str | None] | None:
    """``(task id, worker id)`` from a payload; None for a payload that is not one."""
    try:
        task_id, worker_id = orjson.loads(payload)
        return int(task_id), None if worker_id is None else str(worker_id)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
