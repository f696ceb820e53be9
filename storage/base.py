"""The storage contract: ``AsyncStorageBackend``, its records and its settings.

This module owns the one async API that the orchestrator builds on (chat, stream events,
session leases, agent tasks, outbox, cancellation state, notifications) and the immutable
records it returns. The public methods validate, encode and map errors once, here; drivers
(``storage.postgres``, ``storage.sqlite``) implement only the ``_sql_*`` hooks that run SQL
on prepared arguments, and must pass the shared contract suite in ``tests/contract/``.
"""

from __future__ import annotations

import abc
import bisect
import collections
import functools
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import (
    Any,
    ClassVar,
    Concatenate,
    Generic,
    NamedTuple,
    ParamSpec,
    Self,
    TypeVar,
)

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from asyncstore.storage.errors import (
    InvalidArgument,
    InvalidInput,
    InvalidType,
    LeaseLost,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)
from asyncstore.storage.families import Family, MetricSink

_P = ParamSpec("_P")
_R = TypeVar("_R")
_B = TypeVar("_B", bound="AsyncStorageBackend")

__all__ = [
    "JOB_KINDS",
    "JSON",
    "LEASE_EXPIRED",
    "OUTBOX",
    "TASKS",
    "AsyncStorageBackend",
    "AuditEntry",
    "CancelState",
    "ChatMessage",
    "Claim",
    "EncodedJSON",
    "Failure",
    "JobKind",
    "JournaledEvent",
    "Leadership",
    "Lease",
    "LeaseAttempt",
    "LoginPolicy",
    "LoginSlot",
    "NewMessage",
    "NewOutboxMessage",
    "NewStreamEvent",
    "NewTask",
    "Notification",
    "NotificationStream",
    "OutboxMessage",
    "QueueDepth",
    "StorageSettings",
    "StorageStatistics",
    "StreamEvent",
    "StreamPartition",
    "StreamRow",
    "Task",
    "TaskStatus",
    "WebhookAttempt",
]

JSON = Any
"""A JSON value: None, bool, int, float, str, list of JSON, dict of str to JSON."""


@dataclass(frozen=True, slots=True)
class EncodedJSON:
    """A payload already validated and encoded by ``storage.encode_payload``.

    Wherever a payload is accepted, drivers pass ``data`` through instead of encoding again,
    so a caller that needs the encoded size (the stream writer) encodes exactly once.
    """

    data: bytes


class StorageSettings(BaseModel):
    """How to reach and size the database. Built by ``orchestrator.config``; never reads env.

    ``url`` picks the driver: ``postgresql://`` / ``postgres://`` (asyncpg) or
    ``sqlite:///path/to/file.db`` (aiosqlite; ``sqlite:///:memory:`` for a private,
    in-process database).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr = SecretStr("sqlite:///asyncstore.db")
    pool_min_size: int = Field(default=2, ge=0, le=1000)
    pool_max_size: int = Field(default=10, ge=1, le=1000)
    statement_cache_size: int = Field(
        default=100, ge=0, description="asyncpg prepared-statement cache; 0 for PgBouncer"
    )
    command_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    sqlite_busy_timeout_s: float = Field(default=5.0, ge=0)
    sqlite_readers: int = Field(default=2, ge=1, le=64)
    sqlite_synchronous: str = Field(default="NORMAL", pattern="^(OFF|NORMAL|FULL|EXTRA)$")
    listener_reconnect_max_s: float = Field(
        default=0.5,
        gt=0,
        description="backoff cap between LISTEN reconnect attempts while the server is down; "
        "small, so the listener is back within about this long after the server is",
    )
    listener_queue_size: int = Field(default=10_000, ge=1)
    pooled: bool | None = Field(
        default=None,
        description="url reaches a transaction-mode pooler (PgBouncer): no named prepared "
        "statements on pool connections, session work on listen_url; None detects a pooler "
        "and refuses it with a clear error; false asserts session semantics (no check)",
    )
    listen_url: SecretStr | None = Field(
        default=None,
        description="direct Postgres DSN for what needs a session (LISTEN, leadership "
        "locks); required with pooled=true, defaults to url otherwise",
    )
    slow_query_threshold_s: float = Field(
        default=0.1,
        gt=0,
        description="a storage call that takes longer (pool wait included) counts as slow",
    )
    stream_partitioning: bool = Field(
        default=False,
        description="Postgres: keep stream_events partitioned by session start time, so "
        "retention drops whole partitions (storage/_partitions.py); opening with "
        "migrate=True converts a plain table; SQLite keeps the plain table and batched "
        "DELETE (a warning says so)",
    )


# ---------------------------------------------------------------- records (immutable)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A chat message to append; the storage assigns its per-session ``seq``."""

    role: str
    content: JSON


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A stored chat message: its per-session ``seq`` (from 1, gap-free) and content."""

    session_id: str
    seq: int
    role: str
    content: JSON
    created_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ChatMessage:
        return cls(row["session_id"], row["seq"], row["role"], row["content"], row["created_at"])


@dataclass(frozen=True, slots=True)
class NewStreamEvent:
    """A stream event whose ``(epoch, seq)`` the single writer of the session assigned."""

    session_id: str
    epoch: int
    seq: int
    kind: str
    payload: JSON


StreamRow = tuple[str, int, int, str, bytes]
"""A stream event ready to store: ``(session_id, seq, epoch, kind, encoded payload)``.

What ``append_stream_events`` makes of each ``NewStreamEvent`` once it is validated, and
what the stream writer builds at ``emit`` for its trusted path (``_append_stream_rows``).
"""


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """What ``append_stream_events`` did.

    ``stored``: events written or replaced (a retried batch's events already stored with
    the same epoch are skipped, not counted). ``refused``: the ``(session_id, epoch)`` pairs
    the fence turned away, every event of which was not written: that epoch is not the
    session's current lease token (or, for a session without a lease row, it is older than
    the epoch of the session's last stored event). A writer must stop writing that epoch.
    """

    stored: int
    refused: frozenset[tuple[str, int]] = frozenset()


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A stored (or live) stream event, identified by ``(epoch, seq)`` within its session."""

    session_id: str
    epoch: int
    seq: int
    kind: str
    payload: JSON
    created_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StreamEvent:
        return cls(
            row["session_id"],
            row["epoch"],
            row["seq"],
            row["kind"],
            row["payload"],
            row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class StreamPartition:
    """One partition of a partitioned ``stream_events``: the sessions whose first event was
    stored in ``[lower, upper)``; both None for the default partition (sessions anchored
    where no ranged partition existed yet, moved out when one is created)."""

    name: str
    lower: datetime | None
    upper: datetime | None


@dataclass(frozen=True, slots=True)
class Lease:
    """A session lease. ``token`` is the fencing token: it grows on every new acquisition."""

    session_id: str
    holder: str
    token: int
    expires_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Lease:
        return cls(row["session_id"], row["holder"], row["token"], row["expires_at"])


class LeaseAttempt(NamedTuple):
    """What ``acquire_lease_slot`` found: the lease if taken, and whether a slot was free.

    ``lease`` is None either because the pool was full (``slot_ok`` False) or because the
    session is held by someone else (``slot_ok`` True).
    """

    lease: Lease | None
    slot_ok: bool


LEASE_EXPIRED = "lease expired"
"""``last_error`` of a task re-claimed because its previous worker's lease expired."""


class TaskStatus(StrEnum):
    """Where an agent task is: waiting (``queued``), claimed by a worker, done, or dead-lettered."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"


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
    queue is not finished (the existing row is returned instead).
    """

    queue: str
    payload: JSON
    priority: int = 0
    run_after: datetime | None = None
    idempotency_key: str | None = None
    max_attempts: int = 5


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
        )


@dataclass(frozen=True, slots=True)
class NewOutboxMessage:
    """A message for a channel (e.g. a chat platform) and an account within it."""

    channel: str
    account: str
    payload: JSON
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class JournaledEvent:
    """A durable webhook event committed to the journal, not yet in an outbox batch."""

    id: int
    endpoint: str
    body: bytes


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One delivery attempt of a durable webhook, as kept in the delivery log."""

    endpoint: str
    webhook_id: str
    outbox_id: int | None
    attempted_at: datetime
    status: int | None  # the receiver's HTTP status, None when no answer came
    error: str  # "" when delivered
    ok: bool
    id: int = 0  # assigned by the log

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WebhookAttempt:
        at = row["attempted_at"]
        if not isinstance(at, datetime):
            at = datetime.fromtimestamp(float(at), UTC)
        return cls(
            row["endpoint"],
            row["webhook_id"],
            row["outbox_id"],
            at,
            row["status"],
            row["error"],
            bool(row["ok"]),
            row["id"],
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action as the audit log keeps it (``record_audit`` / ``list_audit``).

    ``actor`` says who acted (the dashboard records the token's label and the client
    address), ``action`` what was asked (``task.redrive``), ``target`` on what (``task:17``),
    ``outcome`` how it ended (``done``, ``refused: ...``, ``failed: ...``) and ``detail``
    anything else worth keeping (JSON text or plain words).
    """

    id: int
    created_at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    detail: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditEntry:
        return cls(
            int(row["id"]),
            row["created_at"],
            row["actor"],
            row["action"],
            row["target"],
            row["outcome"],
            row["detail"],
        )


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


