"""SQLite leases: session leases, lease slots and the leadership lease rows.

This module owns ``SqliteLeases``, the part of ``SqliteBackend`` that takes, renews,
releases and expires session leases and the numbered slots bound to them (with the
limiter's wake-ups), and the fleet's leadership role on SQLite: a lease row in
``maintenance_leaders`` taken or renewed by each ``try_lead()`` (``_SqliteLeadership``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from asyncstore.storage._shield import complete
from asyncstore.storage._sqlite_conn import SqliteConnections
from asyncstore.storage.base import (
    Leadership,
    Lease,
    LeaseAttempt,
    operation,
)
from asyncstore.storage.errors import (
    StorageClosed,
)


class SqliteLeases(SqliteConnections):
    """The lease and leadership hooks of ``SqliteBackend`` (a base of it)."""

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
        rows = await self._read("count_leases", {})
        return int(rows[0]["n"])

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

    def __init__(self, backend: SqliteLeases, name: str, ttl_s: float) -> None:
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
