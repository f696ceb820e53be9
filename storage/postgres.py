"""The Postgres driver (asyncpg): the production backend and the coordination layer.

It owns an asyncpg pool sized from ``StorageSettings``, the named queries of
``sql/postgres/queries.sql`` (one round trip per contract call, batches through
``unnest``), and one dedicated LISTEN connection per backend, outside the pool, that
reconnects as soon as it is lost (short capped backoff while the server is down),
re-LISTENs and reports the gap to subscribers. asyncpg errors are
mapped to ``storage.errors`` in ``_map_error`` and nowhere else.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import asyncpg
import orjson

from storage import _topology
from storage import _validate as v
from storage._notify import NotificationHub, Subscription
from storage._sql import load_migrations, load_queries
from storage.base import (
    AsyncStorageBackend,
    CancelState,
    ChatMessage,
    Claim,
    Failure,
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
    NotificationStream,
    OutboxMessage,
    OutboxStatus,
    QueueDepth,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    Task,
    TaskStatus,
    WebhookAttempt,
    check_login_attempt,
    check_login_finish,
    operation,
)
from storage.errors import (
    ConflictError,
    InvalidInput,
    LeaseLost,
    MigrationError,
    QueryError,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)

Q = load_queries("postgres")
_MIGRATION_LOCK = 0x6173796E63  # "async": the advisory lock key that serializes migrations
_PING_EVERY_S = 10.0


def _encode_jsonb(data: bytes) -> bytes:
    # Payloads arrive already encoded by storage._validate; jsonb's binary format is a
    # version byte followed by the text.
    return b"\x01" + data


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


async def _init_checked_connection(conn: asyncpg.Connection) -> None:
    # ``storage.pooled`` unset: refuse a pooler the settings did not declare, with a clear
    # error, rather than lose notifications or locks to it later.
    await _topology.check_pool_connection(conn)
    await _init_connection(conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook that sends nothing, and discards a connection a call broke.

    asyncpg's default reset runs ``RESET ALL; UNLISTEN *; ...`` on every release, an extra
    round trip per call. Pool connections never carry session state here (no SET; LISTEN
    and leadership live on their own connections; the migration lock is transaction-scoped),
    so they also work through a transaction pooler, and asyncpg still rolls back any open
    transaction and drops listeners before this hook.

    A connection released while a connection-level error leaves the call (the server ended
    the session under it, or the protocol tripped: ``InternalClientError``) is not returned
    to the pool: raising here makes asyncpg terminate it, so the next call gets a fresh one
    instead of tripping on the same broken protocol state (as during a switchover).
    """
    exc = sys.exc_info()[1]
    if isinstance(exc, _BROKEN_CONNECTION) or (
        isinstance(exc, asyncpg.PostgresError)
        and (getattr(exc, "sqlstate", "") or "").startswith(("08", "57P"))
    ):
        raise exc


# Errors after which a connection cannot be trusted with another call.
_BROKEN_CONNECTION = (asyncpg.InternalClientError, asyncpg.InterfaceError, OSError, TimeoutError)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 12" or "DELETE 3".
    return int(status.rsplit(" ", 1)[-1])