# ---------------------------------------------------------------- the leased-job engine

_J = TypeVar("_J")  # the record of a kind (Task, OutboxMessage)
_N = TypeVar("_N")  # what enqueuing takes (NewTask, NewOutboxMessage)
_S = TypeVar("_S", bound=StrEnum)  # the status enum of a kind

_TEMPLATE_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, eq=False, slots=True)
class JobKind(Generic[_J, _N, _S]):
    """One kind of leased job: the table its rows live in and the names of its states.

    Agent tasks (``TASKS``) and outbox messages (``OUTBOX``) are two kinds of one engine:
    rows enqueued ``waiting``, claimed into ``running`` under a lease token (``run_after``
    is then the lease expiry), and finished ``done`` or ``dead``; failing puts a row back to
    ``waiting`` at its ``retry_at`` until its attempts run out. The ``*_jobs`` methods of the
    storage contract take the kind as their first argument. The set of kinds is closed:
    only the two instances below exist, and SQL templates are rendered from their fields
    (never from caller input), so a table name cannot be injected.

    ``grouped`` kinds carry an ordering group (an outbox message's (channel, account)): the
    claim takes a group's messages in id order, at most one in flight per group.
    """

    name: str
    table: str
    suffix: str  # statement names: "<op>_<suffix>" (complete_tasks, claim_outbox, ...)
    waiting: str
    running: str
    done: str
    grouped: bool
    queue_label: str  # what claim_jobs' ``queues`` filter names for this kind
    record: Callable[[Mapping[str, Any]], _J]
    status: Callable[[str], _S]
    prepare: Callable[[object], list[Any]]
    dead: str = "dead"

    def __repr__(self) -> str:
        return f"JobKind({self.name!r})"

    def statement(self, operation: str) -> str:
        """The name of this kind's statement for ``operation`` (e.g. ``claim_tasks``)."""
        return f"{operation}_{self.suffix}"

    def render(self, template: str) -> str:
        """Fill a ``*_jobs`` SQL template: ``{jobs}`` the table, ``{waiting}``, ``{running}``,
        ``{done}``, ``{dead}`` the status names; any other field is an error."""
        fields = {
            "jobs": self.table,
            "waiting": self.waiting,
            "running": self.running,
            "done": self.done,
            "dead": self.dead,
        }

        def fill(match: re.Match[str]) -> str:
            if match.group(1) not in fields:
                raise InvalidArgument(f"unknown field {{{match.group(1)}}} in a job template")
            return fields[match.group(1)]

        return _TEMPLATE_FIELD.sub(fill, template)


TASKS: JobKind[Task, NewTask, TaskStatus] = JobKind(
    "task",
    "agent_tasks",
    "tasks",
    TaskStatus.QUEUED,
    TaskStatus.RUNNING,
    TaskStatus.SUCCEEDED,
    grouped=False,
    queue_label="queue",
    record=Task.from_row,
    status=TaskStatus,
    prepare=lambda jobs: v.prepare_tasks(jobs),
)
"""Agent tasks: per queue, by priority then due time; idempotency keys; no groups."""

OUTBOX: JobKind[OutboxMessage, NewOutboxMessage, OutboxStatus] = JobKind(
    "outbox",
    "outbox",
    "outbox",
    OutboxStatus.PENDING,
    OutboxStatus.SENDING,
    OutboxStatus.SENT,
    grouped=True,
    queue_label="channel",
    record=OutboxMessage.from_row,
    status=OutboxStatus,
    prepare=lambda jobs: v.prepare_outbox(jobs),
)
"""Outbox messages: in id order per (channel, account) group, one in flight per group."""

JOB_KINDS: tuple[JobKind[Any, Any, Any], ...] = (TASKS, OUTBOX)


def render_job_queries(queries: Mapping[str, str]) -> dict[str, str]:
    """Expand each ``<op>_jobs`` template into one statement per kind, ``<op>_<suffix>``.

    A statement the dialect writes for one kind under that name (a kind-specific rule, such
    as a grouped kind's claim) takes the template's place for that kind.
    """
    out = {name: sql for name, sql in queries.items() if not name.endswith("_jobs")}
    for name, sql in queries.items():
        if name.endswith("_jobs"):
            for kind in JOB_KINDS:
                out.setdefault(kind.statement(name.removesuffix("_jobs")), kind.render(sql))
    return out


@dataclass(frozen=True, slots=True)
class CancelState:
    """A persisted cancel request of a session: why, and when it was requested."""

    session_id: str
    reason: str
    requested_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CancelState:
        return cls(row["session_id"], row["reason"], row["requested_at"])


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification on ``channel``. ``gap=True`` means some may have been missed.

    A gap is reported after the listener reconnected or a subscriber's buffer overflowed;
    the subscriber should catch up by reading the state it cares about from storage.
    """

    channel: str
    payload: str
    gap: bool = False


class NotificationStream(abc.ABC):
    """What ``listen()`` yields: an async iterator of notifications for its channels."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Notification]: ...

    @abc.abstractmethod
    async def receive(self) -> Notification:
        """Wait for the next notification. Cancelling the wait loses nothing."""


class Leadership(abc.ABC):
    """A named role that at most one handle on a database holds: the fleet's one sweeper.

    What ``open_leadership`` yields. ``try_lead()`` keeps the role if this handle holds it
    and takes it if nobody does; leaving the ``async with`` block gives it up. A holder
    that dies loses the role on its own: on Postgres with its connection (a session
    advisory lock), on SQLite when its lease row expires after ``ttl_s``.
    """

    @property
    @abc.abstractmethod
    def leading(self) -> bool:
        """Whether the last ``try_lead()`` found this handle holding the role."""

    @abc.abstractmethod
    async def try_lead(self) -> bool:
        """Keep or take the role; False while another handle holds it.

        Raises ``StorageError`` if the database cannot be asked (the role is then treated
        as lost). If cancelled, ``leading`` is False and whatever the call may have taken
        is given up when the ``async with`` block is left.
        """


QUERY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of ``storage_query_duration_seconds``'s buckets (+Inf follows)."""
_DIALECT = ("dialect",)
_OP = ("dialect", "operation")


@dataclass(frozen=True, slots=True)
class StorageStatistics:
    """A snapshot of a backend's counters (statements by query name, notifications)."""

    dialect: str
    statements: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    notifications_received: int = 0
    notifications_dropped: int = 0
    listener_reconnects: int = 0
    listener_reconnect_failures: int = 0  # reconnect attempts that failed (server down)
    # storage calls slower than slow_query_threshold_s, by operation (a method's name)
    slow_queries: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    slow_query_threshold_s: float = 0.1
    # per operation: calls by QUERY_BUCKETS_S bucket (the last one is +Inf) and their sum
    durations: Mapping[str, tuple[tuple[int, ...], float]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    pool: tuple[int, int, int] | None = None  # Postgres: (size, idle, max_size)

    @property
    def total_statements(self) -> int:
        return sum(self.statements.values())

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("storage_statements", "counter", "Statements by operation.", _OP),
        Family("storage_notifications_received", "counter", "Notifications.", _DIALECT),
        Family("storage_notifications_dropped", "counter", "Dropped.", _DIALECT),
        Family("storage_listener_reconnects", "counter", "Listener reconnects.", _DIALECT),
        Family(
            "storage_listener_reconnect_failures",
            "counter",
            "Listener reconnect attempts that failed.",
            _DIALECT,
        ),
        Family(
            "storage_slow_queries",
            "counter",
            "Storage calls slower than the slow-query threshold, by operation "
            "(at zero for every operation called).",
            _OP,
        ),
        Family(
            "storage_slow_query_threshold_seconds",
            "gauge",
            "The slow-query threshold (storage.slow_query_threshold_s).",
            _DIALECT,
        ),
        Family(
            "storage_query_duration_seconds",
            "histogram",
            "Duration of storage calls (pool wait included), by operation.",
            _OP,
            where="once an operation was called",
        ),
        Family(
            "storage_pool_connections",
            "gauge",
            "Pool connections.",
            (*_DIALECT, "state"),
            where="Postgres (a pool)",
        ),
        Family(
            "storage_pool_max_connections",
            "gauge",
            "Pool maximum size.",
            _DIALECT,
            where="Postgres (a pool)",
        ),
    )

    def export(self, out: MetricSink) -> None:
        d = {"dialect": self.dialect}
        out.samples("storage_statements", d, self.statements)
        out.sample("storage_notifications_received", d, self.notifications_received)
        out.sample("storage_notifications_dropped", d, self.notifications_dropped)
        out.sample("storage_listener_reconnects", d, self.listener_reconnects)
        out.sample("storage_listener_reconnect_failures", d, self.listener_reconnect_failures)
        slow = {name: self.slow_queries.get(name, 0) for name in self.durations}
        out.samples("storage_slow_queries", d, slow)
        out.sample("storage_slow_query_threshold_seconds", d, self.slow_query_threshold_s)
        for name, (counts, total) in self.durations.items():
            buckets = zip((*QUERY_BUCKETS_S, float("inf")), counts, strict=True)
            labels = {**d, "operation": name}
            out.histogram("storage_query_duration_seconds", labels, buckets, total)
        if self.pool is not None:
            size, idle, max_size = self.pool
            out.samples("storage_pool_connections", d, {"idle": idle, "in_use": size - idle})
            out.sample("storage_pool_max_connections", d, max_size)


