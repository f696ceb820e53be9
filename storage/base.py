"""The storage contract: ``AsyncStorageBackend``, the one async API of every driver.

This module owns the public methods the orchestrator builds on (chat, stream events,
session leases, agent tasks, outbox, webhooks, cancellation state, notifications, login
attempts) and the ``operation`` wrapper they run in. The public methods validate, encode
and map errors once, here; drivers (``storage.postgres``, ``storage.sqlite``) implement
only the ``_sql_*`` hooks declared in ``storage._hooks`` that run SQL on prepared
arguments, and must pass the shared contract suite in ``tests/contract/``.

The records and settings live in ``storage.records`` and ``storage.job_records``, the
leased-job kinds in ``storage.jobkinds``, the statistics in ``storage.statistics``; every
name this module exported before the split is still importable from here.

Why one file of about 1,300 lines: it is one class, the contract, whose ~90 public methods
are each a few lines (validate, encode, call one ``_sql_*`` hook) and share one guard
(``_CONTRACT_CALLS`` is read from this class's namespace to refuse dialect overrides); mixins
per capability would spread that one contract over several classes without separating any
state, and the SQL itself already lives in the drivers and ``sql/`` files.
"""

from __future__ import annotations

import abc
import bisect
import collections
import functools
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import (
    Any,
    Concatenate,
    ParamSpec,
    Self,
    TypeVar,
)

from asyncstore.storage import _validate as v
from asyncstore.storage._hooks import DialectHooks
from asyncstore.storage._queue_limits import LimitedClaim, QueueLimits, check_queue_limits
from asyncstore.storage._validate import (
    LOGIN_OUTCOMES,
    PRESENCE_MAX_BYTES,
    PRESENCE_MAX_SESSIONS,
    check_login_attempt,
    check_login_finish,
)
from asyncstore.storage.errors import (
    InvalidInput,
    InvalidType,
    LeaseLost,
    QueueCoordinated,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)