def map_postgres_error(exc: Exception) -> StorageError | None:
    """Map an asyncpg or network exception to the library's tree, keyed on SQLSTATE."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        message = f"postgres {state}: {exc}"
        if state.startswith("23"):
            return ConflictError(message)
        if state.startswith("22"):
            return InvalidInput(message)
        if state.startswith(("08", "57P", "53")):
            return StorageUnavailable(message)
        return QueryError(message)
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError):
        return StorageUnavailable(f"postgres unreachable: {exc}")
    if isinstance(exc, asyncpg.InternalClientError):
        # asyncpg's protocol state machine trips ("cannot switch to state 12; another
        # operation (2) is in progress") when the server ends a session under a statement,
        # as a restart does: connection trouble, worth retrying on a fresh connection.
        return StorageUnavailable(f"postgres connection broken: {exc}")
    return None


class PostgresBackend(AsyncStorageBackend):
    """``AsyncStorageBackend`` on Postgres. Build with ``storage.open_storage``."""

    dialect = "postgres"

    def __init__(self, settings: StorageSettings) -> None:
        super().__init__()
        self._settings = settings
        self._topology = _topology.resolve(settings)
        self._dsn = self._topology.dsn
        self._pool: asyncpg.Pool | None = None
        self._hub = NotificationHub(settings.listener_queue_size)
        self._listen_conn: asyncpg.Connection | None = None
        self._listen_lock = anyio.Lock()
        self._listener_was_up = False
        self._listener_failures = 0  # consecutive failed reconnect attempts
        self._reconnect_failures = 0  # all of them, for statistics()
        self._next_attempt = 0.0  # monotonic time before which no reconnect is tried
        self._reconnecting: anyio.Event | None = None  # set when the running loop ends
        self._listener_kick = anyio.Event()  # set by aclose(): stop any backoff wait
        self._last_ping = 0.0
        self._reconnects = 0

    def _map_error(self, exc: Exception) -> StorageError | None:
        return map_postgres_error(exc)

    async def open(self) -> None:
        """Create the pool. Cancelling it closes whatever was opened."""
        s = self._settings
        pooled = self._topology.pooled
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=min(s.pool_min_size, s.pool_max_size),
                max_size=s.pool_max_size,
                # A transaction pooler cannot keep named prepared statements: none there.
                statement_cache_size=0 if pooled else s.statement_cache_size,
                command_timeout=s.command_timeout_s,
                timeout=s.connect_timeout_s,
                init=_init_connection if pooled is not None else _init_checked_connection,
                reset=_keep_session,
            )
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception) and (mapped := map_postgres_error(exc)) is not None:
                raise mapped from exc
            raise

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageUnavailable("postgres pool is not open")
        return self._pool

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener_kick.set()
        self._hub.wake_all()
        # Shielded: connections must be returned and closed even if our caller is cancelled.
        with anyio.CancelScope(shield=True):
            if self._listen_conn is not None:
                await self._listen_conn.close(timeout=5)
                self._listen_conn = None
            if self._pool is not None:
                await self._pool.close()

    def statistics(self) -> StorageStatistics:
        base = super().statistics()
        return StorageStatistics(
            self.dialect,
            base.statements,
            notifications_received=self._hub.received,
            notifications_dropped=self._hub.dropped,
            listener_reconnects=self._reconnects,
            listener_reconnect_failures=self._reconnect_failures,
        )

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        self._count(name)
        return await self.pool.fetch(Q[name], *args)  # type: ignore[no-any-return]

    async def _execute(self, name: str, *args: Any) -> str:
        self._count(name)
        return await self.pool.execute(Q[name], *args)  # type: ignore[no-any-return]

    # -- lifecycle -------------------------------------------------------------

    @operation
    async def migrate(self) -> list[int]:
        """Apply pending migrations, one transaction each, safe with many instances at once.

        Each transaction first takes a transaction-scoped advisory lock, then (re)reads what
        is applied: instances starting together apply every migration once, in order, and
        the lock ends with its transaction, so it is never left held on a connection (which
        a transaction pooler would hand to someone else) and works through PgBouncer.
        """
        applied: list[int] = []
        pending = load_migrations(self.dialect)
        async with self.pool.acquire() as conn:
            while pending:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    done = {
                        r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")
                    }
                    pending = [m for m in pending if m.version not in done]
                    if not pending:
                        break
                    migration = pending.pop(0)
                    try:
                        async with conn.transaction():  # a savepoint: a clear error below
                            await conn.execute(migration.sql)
                    except asyncpg.PostgresError as exc:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                        ) from exc
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                    applied.append(migration.version)
            if applied:
                # New tables and types: cached plans of other pool connections are stale.
                await self.pool.expire_connections()
        return applied

    @operation
    async def schema_version(self) -> int:
        version = await self.pool.fetchval(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0"
            " ELSE (SELECT coalesce(max(version), 0) FROM schema_migrations) END"
        )
        return int(version)

    @operation
    async def ping(self) -> None:
        await self._fetch("ping")

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
        rows = v.prepare_messages(session_id, messages)
        out_rows = v.prepare_outbox(outbox)
        if lease_token is not None:
            v.check_int(lease_token, "lease_token", minimum=1)
        args = (session_id, [r[0] for r in rows], [r[1] for r in rows], lease_token)
        if out_rows:
            async with self.pool.acquire() as conn, conn.transaction():
                self._count("append_messages")
                result = await conn.fetch(Q["append_messages"], *args)
                if result:
                    self._count("enqueue_outbox")
                    await conn.execute(Q["enqueue_outbox"], *_outbox_columns(out_rows))
        else:
            result = await self._fetch("append_messages", *args)
        if not result:
            raise LeaseLost(f"session {session_id!r}: lease token {lease_token} is not current")
        return sorted((ChatMessage.from_row(r) for r in result), key=lambda m: m.seq)

    @operation
    async def load_messages(
        self, session_id: str, *, after_seq: int = 0, limit: int = 100
    ) -> list[ChatMessage]:
        v.check_id(session_id)
        v.check_int(after_seq, "after_seq")
        rows = await self._fetch("load_messages", session_id, after_seq, v.check_limit(limit))
        return [ChatMessage.from_row(r) for r in rows]

    @operation
    async def delete_session(self, session_id: str) -> bool:
        v.check_id(session_id)
        rows = await self._fetch("delete_session", session_id)
        return bool(rows[0][0])

    # -- stream events ---------------------------------------------------------

    @operation
    async def append_stream_events(self, events: Sequence[NewStreamEvent]) -> StreamAppend:
        rows = v.prepare_stream_events(events)
        if not rows:
            return StreamAppend(0)
        columns = [list(col) for col in zip(*rows, strict=True)]
        row = (await self._fetch("append_stream_events", *columns))[0]
        ids, epochs = row["refused_ids"], row["refused_epochs"]
        refused = frozenset(zip(ids, epochs, strict=True)) if ids else frozenset()
        return StreamAppend(int(row["stored"]), refused)

    @operation
    async def load_stream_events(
        self, session_id: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[StreamEvent]:
        v.check_id(session_id)
        v.check_int(after_seq, "after_seq")
        rows = await self._fetch("load_stream_events", session_id, after_seq, v.check_limit(limit))
        return [StreamEvent.from_row(r) for r in rows]

    @operation
    async def last_stream_seq(self, session_id: str) -> int:
        v.check_id(session_id)
        return int((await self._fetch("last_stream_seq", session_id))[0][0])

    @operation
    async def purge_stream_events(self, older_than_s: float) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("purge_stream_events", age))

    @operation
    async def purge_stream_events_batch(self, older_than_s: float, *, limit: int) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(
            await self._execute("purge_stream_events_batch", age, v.check_limit(limit))
        )

    # -- session leases --------------------------------------------------------

    @operation
    async def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> Lease | None:
        v.check_id(session_id)
        v.check_id(holder, "holder")
        rows = await self._fetch(
            "acquire_lease", session_id, holder, v.check_seconds(ttl_s, "ttl_s")
        )
        return Lease.from_row(rows[0]) if rows else None

    @operation
    async def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        rows = await self._fetch("renew_lease", session_id, token, v.check_seconds(ttl_s, "ttl_s"))
        if not rows:
            raise LeaseLost(f"session {session_id!r}: lease token {token} is not current")
        return Lease.from_row(rows[0])

    @operation
    async def release_lease(self, session_id: str, token: int) -> bool:
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        return _rowcount(await self._execute("release_lease", session_id, token)) == 1

    @operation
    async def get_lease(self, session_id: str) -> Lease | None:
        v.check_id(session_id)
        rows = await self._fetch("get_lease", session_id)
        return Lease.from_row(rows[0]) if rows else None

    @operation
    async def expire_leases(self, older_than_s: float = 0.0) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("expire_leases", age))

    @operation
    async def ensure_lease_slots(self, pool: str, slots: int) -> None:
        v.check_id(pool, "pool")
        await self._execute("ensure_lease_slots", pool, v.check_int(slots, "slots", minimum=1))

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
        v.check_id(session_id)
        v.check_id(holder, "holder")
        if pool is not None:
            v.check_id(pool, "pool")
            v.check_int(slots, "slots", minimum=1)
        ttl = v.check_seconds(ttl_s, "ttl_s")
        row = (
            await self._fetch(
                "acquire_lease_slot", session_id, holder, ttl, pool, None if pool is None else slots
            )
        )[0]
        lease = None if row["token"] is None else Lease.from_row(row)
        return LeaseAttempt(lease, bool(row["slot_ok"]))

    @operation
    async def renew_lease_slot(
        self, session_id: str, token: int, ttl_s: float, *, pool: str | None = None
    ) -> Lease:
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        if pool is not None:
            v.check_id(pool, "pool")
        ttl = v.check_seconds(ttl_s, "ttl_s")
        rows = await self._fetch("renew_lease_slot", session_id, token, ttl, pool)
        if not rows:
            raise LeaseLost(f"session {session_id!r}: lease token {token} is not current")
        return Lease.from_row(rows[0])

    @operation
    async def release_lease_slot(
        self, session_id: str, token: int, *, channel: str, pool: str | None = None
    ) -> bool:
        v.check_id(session_id)
        v.check_int(token, "token", minimum=1)
        name, _ = v.check_notify_payload(channel, "")
        if pool is not None:
            v.check_id(pool, "pool")
        rows = await self._fetch("release_lease_slot", session_id, token, name, pool)
        return bool(rows[0]["released"])

    @operation
    async def count_leases(self) -> int:
        return int((await self._fetch("count_leases"))[0][0])

    # -- agent tasks -----------------------------------------------------------

    @operation
    async def enqueue_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        rows = v.prepare_tasks(tasks)
        if not rows:
            return []
        # Same key twice in one call: send it once (ON CONFLICT cannot touch a row twice).
        first_of_key: dict[tuple[str, str], int] = {}
        send: list[v.PreparedTask] = []
        for row in rows:
            if row[4] is not None:
                if (row[0], row[4]) in first_of_key:
                    continue
                first_of_key[(row[0], row[4])] = len(send)
            send.append(row)
        result = await self._fetch("enqueue_tasks", *[list(c) for c in zip(*send, strict=True)])
        return v.match_enqueued(rows, [Task.from_row(r) for r in result])

    @operation
    async def claim_tasks(
        self, queue: str, worker_id: str, *, limit: int, lease_s: float
    ) -> list[Task]:
        v.check_id(queue, "queue")
        v.check_id(worker_id, "worker_id")
        rows = await self._fetch(
            "claim_tasks",
            queue,
            worker_id,
            v.check_limit(limit),
            v.check_seconds(lease_s, "lease_s"),
        )
        return [Task.from_row(r) for r in rows]

    @operation
    async def heartbeat_tasks(self, claims: Sequence[Claim], lease_s: float) -> list[int]:
        ids, tokens = v.prepare_claims(claims)
        seconds = v.check_seconds(lease_s, "lease_s")
        if not ids:
            return []
        return [r[0] for r in await self._fetch("heartbeat_tasks", ids, tokens, seconds)]

    @operation
    async def complete_tasks(self, claims: Sequence[Claim]) -> list[int]:
        return await self._claimed_update("complete_tasks", claims)

    @operation
    async def fail_tasks(self, failures: Sequence[Failure]) -> dict[int, TaskStatus]:
        columns = v.prepare_failures(failures)
        if not columns[0]:
            return {}
        rows = await self._fetch("fail_tasks", *columns)
        return {r[0]: TaskStatus(r[1]) for r in rows}

    @operation
    async def release_tasks(self, claims: Sequence[Claim]) -> list[int]:
        return await self._claimed_update("release_tasks", claims)

    @operation
    async def dead_letter_tasks(self, failures: Sequence[Failure]) -> list[int]:
        ids, tokens, errors, _ = v.prepare_failures(failures)  # retry_at does not apply
        if not ids:
            return []
        return sorted(r[0] for r in await self._fetch("dead_letter_tasks", ids, tokens, errors))

    @operation
    async def get_task(self, task_id: int) -> Task | None:
        rows = await self._fetch("get_task", v.check_int(task_id, "task_id", minimum=1))
        return Task.from_row(rows[0]) if rows else None

    @operation
    async def purge_tasks(self, older_than_s: float) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("purge_tasks", age))

    @operation
    async def next_task_due_s(self, queue: str) -> float | None:
        rows = await self._fetch("next_task_due", v.check_id(queue, "queue"))
        due = rows[0]["due_s"] if rows else None
        return None if due is None else max(0.0, float(due))

    @operation
    async def backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        tasks = [QueueDepth.from_row(r) for r in await self._fetch("task_backlog")]
        return tasks, QueueDepth.from_row((await self._fetch("outbox_backlog"))[0])

    async def _claimed_update(self, name: str, claims: Sequence[Claim]) -> list[int]:
        ids, tokens = v.prepare_claims(claims)
        if not ids:
            return []
        return sorted(r[0] for r in await self._fetch(name, ids, tokens))

    async def _failed_update(self, name: str, failures: Sequence[Failure]) -> list[int]:
        columns = v.prepare_failures(failures)
        if not columns[0]:
            return []
        return sorted(r[0] for r in await self._fetch(name, *columns))

    # -- outbox ----------------------------------------------------------------

    @operation
    async def enqueue_outbox(self, messages: Sequence[NewOutboxMessage]) -> list[OutboxMessage]:
        rows = v.prepare_outbox(messages)
        if not rows:
            return []
        result = await self._fetch("enqueue_outbox", *_outbox_columns(rows))
        return sorted((OutboxMessage.from_row(r) for r in result), key=lambda m: m.id)

    @operation
    async def claim_outbox(
        self,
        worker_id: str,
        *,
        limit: int,
        lease_s: float,
        channels: Sequence[str] | None = None,
    ) -> list[OutboxMessage]:
        v.check_id(worker_id, "worker_id")
        chans = None if channels is None else [v.check_id(c, "channel") for c in channels]
        rows = await self._fetch(
            "claim_outbox",
            worker_id,
            v.check_limit(limit),
            chans,
            v.check_seconds(lease_s, "lease_s"),
        )
        return [OutboxMessage.from_row(r) for r in rows]

    @operation
    async def mark_outbox_sent(self, claims: Sequence[Claim]) -> list[int]:
        return await self._claimed_update("mark_outbox_sent", claims)

    @operation
    async def fail_outbox(self, failures: Sequence[Failure]) -> dict[int, OutboxStatus]:
        columns = v.prepare_failures(failures)
        if not columns[0]:
            return {}
        rows = await self._fetch("fail_outbox", *columns)
        return {r[0]: OutboxStatus(r[1]) for r in rows}

    @operation
    async def redrive_outbox(self, ids: Sequence[int]) -> list[int]:
        checked = v.unique_ids(ids)
        if not checked:
            return []
        return sorted(r[0] for r in await self._fetch("redrive_outbox", checked))

    @operation
    async def release_outbox(self, claims: Sequence[Claim]) -> list[int]:
        return await self._claimed_update("release_outbox", claims)

    @operation
    async def dead_letter_outbox(self, failures: Sequence[Failure]) -> list[int]:
        return await self._failed_update("dead_letter_outbox", failures)

    @operation
    async def get_outbox(self, message_id: int) -> OutboxMessage | None:
        rows = await self._fetch("get_outbox", v.check_int(message_id, "message_id", minimum=1))
        return OutboxMessage.from_row(rows[0]) if rows else None

    @operation
    async def purge_outbox(self, older_than_s: float) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("purge_outbox", age))

    # -- webhook journal --------------------------------------------------------

    @operation
    async def journal_webhook_events(
        self, endpoint: str, owner: str, bodies: Sequence[bytes]
    ) -> list[int]:
        checked = v.prepare_journal(endpoint, owner, bodies)
        if not checked:
            return []
        rows = await self._fetch("journal_webhook_events", endpoint, owner, checked)
        return [r[0] for r in rows]

    @operation
    async def delete_webhook_events(self, ids: Sequence[int]) -> int:
        checked = v.unique_ids(ids)
        if not checked:
            return 0
        return _rowcount(await self._execute("delete_webhook_events", checked))

    @operation
    async def claim_webhook_orphans(
        self, endpoints: Sequence[str], owner: str, *, older_than_s: float, limit: int
    ) -> list[JournaledEvent]:
        names = [v.check_id(e, "endpoint") for e in endpoints]
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        rows = await self._fetch(
            "claim_webhook_orphans", names, v.check_id(owner, "owner"), age, v.check_limit(limit)
        )
        found = [JournaledEvent(r["id"], r["endpoint"], r["body"].encode()) for r in rows]
        return sorted(found, key=lambda e: e.id)

    @operation
    async def record_webhook_attempts(self, attempts: Sequence[WebhookAttempt]) -> int:
        rows = v.prepare_attempts(attempts)
        if not rows:
            return 0
        columns = [list(c) for c in zip(*rows, strict=True)]
        await self._execute("record_webhook_attempts", *columns)
        return len(rows)

    @operation
    async def list_webhook_attempts(
        self,
        *,
        endpoint: str | None = None,
        webhook_id: str | None = None,
        failed: bool = False,
        limit: int = 100,
    ) -> list[WebhookAttempt]:
        name = None if endpoint is None else v.check_id(endpoint, "endpoint")
        wid = None if webhook_id is None else v.check_id(webhook_id, "webhook_id")
        rows = await self._fetch(
            "list_webhook_attempts", name, bool(failed), wid, v.check_limit(limit)
        )
        return [WebhookAttempt.from_row(r) for r in rows]

    @operation
    async def purge_webhook_attempts(self, older_than_s: float) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("purge_webhook_attempts", age))

    # -- cancellation ----------------------------------------------------------

    @operation
    async def request_cancel(
        self, session_id: str, reason: str, *, notify_channel: str | None = None
    ) -> CancelState:
        v.check_id(session_id)
        if not isinstance(reason, str) or "\x00" in reason:
            raise InvalidInput("reason must be a str without NUL characters")
        channel = None if notify_channel is None else v.check_notify_payload(notify_channel, "")[0]
        chars = self.CANCEL_NOTIFY_REASON_CHARS
        rows = await self._fetch("request_cancel", session_id, reason[:1000], channel, chars)
        return CancelState.from_row(rows[0])

    @operation
    async def get_cancel(self, session_id: str) -> CancelState | None:
        v.check_id(session_id)
        rows = await self._fetch("get_cancel", session_id)
        return CancelState.from_row(rows[0]) if rows else None

    @operation
    async def clear_cancel(self, session_id: str) -> bool:
        v.check_id(session_id)
        return _rowcount(await self._execute("clear_cancel", session_id)) > 0

    # -- notifications ---------------------------------------------------------

    @operation
    async def notify(self, channel: str, payload: str) -> None:
        await self._fetch("notify", *v.check_notify_payload(channel, payload))

    def listen(self, *channels: str) -> AbstractAsyncContextManager[NotificationStream]:
        names = [v.check_notify_payload(c, "")[0] for c in channels]
        if not names:
            raise InvalidInput("listen() needs at least one channel")
        return self._listen(names)

    @asynccontextmanager
    async def _listen(self, channels: list[str]) -> AsyncIterator[Subscription]:
        if self._closed:
            raise StorageClosed("postgres storage is closed")
        sub, new = self._hub.add(channels, on_idle=self._keep_listening)
        try:
            try:
                await self._ensure_listener(new)
            except Exception as exc:
                if (mapped := map_postgres_error(exc)) is not None:
                    raise mapped from exc
                raise
            yield sub
        finally:
            emptied = self._hub.remove(sub)
            if emptied and not self._closed:
                # Shielded: UNLISTEN must reach the connection even if the subscriber is cancelled.
                with anyio.CancelScope(shield=True):
                    await self._unlisten(emptied)

    def _on_notification(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._hub.deliver(channel, payload)

    def _on_lost(self, conn: object) -> None:
        if self._closed:
            self._hub.wake_all()
            return
        current = self._listen_conn
        if current is not None and conn is not current and not current.is_closed():
            return  # an older connection's end: the current one is fine
        # Mark the listener down and wake every subscriber: the first one that is waiting
        # starts reconnecting now, the others wait for it, then all of them get a gap.
        self._hub.listener_lost()

    async def _ensure_listener(self, new_channels: list[str]) -> None:
        """Connect the LISTEN connection if it is down and LISTEN on ``new_channels``.

        After a reconnect every subscribed channel is LISTENed again and every subscription
        gets a gap marker, so callers catch up on what they missed while it was down.
        """
        async with self._listen_lock:
            conn = self._listen_conn
            if conn is not None and not conn.is_closed():
                for channel in new_channels:
                    await conn.add_listener(channel, self._on_notification)
                return
            self._listen_conn = None
            conn = await self._connect_session("listen()")
            conn.add_termination_listener(self._on_lost)
            try:
                for channel in self._hub.channels():
                    await conn.add_listener(channel, self._on_notification)
            except BaseException:
                conn.terminate()
                raise
            if self._closed:
                # aclose() ran while we connected: it could not close this one, so we do.
                conn.terminate()
                raise StorageClosed("postgres storage is closed")
            self._listen_conn = conn
            self._last_ping = time.monotonic()
            self._listener_failures = 0
            self._hub.listener_down = False
            if self._listener_was_up:
                self._reconnects += 1
                self._hub.gap_all()
            self._listener_was_up = True

    async def _connect_session(self, what: str) -> asyncpg.Connection:
        """A connection outside the pool that keeps its session (LISTEN, session locks).

        It goes to ``storage.listen_url`` (else ``storage.url`` when that is not pooled) and
        is refused with ``ConfigurationError`` if it turns out to go through a pooler, unless
        ``storage.pooled=false`` asserts that the pooler keeps sessions.
        """
        dsn = self._topology.require_session_dsn(what)
        conn = await asyncpg.connect(
            dsn, timeout=self._settings.connect_timeout_s, statement_cache_size=0
        )
        if self._topology.pooled is False:
            return conn
        try:
            await _topology.check_session(conn, what)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _unlisten(self, channels: list[str]) -> None:
        async with self._listen_lock:
            conn = self._listen_conn
            if conn is None or conn.is_closed():
                return
            try:
                for channel in channels:
                    await conn.remove_listener(channel, self._on_notification)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                conn.terminate()

    async def _keep_listening(self) -> None:
        """Run by a waiting subscriber: reconnect if the listener is down, else ping now and then.

        The LISTEN connection needs no task of its own: asyncpg delivers notifications from
        its protocol callbacks, and the subscribers' own waits drive reconnects and pings.
        A lost connection wakes them at once (``_on_lost``), so a reconnect does not wait
        for an idle check. Raises ``StorageClosed`` once the storage is closed.
        """
        if self._closed:
            raise StorageClosed("postgres storage is closed")
        conn = self._listen_conn
        if conn is None or conn.is_closed():
            await self._reconnect()
            return
        # A live connection: whatever reported a loss is stale (the subscription would
        # otherwise keep calling this hook without waiting).
        self._hub.listener_down = False
        if time.monotonic() - self._last_ping < _PING_EVERY_S:
            return
        self._last_ping = time.monotonic()
        try:
            async with self._listen_lock:
                await conn.execute("SELECT 1", timeout=self._settings.connect_timeout_s)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            # A connection cut without a reset: end it; the subscribers reconnect at once.
            conn.terminate()
            self._hub.listener_lost()

    async def _reconnect(self) -> None:
        """Bring the LISTEN connection back, retrying until it is up or the storage closes.

        One subscriber runs the loop; the others wait for it to end. Attempts start at once
        and back off exponentially with jitter, capped at ``listener_reconnect_max_s``
        (sub-second by default: an attempt against a down server is one refused connect,
        while every second the listener stays down after the server is back is a second of
        notifications only the gap's catch-up read recovers). If the running subscriber is
        cancelled, the next one takes over where the backoff schedule stands.
        """
        running = self._reconnecting
        if running is not None:
            await running.wait()
            return
        done = self._reconnecting = anyio.Event()
        try:
            while True:
                if self._closed:
                    raise StorageClosed("postgres storage is closed")
                wait = self._next_attempt - time.monotonic()
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await self._listener_kick.wait()
                    continue
                try:
                    await self._ensure_listener([])
                    return
                except Exception as exc:
                    if map_postgres_error(exc) is None:
                        raise
                    self._listener_failures += 1
                    self._reconnect_failures += 1
                    cap = self._settings.listener_reconnect_max_s
                    step = min(0.05 * 2 ** min(self._listener_failures - 1, 30), cap)
                    # Equal jitter: processes restarted together spread their attempts.
                    self._next_attempt = time.monotonic() + step / 2 + random.uniform(0, step / 2)
        finally:
            self._reconnecting = None
            done.set()

    # -- login attempts (auth limiter, shared by a fleet) -----------------------

    @operation
    async def reserve_login_attempt(
        self, scope: str, key: str, policy: LoginPolicy
    ) -> LoginSlot:
        p = check_login_attempt(scope, key, policy)
        row = (await self._fetch("reserve_login_attempt", scope, key, p.limit, p.window_s))[0]
        return LoginSlot.from_row(row, p.window_s)

    @operation
    async def finish_login_attempt(
        self,
        scope: str,
        key: str,
        window_start: float,
        outcome: str,
        policy: LoginPolicy,
    ) -> bool:
        p = check_login_attempt(scope, key, policy)
        start = check_login_finish(window_start, outcome)
        if outcome == "release":
            await self._execute("release_login_attempt", scope, key, start)
            return False
        if outcome == "success":
            await self._execute("succeed_login_attempt", scope, key, start)
            return False
        rows = await self._fetch(
            "fail_login_attempt",
            scope,
            key,
            start,
            p.limit,
            p.window_s,
            p.lockout_base_s,
            p.lockout_factor,
            p.lockout_max_s,
            p.forget_after_s,
        )
        return bool(rows and rows[0]["tripped"])

    @operation
    async def purge_login_attempts(self, older_than_s: float) -> int:
        age = v.check_seconds(older_than_s, "older_than_s", minimum=0)
        return _rowcount(await self._execute("purge_login_attempts", age))

    # -- maintenance -----------------------------------------------------------

    def open_leadership(
        self, name: str, *, ttl_s: float
    ) -> AbstractAsyncContextManager[Leadership]:
        v.check_id(name, "name")
        v.check_seconds(ttl_s, "ttl_s")
        return self._leadership(name)

    @asynccontextmanager
    async def _leadership(self, name: str) -> AsyncIterator[Leadership]:
        if self._closed:
            raise StorageClosed("postgres storage is closed")
        role = _PostgresLeadership(self, name)
        try:
            yield role
        finally:
            # Shielded: the lock must be given up even if the owner is being cancelled.
            with anyio.CancelScope(shield=True):
                await role.aclose()

    async def terminate_listener_for_tests(self) -> None:
        """Drop the LISTEN connection abruptly, as a network failure would."""
        if self._listen_conn is not None:
            self._listen_conn.terminate()


class _PostgresLeadership(Leadership):
    """A session-level advisory lock held on a dedicated connection outside the pool.

    Session level, not transaction level: a sweep is many short transactions (one per
    purge batch), and a transaction-level lock would force them into one long transaction
    that holds every deleted row's lock and pins vacuum's horizon until the sweep ends.
    Outside the pool, because the pool's reset hook sends nothing, so a pooled connection
    would carry the lock back into the pool. The server drops the lock when the session
    ends, so a holder that dies or loses its network gives the role up without help.
    """

    def __init__(self, backend: PostgresBackend, name: str) -> None:
        self._backend = backend
        self._name = name
        self._conn: asyncpg.Connection | None = None
        self._leading = False

    @property
    def leading(self) -> bool:
        return self._leading

    async def try_lead(self) -> bool:
        backend = self._backend
        if backend._closed:
            self._drop()
            raise StorageClosed("postgres storage is closed")
        timeout = backend._settings.command_timeout_s
        try:
            if self._leading and self._conn is not None and not self._conn.is_closed():
                try:
                    # A session lock lasts as long as its session: a live session still has it.
                    backend._count("ping")
                    await self._conn.fetchval(Q["ping"], timeout=timeout)
                    return True
                except Exception:
                    self._drop()  # the session is gone or unusable, and the lock with it
            conn = self._conn
            if conn is None or conn.is_closed():
                self._leading = False
                conn = self._conn = await backend._connect_session("open_leadership()")
            backend._count("acquire_leadership")
            self._leading = bool(
                await conn.fetchval(Q["acquire_leadership"], self._name, timeout=timeout)
            )
        except BaseException as exc:
            # Whether the lock was taken is unknown: ending the session settles it (not held).
            self._drop()
            if isinstance(exc, Exception) and (mapped := map_postgres_error(exc)) is not None:
                raise mapped from exc
            raise
        return self._leading

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
        self._conn = None
        self._leading = False

    async def aclose(self) -> None:
        """Give the lock up and close the connection; on any trouble, end the session."""
        conn, leading = self._conn, self._leading
        if conn is None:
            return
        try:
            with anyio.fail_after(self._backend._settings.connect_timeout_s):
                if leading and not conn.is_closed():
                    self._backend._count("release_leadership")
                    await conn.fetchval(Q["release_leadership"], self._name)
                await conn.close()
            self._conn = None
            self._leading = False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            self._drop()


def _outbox_columns(rows: list[tuple[str, str, bytes, int]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]
