"""Postgres LISTEN plumbing and leadership: the connections that live outside the pool.

This module owns ``PgListening``, the part of ``PostgresBackend`` that keeps the one
LISTEN connection (connect, re-LISTEN after a loss, pings, capped reconnect backoff, gap
reports to subscribers through ``NotificationHub``) and opens session-level leadership
(``_PostgresLeadership``, a session advisory lock on a dedicated connection).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import asyncpg

from asyncstore.storage import _topology
from asyncstore.storage._backoff import Backoff
from asyncstore.storage._notify import NotificationHub, Subscription
from asyncstore.storage._pg_conn import _PING_EVERY_S, Q, _connect, map_postgres_error
from asyncstore.storage.base import (
    AsyncStorageBackend,
    Leadership,
    NotificationStream,
)
from asyncstore.storage.errors import (
    StorageClosed,
    StorageError,
    is_retryable,
)


class PgListening(AsyncStorageBackend):
    """The LISTEN connection and leadership of ``PostgresBackend`` (a mixin of it).

    Its state is set up in ``PostgresBackend.__init__``; the attributes are declared here.
    """

    _topology: _topology.Topology
    _hub: NotificationHub
    _listen_conn: asyncpg.Connection | None
    _listen_lock: anyio.Lock
    _listener_was_up: bool
    _listener_failures: int
    _reconnect_failures: int
    _next_attempt: float
    _reconnect_backoff: Backoff
    _reconnecting: anyio.Event | None
    _listener_kick: anyio.Event
    _last_ping: float
    _reconnects: int

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

    def __init__(self, backend: PgListening, name: str) -> None:
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
