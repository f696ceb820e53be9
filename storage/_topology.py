"""Where a Postgres backend's connections go: the pool's DSN, the session DSN, pooler checks.

A transaction-mode pooler (PgBouncer ``pool_mode = transaction``) hands each transaction to
whichever server connection is free, so nothing that lives in a session survives it: LISTEN
registrations (notifications are then lost without an error), session advisory locks (two
leaders, or a lock left held on a pooled server connection) and named prepared statements.
The pool may go through such a pooler when the settings say so (``pooled``); every
connection that needs a session (the LISTEN connection, leadership locks) goes to the
session DSN instead: ``listen_url``, else ``url`` when it is not pooled.

A pooler is recognised without asking it: the process id in the server's BackendKeyData
(``Connection.get_server_pid()``) is the backend's own on a direct connection, while a
pooler makes up its own cancel key, so ``pg_backend_pid()`` differs from it.

Both settings can also ride in the URL's query string, so a plain URL can say it all:
``postgresql://app@bouncer:6432/db?pooled=true&listen_url=postgresql%3A%2F%2Fapp%40pg%2Fdb``
(the listen URL percent-encoded). They are removed before the DSN reaches asyncpg, which
would otherwise send them to the server as settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import asyncpg

from asyncstore.storage.base import StorageSettings
from asyncstore.storage.errors import ConfigurationError, InvalidInput

POOLED_PARAM = "pooled"
LISTEN_PARAM = "listen_url"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class Topology:
    """The resolved connection plan of one backend."""

    dsn: str  # the pool's DSN, without this library's own query parameters
    pooled: bool | None  # True: declared pooler; False: declared sessions; None: detect
    session_dsn: str | None  # where session work goes; None: nowhere (pooled, no listen_url)

    def require_session_dsn(self, what: str) -> str:
        if self.session_dsn is None:
            raise ConfigurationError(
                f"{what} needs a database session, and storage.url goes through a "
                "transaction pooler (storage.pooled=true): set storage.listen_url "
                "(or ?listen_url= in the URL) to a DSN that reaches Postgres directly"
            )
        return self.session_dsn


def split_dsn(url: str) -> tuple[str, bool | None, str | None]:
    """Remove ``pooled`` and ``listen_url`` from the URL's query string and return them."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, None, None
    pooled: bool | None = None
    listen: str | None = None
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == POOLED_PARAM:
            if value.lower() in _TRUE:
                pooled = True
            elif value.lower() in _FALSE:
                pooled = False
            else:
                raise InvalidInput(f"URL parameter pooled={value!r}: use true or false")
        elif key == LISTEN_PARAM:
            listen = value or None
        else:
            kept.append((key, value))
    return (f"{base}?{urlencode(kept)}" if kept else base), pooled, listen


def resolve(settings: StorageSettings) -> Topology:
    """The connection plan of ``settings``; the settings' fields win over URL parameters."""
    dsn, url_pooled, url_listen = split_dsn(settings.url.get_secret_value())
    pooled = settings.pooled if settings.pooled is not None else url_pooled
    listen = settings.listen_url.get_secret_value() if settings.listen_url else url_listen
    if listen is not None:
        listen, listen_pooled, _ = split_dsn(listen)
        if listen_pooled:
            raise InvalidInput("storage.listen_url must reach Postgres directly, not pooled")
    session = listen if listen is not None else (None if pooled else dsn)
    return Topology(dsn, pooled, session)


_POOLER_STATE = "AS001"  # the SQLSTATE the probe below raises on a pooled connection


async def through_pooler(conn: asyncpg.Connection) -> bool:
    """Whether ``conn`` goes through a pooler (its server pid is not its backend's).

    The probe is one simple-protocol statement: no prepared statement is left behind on a
    pooled server connection (where another client could trip on its name), whatever the
    connection's statement cache size.
    """
    pid = int(conn.get_server_pid())
    try:
        await conn.execute(
            f"DO $$BEGIN IF pg_backend_pid() <> {pid} THEN"
            f" RAISE EXCEPTION USING ERRCODE = '{_POOLER_STATE}'; END IF; END$$"
        )
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == _POOLER_STATE:
            return True
        raise
    return False


async def check_session(conn: asyncpg.Connection, what: str) -> None:
    """Refuse a session connection that goes through a pooler: its session would not hold."""
    if await through_pooler(conn):
        raise ConfigurationError(
            f"{what} reached Postgres through a connection pooler (the server's process id "
            "is not the connection's): LISTEN and session locks do not survive a "
            "transaction pooler. Set storage.listen_url to a DSN that reaches Postgres "
            "directly, or storage.pooled=false if this pooler keeps sessions"
        )


async def check_pool_connection(conn: asyncpg.Connection) -> None:
    """Refuse an undeclared pooler under the pool (``pooled`` unset)."""
    if await through_pooler(conn):
        raise ConfigurationError(
            "storage.url reaches Postgres through a connection pooler (PgBouncer?): declare "
            "it with storage.pooled=true (or ?pooled=true in the URL) and set "
            "storage.listen_url to a direct DSN for LISTEN and leadership; or "
            "storage.pooled=false if the pooler keeps sessions (pool_mode = session)"
        )
