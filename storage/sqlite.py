"""The SQLite driver (aiosqlite): the embedded default for one process.

It owns ``SqliteBackend``: opening and closing the file, migrations, and the SQL hooks of
webhooks, cancellation, notifications, login attempts and periodic ticks. The database
runs in WAL mode with a busy timeout. One writer connection serializes every write behind
an in-process lock and a ``BEGIN IMMEDIATE`` transaction (so two processes on one file
also stay correct); reads go to a small set of separate reader connections. Notifications
are delivered in process to every backend open on the same file. Its other parts are
bases in private modules: the connections, transactions and the one error mapping
(``_sqlite_conn``: sqlite3 errors are mapped to ``storage.errors`` in ``map_sqlite_error``
and nowhere else), chat and stream events fenced by the lease (``_sqlite_streams``), the
leased-job hooks (``_sqlite_jobs``), and the session leases, lease slots and leadership
rows (``_sqlite_leases``).
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3
import time
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import orjson

from asyncstore.storage import _ticks
from asyncstore.storage._notify import NotificationHub
from asyncstore.storage._shield import complete
from asyncstore.storage._sql import load_migrations
from asyncstore.storage._sqlite_conn import (
    _BUSY_BACKOFF as _BUSY_BACKOFF,  # re-exported: tests read the policy here
)
from asyncstore.storage._sqlite_conn import (
    _HUBS,
    Q,
    _immediate,
    _json,
    _why_unopenable,
    map_sqlite_error,
)
from asyncstore.storage._sqlite_jobs import SqliteJobs
from asyncstore.storage._sqlite_leases import SqliteLeases
from asyncstore.storage._sqlite_streams import SqliteStreams
from asyncstore.storage.base import (
    CancelState,
    JournaledEvent,
    LoginPolicy,
    LoginSlot,
    NotificationStream,
    StorageSettings,
    StorageStatistics,
    Task,
    WebhookAttempt,
    operation,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    MigrationError,
    StorageError,
    StorageUnavailable,
)

__all__ = ["Q", "SqliteBackend", "map_sqlite_error"]


class SqliteBackend(SqliteStreams, SqliteLeases, SqliteJobs):
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

    def _notify_listened(self, channel: str) -> bool:
        return any(hub.has_subscribers(channel) for hub in _HUBS.get(self._hub_key, ()))

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

    # -- periodic ticks (the SQL is in storage._ticks) ---------------------------

    async def _sql_record_periodic_tick(
        self, schedule: str, tick_at: datetime, row: Any, notify: str | None
    ) -> Task | None:
        return await _ticks.sqlite_record_tick(self, schedule, tick_at, row, notify)

    async def _sql_last_periodic_ticks(self, schedules: list[str]) -> dict[str, datetime]:
        return await _ticks.sqlite_last_ticks(self, schedules)

    async def _sql_purge_periodic_ticks(self, retention_s: float) -> int:
        return await _ticks.sqlite_purge_ticks(self, retention_s)