# ---------------------------------------------------------------- login attempts (records)

LOGIN_SCOPES = ("account", "address")
"""The scopes a login attempt is counted under (``reserve_login_attempt``)."""

LOGIN_BUSY_RETRY_S = 1.0
"""The retry-after of a refusal caused by attempts in flight (they end within a verification)."""


class LoginPolicy(NamedTuple):
    """The limits of one scope for ``reserve_login_attempt`` / ``finish_login_attempt``."""

    limit: int  # failures + attempts in flight allowed per window
    window_s: float
    lockout_base_s: float
    lockout_factor: float
    lockout_max_s: float
    forget_after_s: float  # without a failure this long, the next lockout is the base again


class LoginSlot(NamedTuple):
    """The answer of ``reserve_login_attempt``.

    ``granted``: one attempt is reserved and must be finished with ``window_start``.
    Otherwise ``retry_after_s`` says when to retry and ``locked`` whether the key is locked
    out (else it is full of attempts in flight).
    """

    granted: bool
    window_start: float
    retry_after_s: float
    locked: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any], window_s: float) -> LoginSlot:
        now = float(row["now"])
        locked_until = float(row["locked_until"])
        window_start = float(row["window_start"])
        if row["granted"]:
            return cls(True, window_start, 0.0, False)
        if locked_until > now:
            return cls(False, window_start, locked_until - now, True)
        left = window_start + window_s - now
        return cls(False, window_start, max(0.0, min(LOGIN_BUSY_RETRY_S, left)), False)


def check_login_attempt(scope: object, key: object, policy: object) -> LoginPolicy:
    """Validate the arguments of the login attempt methods (the same on both drivers)."""
    from asyncstore.storage import _validate as v  # _validate imports this module's records

    if scope not in LOGIN_SCOPES:
        raise InvalidInput(f"scope must be one of {LOGIN_SCOPES}, got {scope!r}")
    v.check_id(key, "key")
    if not isinstance(policy, LoginPolicy):
        raise InvalidInput(f"policy must be a LoginPolicy, got {type(policy).__name__}")
    v.check_int(policy.limit, "policy.limit", minimum=1, maximum=2**31 - 1)
    for name in ("window_s", "lockout_base_s", "lockout_max_s", "forget_after_s"):
        v.check_seconds(getattr(policy, name), f"policy.{name}")
    if v.check_seconds(policy.lockout_factor, "policy.lockout_factor", minimum=1.0) > 1e6:
        raise InvalidInput("policy.lockout_factor must be <= 1e6")
    return policy


LOGIN_OUTCOMES = ("failure", "success", "release")


def check_login_finish(window_start: object, outcome: object) -> float:
    """Validate ``finish_login_attempt``'s window start and outcome (both drivers)."""
    if (
        isinstance(window_start, bool)
        or not isinstance(window_start, int | float)
        or window_start != window_start
    ):
        raise InvalidInput(f"window_start must be a number, got {window_start!r}")
    if outcome not in LOGIN_OUTCOMES:
        raise InvalidInput(f"outcome must be failure, success or release, got {outcome!r}")
    return float(window_start)


def operation(
    method: Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]]:
    """Decorate a driver method: refuse calls after close, map driver errors to the tree."""

    @functools.wraps(method)
    async def wrapper(self: _B, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._closed:
            raise StorageClosed(f"{self.dialect} storage is closed")
        start = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        except StorageError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc)
            if mapped is None and isinstance(exc, OSError):
                # The operating system failed the call (a socket, a file): whatever the
                # driver did not name is still the storage being unreachable.
                mapped = StorageUnavailable(f"{self.dialect}: {type(exc).__name__}: {exc}")
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self._observe(method.__name__, time.perf_counter() - start)

    wrapper.__storage_operation__ = True  # type: ignore[attr-defined]
    return wrapper


def _observed_as(
    name: str,
) -> Callable[
    [Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]]],
    Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]],
]:
    """``operation``, timed under ``name``: an internal variant of a public call (the
    stream writer's trusted append) counts as that call in ``statistics().durations``."""

    def decorate(
        method: Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]],
    ) -> Callable[Concatenate[_B, _P], Coroutine[Any, Any, _R]]:
        method.__name__ = name
        return operation(method)

    return decorate


# ---------------------------------------------------------------- the contract


