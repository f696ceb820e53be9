"""The Postgres driver (asyncpg): the production backend and the coordination layer.

It owns an asyncpg pool sized from ``StorageSettings``, the named queries of
``sql/postgres/queries.sql`` (one round trip per contract call, batches through
``unnest``), and one dedicated LISTEN connection per backend, outside the pool, that
reconnects as soon as it is lost (short capped backoff while the server is down),
re-LISTENs and reports the gap to subscribers. asyncpg errors are
mapped to ``storage.errors`` in ``_map_error`` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import asyncpg
import orjson

from asyncstore.storage import _partitions, _topology
from asyncstore.storage import _validate as v
from asyncstore.storage._backoff import Backoff
from asyncstore.storage._notify import NotificationHub, Subscription
from asyncstore.storage._schema import mask_url
from asyncstore.storage._shield import complete
from asyncstore.storage._sql import load_migrations, load_queries
from asyncstore.storage.base import (
    TASKS,
    AsyncStorageBackend,
    AuditEntry,
    CancelState,
    ChatMessage,
    FailureColumns,
    JobKind,
    JournaledEvent,
    Leadership,
    Lease,
    LeaseAttempt,
    LoginPolicy,
    LoginSlot,
    NewMessage,
    NotificationStream,
    QueueDepth,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    WebhookAttempt,
    operation,
    render_job_queries,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    MigrationError,
    QueryError,
    StorageClosed,
    StorageError,
    StorageUnavailable,
    is_retryable,
)

Q = render_job_queries(load_queries("postgres"))
_MIGRATION_LOCK = 0x6173796E63  # "async": the advisory lock key that serializes migrations
_PING_EVERY_S = 10.0
_RECONNECT_BASE_S = 0.05  # first LISTEN reconnect backoff step (capped by the settings)


def _encode_json(data: bytes) -> bytes:
    # Payloads arrive already encoded by storage._validate; json's binary format is the
    # text itself, kept as written (migration 0008: exact round-trip of every number).
    return data


def _decode_json(data: bytes) -> Any:
    return orjson.loads(data)


def _encode_jsonb(data: bytes) -> bytes:
    # jsonb's binary format is a version byte followed by the text. Only a schema older
    # than 0008 (payload columns still jsonb) reads through this codec.
    return b"\x01" + data


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "json",
        encoder=_encode_json,
        decoder=_decode_json,
        schema="pg_catalog",
        format="binary",
    )
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


# The partitioned layout's queries: each _p_<name> runs in place of <name>.
_PARTITIONED_QUERIES: Mapping[str, str] = {
    **Q,
    **{name[len("_p_") :]: sql for name, sql in Q.items() if name.startswith("_p_")},
}
_PARTITION_LOCK = 0x6173797063  # advisory lock key of partition creation and drops
# A rotation step waits at most this long for its table locks (and so holds up the
# statements queued behind it at most that long); it is retried next round.
_LOCK_TIMEOUT = "5s"


class _Kept(Exception):
    """A partition drop found a live event: roll its transaction back."""


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


# Errors after which a connection cannot be trusted with another call.
_BROKEN_CONNECTION = (asyncpg.InternalClientError, asyncpg.InterfaceError, OSError, TimeoutError)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 12" or "DELETE 3".
    return int(status.rsplit(" ", 1)[-1])


def _login_target(dsn: str) -> str:
    """``user 'u' on database 'd' at host:port`` as far as the DSN says (for messages)."""
    try:
        parts = urlsplit(dsn)
        user = unquote(parts.username) if parts.username else None
        database = unquote(parts.path.lstrip("/")) or None
        host = parts.netloc.rpartition("@")[2] or None
    except ValueError:
        return f"with {mask_url(dsn)}"
    return (
        f"as user {user or '(default: $PGUSER or the OS user)'!r} "
        f"to database {database or '(default: the user name)'!r} at {host or 'localhost'}"
    )


# SQLSTATEs that refuse the session itself: the login (class 28) or the database (3D000).
_LOGIN_REFUSED = ("28", "3D000")


def map_connect_error(exc: Exception, dsn: str) -> StorageError | None:
    """Map what ``asyncpg.connect`` raised, naming the user and database but no password.

    A malformed DSN (asyncpg raises ``ValueError``, ``OverflowError`` or its
    ``ClientConfigurationError``) is a ``ConfigurationError``; a refused login or a missing
    database is ``StorageUnavailable`` (the database cannot be used from here, and an
    operator may fix it while we retry); anything else is mapped as any other call's error.
    """
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError | OverflowError):
        return ConfigurationError(f"invalid postgres URL {mask_url(dsn)}: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state.startswith(_LOGIN_REFUSED):
            return StorageUnavailable(
                f"postgres refused the connection {_login_target(dsn)}: {exc} (SQLSTATE {state})"
            )
    return map_postgres_error(exc)


async def _connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` with its failures mapped by ``map_connect_error``."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except Exception as exc:
        if (mapped := map_connect_error(exc, dsn)) is not None:
            raise mapped from exc
        raise


def map_postgres_error(exc: Exception) -> StorageError | None:
    """Map an asyncpg or network exception to the library's tree, keyed on SQLSTATE."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        message = f"postgres {state}: {exc}"
        if state.startswith("23"):
            return ConflictError(message)
        if state.startswith("22"):
            return InvalidInput(message)
        if state.startswith(("08", "57P", "53", *_LOGIN_REFUSED)):
            return StorageUnavailable(message)
        return QueryError(message)
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return ConfigurationError(f"postgres client configuration: {exc}")
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
        cap = self._settings.listener_reconnect_max_s
        self._reconnect_backoff = Backoff(min(_RECONNECT_BASE_S, cap), cap, jitter=0.5)
        self._reconnecting: anyio.Event | None = None  # set when the running loop ends
        self._listener_kick = anyio.Event()  # set by aclose(): stop any backoff wait
        self._last_ping = 0.0
        self._reconnects = 0
        self._q: Mapping[str, str] = Q  # the plain layout's queries; see _use_stream_layout

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

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction on a pooled connection, all or nothing under any cancellation.

        Shielded from anyio cancellation, as the SQLite driver's writes are: a cancel scope
        would otherwise cancel the ROLLBACK of asyncpg's transaction block too and leave
        it to the pool's reset. So a cancelled caller's transaction completes (or rolls
        back on error) and the cancellation takes effect right after. A plain asyncio
        cancellation lands in the body and rolls the transaction back. A failed COMMIT
        has already ended the transaction on the server.
        """
        async with self.pool.acquire() as conn:
            with anyio.CancelScope(shield=True):
                async with conn.transaction():
                    yield conn

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        self._count(name)
        return await self.pool.fetch(self._q[name], *args)  # type: ignore[no-any-return]

    async def _execute(self, name: str, *args: Any) -> str:
        self._count(name)
        return await self.pool.execute(self._q[name], *args)  # type: ignore[no-any-return]

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
        self, rows: list[tuple[str, int, int, str, bytes]]
    ) -> StreamAppend:
        columns = [list(col) for col in zip(*rows, strict=True)]
        row = (await self._fetch("append_stream_events", *columns))[0]
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

    # -- stream partitions (storage/_partitions.py) ----------------------------

    async def _use_stream_layout(self) -> None:
        """Run the stream queries of the layout the database has: on a partitioned
        ``stream_events``, its ``_p_*`` variants in place of the plain ones."""
        layout = await self.pool.fetchval(Q["_stream_layout"])
        self._q = _PARTITIONED_QUERIES if layout == "p" else Q

    async def _sql_list_stream_partitions(self) -> list[StreamPartition]:
        rows = await self._fetch("_stream_partitions")
        found = (_partitions.parse_partition(r["name"]) for r in rows)
        return _partitions.sort_partitions([p for p in found if p is not None])

    async def _sql_partition_stream_events(self) -> bool:
        try:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if await conn.fetchval(Q["_stream_layout"]) == "p":
                    return False
                self._count("_partition_stream_events")
                await conn.execute(Q["_partition_stream_events"])
            return True
        finally:
            # Whether it committed or not (a cancellation may land after the commit):
            # plans cached on pool connections may be stale, and the layout is re-read.
            await complete(self._refresh_stream_layout())

    async def _refresh_stream_layout(self) -> None:
        await self.pool.expire_connections()
        await self._use_stream_layout()

    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int:
        partitions = await self._sql_list_stream_partitions()
        if not partitions:
            return 0
        waiting = [r["at"] for r in await self._fetch("_default_partition_slots", width_s)]
        now = (await self.pool.fetchval("SELECT clock_timestamp()")).timestamp()
        taken = [
            (int(p.lower.timestamp()), int(p.upper.timestamp()))
            for p in partitions
            if p.lower is not None and p.upper is not None
        ]
        created = 0
        for lower, upper in _partitions.missing_ranges(
            taken, waiting, now, now + ahead_s, width_s
        ):
            created += await self._create_stream_partition(lower, upper)
        return created

    async def _create_stream_partition(self, lower: int, upper: int) -> int:
        """One partition in one transaction: created detached, filled with the default
        partition's rows of its range, then attached (which finds none left there). It
        holds the default partition exclusively throughout: appends wait for it (a few
        milliseconds while the default partition is empty, as it is when the leader keeps
        partitions ahead), at most ``_LOCK_TIMEOUT`` for its lock."""
        name = _partitions.partition_name(lower, upper)
        bounds = {"lower": _iso(lower), "upper": _iso(upper)}
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                return 0  # another rotation made it
            self._count("_create_stream_partition")
            await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            # ATTACH needs the default partition exclusively: taken first, so no append
            # adds a row of this range there between the move and the attach, and the
            # lock order (default, then the parent) cannot deadlock with an append's.
            default = _partitions.DEFAULT_PARTITION
            await conn.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
            await conn.execute(f"CREATE TABLE {name} (LIKE stream_events INCLUDING DEFAULTS)")
            await conn.execute(Q["_move_into_partition"].format(name=name, **bounds))
            await conn.execute(
                f"ALTER TABLE stream_events ATTACH PARTITION {name} "
                f"FOR VALUES FROM ('{bounds['lower']}') TO ('{bounds['upper']}')"
            )
        return 1

    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None:
        partition = _partitions.parse_partition(name)
        if partition is None or partition.lower is None or partition.upper is None:
            return None
        try:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
                ended = await conn.fetchval(
                    "SELECT to_regclass($1) IS NOT NULL"
                    " AND $2 <= clock_timestamp() - make_interval(secs => $3)",
                    name,
                    partition.upper,
                    age_s,
                )
                if not ended:
                    return None
                self._count("_drop_stream_partition")
                rows = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
                # Anchors first (row locks, in the appends' order), then the table locks
                # in the appends' order too: the parent, then (by DROP) the partition and
                # the default one, whose implicit range grows.
                await conn.execute(Q["_delete_partition_anchors"], partition.lower, partition.upper)
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                await conn.execute("LOCK TABLE ONLY stream_events IN ACCESS EXCLUSIVE MODE")
                if await conn.fetchval(Q["_partition_is_live"].format(name=name), age_s):
                    raise _Kept  # a session came back: roll the anchors back, keep it all
                await conn.execute(f"DROP TABLE {name}")
        except _Kept:
            return None
        return rows

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

    # -- leased jobs (agent tasks, outbox) ---------------------------------------

    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        send = rows
        if kind is TASKS:
            # Same key twice in one call: send it once (ON CONFLICT cannot touch a row twice).
            first_of_key: set[tuple[str, str]] = set()
            send = []
            for row in rows:
                if row[4] is not None:
                    if (row[0], row[4]) in first_of_key:
                        continue
                    first_of_key.add((row[0], row[4]))
                send.append(row)
        columns = [list(c) for c in zip(*send, strict=True)]
        result = await self._fetch(kind.statement("enqueue"), *columns, notify)
        if result and result[0]["notified"]:
            self._count("notify")  # sent by the enqueue statement itself, on its commit
        records = [kind.record(r) for r in result]
        if kind is TASKS:
            return v.match_enqueued(rows, records)
        return sorted(records, key=lambda m: m.id)

    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease_s: float,
        queues: list[str] | None,
    ) -> list[Any]:
        rows = await self._fetch(kind.statement("claim"), worker_id, limit, queues, lease_s)
        return [kind.record(r) for r in rows]

    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]:
        return [r[0] for r in await self._fetch(kind.statement("heartbeat"), ids, tokens, lease_s)]

    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("complete"), ids, tokens))

    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]:
        rows = await self._fetch(kind.statement("fail"), *failures)
        return {r[0]: r[1] for r in rows}

    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("release"), ids, tokens))

    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]:
        ids, tokens, errors, _ = failures  # retry_at does not apply
        rows = await self._fetch(kind.statement("dead_letter"), ids, tokens, errors)
        return sorted(r[0] for r in rows)

    async def _sql_redrive_jobs(self, kind: JobKind[Any, Any, Any], ids: list[int]) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("redrive"), ids))

    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any:
        rows = await self._fetch(kind.statement("get"), job_id)
        return kind.record(rows[0]) if rows else None

    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int:
        return _rowcount(await self._execute(kind.statement("purge"), age_s))

    async def _sql_next_task_due_s(self, queue: str) -> float | None:
        rows = await self._fetch("next_task_due", queue)
        due = rows[0]["due_s"] if rows else None
        return None if due is None else max(0.0, float(due))

    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        tasks = [QueueDepth.from_row(r) for r in await self._fetch("task_backlog")]
        return tasks, QueueDepth.from_row((await self._fetch("outbox_backlog"))[0])

    async def _sql_list_jobs(self, kind: JobKind[Any, Any, Any], status: str, limit: int) -> Any:
        rows = await self._fetch(kind.statement("list"), status, limit)
        return [kind.record(r) for r in rows]

    async def _sql_list_leases(self, limit: int) -> list[Lease]:
        return [Lease.from_row(r) for r in await self._fetch("list_leases", limit)]

    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry:
        rows = await self._fetch("record_audit", actor, action, target, outcome, detail)
        return AuditEntry.from_row(rows[0])

    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self._fetch("list_audit", limit)]

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

    def _sql_listen(self, channels: list[str]) -> AbstractAsyncContextManager[NotificationStream]:
        return self._listen(channels)

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
        conn = await _connect(dsn, timeout=self._settings.connect_timeout_s, statement_cache_size=0)
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
                    # _ensure_listener's connect raises mapped errors; the rest are raw. A
                    # ConfigurationError (LISTEN through a pooler) is raised, not retried.
                    if isinstance(exc, StorageError) and not is_retryable(exc):
                        raise
                    if not isinstance(exc, StorageError) and map_postgres_error(exc) is None:
                        raise
                    self._listener_failures += 1
                    self._reconnect_failures += 1
                    # Equal jitter: processes restarted together spread their attempts.
                    delay = self._reconnect_backoff.delay(self._listener_failures)
                    self._next_attempt = time.monotonic() + delay
        finally:
            self._reconnecting = None
            done.set()

    # -- login attempts (auth limiter, shared by a fleet) -----------------------

    async def _sql_reserve_login_attempt(
        self, scope: str, key: str, p: LoginPolicy
    ) -> LoginSlot:
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

    # -- maintenance -----------------------------------------------------------

    def _sql_leadership(self, name: str, ttl_s: float) -> AbstractAsyncContextManager[Leadership]:
        return self._leadership(name)  # ttl_s does not apply: the lock ends with its session

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
        except BaseException as exc:
            # Trouble, or a plain asyncio cancellation the shield above does not stop:
            # ending the session gives the lock up at once.
            self._drop()
            trouble = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
            if not isinstance(exc, trouble):
                raise


def _outbox_columns(rows: list[tuple[str, str, bytes, int]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]