from asyncstore.storage.jobkinds import (
    JOB_KINDS,
    OUTBOX,
    TASKS,
    JobKind,
    render_job_queries,
)
from asyncstore.storage.records import (
    JSON,
    LEASE_EXPIRED,
    LOGIN_BUSY_RETRY_S,
    LOGIN_SCOPES,
    AuditEntry,
    CancelState,
    ChatMessage,
    Claim,
    EncodedJSON,
    Failure,
    FailureColumns,
    JournaledEvent,
    Leadership,
    Lease,
    LeaseAttempt,
    LoginPolicy,
    LoginSlot,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    Notification,
    NotificationStream,
    OutboxMessage,
    OutboxStatus,
    Presence,
    QueueDepth,
    StorageSettings,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    StreamRow,
    Task,
    TaskStatus,
    WebhookAttempt,
)
from asyncstore.storage.statistics import QUERY_BUCKETS_S, StorageStatistics
from asyncstore.storage.task_cancel import (
    TASK_CANCEL_CHANNEL,
    TaskCancellation,
    prepare_task_cancel,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_B = TypeVar("_B", bound="AsyncStorageBackend")

__all__ = [
    "JOB_KINDS",
    "JSON",
    "LEASE_EXPIRED",
    "LOGIN_BUSY_RETRY_S",
    "LOGIN_OUTCOMES",
    "LOGIN_SCOPES",
    "OUTBOX",
    "PRESENCE_MAX_BYTES",
    "PRESENCE_MAX_SESSIONS",
    "QUERY_BUCKETS_S",
    "TASKS",
    "AsyncStorageBackend",
    "AuditEntry",
    "CancelState",
    "ChatMessage",
    "Claim",
    "EncodedJSON",
    "Failure",
    "FailureColumns",
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
    "OutboxStatus",
    "Presence",
    "QueueDepth",
    "StorageSettings",
    "StorageStatistics",
    "StreamAppend",
    "StreamEvent",
    "StreamPartition",
    "StreamRow",
    "Task",
    "TaskStatus",
    "WebhookAttempt",
    "check_login_attempt",
    "check_login_finish",
    "operation",
    "render_job_queries",
]

_J = TypeVar("_J")  # the record of a kind (Task, OutboxMessage)
_N = TypeVar("_N")  # what enqueuing takes (NewTask, NewOutboxMessage)
_S = TypeVar("_S", bound=StrEnum)  # the status enum of a kind


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


class AsyncStorageBackend(DialectHooks):
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
    async def _append_stream_rows(
        self, rows: list[StreamRow], notify: tuple[str, Sequence[str]] | None = None
    ) -> StreamAppend:
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

        ``notify``: ``(channel, payloads)``, the writer's notification of these rows, sent
        with them only if the fence refuses none of them (else nothing is sent and the
        caller announces what was stored): on Postgres by ``pg_notify`` in the append
        statement (delivered on commit, never without the rows), on SQLite in process
        right after the commit. The channel is one ``notify()`` accepts and each payload
        at most ``MAX_NOTIFY_BYTES``; they are not checked again.
        """
        if not rows:
            return StreamAppend(0)
        return await self._sql_append_stream_events(rows, notify)

    def _notify_listened(self, channel: str) -> bool:
        """Whether a notification on ``channel`` may reach anyone: on Postgres always
        (other processes may listen); on SQLite, whether a subscription of this process
        listens to it (its notifications reach nobody else), so the writer can skip
        encoding notifications nobody receives."""
        return True

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
        groups = v.task_groups(jobs) if k is TASKS else []
        channel = None if notify is None else v.check_channel(notify)
        if not rows:
            return []
        if any(g is not None for g in groups):
            return await self._sql_enqueue_grouped_tasks(rows, groups, channel)  # type: ignore[return-value]
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

        A task claim never bypasses a coordinated queue's limits or groups: on a queue with
        a ``task_queues`` row (declared limits, or a grouped task enqueued) the statement
        takes nothing and ``QueueCoordinated`` is raised (claim through
        ``claim_limited_tasks``). Only a claim that took nothing reads the queue's row, so
        the claim of a queue without limits stays one statement while it finds work.
        """
        k = v.check_job_kind(kind)
        v.check_id(worker_id, "worker_id")
        label = k.queue_label
        names = None if queues is None else v.check_names(queues, label)
        if not k.grouped and (names is None or len(names) != 1):
            raise InvalidInput(f"a {k.name} claim names exactly one {label}")
        n = v.check_limit(limit)
        lease = v.check_seconds(lease_s, "lease_s")
        jobs = await self._sql_claim_jobs(k, worker_id, n, lease, names)
        queue = names[0] if names and k is TASKS else None
        if not jobs and queue is not None and await self._sql_get_queue_limits(queue) is not None:
            raise QueueCoordinated(queue)
        return jobs

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

    # -- coordinated task queues (ordering groups, fleet-wide limits; _queue_limits) --

    @operation
    async def set_queue_limits(
        self,
        queue: str,
        *,
        max_running: int | None = None,
        max_per_second: float | None = None,
        max_per_group: int = 1,
    ) -> QueueLimits:
        """Declare a task queue's fleet-wide limits (None: no cap); returns them.

        ``max_running``: most tasks of the queue running under a live lease at once, across
        every process. ``max_per_second``: most starts per second, as at most
        ``max(1, floor(rate))`` starts in any window of that many / rate seconds.
        ``max_per_group``: most tasks of one ordering group in flight. The queue becomes
        coordinated: its claims go through ``claim_limited_tasks``. The whole declaration
        replaces the previous one; the next claim reads it.
        """
        name = v.check_id(queue, "queue")
        running, rate, group = check_queue_limits(max_running, max_per_second, max_per_group)
        return await self._sql_set_queue_limits(name, running, rate, group)

    @operation
    async def get_queue_limits(self, queue: str) -> QueueLimits | None:
        """The queue's limits; None when it is not coordinated (no limits, no groups)."""
        return await self._sql_get_queue_limits(v.check_id(queue, "queue"))

    @operation
    async def claim_limited_tasks(
        self, queue: str, worker_id: str, *, limit: int, lease_s: float
    ) -> LimitedClaim:
        """Claim up to ``limit`` tasks of a coordinated queue under its limits and groups.

        Claims of one queue run one at a time across the fleet (Postgres: the queue's
        ``task_queues`` row is locked, then the queue is read in a new statement, which sees
        every claim committed before; SQLite: the one writer). Within the budget the limits
        leave, tasks are taken as ``claim_tasks`` takes them (priority, run_after, id), and
        a grouped task only with every open task ahead of it in its group that is not in
        flight, at most ``max_per_group`` of a group in flight; a task waiting for its retry
        holds back the later tasks of its group, a dead one holds nothing back. Expired
        leases are re-claimed (or dead-lettered on their last attempt) as ``claim_tasks``
        does. ``refused``: due tasks were held back below ``limit``; then the queue is
        marked so that the next ``wake_task_queue`` notifies, and ``retry_after_s`` says
        when the limits allow a start without any finish. A queue without a row is claimed
        by the plain claim.
        """
        name = v.check_id(queue, "queue")
        v.check_id(worker_id, "worker_id")
        n = v.check_limit(limit)
        lease = v.check_seconds(lease_s, "lease_s")
        claimed = await self._sql_claim_limited_tasks(name, worker_id, n, lease)
        if claimed is None:
            plain = await self._sql_claim_jobs(TASKS, worker_id, n, lease, [name])
            return LimitedClaim(plain, False, None)
        return claimed

    @operation
    async def wake_task_queue(self, queue: str, channel: str) -> bool:
        """After tasks of a coordinated queue finished: if a claim was refused since the
        last wake, notify ``channel`` (payload ``0``) in the same statement and return True."""
        return await self._sql_wake_task_queue(v.check_id(queue, "queue"), v.check_channel(channel))

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

        For operators (the dashboard): one read of at most ``limit`` rows, no lock.
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
    async def list_queued_tasks(self, queues: Sequence[str], *, limit: int = 10) -> list[Task]:
        """For each of ``queues``, its next ``limit`` queued tasks in claim order (priority
        descending, then ``run_after``, then id: the ones a claim takes first, due or not).

        Grouped by queue in the order given (a name given twice is listed once). For
        operators (the dashboard): one read, a bounded index walk per queue, no lock.
        """
        names = list(dict.fromkeys(v.check_names(queues, "queue")))
        n = v.check_limit(limit)
        return await self._sql_list_queued_tasks(names, n) if names else []

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

    # -- instance presence (the dashboard's fleet-wide subscribers, 0015) ----------------

    @operation
    async def publish_presence(
        self,
        instance_id: str,
        counts: Mapping[str, int],
        ttl_s: float,
        *,
        host: str | None = None,
        pid: int | None = None,
    ) -> Presence:
        """Write this instance's presence row: its live stream subscribers per session.

        One upsert keyed on ``instance_id``: the row's counts are replaced, ``seen_at`` is
        the database's now and ``expires_at`` ``ttl_s`` later (so a process that stops
        publishing drops out of ``list_presence`` on the database's clock). ``host`` and
        ``pid`` default to this process's. ``counts`` maps session ids (checked as ids) to
        non-negative ints, at most ``PRESENCE_MAX_SESSIONS`` sessions and
        ``PRESENCE_MAX_BYTES`` of JSON; more is ``InvalidInput`` and nothing is written.
        Returns the row as stored. If cancelled, the row is either written whole or left
        as it was.
        """
        row = v.prepare_presence(instance_id, counts, ttl_s, host, pid)
        return await self._sql_publish_presence(*row)

    @operation
    async def list_presence(self, *, limit: int = 1000) -> list[Presence]:
        """The presence rows not yet expired (the database's clock), by instance id.

        For operators (the dashboard): one read of at most ``limit`` rows, no lock; expired
        rows are left out whether or not ``purge_presence`` has deleted them yet.
        """
        return await self._sql_list_presence(v.check_limit(limit))

    @operation
    async def withdraw_presence(self, instance_id: str) -> bool:
        """Delete ``instance_id``'s presence row (a runtime closing cleanly); whether there
        was one. One DELETE: if cancelled, the row is either gone or still there."""
        return await self._sql_withdraw_presence(v.check_id(instance_id, "instance_id"))

    @operation
    async def purge_presence(self) -> int:
        """Delete the expired presence rows (instances that stopped publishing without
        withdrawing, e.g. killed); the number deleted. Run by the maintenance sweeper."""
        return await self._sql_purge_presence()

    # -- the engine's per-kind names (aliases of the *_jobs methods) --------------

    async def enqueue_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        """``enqueue_jobs(TASKS, tasks)``."""
        return await self.enqueue_jobs(TASKS, tasks)

    async def claim_tasks(
        self, queue: str, worker_id: str, *, limit: int, lease_s: float
    ) -> list[Task]:
        """``claim_jobs(TASKS, worker_id, queues=[queue], ...)``: the plain claim, which
        raises ``QueueCoordinated`` on a queue with limits or groups (nothing claimed)."""
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
        """``purge_jobs(TASKS, older_than_s)``: succeeded and cancelled tasks (dead ones stay)."""
        return await self.purge_jobs(TASKS, older_than_s)

    @operation
    async def cancel_task(
        self,
        task_id: int,
        reason: str = "cancelled",
        *,
        notify_channel: str | None = TASK_CANCEL_CHANNEL,
    ) -> TaskCancellation:
        """End a queued or running task ``cancelled``, from any process; say what happened.

        One statement under the row's lock: a queued task never starts; a running one is
        cancelled in storage at once (its worker's later outcome write, or a claim after
        its lease runs out, finds it no longer running and changes nothing) and, with
        ``notify_channel`` (default ``TASK_CANCEL_CHANNEL``, where workers listen), the
        worker running it is notified with ``["<task id>", "<worker id>"]`` (Postgres: in
        the same statement, sent on commit; SQLite: in process, after the commit) and
        cancels the handler. ``reason`` (cut to 1000 characters) becomes ``last_error``.
        Idempotent: a cancelled task reports ``ALREADY_CANCELLED``, a succeeded or dead
        one ``ALREADY_FINISHED`` (unchanged), an unknown id ``NOT_FOUND``. A cancel and an
        outcome write that commit at once leave exactly one terminal state, the one the
        answer implies. A refused argument raises ``InvalidInput`` and changes nothing.
        If cancelled, the cancel and its notification are either both done or neither.
        A task of a coordinated queue (limits or groups) frees its slot and its group as a
        finish does, so the queue's finish wakeup (``wake_task_queue``) follows: SQLite in
        the same transaction; Postgres in a second statement once the cancel committed
        (run to its end even if the caller is cancelled; in the cancel's statement it would
        take the task's lock before the queue's, the reverse of a claim: a deadlock).
        """
        checked, kept, channel = prepare_task_cancel(task_id, reason, notify_channel)
        return await self._sql_cancel_task(checked, kept, channel)

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

    # -- periodic ticks (orchestrator.periodic) ---------------------------------

    @operation
    async def record_periodic_tick(
        self, schedule: str, tick_at: datetime, task: NewTask, *, notify: str | None = None
    ) -> Task | None:
        """Record the tick ``(schedule, tick_at)`` and enqueue ``task`` in one transaction.

        Returns the enqueued task, or None (nothing written) when that tick was already
        recorded: of any number of concurrent calls for one tick, in any processes, one
        enqueues its task. ``tick_at`` is an aware datetime (its microseconds are kept);
        ``notify`` wakes the queue's workers as ``enqueue_jobs`` does. If cancelled, the
        tick and its task were either both written or neither.
        """
        name = v.check_id(schedule, "schedule")
        when = v.check_when(tick_at, "tick_at")
        if when is None:
            raise InvalidInput("tick_at must be a datetime, got None")
        row = v.prepare_tasks([task])[0]
        channel = None if notify is None else v.check_channel(notify)
        return await self._sql_record_periodic_tick(name, when.astimezone(UTC), row, channel)

    @operation
    async def last_periodic_ticks(self, schedules: Sequence[str]) -> dict[str, datetime]:
        """Each named schedule's latest recorded tick (schedules never recorded are absent)."""
        names = v.check_names(schedules, "schedule")
        if not names:
            return {}
        return await self._sql_last_periodic_ticks(sorted(set(names)))

    @operation
    async def purge_periodic_ticks(self, retention_s: float) -> int:
        """Delete ticks recorded over ``retention_s`` seconds ago, except each schedule's
        latest (a restarted runner resumes from it); returns how many were deleted."""
        return await self._sql_purge_periodic_ticks(v.check_seconds(retention_s, "retention_s"))

    # -- login attempts (auth limiter, shared by a fleet) -----------------------

    @operation
    async def reserve_login_attempt(self, scope: str, key: str, policy: LoginPolicy) -> LoginSlot:
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
