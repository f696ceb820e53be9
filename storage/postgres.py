"""The Postgres driver (asyncpg): the production backend and the coordination layer.

It owns ``PostgresBackend``: an asyncpg pool sized from ``StorageSettings``, migrations,
and the SQL hooks of chat, stream events, session leases, webhooks, cancellation, login
attempts and periodic ticks, each one named query of ``sql/postgres/queries.sql`` (one
round trip per contract call, batches through ``unnest``). Its other parts are mixins in
private modules: the connection plumbing, the pool calls every hook runs through and the
one error mapping (``_pg_conn``: asyncpg errors are mapped to ``storage.errors`` there and
nowhere else), the leased-job engine's hooks and the coordinated task queues
(``_pg_jobs``), the dedicated LISTEN connection outside the pool that reconnects as soon as
it is lost and reports the gap to subscribers, and leadership (``_pg_listen``), and the
stream partitions (``_pg_partitions``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from asyncstore.storage import _ticks, _topology
from asyncstore.storage._backoff import Backoff
from asyncstore.storage._notify import NotificationHub
from asyncstore.storage._pg_conn import (
    _MIGRATION_LOCK,
    _RECONNECT_BASE_S,
    Q,
    _connect,
    _init_checked_connection,
    _init_connection,
    _keep_session,
    _rowcount,
    map_connect_error,
    map_postgres_error,
)
from asyncstore.storage._pg_jobs import PgJobs
from asyncstore.storage._pg_listen import PgListening
from asyncstore.storage._pg_partitions import PgPartitions
from asyncstore.storage._shield import complete
from asyncstore.storage._sql import load_migrations
from asyncstore.storage.base import (
    CancelState,
    ChatMessage,
    JournaledEvent,
    Lease,
    LeaseAttempt,
    LoginPolicy,
    LoginSlot,
    NewMessage,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    Task,
    WebhookAttempt,
    operation,
)
from asyncstore.storage.errors import (
    MigrationError,
    StorageError,
)

__all__ = ["PostgresBackend", "Q", "map_connect_error", "map_postgres_error"]


class PostgresBackend(PgJobs, PgPartitions, PgListening):
    """``AsyncStorageBackend`` on Postgres. Build with ``storage.open_storage``."""

    dialect = "postgres"

    def __init__(self, settings: StorageSettings) -> None:
        super().__init__()
        self._settings = settings
        self._topology = _topology.resolve(settings)
        self._dsn = self._topology.dsn
        self._pool = None
        self._hub = NotificationHub(settings.listener_queue_size)
        self._listen_conn: asyncpg.Connection | None = None
        self._listen_lock = anyio.Lock()
        self._listener_was_up = False
        self._listener_failures = 0  # consecutive failed reconnect attempts
        self._reconnect_failures = 0  # all of them, for statistics()
        self._next_attempt = 0.0  # monotonic time before which no reconnect is tried
        cap = self._settings.listener_reconnect_max_s
        self._reconnect_backoff = Backoff(min(_RECONNECT_BASE_S, cap), cap, jitter=0.5)
        self._reconnecting: anyio.Event | None = None  # set when the running loop ends
        self._listener_kick = anyio.Event()  # set by aclose(): stop any backoff wait
        self._last_ping = 0.0
        self._reconnects = 0
        self._q = Q  # the plain layout's queries; see _use_stream_layout

    def _map_error(self, exc: Exception) -> StorageError | None:
        return map_postgres_error(exc)

    async def open(self) -> None:
        """Create the pool. Cancelling it closes whatever was opened."""
        s = self._settings
        pooled = self._topology.pooled
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                connect=self._connect_mapped,
                min_size=min(s.pool_min_size, s.pool_max_size),
                max_size=s.pool_max_size,
                # A transaction pooler cannot keep named prepared statements: none there.
                statement_cache_size=0 if pooled else s.statement_cache_size,
                command_timeout=s.command_timeout_s,
                timeout=s.connect_timeout_s,
                init=_init_connection if pooled is not None else _init_checked_connection,
                reset=_keep_session,
            )
            await self._use_stream_layout()
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception) and (mapped := map_postgres_error(exc)) is not None:
                raise mapped from exc
            raise

    async def _connect_mapped(self, dsn: str | None = None, **kwargs: Any) -> asyncpg.Connection:
        # The pool's connect hook: called with the pool's DSN and options, for every new
        # pool connection (at open and later, when the pool grows or replaces one).
        return await _connect(dsn or self._dsn, **kwargs)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener_kick.set()
        self._hub.close("postgres storage is closed")
        # Completed even if our caller is cancelled (by anyio or asyncio): connections must
        # be returned and closed.
        await complete(self._close_connections())

    async def _close_connections(self) -> None:
        if self._listen_conn is not None:
            await self._listen_conn.close(timeout=5)
            self._listen_conn = None
        if self._pool is not None:
            await self._pool.close()

    def statistics(self) -> StorageStatistics:
        pool = self._pool
        return dataclasses.replace(
            super().statistics(),
            notifications_received=self._hub.received,
            notifications_dropped=self._hub.dropped,
            listener_reconnects=self._reconnects,
            listener_reconnect_failures=self._reconnect_failures,
            pool=None
            if pool is None
            else (pool.get_size(), pool.get_idle_size(), pool.get_max_size()),
        )

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
                    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
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
        # One round trip when migrated. (A CASE on to_regclass() cannot guard the subquery:
        # the table name is resolved when the statement is parsed, so it failed with
        # "relation does not exist" on an empty database.)
        try:
            version = await self.pool.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            )
        except asyncpg.UndefinedTableError:
            return 0
        return int(version)

    @operation
    async def ping(self) -> None:
        await self._fetch("ping")

    # -- chat ------------------------------------------------------------------

    async def _sql_append_messages(
        self,
        session_id: str,
        rows: list[tuple[str, bytes]],
        outbox: list[tuple[str, str, bytes, int]],
        lease_token: int | None,
        messages: Sequence[NewMessage],
    ) -> list[ChatMessage] | None:
        args = (session_id, [r[0] for r in rows], [r[1] for r in rows], lease_token)
        if outbox:
            async with self._transaction() as conn:
                self._count("append_messages")
                result = await conn.fetch(Q["append_messages"], *args)
                if result:
                    self._count("enqueue_outbox")
                    await conn.execute(Q["enqueue_outbox"], *_outbox_columns(outbox), None)
        else:
            result = await self._fetch("append_messages", *args)
        if not result:
            return None
        return sorted((ChatMessage.from_row(r) for r in result), key=lambda m: m.seq)

    async def _sql_load_messages(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[ChatMessage]:
        rows = await self._fetch("load_messages", session_id, after_seq, limit)
        return [ChatMessage.from_row(r) for r in rows]

    async def _sql_delete_session(self, session_id: str) -> bool:
        async with self._transaction() as conn:
            self._count("_lock_chat_session")
            await conn.execute(Q["_lock_chat_session"], session_id)
            self._count("delete_session")
            rows = await conn.fetch(Q["delete_session"], session_id)
        return bool(rows[0][0])

    # -- stream events ---------------------------------------------------------

    async def _sql_append_stream_events(
        self,
        rows: list[tuple[str, int, int, str, bytes]],
        notify: tuple[str, Sequence[str]] | None = None,
    ) -> StreamAppend:
        columns = [list(col) for col in zip(*rows, strict=True)]
        # The notification rides in the statement ($6, $7): sent only if nothing is refused.
        channel, payloads = notify if notify is not None else ("", ())
        row = (await self._fetch("append_stream_events", *columns, channel, payloads))[0]
        ids, epochs = row["refused_ids"], row["refused_epochs"]
        refused = frozenset(zip(ids, epochs, strict=True)) if ids else frozenset()
        return StreamAppend(int(row["stored"]), refused)

    async def _sql_load_stream_events(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[StreamEvent]:
        rows = await self._fetch("load_stream_events", session_id, after_seq, limit)
        return [StreamEvent.from_row(r) for r in rows]

    async def _sql_last_stream_seq(self, session_id: str) -> int:
        return int((await self._fetch("last_stream_seq", session_id))[0][0])

    async def _sql_purge_stream_events(self, age_s: float) -> int:
        return _rowcount(await self._execute("purge_stream_events", age_s))

    async def _sql_purge_stream_events_batch(self, age_s: float, limit: int) -> int:
        return _rowcount(await self._execute("purge_stream_events_batch", age_s, limit))

    # -- session leases --------------------------------------------------------

    async def _sql_acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> Lease | None:
        rows = await self._fetch("acquire_lease", session_id, holder, ttl_s)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease | None:
        rows = await self._fetch("renew_lease", session_id, token, ttl_s)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_release_lease(self, session_id: str, token: int) -> bool:
        return _rowcount(await self._execute("release_lease", session_id, token)) == 1

    async def _sql_get_lease(self, session_id: str) -> Lease | None:
        rows = await self._fetch("get_lease", session_id)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_expire_leases(self, age_s: float) -> int:
        return _rowcount(await self._execute("expire_leases", age_s))

    async def _sql_ensure_lease_slots(self, pool: str, slots: int) -> None:
        await self._execute("ensure_lease_slots", pool, slots)

    async def _sql_acquire_lease_slot(
        self, session_id: str, holder: str, ttl_s: float, pool: str | None, slots: int
    ) -> LeaseAttempt:
        row = (
            await self._fetch(
                "acquire_lease_slot",
                session_id,
                holder,
                ttl_s,
                pool,
                None if pool is None else slots,
            )
        )[0]
        lease = None if row["token"] is None else Lease.from_row(row)
        return LeaseAttempt(lease, bool(row["slot_ok"]))

    async def _sql_renew_lease_slot(
        self, session_id: str, token: int, ttl_s: float, pool: str | None
    ) -> Lease | None:
        rows = await self._fetch("renew_lease_slot", session_id, token, ttl_s, pool)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_release_lease_slot(
        self, session_id: str, token: int, channel: str, pool: str | None
    ) -> bool:
        rows = await self._fetch("release_lease_slot", session_id, token, channel, pool)
        return bool(rows[0]["released"])

    async def _sql_count_leases(self) -> int:
        return int((await self._fetch("count_leases"))[0][0])

    # -- webhook journal --------------------------------------------------------

    async def _sql_journal_webhook_events(
        self, endpoint: str, owner: str, bodies: list[str]
    ) -> list[int]:
        rows = await self._fetch("journal_webhook_events", endpoint, owner, bodies)
        return [r[0] for r in rows]

    async def _sql_delete_webhook_events(self, ids: list[int]) -> int:
        return _rowcount(await self._execute("delete_webhook_events", ids))

    async def _sql_claim_webhook_orphans(
        self, endpoints: list[str], owner: str, age_s: float, limit: int
    ) -> list[JournaledEvent]:
        rows = await self._fetch("claim_webhook_orphans", endpoints, owner, age_s, limit)
        found = [JournaledEvent(r["id"], r["endpoint"], r["body"].encode()) for r in rows]
        return sorted(found, key=lambda e: e.id)

    async def _sql_record_webhook_attempts(
        self, rows: list[tuple[str, str, int | None, datetime, int | None, str, bool]]
    ) -> int:
        columns = [list(c) for c in zip(*rows, strict=True)]
        await self._execute("record_webhook_attempts", *columns)
        return len(rows)

    async def _sql_list_webhook_attempts(
        self, endpoint: str | None, webhook_id: str | None, failed: bool, limit: int
    ) -> list[WebhookAttempt]:
        rows = await self._fetch("list_webhook_attempts", endpoint, failed, webhook_id, limit)
        return [WebhookAttempt.from_row(r) for r in rows]

    async def _sql_purge_webhook_attempts(self, age_s: float) -> int:
        return _rowcount(await self._execute("purge_webhook_attempts", age_s))

    # -- cancellation ----------------------------------------------------------

    async def _sql_request_cancel(
        self, session_id: str, reason: str, channel: str | None
    ) -> CancelState:
        chars = self.CANCEL_NOTIFY_REASON_CHARS
        rows = await self._fetch("request_cancel", session_id, reason, channel, chars)
        return CancelState.from_row(rows[0])

    async def _sql_get_cancel(self, session_id: str) -> CancelState | None:
        rows = await self._fetch("get_cancel", session_id)
        return CancelState.from_row(rows[0]) if rows else None

    async def _sql_clear_cancel(self, session_id: str) -> bool:
        return _rowcount(await self._execute("clear_cancel", session_id)) > 0

    # -- notifications ---------------------------------------------------------

    async def _sql_notify(self, channel: str, payload: str) -> None:
        await self._fetch("notify", channel, payload)

    # -- login attempts (auth limiter, shared by a fleet) -----------------------

    async def _sql_reserve_login_attempt(self, scope: str, key: str, p: LoginPolicy) -> LoginSlot:
        row = (await self._fetch("reserve_login_attempt", scope, key, p.limit, p.window_s))[0]
        return LoginSlot.from_row(row, p.window_s)

    async def _sql_finish_login_attempt(
        self, scope: str, key: str, start: float, outcome: str, p: LoginPolicy
    ) -> bool:
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

    async def _sql_purge_login_attempts(self, age_s: float) -> int:
        return _rowcount(await self._execute("purge_login_attempts", age_s))

    # -- periodic ticks (the SQL is in storage._ticks) ---------------------------

    async def _sql_record_periodic_tick(
        self, schedule: str, tick_at: datetime, row: Any, notify: str | None
    ) -> Task | None:
        return await _ticks.postgres_record_tick(self, schedule, tick_at, row, notify)

    async def _sql_last_periodic_ticks(self, schedules: list[str]) -> dict[str, datetime]:
        return await _ticks.postgres_last_ticks(self, schedules)

    async def _sql_purge_periodic_ticks(self, retention_s: float) -> int:
        return await _ticks.postgres_purge_ticks(self, retention_s)


def _outbox_columns(rows: list[tuple[str, str, bytes, int]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]