class AsyncStorageBackend(abc.ABC):
    """The native-async storage contract for the hot paths of an agent backend.

    Open one with ``storage.open_storage(settings_or_url)`` (an async context manager).
    Every method validates its input first and raises ``InvalidInput`` before writing
    anything; multi-row writes are all or nothing. Driver exceptions are mapped to
    ``storage.errors``. Unless a method says otherwise, cancelling a call leaves the
    database as if the call either completed or never started; the retry-safe methods
    (``append_stream_events``, enqueue with an idempotency key) can simply be repeated.

    One contract by construction: the public methods are implemented here, once. Each
    refuses a closed handle, validates and encodes its arguments (``storage._validate``),
    then calls a ``_sql_*`` hook of the dialect, which only runs SQL on prepared values,
    inside the ``operation`` wrapper that maps every driver or OS exception into
    ``storage.errors``. A dialect that overrides a public method is refused when its class
    is created.

    Input rules (the same on both drivers; ``InvalidInput`` otherwise):

    - ids and names (session id, holder, worker id, queue, pool, account, outbox channel,
      endpoint, owner, webhook id, idempotency key, login key, leadership name): a str of
      1..255 characters, without NUL, encodable to UTF-8 (no lone surrogate); role and
      stream-event kind at most 64 characters.
    - notification channels (``notify``, ``listen``, ``notify_channel``, ``channel``):
      letters, digits and ``_ . : -``, at most 63 bytes in UTF-8 (Postgres truncates longer
      identifiers, so two longer names could share a channel).
    - free texts (cancel reason, failure and attempt errors, notification payloads): a str
      encodable to UTF-8; the reason is kept to 1000 characters, a failure error to 10,000
      (NUL removed), an attempt error to 1000 (NUL refused); a notification payload without
      NUL and under 7900 bytes.
    - JSON payloads: what orjson encodes (no NaN or infinity, no lone surrogate, integers
      within [-2**63, 2**64 - 1]), no NUL character, at most 8 MiB encoded.

    Number policy: JSON values round-trip exactly on both drivers. Payloads are kept as
    the JSON text orjson wrote (``TEXT`` on SQLite, ``json`` on Postgres since migration
    0008, not ``jsonb``), so ``1e16`` comes back a float, ``-0.0`` keeps its sign, integers
    keep every digit and object keys keep their order.
    """

    dialect: str = "abstract"
    _settings: StorageSettings = StorageSettings()  # drivers set theirs

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, at class creation, a dialect that bypasses the contract layer.

        The public methods below validate, encode, check closed and map errors, then call
        the ``_sql_*`` hooks a dialect implements; a dialect that overrode one of them
        could see unvalidated input, so that is refused. The few calls a dialect does
        implement itself (``migrate``, ``schema_version``, ``ping``) must pass the
        ``operation`` wrapper.
        """
        super().__init_subclass__(**kwargs)
        for name in _CONTRACT_CALLS:
            if name in cls.__dict__:
                raise InvalidType(
                    f"{cls.__name__}.{name}: a dialect implements _sql_{name} hooks, not the "
                    "public contract methods (they validate its input)"
                )
        for name in _DIALECT_CALLS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__storage_operation__", False):
                raise InvalidType(
                    f"{cls.__name__}.{name} must be decorated with storage.base.operation"
                )

    def __init__(self) -> None:
        self._statements: collections.Counter[str] = collections.Counter()
        self._slow: collections.Counter[str] = collections.Counter()
        self._durations: dict[str, tuple[list[int], list[float]]] = {}
        self._closed = False

    def _map_error(self, exc: Exception) -> StorageError | None:
        """The driver's one place that maps its exceptions; None leaves ``exc`` as it is."""
        return None

    def _count(self, name: str, n: int = 1) -> None:
        self._statements[name] += n

    def _observe(self, name: str, seconds: float) -> None:
        """Time one storage call (``operation`` does): histogram bucket, sum, slow count."""
        counts, total = self._durations.get(name) or self._durations.setdefault(
            name, ([0] * (len(QUERY_BUCKETS_S) + 1), [0.0])
        )
        counts[bisect.bisect_left(QUERY_BUCKETS_S, seconds)] += 1
        total[0] += seconds
        if seconds > self._settings.slow_query_threshold_s:
            self._slow[name] += 1

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- lifecycle -------------------------------------------------------------

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close listeners and connections. Idempotent; completes even if cancelled."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied (empty if up to date).

        Safe to run from two processes at once (advisory lock on Postgres, an IMMEDIATE
        transaction on SQLite). Each migration is applied in its own transaction.
        """

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest applied migration version, 0 for an empty database."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Round-trip to the database; raises ``StorageUnavailable`` if it does not answer."""

    def statistics(self) -> StorageStatistics:
        """Counters of this handle: statements issued by query name, listener activity,
        calls timed per operation and the slow ones."""
        return StorageStatistics(
            self.dialect,
            MappingProxyType(dict(self._statements)),
            slow_queries=MappingProxyType(dict(self._slow)),
            slow_query_threshold_s=self._settings.slow_query_threshold_s,
            durations=MappingProxyType(
                {name: (tuple(c), t[0]) for name, (c, t) in self._durations.items()}
            ),
        )

    # -- chat ------------------------------------------------------------------

    @operation
    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        outbox: Sequence[NewOutboxMessage] = (),
        lease_token: int | None = None,
    ) -> list[ChatMessage]:
        """Append messages to a session and return them with their sequence numbers.

        The session row is upserted in the same transaction as the messages; sequence
        numbers are per session, start at 1 and are gap-free even with many concurrent
        appenders. ``outbox`` rows are enqueued in the same transaction. With
        ``lease_token`` the append succeeds only while that token is the session's current,
        unexpired lease (fencing); otherwise ``LeaseLost`` and nothing is written.
        """
        rows = v.prepare_messages(session_id, messages)
        out_rows = v.prepare_outbox(outbox)
        if lease_token is not None:
            v.check_int(lease_token, "lease_token", minimum=1)
        result = await self._sql_append_messages(session_id, rows, out_rows, lease_token, messages)
        if result is None:
            raise LeaseLost(f"session {session_id!r}: lease token {lease_token} is not current")
        return result

    @operation
    async def load_messages(
        self, session_id: str, *, after_seq: int = 0, limit: int = 100
    ) -> list[ChatMessage]:
        """Messages with ``seq > after_seq`` in order, at most ``limit``."""
        v.check_id(session_id)
        v.check_int(after_seq, "after_seq")
        return await self._sql_load_messages(session_id, after_seq, v.check_limit(limit))

    @operation
    async def delete_session(self, session_id: str) -> bool:
        """Delete a session's messages, stream events, cancel state and lease.

        Returns whether anything existed. Outbox rows and tasks are not touched.
        """
        return await self._sql_delete_session(v.check_id(session_id))

    # -- stream events ---------------------------------------------------------

    @operation
    async def append_stream_events(self, events: Sequence[NewStreamEvent]) -> StreamAppend:
        """Persist a batch of events for any number of sessions in one round trip.

        Fenced by the session lease, in the same statement: the events of a
        ``(session_id, epoch)`` are written only if ``epoch`` is the session's current lease
        token (the lease row's token, expired or not: a release does not supersede its
        holder, only a new acquisition does); a session without a lease row accepts an
        epoch no older than that of its last stored event. Refused pairs are reported in
        ``StreamAppend.refused`` and nothing of theirs is written, so a superseded holder
        can never store events after the new holder's. On Postgres the lease row is read
        ``FOR SHARE``: an acquisition committing concurrently either waits for this append
        or is seen by it. Idempotent on ``(session_id, seq)``: an event already stored with
        the same epoch is skipped, so a retried batch is safe; an accepted event replaces a
        stored one only if that one has an older epoch (a superseded holder's seqs).
        """
        rows = v.prepare_stream_events(events)
        if not rows:
            return StreamAppend(0)
        return await self._sql_append_stream_events(rows)

    @_observed_as("append_stream_events")
    async def _append_stream_rows(self, rows: list[StreamRow]) -> StreamAppend:
        """``append_stream_events`` for rows the stream writer built: trusted, not re-checked.

        The same statement, fence and idempotency as the public call, without validating
        and encoding the rows again. Only ``orchestrator.streams.StreamEventWriter`` calls
        it, and only with rows its ``emit_nowait`` built, which is what makes skipping the
        checks safe. The invariant every row holds (``StreamEventWriter.emit_nowait`` says
        how): ``session_id`` passed ``check_id`` (``begin`` reads the session's head through
        ``last_stream_seq``), ``epoch`` and ``seq`` are ints in ``[0, 2**63 - 1]`` and
        ``[1, 2**63 - 1]``, ``kind`` passed ``check_name``, the payload is the bytes of
        ``encode_json``, and no ``(session_id, seq)`` appears twice in one call. Timed as
        ``append_stream_events`` in ``statistics().durations``. Anything else must call
        ``append_stream_events``.
        """
        if not rows:
            return StreamAppend(0)
        return await self._sql_append_stream_events(rows)

    @operation
    async def load_stream_events(
        self, session_id: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[StreamEvent]:
        """Events with ``seq > after_seq`` in seq order, at most ``limit``."""
        v.check_id(session_id)
        v.check_int(after_seq, "after_seq")
        return await self._sql_load_stream_events(session_id, after_seq, v.check_limit(limit))

    @operation
    async def last_stream_seq(self, session_id: str) -> int:
        """The highest persisted seq of a session (0 if none): where a new epoch continues."""
        return await self._sql_last_stream_seq(v.check_id(session_id))

    @operation
    async def purge_stream_events(self, older_than_s: float) -> int:
        """Delete events stored more than ``older_than_s`` seconds ago; return the count."""
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_purge_stream_events(age)

    @operation
    async def purge_stream_events_batch(self, older_than_s: float, *, limit: int) -> int:
        """Delete at most ``limit`` of the oldest events stored more than ``older_than_s`` ago.

        One statement, so each batch is a short transaction; the background sweeper calls
        it until it returns fewer than ``limit``. Only expired rows are deleted; which of
        them go first is roughly oldest first (SQLite: exactly, by its ``created_at`` index;
        Postgres: heap order, since sorting on its BRIN index would re-read the whole
        backlog per batch). Rows another transaction has locked are skipped (Postgres), not
        waited for. Returns the number deleted.
        """
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_purge_stream_events_batch(age, v.check_limit(limit))

    # -- stream partitions (opt-in, Postgres; storage/_partitions.py) -----------

    @operation
    async def list_stream_partitions(self) -> list[StreamPartition]:
        """The partitions of ``stream_events``, oldest range first, the default one last.

        Empty when the table is plain: always on SQLite, which keeps the plain table and
        purges it with ``purge_stream_events_batch``.
        """
        return await self._sql_list_stream_partitions()

    @operation
    async def partition_stream_events(self) -> bool:
        """Convert a plain ``stream_events`` into the partitioned layout, keeping its rows.

        Returns False if it already is partitioned. One transaction under the migration
        lock, holding ``stream_events`` exclusively while it copies: run it like a
        migration, with the writers stopped (an instance opened on the plain layout keeps
        running the plain queries until it reopens). Existing sessions are anchored at
        their first stored event; their rows go to the default partition until
        ``create_stream_partitions`` moves them. SQLite raises ``ConfigurationError``.
        """
        return await self._sql_partition_stream_events()

    @operation
    async def create_stream_partitions(self, width_s: int, *, ahead_s: float) -> int:
        """Create the missing ranged partitions up to ``ahead_s`` seconds from now.

        Ranges are ``width_s`` seconds aligned on the Unix epoch, from the oldest session
        waiting in the default partition (or now) on; a range that overlaps an existing
        partition (another width) is cut to the gap. Each partition is created in its own
        transaction, with the default partition's rows of its range moved into it, so a
        failure or a kill leaves every finished one in place. Returns how many it created
        (0 on a plain table or SQLite).
        """
        width = v.check_int(width_s, "width_s", minimum=1, maximum=366 * 86_400)
        ahead = v.check_seconds(ahead_s, "ahead_s", minimum=0)
        return await self._sql_create_stream_partitions(width, ahead)

    @operation
    async def drop_stream_partition(self, name: str, older_than_s: float) -> int | None:
        """Drop one ranged partition whose sessions have all expired; return its row count.

        The partition goes, with its sessions' anchors, in one transaction, only if its
        range ended more than ``older_than_s`` seconds ago and none of its events was
        stored since: a session keeps every event (resume sees them all) until its last
        event is older than that. Returns None, changing nothing, if the partition is still
        live, does not exist, or is the default one.
        """
        v.check_id(name, "name")
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_drop_stream_partition(name, age)

    # -- session leases --------------------------------------------------------

    @operation
    async def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the session's lease if it is free or expired; None if someone holds it.

        One statement, with no COUNT(*) and no DELETE. Every successful acquisition gets a
        fencing token larger than any token issued before it.
        """
        v.check_id(session_id)
        v.check_id(holder, "holder")
        return await self._sql_acquire_lease(session_id, holder, v.check_seconds(ttl_s, "ttl_s"))

    @operation
    async def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        """Extend a lease held with ``token``; ``LeaseLost`` if it is not current any more."""
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        lease = await self._sql_renew_lease(session_id, token, v.check_seconds(ttl_s, "ttl_s"))
        if lease is None:
            raise LeaseLost(f"session {session_id!r}: lease token {token} is not current")
        return lease

    @operation
    async def release_lease(self, session_id: str, token: int) -> bool:
        """Release a lease held with ``token``. False if it was not current (nothing done)."""
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        return await self._sql_release_lease(session_id, token)

    @operation
    async def get_lease(self, session_id: str) -> Lease | None:
        """The session's current, unexpired lease, if any."""
        return await self._sql_get_lease(v.check_id(session_id))

    @operation
    async def expire_leases(self, older_than_s: float = 0.0) -> int:
        """Background sweep: delete leases expired for more than ``older_than_s`` seconds."""
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_expire_leases(age)

    # -- lease slots (global cap on running sessions) and limiter wake-ups ------

    @operation
    async def ensure_lease_slots(self, pool: str, slots: int) -> None:
        """Create the numbered slots ``1..slots`` of ``pool`` that do not exist yet.

        Run once when a limiter starts, never on the acquire path. A pool's slots are shared
        by every instance; each acquirer passes its cap as ``slots`` and uses slots up to it.
        """
        v.check_id(pool, "pool")
        await self._sql_ensure_lease_slots(pool, v.check_int(slots, "slots", minimum=1))

    @operation
    async def acquire_lease_slot(
        self,
        session_id: str,
        holder: str,
        ttl_s: float,
        *,
        pool: str | None = None,
        slots: int = 0,
    ) -> LeaseAttempt:
        """Take the session's lease and, with ``pool``, a free numbered slot of that pool.

        One statement on Postgres (slot claimed with ``FOR UPDATE SKIP LOCKED``), one
        IMMEDIATE transaction on SQLite; never a COUNT(*) or a DELETE. The slot is bound to
        the lease's fencing token and expires, renews and is released with it. A failed
        attempt records that someone is waiting (on the session's lease, or on the pool when
        it was full) so that ``release_lease_slot`` notifies only when there are waiters.
        """
        v.check_id(session_id)
        v.check_id(holder, "holder")
        if pool is not None:
            v.check_id(pool, "pool")
            v.check_int(slots, "slots", minimum=1)
        ttl = v.check_seconds(ttl_s, "ttl_s")
        return await self._sql_acquire_lease_slot(session_id, holder, ttl, pool, slots)

    @operation
    async def renew_lease_slot(
        self, session_id: str, token: int, ttl_s: float, *, pool: str | None = None
    ) -> Lease:
        """Extend a lease and its slot; ``LeaseLost`` if ``token`` is not current any more."""
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        if pool is not None:
            v.check_id(pool, "pool")
        ttl = v.check_seconds(ttl_s, "ttl_s")
        lease = await self._sql_renew_lease_slot(session_id, token, ttl, pool)
        if lease is None:
            raise LeaseLost(f"session {session_id!r}: lease token {token} is not current")
        return lease

    @operation
    async def release_lease_slot(
        self, session_id: str, token: int, *, channel: str, pool: str | None = None
    ) -> bool:
        """Release a lease and its slot; False if ``token`` was not current (nothing done).

        If an acquirer found the lease busy while it was held, ``channel`` is notified with
        ``s:<session_id>``; if one found the pool full, with ``p:<pool>``. Both are sent in
        the same statement (Postgres) or right after the commit (SQLite).
        """
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        name = v.check_channel(channel)
        if pool is not None:
            v.check_id(pool, "pool")
        return await self._sql_release_lease_slot(session_id, token, name, pool)

    @operation
    async def count_leases(self) -> int:
        """The number of live leases (a COUNT(*): only the legacy limiter loop uses it)."""
        return await self._sql_count_leases()

    # -- leased jobs (agent tasks, outbox) ---------------------------------------
    # One engine for both kinds (``JobKind``): each method takes the kind first. The
    # ``*_tasks`` / ``*_outbox`` methods further down are one-line aliases kept for callers.

    @operation
    async def enqueue_jobs(
        self, kind: JobKind[_J, _N, _S], jobs: Sequence[_N], *, notify: str | None = None
    ) -> list[_J]:
        """Enqueue jobs of ``kind`` in one transaction; one row per input, in input order.

        Tasks: an input whose idempotency key matches an unfinished task of the same queue
        (or an earlier input of the same call) returns that task instead of a new row.
        With ``notify``, the same statement (Postgres) or the same call right after the
        commit (SQLite, in process) sends one notification on that channel when a returned
        row is waiting, its payload the earliest ``run_after`` of those rows as a Unix
        timestamp: the enqueue and its wakeup are one round trip.
        """
        k = v.check_job_kind(kind)
        rows = k.prepare(jobs)
        channel = None if notify is None else v.check_channel(notify)
        if not rows:
            return []
        return await self._sql_enqueue_jobs(k, rows, channel)

    @operation
    async def claim_jobs(
        self,
        kind: JobKind[_J, _N, _S],
        worker_id: str,
        *,
        limit: int,
        lease_s: float,
        queues: Sequence[str] | None = None,
    ) -> list[_J]:
        """Claim up to ``limit`` claimable jobs of ``kind`` in one statement.

        Claimable: waiting with ``run_after`` due, or running with an expired lease (its
        worker died). Each claim counts an attempt and gets a new lease token; concurrent
        claimers never get the same row. A row whose lease expired on its last attempt is
        dead-lettered (``lease expired on the last attempt``) and not returned; a task
        re-claimed after its lease expired gets ``last_error`` = ``LEASE_EXPIRED``. If the
        call is cancelled after the claim committed, the rows stay leased and are claimed
        again after ``lease_s``.

        ``queues`` filters by the kind's queue column (``kind.queue_label``): a task claim
        names exactly one queue and takes its tasks by priority descending, then
        ``run_after``, then id. An outbox claim takes any channels (None) or those listed,
        in id order under the group rule: nothing of a (channel, account) group is claimed
        while one of its messages is in flight under a live claim; a message waiting for
        its retry holds back the later messages of its group; a dead message holds nothing
        back. A claim takes a prefix, in id order, of each group's due messages.
        """
        k = v.check_job_kind(kind)
        v.check_id(worker_id, "worker_id")
        label = k.queue_label
        names = None if queues is None else v.check_names(queues, label)
        if not k.grouped and (names is None or len(names) != 1):
            raise InvalidInput(f"a {k.name} claim names exactly one {label}")
        n = v.check_limit(limit)
        lease = v.check_seconds(lease_s, "lease_s")
        return await self._sql_claim_jobs(k, worker_id, n, lease, names)

    @operation
    async def heartbeat_jobs(
        self, kind: JobKind[_J, _N, _S], claims: Sequence[Claim], lease_s: float
    ) -> list[int]:
        """Extend the leases of running jobs; returns the ids whose claim was still current."""
        k = v.check_job_kind(kind)
        ids, tokens = v.prepare_claims(claims)
        seconds = v.check_seconds(lease_s, "lease_s")
        return await self._sql_heartbeat_jobs(k, ids, tokens, seconds) if ids else []

    @operation
    async def complete_jobs(self, kind: JobKind[_J, _N, _S], claims: Sequence[Claim]) -> list[int]:
        """Mark jobs done; returns the ids whose claim was current (others untouched)."""
        k = v.check_job_kind(kind)
        ids, tokens = v.prepare_claims(claims)
        return await self._sql_complete_jobs(k, ids, tokens) if ids else []

    @operation
    async def fail_jobs(
        self, kind: JobKind[_J, _N, _S], failures: Sequence[Failure]
    ) -> dict[int, _S]:
        """Record failed attempts under their current claims.

        A job with attempts left goes back to waiting with ``run_after`` = ``retry_at``
        (None: now); otherwise it becomes ``dead`` (kept, with its last error). Returns the
        new status of every job whose claim was current; stale claims are left out.
        """
        k = v.check_job_kind(kind)
        columns = v.prepare_failures(failures)
        if not columns.ids:
            return {}
        return {i: k.status(s) for i, s in (await self._sql_fail_jobs(k, columns)).items()}

    @operation
    async def release_jobs(self, kind: JobKind[_J, _N, _S], claims: Sequence[Claim]) -> list[int]:
        """Give claimed jobs back (shutdown): waiting, due now, this attempt not counted."""
        k = v.check_job_kind(kind)
        ids, tokens = v.prepare_claims(claims)
        return await self._sql_release_jobs(k, ids, tokens) if ids else []

    @operation
    async def dead_letter_jobs(
        self, kind: JobKind[_J, _N, _S], failures: Sequence[Failure]
    ) -> list[int]:
        """Dead-letter running jobs now (permanent error, cancelled), attempts left or not.

        Only under their current claims; ``retry_at`` is ignored. Returns the ids moved.
        """
        k = v.check_job_kind(kind)
        columns = v.prepare_failures(failures)  # retry_at does not apply
        return await self._sql_dead_letter_jobs(k, columns) if columns.ids else []

    @operation
    async def redrive_jobs(self, kind: JobKind[_J, _N, _S], ids: Sequence[int]) -> list[int]:
        """Put dead jobs back to waiting, due now, with a fresh attempt budget; returns those
        moved.

        A redriven outbox message takes its place (its id) among its group's open messages
        again: it waits while a message of its group is in flight, then goes before the
        later messages of its group that are still pending.
        """
        k = v.check_job_kind(kind)
        checked = v.unique_ids(ids)
        return await self._sql_redrive_jobs(k, checked) if checked else []

    @operation
    async def get_job(self, kind: JobKind[_J, _N, _S], job_id: int) -> _J | None:
        """One job of ``kind`` by id, in any state."""
        k = v.check_job_kind(kind)
        return await self._sql_get_job(k, v.check_int(job_id, "id", minimum=1))  # type: ignore[no-any-return]

    @operation
    async def purge_jobs(self, kind: JobKind[_J, _N, _S], older_than_s: float) -> int:
        """Delete done jobs finished more than ``older_than_s`` seconds ago.

        Dead jobs are kept for an operator to inspect or redrive. Returns the count.
        """
        k = v.check_job_kind(kind)
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_purge_jobs(k, age)

    @operation
    async def next_task_due_s(self, queue: str) -> float | None:
        """Seconds until the next task of ``queue`` becomes claimable, by the database's clock.

        That is the earliest ``run_after`` of its queued tasks and the earliest lease expiry
        of its running ones; 0.0 if one is claimable now (or is being claimed by a
        transaction that has not committed yet), None if the queue has no unfinished task.
        Idle workers sleep until then, so a dead worker's tasks are re-run as soon as their
        lease runs out. One read, no lock.
        """
        return await self._sql_next_task_due_s(v.check_id(queue, "queue"))

    @operation
    async def backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        """Depth and oldest wait of every task queue with unfinished tasks, and of the outbox.

        Returns (one ``QueueDepth`` per queue, sorted by name; the outbox's, named
        ``outbox``). For metrics: one read of each table's unfinished rows, no lock.
        """
        return await self._sql_backlog_depths()

    # -- operator views (the dashboard) and the audit log ---------------------------

    AUDIT_TEXT_CHARS = 2000
    """How many characters of an audit entry's ``detail`` and ``outcome`` are kept."""

    @operation
    async def list_jobs(
        self, kind: JobKind[_J, _N, _S], status: str, *, limit: int = 100
    ) -> list[_J]:
        """The jobs of ``kind`` in ``status`` (one of the kind's status names), newest first.

        For operators (the dashboard): one indexed read of at most ``limit`` rows, no lock.
        """
        k = v.check_job_kind(kind)
        try:
            checked = k.status(status)
        except ValueError:
            names = ", ".join(repr(str(s)) for s in (k.waiting, k.running, k.done, k.dead))
            raise InvalidInput(
                f"status {status!r} is not a {k.name} status: one of {names}"
            ) from None
        return await self._sql_list_jobs(k, str(checked), v.check_limit(limit))  # type: ignore[no-any-return]

    async def list_tasks(self, status: str, *, limit: int = 100) -> list[Task]:
        """``list_jobs(TASKS, status, limit=limit)``."""
        return await self.list_jobs(TASKS, status, limit=limit)

    @operation
    async def list_leases(self, *, limit: int = 100) -> list[Lease]:
        """Unexpired session leases (the sessions running a turn now), by session id."""
        return await self._sql_list_leases(v.check_limit(limit))

    @operation
    async def record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str = ""
    ) -> AuditEntry:
        """Append one operator action to the audit log and return it as stored.

        ``actor``, ``action`` and ``target`` are identifiers (1..255 characters); ``outcome``
        and ``detail`` are free text cut to ``AUDIT_TEXT_CHARS``. One INSERT: if cancelled,
        the entry is either written whole or not at all.
        """
        row = (
            v.check_id(actor, "actor"),
            v.check_id(action, "action"),
            v.check_id(target, "target"),
            v.check_text(outcome, "outcome", max_chars=self.AUDIT_TEXT_CHARS),
            v.check_text(detail, "detail", max_chars=self.AUDIT_TEXT_CHARS),
        )
        return await self._sql_record_audit(*row)

    @operation
    async def list_audit(self, *, limit: int = 100) -> list[AuditEntry]:
        """The audit log, newest first."""
        return await self._sql_list_audit(v.check_limit(limit))

    # -- the engine's per-kind names (aliases of the *_jobs methods) --------------

    async def enqueue_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        """``enqueue_jobs(TASKS, tasks)``."""
        return await self.enqueue_jobs(TASKS, tasks)

    async def claim_tasks(
        self, queue: str, worker_id: str, *, limit: int, lease_s: float
    ) -> list[Task]:
        """``claim_jobs(TASKS, worker_id, queues=[queue], ...)``."""
        return await self.claim_jobs(TASKS, worker_id, limit=limit, lease_s=lease_s, queues=[queue])

    async def heartbeat_tasks(self, claims: Sequence[Claim], lease_s: float) -> list[int]:
        """``heartbeat_jobs(TASKS, claims, lease_s)``."""
        return await self.heartbeat_jobs(TASKS, claims, lease_s)

    async def complete_tasks(self, claims: Sequence[Claim]) -> list[int]:
        """``complete_jobs(TASKS, claims)``."""
        return await self.complete_jobs(TASKS, claims)

    async def fail_tasks(self, failures: Sequence[Failure]) -> dict[int, TaskStatus]:
        """``fail_jobs(TASKS, failures)``."""
        return await self.fail_jobs(TASKS, failures)

    async def release_tasks(self, claims: Sequence[Claim]) -> list[int]:
        """``release_jobs(TASKS, claims)``."""
        return await self.release_jobs(TASKS, claims)

    async def dead_letter_tasks(self, failures: Sequence[Failure]) -> list[int]:
        """``dead_letter_jobs(TASKS, failures)``."""
        return await self.dead_letter_jobs(TASKS, failures)

    async def get_task(self, task_id: int) -> Task | None:
        """``get_job(TASKS, task_id)``."""
        return await self.get_job(TASKS, task_id)

    async def purge_tasks(self, older_than_s: float) -> int:
        """``purge_jobs(TASKS, older_than_s)``."""
        return await self.purge_jobs(TASKS, older_than_s)

    async def enqueue_outbox(self, messages: Sequence[NewOutboxMessage]) -> list[OutboxMessage]:
        """``enqueue_jobs(OUTBOX, messages)``."""
        return await self.enqueue_jobs(OUTBOX, messages)

    async def claim_outbox(
        self,
        worker_id: str,
        *,
        limit: int,
        lease_s: float,
        channels: Sequence[str] | None = None,
    ) -> list[OutboxMessage]:
        """``claim_jobs(OUTBOX, worker_id, queues=channels, ...)``."""
        return await self.claim_jobs(
            OUTBOX, worker_id, limit=limit, lease_s=lease_s, queues=channels
        )

    async def mark_outbox_sent(self, claims: Sequence[Claim]) -> list[int]:
        """``complete_jobs(OUTBOX, claims)``."""
        return await self.complete_jobs(OUTBOX, claims)

    async def fail_outbox(self, failures: Sequence[Failure]) -> dict[int, OutboxStatus]:
        """``fail_jobs(OUTBOX, failures)``."""
        return await self.fail_jobs(OUTBOX, failures)

    async def redrive_outbox(self, ids: Sequence[int]) -> list[int]:
        """``redrive_jobs(OUTBOX, ids)``."""
        return await self.redrive_jobs(OUTBOX, ids)

    async def release_outbox(self, claims: Sequence[Claim]) -> list[int]:
        """``release_jobs(OUTBOX, claims)``."""
        return await self.release_jobs(OUTBOX, claims)

    async def dead_letter_outbox(self, failures: Sequence[Failure]) -> list[int]:
        """``dead_letter_jobs(OUTBOX, failures)``."""
        return await self.dead_letter_jobs(OUTBOX, failures)

    async def get_outbox(self, message_id: int) -> OutboxMessage | None:
        """``get_job(OUTBOX, message_id)``."""
        return await self.get_job(OUTBOX, message_id)

    async def purge_outbox(self, older_than_s: float) -> int:
        """``purge_jobs(OUTBOX, older_than_s)``: sent messages; dead ones are kept."""
        return await self.purge_jobs(OUTBOX, older_than_s)

    # -- webhook journal --------------------------------------------------------

    @operation
    async def journal_webhook_events(
        self, endpoint: str, owner: str, bodies: Sequence[bytes]
    ) -> list[int]:
        """Commit events (JSON bodies) of a durable webhook endpoint in one transaction.

        The rows are held by ``owner`` (one process); returns their ids in order.
        """
        checked = v.prepare_journal(endpoint, owner, bodies)
        return await self._sql_journal_webhook_events(endpoint, owner, checked) if checked else []

    @operation
    async def delete_webhook_events(self, ids: Sequence[int]) -> int:
        """Delete journaled events once their batch is in the outbox; returns the count."""
        checked = v.unique_ids(ids)
        return await self._sql_delete_webhook_events(checked) if checked else 0

    @operation
    async def claim_webhook_orphans(
        self, endpoints: Sequence[str], owner: str, *, older_than_s: float, limit: int
    ) -> list[JournaledEvent]:
        """Take over journaled events of ``endpoints`` held for more than ``older_than_s``.

        Their owner did not batch them in time (crashed, or lost its storage). Oldest
        first; each row is taken by one claimer, and held by ``owner`` from now on.
        """
        names = [v.check_id(e, "endpoint") for e in endpoints]
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        v.check_id(owner, "owner")
        return await self._sql_claim_webhook_orphans(names, owner, age, v.check_limit(limit))

    @operation
    async def record_webhook_attempts(self, attempts: Sequence[WebhookAttempt]) -> int:
        """Append attempts to the delivery log in one transaction; returns the count."""
        rows = v.prepare_attempts(attempts)
        return await self._sql_record_webhook_attempts(rows) if rows else 0

    @operation
    async def list_webhook_attempts(
        self,
        *,
        endpoint: str | None = None,
        webhook_id: str | None = None,
        failed: bool = False,
        limit: int = 100,
    ) -> list[WebhookAttempt]:
        """The delivery log, newest first; ``failed``: only webhook-ids never delivered."""
        name = None if endpoint is None else v.check_id(endpoint, "endpoint")
        wid = None if webhook_id is None else v.check_id(webhook_id, "webhook_id")
        n = v.check_limit(limit)
        return await self._sql_list_webhook_attempts(name, wid, bool(failed), n)

    @operation
    async def purge_webhook_attempts(self, older_than_s: float) -> int:
        """Delete log entries older than ``older_than_s`` seconds; returns the count."""
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_purge_webhook_attempts(age)

    # -- cancellation ----------------------------------------------------------

    CANCEL_NOTIFY_REASON_CHARS = 200
    """How many characters of the kept reason a ``request_cancel`` notification carries."""

    @operation
    async def request_cancel(
        self, session_id: str, reason: str, *, notify_channel: str | None = None
    ) -> CancelState:
        """Persist a cancel request (the first request's reason and time are kept).

        ``reason`` is stored up to its first 1000 characters. With ``notify_channel`` the
        request is also announced on that channel, together with the write: the payload is
        the JSON text ``[session_id, kept reason]`` (the reason cut to
        ``CANCEL_NOTIFY_REASON_CHARS`` characters, encoded as orjson does), so listeners
        need no read. Postgres sends it with ``pg_notify`` in the same statement as the
        write (one round trip; delivered on commit, never without the row); SQLite delivers
        it in-process right after the commit. The channel follows ``notify()``'s rules; a
        refused input raises ``InvalidInput`` and neither writes nor notifies. Without a
        channel nothing is sent.

        If cancelled, the request and its notification are either both done or neither
        (on SQLite the write completes and the notification is delivered, then the
        cancellation takes effect).
        """
        session_id, reason, channel = v.prepare_cancel(session_id, reason, notify_channel)
        return await self._sql_request_cancel(session_id, reason, channel)

    @operation
    async def get_cancel(self, session_id: str) -> CancelState | None:
        """The session's cancel request, if any."""
        return await self._sql_get_cancel(v.check_id(session_id))

    @operation
    async def clear_cancel(self, session_id: str) -> bool:
        """Forget a session's cancel request (a new turn starts); whether one existed."""
        return await self._sql_clear_cancel(v.check_id(session_id))

    # -- notifications ---------------------------------------------------------

    @operation
    async def notify(self, channel: str, payload: str) -> None:
        """Send a small notification (ids, not data) to every listener of ``channel``."""
        await self._sql_notify(*v.check_notify_payload(channel, payload))

    def listen(self, *channels: str) -> AbstractAsyncContextManager[NotificationStream]:
        """Subscribe to channels: ``async with storage.listen("a", "b") as stream:``.

        The subscription is registered when the ``async with`` body starts; notifications
        sent after that are delivered in order. After a connection loss or a buffer
        overflow a ``Notification(gap=True)`` is delivered so the caller can catch up.
        """
        names = [v.check_channel(c) for c in channels]
        if not names:
            raise InvalidInput("listen() needs at least one channel")
        return self._sql_listen(names)

    # -- maintenance -----------------------------------------------------------

    def open_leadership(
        self, name: str, *, ttl_s: float
    ) -> AbstractAsyncContextManager[Leadership]:
        """An exclusive role among every handle on this database: ``async with``.

        Postgres: a session-level advisory lock on a dedicated connection outside the pool,
        so the role ends with the holder's connection (``ttl_s`` is not used). SQLite: a
        lease row written in a ``BEGIN IMMEDIATE`` transaction, renewed by each
        ``try_lead()`` and expiring ``ttl_s`` after the last one. Nothing is taken until
        ``try_lead()``; leaving the block releases the role, even when cancelled.
        """
        v.check_id(name, "name")
        return self._sql_leadership(name, v.check_seconds(ttl_s, "ttl_s"))

    # -- login attempts (auth limiter, shared by a fleet) -----------------------

    @operation
    async def reserve_login_attempt(
        self, scope: str, key: str, policy: LoginPolicy
    ) -> LoginSlot:
        """Reserve one login attempt for ``key`` in ``scope`` ("account" or "address").

        In one statement: refused when the key is locked out or when its failures plus the
        attempts in flight already reach ``policy.limit`` in the current fixed window of
        ``policy.window_s`` (a window that ended starts over, dropping what was in flight);
        otherwise the attempt is counted as in flight. Concurrent callers, in any number of
        processes, never get more than ``limit`` grants per window between them. A granted
        attempt must be finished with ``finish_login_attempt``; one never finished (the
        process died) stays counted until its window ends. Times are the database's clock
        (Postgres) or the writer's (SQLite). If cancelled, the reservation may or may not
        have been made; it is then dropped when the window ends.
        """
        p = check_login_attempt(scope, key, policy)
        return await self._sql_reserve_login_attempt(scope, key, p)

    @operation
    async def finish_login_attempt(
        self,
        scope: str,
        key: str,
        window_start: float,
        outcome: str,
        policy: LoginPolicy,
    ) -> bool:
        """End a granted attempt (``window_start`` from its ``LoginSlot``); one statement.

        ``outcome``: "failure" counts a failed login (the ``limit``-th failure locks the key
        for the next lockout length: ``lockout_base_s``, growing by ``lockout_factor`` up to
        ``lockout_max_s``, back to the base after ``forget_after_s`` without failures; a
        failure while already locked counts nothing); "success" forgets the key's failures,
        lockout and growth; "release" gives the attempt back uncounted. Returns whether this
        call locked the key out. Cancellation: the statement is either applied or not.
        """
        p = check_login_attempt(scope, key, policy)
        start = check_login_finish(window_start, outcome)
        return await self._sql_finish_login_attempt(scope, key, start, outcome, p)

    @operation
    async def purge_login_attempts(self, older_than_s: float) -> int:
        """Delete attempt counts idle for ``older_than_s`` seconds and not locked out."""
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return await self._sql_purge_login_attempts(age)

    # -- dialect hooks ---------------------------------------------------------
    # What a dialect implements: SQL only. Each hook receives arguments the public method
    # above has already validated and encoded (``storage._validate``), is called inside
    # the ``operation`` wrapper (closed check, error mapping), and is never called with an
    # empty batch. A dialect overrides these, never the public methods.

    @abc.abstractmethod
    async def _sql_append_messages(
        self,
        session_id: str,
        rows: list[tuple[str, bytes]],
        outbox: list[tuple[str, str, bytes, int]],
        lease_token: int | None,
        messages: Sequence[NewMessage],
    ) -> list[ChatMessage] | None:
        """The appended messages in seq order; None if ``lease_token`` was not current."""

    @abc.abstractmethod
    async def _sql_load_messages(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[ChatMessage]: ...

    @abc.abstractmethod
    async def _sql_delete_session(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_append_stream_events(self, rows: list[StreamRow]) -> StreamAppend: ...

    @abc.abstractmethod
    async def _sql_load_stream_events(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[StreamEvent]: ...

    @abc.abstractmethod
    async def _sql_last_stream_seq(self, session_id: str) -> int: ...

    @abc.abstractmethod
    async def _sql_purge_stream_events(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_purge_stream_events_batch(self, age_s: float, limit: int) -> int: ...

    @abc.abstractmethod
    async def _sql_list_stream_partitions(self) -> list[StreamPartition]: ...

    @abc.abstractmethod
    async def _sql_partition_stream_events(self) -> bool: ...

    @abc.abstractmethod
    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None: ...

    @abc.abstractmethod
    async def _sql_acquire_lease(
        self, session_id: str, holder: str, ttl_s: float
    ) -> Lease | None: ...

    @abc.abstractmethod
    async def _sql_renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease | None:
        """The renewed lease; None if ``token`` is not current."""

    @abc.abstractmethod
    async def _sql_release_lease(self, session_id: str, token: int) -> bool: ...

    @abc.abstractmethod
    async def _sql_get_lease(self, session_id: str) -> Lease | None: ...

    @abc.abstractmethod
    async def _sql_expire_leases(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_ensure_lease_slots(self, pool: str, slots: int) -> None: ...

    @abc.abstractmethod
    async def _sql_acquire_lease_slot(
        self, session_id: str, holder: str, ttl_s: float, pool: str | None, slots: int
    ) -> LeaseAttempt: ...

    @abc.abstractmethod
    async def _sql_renew_lease_slot(
        self, session_id: str, token: int, ttl_s: float, pool: str | None
    ) -> Lease | None:
        """The renewed lease; None if ``token`` is not current."""

    @abc.abstractmethod
    async def _sql_release_lease_slot(
        self, session_id: str, token: int, channel: str, pool: str | None
    ) -> bool: ...

    @abc.abstractmethod
    async def _sql_count_leases(self) -> int: ...

    @abc.abstractmethod
    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        """One record per row, in row order (``_validate.match_enqueued`` puts tasks so);
        with ``notify``, one notification when a returned row is waiting (see
        ``enqueue_jobs``)."""

    @abc.abstractmethod
    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease_s: float,
        queues: list[str] | None,
    ) -> list[Any]: ...

    @abc.abstractmethod
    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]: ...

    @abc.abstractmethod
    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_redrive_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any: ...

    @abc.abstractmethod
    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_next_task_due_s(self, queue: str) -> float | None: ...

    @abc.abstractmethod
    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]: ...

    @abc.abstractmethod
    async def _sql_list_jobs(
        self, kind: JobKind[Any, Any, Any], status: str, limit: int
    ) -> Any: ...

    @abc.abstractmethod
    async def _sql_list_leases(self, limit: int) -> list[Lease]: ...

    @abc.abstractmethod
    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry: ...

    @abc.abstractmethod
    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def _sql_journal_webhook_events(
        self, endpoint: str, owner: str, bodies: list[str]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_delete_webhook_events(self, ids: list[int]) -> int: ...

    @abc.abstractmethod
    async def _sql_claim_webhook_orphans(
        self, endpoints: list[str], owner: str, age_s: float, limit: int
    ) -> list[JournaledEvent]: ...

    @abc.abstractmethod
    async def _sql_record_webhook_attempts(
        self, rows: list[tuple[str, str, int | None, datetime, int | None, str, bool]]
    ) -> int: ...

    @abc.abstractmethod
    async def _sql_list_webhook_attempts(
        self, endpoint: str | None, webhook_id: str | None, failed: bool, limit: int
    ) -> list[WebhookAttempt]: ...

    @abc.abstractmethod
    async def _sql_purge_webhook_attempts(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_request_cancel(
        self, session_id: str, reason: str, channel: str | None
    ) -> CancelState: ...

    @abc.abstractmethod
    async def _sql_get_cancel(self, session_id: str) -> CancelState | None: ...

    @abc.abstractmethod
    async def _sql_clear_cancel(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_notify(self, channel: str, payload: str) -> None: ...

    @abc.abstractmethod
    def _sql_listen(self, channels: list[str]) -> AbstractAsyncContextManager[NotificationStream]:
        """Subscribe to checked channel names (at least one)."""

    @abc.abstractmethod
    def _sql_leadership(
        self, name: str, ttl_s: float
    ) -> AbstractAsyncContextManager[Leadership]: ...

    @abc.abstractmethod
    async def _sql_reserve_login_attempt(
        self, scope: str, key: str, policy: LoginPolicy
    ) -> LoginSlot: ...

    @abc.abstractmethod
    async def _sql_finish_login_attempt(
        self, scope: str, key: str, window_start: float, outcome: str, policy: LoginPolicy
    ) -> bool: ...

    @abc.abstractmethod
    async def _sql_purge_login_attempts(self, age_s: float) -> int: ...

    # -- single-row conveniences (written once, on top of the batch methods) ---

    async def complete_task(self, claim: Claim) -> None:
        """Mark one task succeeded; ``LeaseLost`` if the claim is not current."""
        if not await self.complete_tasks([claim]):
            raise LeaseLost(f"task {claim.id}: lease token {claim.token} is not current")

    async def fail_task(self, failure: Failure) -> TaskStatus:
        """Record one failed attempt; ``LeaseLost`` if the claim is not current."""
        result = await self.fail_tasks([failure])
        if failure.id not in result:
            raise LeaseLost(f"task {failure.id}: lease token {failure.token} is not current")
        return result[failure.id]

    async def enqueue_task(self, task: NewTask) -> Task:
        """Enqueue one task (see ``enqueue_tasks``)."""
        return (await self.enqueue_tasks([task]))[0]


_JOB_ALIASES = frozenset(
    (
        *(f"{op}_tasks" for op in ("enqueue", "claim", "heartbeat", "complete", "fail")),
        *(f"{op}_tasks" for op in ("release", "dead_letter", "purge")),
        "get_task",
        *(f"{op}_outbox" for op in ("enqueue", "claim", "fail", "redrive", "release")),
        *(f"{op}_outbox" for op in ("dead_letter", "get", "purge")),
        "mark_outbox_sent",
    )
)
"""The per-kind names of the job engine: aliases, refused in a dialect like the rest."""

_CONTRACT_CALLS = frozenset(
    name
    for name, member in vars(AsyncStorageBackend).items()
    if not name.startswith("_")
    and (
        getattr(member, "__storage_operation__", False)
        or name in ("listen", "open_leadership")
        or name in _JOB_ALIASES
    )
)
"""The public contract methods the base class implements once for every dialect."""

_DIALECT_CALLS = frozenset(("migrate", "schema_version", "ping"))
"""The calls each dialect implements itself, under the ``operation`` wrapper."""

# Imported last: _validate imports the records defined above.
from asyncstore.storage import _validate as v  # noqa: E402
