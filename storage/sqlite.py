"""The SQLite driver (aiosqlite): the embedded default for one process.

The database runs in WAL mode with a busy timeout. One writer connection serializes every
write behind an in-process lock and a ``BEGIN IMMEDIATE`` transaction (so two processes on
one file also stay correct); reads go to a small set of separate reader connections.
Notifications are delivered in process to every backend open on the same file. sqlite3
errors are mapped to ``storage.errors`` in ``map_sqlite_error`` and nowhere else.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
import orjson

from asyncstore.storage import _validate as v
from asyncstore.storage._backoff import Backoff
from asyncstore.storage._notify import NotificationHub
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
    OutboxMessage,
    QueueDepth,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    StreamRow,
    Task,
    WebhookAttempt,
    operation,
    render_job_queries,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    ConflictError,
    MigrationError,
    QueryError,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)

Q = render_job_queries(load_queries("sqlite"))
log = logging.getLogger("asyncstore.storage")
# Errors creating or opening a path that retrying cannot fix: the URL names a bad path.
_BAD_PATH_ERRNOS = frozenset(
    {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
     errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP}
)  # fmt: skip
_T = TypeVar("_T")
_TIME_COLUMNS = frozenset({"created_at", "updated_at", "run_after", "expires_at", "requested_at"})
_JSON_COLUMNS = frozenset({"payload", "content"})
# "database is locked" while switching to WAL: 5 ms doubling to 200 ms, equal jitter.
_BUSY_BACKOFF = Backoff(0.005, 0.2, jitter=0.5)

# Backends open on the same database file, by resolved path: in-process NOTIFY fan-out.
_HUBS: dict[str, set[NotificationHub]] = {}


def _row_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    # Runs in aiosqlite's thread, so JSON decoding and time conversion stay off the loop.
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cursor.description, row, strict=True):
        if value is not None and name in _TIME_COLUMNS:
            value = datetime.fromtimestamp(value, UTC)
        elif name in _JSON_COLUMNS:
            value = orjson.loads(value)
        out[name] = value
    return out


def _ts(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def map_sqlite_error(exc: Exception) -> StorageError | None:
    """Map a sqlite3 exception to the library's tree."""
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "locked" in text or "busy" in text or "unable to open" in text or "disk i/o" in text:
            return StorageUnavailable(f"sqlite: {exc}")
        return QueryError(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error | ValueError) and (
        "closed" in str(exc).lower() or "no active connection" in str(exc)  # aiosqlite's words
    ):
        return StorageUnavailable(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error):
        return QueryError(f"sqlite: {exc}")
    return None


def _why_unopenable(path: Path) -> str:
    """A hint for SQLite's bare "unable to open database file", when the cause is visible."""
    if path.is_dir():
        return " (the path is a directory)"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f" (the directory {str(path.parent)!r} is not writable)"
    return " (the directory refuses new files, or too many files are open)"


