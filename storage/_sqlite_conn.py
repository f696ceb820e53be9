"""SQLite connection plumbing: the writer, the readers, write transactions and error mapping.

This module owns how the SQLite driver talks to its file: the named queries (``Q``), the
row factory (JSON and time columns decoded in aiosqlite's thread), the one mapping of
sqlite3 errors to ``storage.errors`` (``map_sqlite_error``), opening a connection (busy
timeout, WAL, the database's directory), the one writer behind an in-process lock with
``BEGIN IMMEDIATE`` transactions (``_Tx``, notifications delivered on commit through the
in-process hubs) and the pool of reader connections (``SqliteConnections``).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
import orjson

from asyncstore.storage._backoff import Backoff
from asyncstore.storage._notify import NotificationHub
from asyncstore.storage._shield import complete
from asyncstore.storage._sql import load_queries
from asyncstore.storage.base import (
    AsyncStorageBackend,
    render_job_queries,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    ConflictError,
    QueryError,
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
_TIME_COLUMNS = frozenset(
    {"created_at", "updated_at", "run_after", "expires_at", "requested_at", "seen_at"}
)
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


class SqliteConnections(AsyncStorageBackend):
    """The connections of ``SqliteBackend`` (a base of it): open, read, write in a transaction.

    Its state is set up in ``SqliteBackend.__init__``; the attributes are declared here.
    """

    _memory: bool
    _path: str
    _writer: aiosqlite.Connection | None
    _readers: list[aiosqlite.Connection]
    _free_readers: list[aiosqlite.Connection]
    _reader_waiters: collections.deque[anyio.Event]
    _write_lock: anyio.Lock
    _hub: NotificationHub
    _hub_key: str

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
            # The wall clock read inside a statement, after its snapshot began: a liveness
            # judgement that cannot predate the rows it sees (count_leases).
            await conn.create_function("asyncstore_now", 0, time.time)
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
            if "now" in params:
                # Liveness is judged when the read runs, not when it was asked for: a read
                # that waited for a reader would otherwise count a lease released meanwhile
                # (its row keeps the release time) beside the one that replaced it.
                params = {**params, "now": time.time()}
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

    def __init__(self, backend: SqliteConnections, conn: aiosqlite.Connection) -> None:
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
