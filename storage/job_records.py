"""The records of the leased-job engine: agent tasks, outbox messages, claims and failures.

This module owns what the job calls of ``AsyncStorageBackend`` take and return: ``NewTask``
/ ``Task`` and ``NewOutboxMessage`` / ``OutboxMessage`` with their status enums
(``TaskStatus``, ``OutboxStatus``), the ``Claim`` a claimed row is settled under, the
``Failure`` of an attempt and the ``FailureColumns`` the drivers receive, the backlog's
``QueueDepth`` and ``LEASE_EXPIRED``. Plain data, like ``storage.records`` (which
re-exports every name, as ``storage.base`` does); ``storage.jobkinds`` ties them to their
tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from asyncstore.storage.errors import LeaseLost

if TYPE_CHECKING:
    # Annotations only: storage.records imports this module to re-export its names.
    from asyncstore.storage.records import JSON


LEASE_EXPIRED = "lease expired"
"""``last_error`` of a task re-claimed because its previous worker's lease expired."""


class TaskStatus(StrEnum):
    """Where an agent task is: waiting (``queued``), claimed by a worker, done, dead-lettered,
    or ``cancelled`` by ``cancel_task`` (terminal: never claimed again, not retried)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class NewTask:
    """An agent task to enqueue.

    ``run_after`` (None: now) is the earliest time it may be claimed; a task with an
    ``idempotency_key`` is enqueued once while an earlier one with the same key on the same
    queue is not finished (the existing row is returned instead). A task with a ``group``
    (an ordering group within its queue) runs after the earlier tasks of its group, at
    most the queue's ``max_per_group`` of them at once; its queue becomes coordinated
    (``claim_limited_tasks``).
    """

    queue: str
    payload: JSON
    priority: int = 0
    run_after: datetime | None = None
    idempotency_key: str | None = None
    max_attempts: int = 5
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """An agent task row.

    While ``status`` is ``running``, ``run_after`` is the lease expiry: the time after which
    the normal claim takes the task again if its worker stopped heartbeating.
    """

    id: int
    queue: str
    payload: JSON
    priority: int
    status: TaskStatus
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_token: int | None
    worker_id: str | None
    idempotency_key: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    group: str | None = None  # the ordering group (NewTask.group), None: ungrouped

    @property
    def claim(self) -> Claim:
        if self.lease_token is None:
            raise LeaseLost(f"task {self.id} is not claimed")
        return Claim(self.id, self.lease_token)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        return cls(
            row["id"],
            row["queue"],
            row["payload"],
            row["priority"],
            TaskStatus(row["status"]),
            row["attempts"],
            row["max_attempts"],
            row["run_after"],
            row["lease_token"],
            row["worker_id"],
            row["idempotency_key"],
            row["last_error"],
            row["created_at"],
            row["updated_at"],
            row.get("group_key"),
        )


@dataclass(frozen=True, slots=True)
class NewOutboxMessage:
    """A message for a channel (e.g. a chat platform) and an account within it."""

    channel: str
    account: str
    payload: JSON
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An outbox row; while ``sending``, ``run_after`` is the claim's lease expiry."""

    id: int
    channel: str
    account: str
    payload: JSON
    status: OutboxStatus
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_token: int | None
    last_error: str | None
    created_at: datetime

    @property
    def claim(self) -> Claim:
        if self.lease_token is None:
            raise LeaseLost(f"outbox message {self.id} is not claimed")
        return Claim(self.id, self.lease_token)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> OutboxMessage:
        return cls(
            row["id"],
            row["channel"],
            row["account"],
            row["payload"],
            OutboxStatus(row["status"]),
            row["attempts"],
            row["max_attempts"],
            row["run_after"],
            row["lease_token"],
            row["last_error"],
            row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """The unfinished rows of one task queue, or of the outbox, as ``backlog_depths`` read them.

    ``waiting`` rows can be claimed now: queued (pending) and due, or claimed under a lease
    that expired (their worker died). ``delayed`` rows wait for a future ``run_after``
    (scheduled, or a retry's backoff); ``in_flight`` rows are claimed under a live lease.
    ``oldest_wait_s`` is how long the longest-waiting claimable row has been claimable
    (since its ``run_after`` or its lease expiry; 0.0 when none waits), by the database's
    clock.
    """

    name: str
    waiting: int
    delayed: int
    in_flight: int
    oldest_wait_s: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QueueDepth:
        return cls(
            row["name"],
            int(row["waiting"]),
            int(row["delayed"]),
            int(row["in_flight"]),
            max(0.0, float(row["oldest_wait_s"] or 0.0)),
        )


class Claim(NamedTuple):
    """Identifies one claimed row (task or outbox message) under one lease."""

    id: int
    token: int


class FailureColumns(NamedTuple):
    """``Failure`` records checked and split into columns: what the failure hooks receive."""

    ids: list[int]
    tokens: list[int]
    errors: list[str]
    retry_at: list[datetime | None]


class Failure(NamedTuple):
    """A failed attempt: retry at ``retry_at`` (None: at once) unless attempts ran out."""

    id: int
    token: int
    error: str
    retry_at: datetime | None = None
