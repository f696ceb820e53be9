"""The immutable records of the storage contract, its settings and its status enums.

This module owns what ``AsyncStorageBackend`` takes and returns outside the leased-job
engine: ``StorageSettings``, the chat, stream-event, lease, webhook, audit, cancel,
notification and login records, and the ``Leadership`` / ``NotificationStream``
interfaces. The job records (tasks, outbox messages, their status enums, the claim and
failure tuples, ``QueueDepth``) live in ``storage.job_records`` and are re-exported here.
Plain data: no I/O, no validation beyond construction (``storage._validate`` checks
arguments). ``storage.base`` re-exports every name.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from asyncstore.storage.job_records import (
    LEASE_EXPIRED,
    Claim,
    Failure,
    FailureColumns,
    NewOutboxMessage,
    NewTask,
    OutboxMessage,
    OutboxStatus,
    QueueDepth,
    Task,
    TaskStatus,
)

# Every name, the job records of storage.job_records included (importable from here as
# before the split).
__all__ = [
    "JSON",
    "LEASE_EXPIRED",
    "LOGIN_BUSY_RETRY_S",
    "LOGIN_SCOPES",
    "AuditEntry",
    "CancelState",
    "ChatMessage",
    "Claim",
    "EncodedJSON",
    "Failure",
    "FailureColumns",
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
    "OutboxStatus",
    "Presence",
    "QueueDepth",
    "StorageSettings",
    "StreamAppend",
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

    ``actor`` says who acted (the dashboard records the operator's name and the client
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
class Presence:
    """One runtime instance's presence row (``publish_presence`` / ``list_presence``).

    ``instance_id`` names the instance (``runtime.instance_id``), ``host`` and ``pid`` the
    process that wrote the row; ``seen_at`` is when it last published and ``expires_at``
    when the row stops counting (both the database's time). ``counts`` maps each session
    id to that instance's live stream subscribers of it, in the order published.
    """

    instance_id: str
    host: str
    pid: int
    seen_at: datetime
    expires_at: datetime
    counts: Mapping[str, int]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Presence:
        return cls(
            row["instance_id"],
            row["host"],
            int(row["pid"]),
            row["seen_at"],
            row["expires_at"],
            row["counts"],
        )


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