class SqliteBackend(AsyncStorageBackend):
    """``AsyncStorageBackend`` on one SQLite file. Build with ``storage.open_storage``."""

    dialect = "sqlite"

    def __init__(self, settings: StorageSettings) -> None:
        super().__init__()
        self._settings = settings
        url = settings.url.get_secret_value()
        if not url.startswith("sqlite://"):
            raise ConfigurationError(
                f"invalid sqlite URL {url!r}: use sqlite:///relative/path.db, "
                "sqlite:////absolute/path.db or sqlite:///:memory:"
            )
        path = url.removeprefix("sqlite://").removeprefix("/")
        if "\x00" in path:
            raise ConfigurationError(f"invalid sqlite URL {url!r}: the path contains a NUL byte")
        self._memory = path in ("", ":memory:")
        self._path = ":memory:" if self._memory else path
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._free_readers: list[aiosqlite.Connection] = []
        self._reader_waiters: collections.deque[anyio.Event] = collections.deque()
        self._write_lock = anyio.Lock()
        self._hub = NotificationHub(settings.listener_queue_size)
        self._hub_key = f"memory:{id(self)}" if self._memory else str(Path(path).resolve())

    def _map_error(self, exc: Exception) -> StorageError | None:
        return map_sqlite_error(exc)

    async def _connect(self) -> aiosqlite.Connection:
        pending = aiosqlite.connect(
            self._path, isolation_level=None, timeout=self._settings.sqlite_busy_timeout_s
        )
        try:
            conn = await pending
        except BaseException:
            # A failed connect stops its worker thread asynchronously; wait for it, shielded,
            # so it does not outlive the event loop (it then prints "Event loop is closed").
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(thread.join, 5.0)
            raise
        try:
            conn.row_factory = _row_factory  # type: ignore[assignment]
            busy_ms = int(self._settings.sqlite_busy_timeout_s * 1000)
            await conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            await self._enable_wal(conn)
            await conn.execute(f"PRAGMA synchronous = {self._settings.sqlite_synchronous}")
            await conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            # Shielded: an unclosed connection keeps its worker thread, and with it the
            # whole process, alive (two processes opening a fresh file hung this way).
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def _enable_wal(self, conn: aiosqlite.Connection) -> None:
        """Switch to WAL, retrying "database is locked" within the busy timeout.

        Changing the journal mode needs the file's exclusive lock, and SQLite may answer
        SQLITE_BUSY at once instead of calling the busy handler while another process
        opens or switches the same fresh file, so the wait is done here.
        """
        deadline = time.monotonic() + self._settings.sqlite_busy_timeout_s
        attempt = 0
        while True:
            try:
                await conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                attempt += 1
                delay = _BUSY_BACKOFF.delay(attempt)
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay)

    async def open(self) -> None:
        """Open the writer and the readers. Cancelling it closes whatever was opened."""
        try:
            if not self._memory:
                self._prepare_directory()
            self._writer = await self._connect()
            # An in-memory database exists only on its one connection: it reads there too.
            for _ in range(0 if self._memory else self._settings.sqlite_readers):
                self._readers.append(await self._connect())
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise StorageUnavailable(
                    f"sqlite: cannot open the database file {self._path!r}: {exc}"
                    f"{_why_unopenable(Path(self._path))}"
                ) from exc
            if isinstance(exc, Exception) and (mapped := map_sqlite_error(exc)) is not None:
                raise mapped from exc
            raise
        self._free_readers = list(self._readers)
        _HUBS.setdefault(self._hub_key, set()).add(self._hub)

    def _prepare_directory(self) -> None:
        """Create the database file's missing directories, saying so at INFO.

        A typo in the path would otherwise put the database somewhere unexpected without
        a word; refusing instead would break the common ``sqlite:///data/app.db`` start.
        A path that cannot be used raises an error naming the path and the cause.
        """
        parent = Path(self._path).parent
        try:
            if parent.is_dir():
                return
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            cause = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno in (errno.EEXIST, errno.ENOTDIR):
                blocker = next(
                    (p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()),
                    None,
                )
                if blocker is not None:
                    cause = f"{str(blocker)!r} is a file, not a directory"
            elif exc.filename:
                cause = f"{cause} ({exc.filename!r})"
            message = (
                f"sqlite: cannot create the directory {str(parent)!r} for the database "
                f"{self._path!r}: {cause}"
            )
            if exc.errno in _BAD_PATH_ERRNOS:
                raise ConfigurationError(message) from exc
            raise StorageUnavailable(message) from exc
        log.info(
            "created the directory %s for the sqlite database %s", parent.resolve(), self._path
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close("sqlite storage is closed")
        hubs = _HUBS.get(self._hub_key)
        if hubs is not None:
            hubs.discard(self._hub)
            if not hubs:
                del _HUBS[self._hub_key]
        # Completed even if our caller is cancelled (by anyio or asyncio): a connection
        # left open keeps its thread, and with it the process, alive.
        await complete(self._close_connections())
        self._readers.clear()
        self._writer = None

    async def _close_connections(self) -> None:
        async with self._write_lock:
            for conn in [*self._readers, self._writer]:
                if conn is not None:
                    await conn.close()

    def statistics(self) -> StorageStatistics:
        return dataclasses.replace(
            super().statistics(),
            notifications_received=self._hub.received,
            notifications_dropped=self._hub.dropped,
        )

    # -- connection plumbing ---------------------------------------------------

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StorageUnavailable("sqlite storage is not open")
        return self._writer

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._memory:
            async with self._write_lock:
                yield self._conn
            return
        conn = await self._take_reader()
        try:
            yield conn
        finally:
            # No await here: a wakeup that a cancellation could skip would leave a waiter
            # asleep until some unrelated read returned a reader. A statement the caller
            # abandoned still runs first (each connection runs its statements in order).
            self._free_readers.append(conn)
            self._wake_reader_waiter()

    async def _take_reader(self) -> aiosqlite.Connection:
        """A free reader connection, waiting in line while all of them are in use."""
        while not self._free_readers:
            woken = anyio.Event()
            self._reader_waiters.append(woken)
            try:
                await woken.wait()
            except BaseException:
                if woken.is_set():
                    # Woken and cancelled before taking the reader: pass the wakeup on.
                    self._wake_reader_waiter()
                else:
                    self._reader_waiters.remove(woken)
                raise
        return self._free_readers.pop()

    def _wake_reader_waiter(self) -> None:
        if self._reader_waiters and self._free_readers:
            self._reader_waiters.popleft().set()

    async def _read(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._count(name)
        async with self._reader() as conn:
            return list(await conn.execute_fetchall(Q[name], params))  # type: ignore[arg-type]

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        """One ``BEGIN IMMEDIATE`` write transaction on the writer connection, all or nothing.

        Shielded from anyio cancellation: aiosqlite runs each statement in a thread that a
        cancelled await cannot stop, so a cancelled caller's write completes (or rolls back
        on error) and the cancellation takes effect right after. A plain asyncio
        cancellation (``wait_for``, ``Task.cancel()``) cannot be shielded that way: it
        rolls the transaction back instead. A failed COMMIT rolls back too. Either way the
        writer leaves this block outside any transaction. Notifications queued with
        ``notify_on_commit`` are delivered right after a successful COMMIT, cancelled or not.
        """
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                tx = _Tx(self, self._conn)
                async with _immediate(tx._conn, on_commit=tx._deliver):
                    yield tx

    async def _write(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        async with self._transaction() as tx:
            return await tx.fetch(name, params)

    async def _write_count(self, name: str, params: Mapping[str, Any]) -> int:
        async with self._transaction() as tx:
            return await tx.execute(name, params)

    # -- lifecycle -------------------------------------------------------------

    @operation
    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._write_lock:
            conn = self._conn
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            for migration in load_migrations(self.dialect):
                # Shielded for the reason given in _transaction.
                with anyio.CancelScope(shield=True):
                    try:
                        async with _immediate(conn):
                            rows = await conn.execute_fetchall(
                                "SELECT 1 FROM schema_migrations WHERE version = ?",
                                (migration.version,),
                            )
                            if not rows:
                                for statement in migration.statements():
                                    await conn.execute(statement)
                                await conn.execute(
                                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                    (migration.version, migration.name, time.time()),
                                )
                    except sqlite3.Error as exc:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                        ) from exc
                if not rows:
                    applied.append(migration.version)
        return applied

    @operation
    async def schema_version(self) -> int:
        async with self._reader() as conn:
            rows = await conn.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            )
            if not rows:
                return 0
            rows = await conn.execute_fetchall(
                "SELECT coalesce(max(version), 0) AS v FROM schema_migrations"
            )
            return int(next(iter(rows))["v"])

    @operation
    async def ping(self) -> None:
        await self._read("ping", {})

    # -- chat ------------------------------------------------------------------

    async def _sql_append_messages(
        self,
        session_id: str,
        rows: list[tuple[str, bytes]],
        outbox: list[tuple[str, str, bytes, int]],
        lease_token: int | None,
        messages: Sequence[NewMessage],
    ) -> list[ChatMessage] | None:
        async with self._transaction() as tx:
            now = time.time()
            if lease_token is not None:
                fence = {"session_id": session_id, "token": lease_token, "now": now}
                if not await tx.fetch("_fence", fence):
                    return None
            params = {"session_id": session_id, "n": len(rows), "now": now}
            last = (await tx.fetch("append_messages", params))[0]["last_seq"]
            first = last - len(rows) + 1
            values = [
                (session_id, first + i, role, content.decode(), now)
                for i, (role, content) in enumerate(rows)
            ]
            await tx.execute_many("_insert_message", values)
            if outbox:
                await self._insert_outbox(tx, outbox, now)
        created = datetime.fromtimestamp(now, UTC)
        return [
            ChatMessage(session_id, first + i, m.role, m.content, created)
            for i, m in enumerate(messages)
        ]

    async def _sql_load_messages(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[ChatMessage]:
        params = {"session_id": session_id, "after": after_seq, "limit": limit}
        return [ChatMessage.from_row(r) for r in await self._read("load_messages", params)]

    async def _sql_delete_session(self, session_id: str) -> bool:
        params = {"session_id": session_id}
        removed = 0
        async with self._transaction() as tx:
            for name in (
                "delete_session",
                "_delete_chat_session",
                "_delete_stream_events",
                "_delete_cancel",
                "_delete_lease",
            ):
                removed += await tx.execute(name, params)
        return removed > 0

    # -- stream events ---------------------------------------------------------

    async def _sql_append_stream_events(self, rows: list[StreamRow]) -> StreamAppend:
        now = time.time()
        ids = orjson.dumps(sorted({row[0] for row in rows})).decode()
        fence_sql, insert_sql = Q["_stream_fence"], Q["append_stream_events"]

        def append(conn: sqlite3.Connection) -> StreamAppend:
            # The whole write transaction in one call on the writer's thread: one hand-off
            # instead of five (BEGIN, fence, insert, cursor close, COMMIT), each of which
            # waits for a busy event loop to come round. The fence is decided for every
            # (session, epoch) against the state before this batch, in its transaction, as
            # the Postgres statement does.
            conn.execute("BEGIN IMMEDIATE")
            try:
                fence = {
                    r["session_id"]: (r["token"], r["head_epoch"])
                    for r in conn.execute(fence_sql, {"ids": ids}).fetchall()
                }
                refused = frozenset(
                    (sid, epoch)
                    for sid, epoch in {(row[0], row[2]) for row in rows}
                    if not _fence_accepts(fence[sid], epoch)
                )
                values = [
                    (sid, seq, epoch, kind, data.decode(), now)
                    for sid, seq, epoch, kind, data in rows
                    if (sid, epoch) not in refused
                ]
                stored = conn.executemany(insert_sql, values).rowcount if values else 0
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return StreamAppend(stored, refused)

        self._count("_stream_fence")
        self._count("append_stream_events")
        async with self._write_lock:
            # Shielded like _transaction: the thread runs the call to its end regardless.
            with anyio.CancelScope(shield=True):
                result = await _on_writer_thread(self._conn, append)
        return result

    async def _sql_load_stream_events(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[StreamEvent]:
        params = {"session_id": session_id, "after": after_seq, "limit": limit}
        return [StreamEvent.from_row(r) for r in await self._read("load_stream_events", params)]

    async def _sql_last_stream_seq(self, session_id: str) -> int:
        rows = await self._read("last_stream_seq", {"session_id": session_id})
        return int(next(iter(rows[0].values())))

    async def _sql_purge_stream_events(self, age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count("purge_stream_events", {"cutoff": cutoff})

    async def _sql_purge_stream_events_batch(self, age_s: float, limit: int) -> int:
        params = {"cutoff": time.time() - age_s, "limit": limit}
        return await self._write_count("purge_stream_events_batch", params)

    # -- stream partitions: none on SQLite (storage/_partitions.py) ------------

    async def _sql_list_stream_partitions(self) -> list[StreamPartition]:
        return []

    async def _sql_partition_stream_events(self) -> bool:
        raise ConfigurationError(
            "sqlite has no partitioned stream_events layout: it keeps the plain table, "
            "purged by batched DELETE (maintenance.purge_batch_size)"
        )

    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int:
        return 0

    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None:
        return None

    # -- session leases --------------------------------------------------------

    async def _sql_acquire_lease(self, session_id: str, holder: str, ttl: float) -> Lease | None:
        async with self._transaction() as tx:
            now = time.time()
            token = await tx.next_token("lease_tokens")
            rows = await tx.fetch(
                "acquire_lease",
                {
                    "session_id": session_id,
                    "holder": holder,
                    "token": token,
                    "expires_at": now + ttl,
                    "now": now,
                },
            )
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_renew_lease(self, session_id: str, token: int, ttl: float) -> Lease | None:
        now = time.time()
        rows = await self._write(
            "renew_lease",
            {
                "session_id": session_id,
                "token": token,
                "expires_at": now + ttl,
                "now": now,
            },
        )
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_release_lease(self, session_id: str, token: int) -> bool:
        params = {"session_id": session_id, "token": token, "now": time.time()}
        return await self._write_count("release_lease", params) == 1

    async def _sql_get_lease(self, session_id: str) -> Lease | None:
        params = {"session_id": session_id, "now": time.time()}
        rows = await self._read("get_lease", params)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_expire_leases(self, age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count("expire_leases", {"cutoff": cutoff})

    async def _sql_ensure_lease_slots(self, pool: str, slots: int) -> None:
        params = {"pool": pool, "count": slots}
        async with self._transaction() as tx:
            await tx.execute("_ensure_slot_pool", params)
            await tx.execute("ensure_lease_slots", params)

    async def _sql_acquire_lease_slot(
        self, session_id: str, holder: str, ttl: float, pool: str | None, slots: int
    ) -> LeaseAttempt:
        async with self._transaction() as tx:
            now = time.time()
            slot: int | None = None
            if pool is not None:
                free = await tx.fetch("_free_slot", {"pool": pool, "slots": slots, "now": now})
                if not free:
                    await tx.execute("_pool_waited_on", {"pool": pool})
                    return LeaseAttempt(None, False)
                slot = free[0]["slot"]
            # The token is allocated inside this statement (see migration 0003).
            params = {
                "session_id": session_id,
                "holder": holder,
                "expires_at": now + ttl,
                "now": now,
            }
            rows = await tx.fetch("acquire_lease_slot", params)
            if not rows:
                await tx.execute("_lease_contended", {"session_id": session_id, "now": now})
                return LeaseAttempt(None, True)
            if slot is not None:
                token = rows[0]["token"]
                bind = {"pool": pool, "slot": slot, "token": token, "expires_at": now + ttl}
                await tx.execute("_bind_slot", bind)
        return LeaseAttempt(Lease.from_row(rows[0]), True)

    async def _sql_renew_lease_slot(
        self, session_id: str, token: int, ttl: float, pool: str | None
    ) -> Lease | None:
        async with self._transaction() as tx:
            now = time.time()
            params = {"session_id": session_id, "token": token, "expires_at": now + ttl, "now": now}
            rows = await tx.fetch("renew_lease_slot", params)
            if rows and pool is not None:
                slot = {"pool": pool, "token": token, "expires_at": now + ttl}
                await tx.execute("_renew_slot", slot)
        return Lease.from_row(rows[0]) if rows else None

    async def _sql_release_lease_slot(
        self, session_id: str, token: int, name: str, pool: str | None
    ) -> bool:
        async with self._transaction() as tx:
            now = time.time()
            params = {"session_id": session_id, "token": token, "now": now}
            rows = await tx.fetch("release_lease_slot", params)
            # Delivered on commit, as Postgres delivers NOTIFY.
            if rows and rows[0]["contended"]:
                tx.notify_on_commit(name, f"s:{session_id}")
            if rows and pool is not None:
                slot = {"pool": pool, "token": token, "now": now}
                if await tx.fetch("_release_slot", slot):
                    for r in await tx.fetch("_pool_woken", slot):
                        tx.notify_on_commit(name, f"p:{r['pool']}")
        return bool(rows)

    async def _sql_count_leases(self) -> int:
        rows = await self._read("count_leases", {"now": time.time()})
        return int(rows[0]["n"])

    # -- leased jobs (agent tasks, outbox) ---------------------------------------

    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        now = time.time()
        async with self._transaction() as tx:
            if kind is TASKS:
                records: list[Any] = await self._insert_tasks(tx, rows, now)
            else:
                records = [
                    OutboxMessage.from_row(r) for r in await self._insert_outbox(tx, rows, now)
                ]
            waiting = [r.run_after for r in records if r.status == kind.waiting]
            if notify is not None and waiting:
                # Delivered in process on commit, as Postgres delivers the NOTIFY that its
                # enqueue statement sends: the same payload, the earliest due time.
                self._count("notify")
                tx.notify_on_commit(notify, f"{min(waiting).timestamp():.6f}")
        return records

    async def _insert_tasks(self, tx: _Tx, rows: list[v.PreparedTask], now: float) -> list[Task]:
        keys = sorted({(r[0], r[4]) for r in rows if r[4] is not None})
        existing: list[dict[str, Any]] = []
        if keys:
            existing = await tx.fetch("_existing_keyed_tasks", {"keys": _json(keys)})
        taken = {(e["queue"], e["idempotency_key"]) for e in existing}
        values = []
        for queue, payload, priority, run_after, key, max_attempts in rows:
            if key is not None:
                if (queue, key) in taken:
                    continue
                taken.add((queue, key))
            at = now if run_after is None else run_after.timestamp()
            values.append((queue, payload.decode(), priority, at, key, max_attempts, now, now))
        before = await tx.scalar("_max_task_id", {})
        await tx.execute_many("enqueue_tasks", values)
        new = await tx.fetch("_tasks_after", {"after": before})
        return v.match_enqueued(rows, [Task.from_row(r) for r in [*existing, *new]])

    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease: float,
        queues: list[str] | None,
    ) -> list[Any]:
        params: dict[str, Any] = {
            "worker_id": worker_id,
            "limit": limit,
            "queue": queues[0] if queues else None,  # a task claim names one queue
            "channels": None if queues is None else _json(queues),
        }
        async with self._transaction() as tx:
            now = time.time()
            token = await tx.next_token("claim_tokens")
            params.update(token=token, now=now, lease_until=now + lease)
            rows = await tx.fetch(kind.statement("claim"), params)
        jobs = [kind.record(r) for r in rows if r["status"] == kind.running]
        if kind is TASKS:
            return sorted(jobs, key=lambda t: (-t.priority, t.id))
        return sorted(jobs, key=lambda m: m.id)

    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]:
        name = kind.statement("heartbeat")
        return await self._claimed_update(name, ids, tokens, lease_until=lease_s)

    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return await self._claimed_update(kind.statement("complete"), ids, tokens)

    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]:
        rows = await self._failures(kind.statement("fail"), failures)
        return {r["id"]: r["status"] for r in rows}

    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return await self._claimed_update(kind.statement("release"), ids, tokens)

    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]:
        rows = await self._failures(kind.statement("dead_letter"), failures)
        return sorted(r["id"] for r in rows)

    async def _sql_redrive_jobs(self, kind: JobKind[Any, Any, Any], ids: list[int]) -> list[int]:
        params = {"ids": _json(ids), "now": time.time()}
        return sorted(r["id"] for r in await self._write(kind.statement("redrive"), params))

    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any:
        rows = await self._read(kind.statement("get"), {"id": job_id})
        return kind.record(rows[0]) if rows else None

    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count(kind.statement("purge"), {"cutoff": cutoff})

    async def _sql_next_task_due_s(self, queue: str) -> float | None:
        params = {"queue": queue, "now": time.time()}
        due = (await self._read("next_task_due", params))[0]["due_s"]
        return None if due is None else max(0.0, float(due))

    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        now = {"now": time.time()}
        tasks = [QueueDepth.from_row(r) for r in await self._read("task_backlog", now)]
        return tasks, QueueDepth.from_row((await self._read("outbox_backlog", now))[0])

    async def _sql_list_jobs(self, kind: JobKind[Any, Any, Any], status: str, limit: int) -> Any:
        rows = await self._read(kind.statement("list"), {"status": status, "limit": limit})
        return [kind.record(r) for r in rows]

    async def _sql_list_leases(self, limit: int) -> list[Lease]:
        rows = await self._read("list_leases", {"now": time.time(), "limit": limit})
        return [Lease.from_row(r) for r in rows]

    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry:
        params = {
            "now": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
        }
        return AuditEntry.from_row((await self._write("record_audit", params))[0])

    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self._read("list_audit", {"limit": limit})]

    async def _claimed_update(
        self, name: str, ids: list[int], tokens: list[int], *, lease_until: float | None = None
    ) -> list[int]:
        now = time.time()
        params: dict[str, Any] = {"claims": _json(list(zip(ids, tokens, strict=True))), "now": now}
        if lease_until is not None:
            params["lease_until"] = now + lease_until
        return sorted(r["id"] for r in await self._write(name, params))

    async def _failures(self, name: str, failures: FailureColumns) -> list[dict[str, Any]]:
        ids, tokens, errors, retry = failures
        items = [list(f) for f in zip(ids, tokens, errors, map(_ts, retry), strict=True)]
        return await self._write(name, {"failures": _json(items), "now": time.time()})

    async def _insert_outbox(
        self, tx: _Tx, rows: list[tuple[str, str, bytes, int]], now: float
    ) -> list[dict[str, Any]]:
        before = await tx.scalar("_max_outbox_id", {})
        values = [(c, a, p.decode(), m, now, now, now) for c, a, p, m in rows]
        await tx.execute_many("enqueue_outbox", values)
        return await tx.fetch("_outbox_after", {"after": before})

    # -- webhook journal --------------------------------------------------------

    async def _sql_journal_webhook_events(
        self, endpoint: str, owner: str, checked: list[str]
    ) -> list[int]:
        now = time.time()
        ids: list[int] = []
        async with self._transaction() as tx:
            for body in checked:
                params = {"endpoint": endpoint, "owner": owner, "body": body, "now": now}
                ids.append((await tx.fetch("journal_webhook_events", params))[0]["id"])
        return ids

    async def _sql_delete_webhook_events(self, ids: list[int]) -> int:
        return await self._write_count("delete_webhook_events", {"ids": _json(ids)})

    async def _sql_claim_webhook_orphans(
        self, endpoints: list[str], owner: str, age_s: float, limit: int
    ) -> list[JournaledEvent]:
        now = time.time()
        params = {
            "endpoints": _json(endpoints),
            "owner": owner,
            "now": now,
            "cutoff": now - age_s,
            "limit": limit,
        }
        rows = await self._write("claim_webhook_orphans", params)
        found = [JournaledEvent(r["id"], r["endpoint"], r["body"].encode()) for r in rows]
        return sorted(found, key=lambda e: e.id)

    async def _sql_record_webhook_attempts(
        self, rows: list[tuple[str, str, int | None, datetime, int | None, str, bool]]
    ) -> int:
        keys = ("endpoint", "webhook_id", "outbox_id", "attempted_at", "status", "error", "ok")
        async with self._transaction() as tx:
            for row in rows:
                params: dict[str, Any] = dict(zip(keys, row, strict=True))
                params["attempted_at"] = row[3].timestamp()
                params["ok"] = int(row[6])
                await tx.execute("record_webhook_attempts", params)
        return len(rows)

    async def _sql_list_webhook_attempts(
        self, endpoint: str | None, webhook_id: str | None, failed: bool, limit: int
    ) -> list[WebhookAttempt]:
        params = {
            "endpoint": endpoint,
            "webhook_id": webhook_id,
            "failed": int(failed),
            "limit": limit,
        }
        rows = await self._read("list_webhook_attempts", params)
        return [WebhookAttempt.from_row(r) for r in rows]

    async def _sql_purge_webhook_attempts(self, age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count("purge_webhook_attempts", {"cutoff": cutoff})

    # -- cancellation ----------------------------------------------------------

    async def _sql_request_cancel(
        self, session_id: str, reason: str, channel: str | None
    ) -> CancelState:
        params = {"session_id": session_id, "reason": reason, "now": time.time()}
        async with self._transaction() as tx:
            state = CancelState.from_row((await tx.fetch("request_cancel", params))[0])
            if channel is not None:
                # Delivered on commit (as Postgres delivers NOTIFY), even if the caller is
                # cancelled meanwhile, so a committed request is always announced; the kept
                # reason, as on Postgres, in the same JSON text.
                kept = state.reason[: self.CANCEL_NOTIFY_REASON_CHARS]
                tx.notify_on_commit(channel, orjson.dumps([state.session_id, kept]).decode())
        return state

    async def _sql_get_cancel(self, session_id: str) -> CancelState | None:
        rows = await self._read("get_cancel", {"session_id": session_id})
        return CancelState.from_row(rows[0]) if rows else None

    async def _sql_clear_cancel(self, session_id: str) -> bool:
        return await self._write_count("clear_cancel", {"session_id": session_id}) > 0

    # -- notifications ---------------------------------------------------------

    async def _sql_notify(self, name: str, text: str) -> None:
        self._count("notify")
        for hub in list(_HUBS.get(self._hub_key, ())):
            hub.deliver(name, text)

    def _sql_listen(self, names: list[str]) -> AbstractAsyncContextManager[NotificationStream]:
        return self._hub.subscribe_local(names)

    # -- login attempts (auth limiter, shared by a host) ------------------------

    async def _sql_reserve_login_attempt(self, scope: str, key: str, p: LoginPolicy) -> LoginSlot:
        params = {
            "scope": scope,
            "key": key,
            "limit": p.limit,
            "window_s": p.window_s,
            "now": time.time(),
        }
        row = (await self._write("reserve_login_attempt", params))[0]
        return LoginSlot.from_row(row, p.window_s)

    async def _sql_finish_login_attempt(
        self, scope: str, key: str, window_start: float, outcome: str, p: LoginPolicy
    ) -> bool:
        params: dict[str, Any] = {
            "scope": scope,
            "key": key,
            "window_start": window_start,
            "now": time.time(),
        }
        if outcome == "release":
            await self._write_count("release_login_attempt", params)
            return False
        if outcome == "success":
            await self._write_count("succeed_login_attempt", params)
            return False
        params.update(
            limit=p.limit,
            window_s=p.window_s,
            lockout_base_s=p.lockout_base_s,
            lockout_factor=p.lockout_factor,
            lockout_max_s=p.lockout_max_s,
            forget_after_s=p.forget_after_s,
        )
        rows = await self._write("fail_login_attempt", params)
        return bool(rows and rows[0]["tripped"])

    async def _sql_purge_login_attempts(self, age_s: float) -> int:
        now = time.time()
        cutoff = now - age_s
        return await self._write_count("purge_login_attempts", {"cutoff": cutoff, "now": now})

    # -- maintenance -----------------------------------------------------------

    def _sql_leadership(self, name: str, ttl_s: float) -> AbstractAsyncContextManager[Leadership]:
        return self._leadership(name, ttl_s)

    @operation
    async def _take_role(self, name: str, holder: str, ttl_s: float) -> bool:
        async with self._transaction() as tx:
            now = time.time()
            params = {"name": name, "holder": holder, "expires_at": now + ttl_s, "now": now}
            return bool(await tx.fetch("acquire_leadership", params))

    @operation
    async def _drop_role(self, name: str, holder: str) -> None:
        await self._write_count("release_leadership", {"name": name, "holder": holder})

    @asynccontextmanager
    async def _leadership(self, name: str, ttl_s: float) -> AsyncIterator[Leadership]:
        if self._closed:
            raise StorageClosed("sqlite storage is closed")
        role = _SqliteLeadership(self, name, ttl_s)
        try:
            yield role
        finally:
            if not self._closed:
                # Always, since a cancelled try_lead() may have taken the row unseen.
                # Completed even if the owner is being cancelled (by anyio or asyncio), or
                # the other handles would wait out its expiry.
                await complete(role.release())


class _SqliteLeadership(Leadership):
    """A lease row in ``maintenance_leaders``, taken or renewed by each ``try_lead()``."""

    def __init__(self, backend: SqliteBackend, name: str, ttl_s: float) -> None:
        self._backend = backend
        self._name = name
        self._ttl_s = ttl_s
        self._holder = secrets.token_hex(8)
        self._leading = False

    @property
    def leading(self) -> bool:
        return self._leading

    async def try_lead(self) -> bool:
        # While a renewal is in flight the last answer stands (the row's TTL covers it).
        try:
            self._leading = await self._backend._take_role(self._name, self._holder, self._ttl_s)
        except BaseException:
            self._leading = False
            raise
        return self._leading

    async def release(self) -> None:
        """Delete the row if it is still ours (a shielded write: it completes if cancelled)."""
        self._leading = False
        await self._backend._drop_role(self._name, self._holder)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _on_writer_thread(
    conn: aiosqlite.Connection, call: Callable[[sqlite3.Connection], _T]
) -> _T:
    """Run ``call`` with the underlying ``sqlite3`` connection on aiosqlite's own thread.

    aiosqlite has no public call for this: ``_execute`` queues a function on the thread
    that owns the connection (the one every statement of it runs on, in order), and
    ``_conn`` is its ``sqlite3.Connection``; both exist since aiosqlite 0.17.
    """
    raw: sqlite3.Connection = conn._conn
    result: _T = await conn._execute(call, raw)  # type: ignore[no-untyped-call]
    return result


def _fence_accepts(fence: tuple[int | None, int | None], epoch: int) -> bool:
    """The stream fence: the lease token if the session has a lease row, else the head."""
    token, head_epoch = fence
    if token is not None:
        return epoch == token
    return head_epoch is None or epoch >= head_epoch


@asynccontextmanager
async def _immediate(
    conn: aiosqlite.Connection, *, on_commit: Callable[[], None] | None = None
) -> AsyncIterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception or cancellation.

    The ROLLBACK runs even if BEGIN itself was the await that got cancelled (the thread
    still runs it), and a COMMIT that fails (a deferred constraint, SQLITE_BUSY) is
    rolled back as well, so the connection never stays inside a transaction.
    """
    try:
        await conn.execute("BEGIN IMMEDIATE")
        yield
    except BaseException:
        await complete(_rollback(conn))
        raise
    try:
        await conn.execute("COMMIT")
    except Exception:
        # COMMIT itself failed: nothing was committed, whatever the ROLLBACK finds (SQLite
        # rolls back by itself on some COMMIT errors, e.g. a full disk), so nothing is
        # announced.
        await complete(_rollback(conn))
        raise
    except BaseException:
        # Cancelled while the thread still runs COMMIT: the ROLLBACK queued behind it
        # settles whether it went through (it finds no transaction if so), and a committed
        # transaction's notifications still go out.
        if not await complete(_rollback(conn)) and on_commit is not None:
            on_commit()
        raise
    if on_commit is not None:
        on_commit()


async def _rollback(conn: aiosqlite.Connection) -> bool:
    """Roll back; False if there was no transaction (BEGIN failed, or COMMIT went through)."""
    try:
        await conn.execute("ROLLBACK")
    except sqlite3.Error:
        # "no transaction is active"; anything that leaves a transaction open is raised.
        if conn.in_transaction:
            raise
        return False
    return True


class _Tx:
    """Statements inside one write transaction of the SQLite driver (counted by name)."""

    __slots__ = ("_backend", "_conn", "_notices")

    def __init__(self, backend: SqliteBackend, conn: aiosqlite.Connection) -> None:
        self._backend = backend
        self._conn = conn
        self._notices: list[tuple[str, str]] = []

    def notify_on_commit(self, channel: str, payload: str) -> None:
        """Deliver a notification in process once (and only if) this transaction commits."""
        self._notices.append((channel, payload))

    def _deliver(self) -> None:
        for channel, payload in self._notices:
            for hub in list(_HUBS.get(self._backend._hub_key, ())):
                hub.deliver(channel, payload)

    async def fetch(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._backend._count(name)
        return list(await self._conn.execute_fetchall(Q[name], params))  # type: ignore[arg-type]

    async def scalar(self, name: str, params: Mapping[str, Any]) -> Any:
        rows = await self.fetch(name, params)
        return next(iter(rows[0].values()))

    async def execute(self, name: str, params: Mapping[str, Any]) -> int:
        self._backend._count(name)
        async with self._conn.execute(Q[name], params) as cursor:
            return cursor.rowcount

    async def execute_many(self, name: str, rows: Iterable[Sequence[Any]]) -> int:
        self._backend._count(name)
        async with self._conn.executemany(Q[name], rows) as cursor:
            return cursor.rowcount

    async def next_token(self, counter: str) -> int:
        return int(await self.scalar("_next_token", {"name": counter}))
