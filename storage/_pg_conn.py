"""Postgres connection plumbing: the named queries, connections, codecs and error mapping.

This module owns what every Postgres connection of the driver goes through: the rendered
named queries (``Q``), the JSON codecs and ``init`` hooks of pool connections, the pool's
reset hook (``_keep_session``), ``_connect`` for connections outside the pool, and the one
mapping of asyncpg and network exceptions to ``storage.errors`` (``map_postgres_error``,
``map_connect_error``), and ``PgConnections``, the pool calls every part of
``PostgresBackend`` runs its statements through. ``storage.postgres`` re-exports the
public names.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import asyncpg
import orjson

from asyncstore.storage import _topology
from asyncstore.storage._schema import mask_url
from asyncstore.storage._sql import load_queries
from asyncstore.storage.base import (
    AsyncStorageBackend,
    render_job_queries,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    QueryError,
    StorageError,
    StorageUnavailable,
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


class PgConnections(AsyncStorageBackend):
    """The pool calls of ``PostgresBackend`` (a base of it and of its mixins).

    Its state is set up in ``PostgresBackend.__init__`` and ``open``; the attributes are
    declared here.
    """

    _pool: asyncpg.Pool | None
    _q: Mapping[str, str]  # the running layout's queries; see PgPartitions._use_stream_layout

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageUnavailable("postgres pool is not open")
        return self._pool

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
