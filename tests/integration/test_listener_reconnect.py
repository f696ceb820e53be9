"""The Postgres LISTEN connection comes back promptly after it is lost.

Reconnects must not wait for a subscriber's idle check: these tests make that check an
hour long, so only a prompt reconnect can pass. A real outage of the listener is made by
terminating its backend (``pg_terminate_backend``) while its role may not log in, so the
first reconnect attempts fail the way they do while a server restarts.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.storage import StorageSettings, _notify, open_storage
from asyncstore.storage.postgres import PostgresBackend
from tests.waiting import wait_for


@pytest.fixture(autouse=True)
def _no_idle_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_notify, "IDLE_CHECK_S", 3600.0)


@pytest.fixture
async def role_dsn(postgres_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A DSN for a throwaway login role of the test database, and that role's name."""
    role = f"asyncstore_listener_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        # Opening a handle reads the schema version (the schema guard).
        await admin.execute(f'GRANT SELECT ON schema_migrations TO "{role}"')
        parts = urlsplit(postgres_dsn)
        host = parts.netloc.rpartition("@")[2]
        yield urlunsplit(parts._replace(netloc=f"{role}@{host}")), role
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def listener_pid(admin: asyncpg.Connection, role: str) -> int:
    pid = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'LISTEN %'", role
    )
    assert isinstance(pid, int)
    return pid


async def test_listener_retries_at_once_until_the_server_lets_it_back_in(
    postgres_dsn: str, role_dsn: tuple[str, str]
) -> None:
    dsn, role = role_dsn
    admin = await asyncpg.connect(postgres_dsn)
    try:
        async with (
            open_storage(StorageSettings(url=SecretStr(dsn))) as backend,
            backend.listen("outage") as stream,
        ):
            assert isinstance(backend, PostgresBackend)
            pid = await listener_pid(admin, role)
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute("SELECT pg_terminate_backend($1)", pid)

            async def receive() -> None:
                # A subscriber waiting as usual: it drives the reconnect.
                marker = await stream.receive()
                assert marker.gap
                got.append(marker.payload)

            got: list[str] = []
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive)
                    await wait_for(lambda: backend.statistics().listener_reconnect_failures >= 3)
                    assert backend.statistics().listener_reconnects == 0
                    await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            with anyio.fail_after(10):
                await admin.execute("SELECT pg_notify('outage', 'after-reconnect')")
                note = await stream.receive()
            assert note.payload == "after-reconnect" and not note.gap
            assert backend.statistics().listener_reconnects == 1
            assert await listener_pid(admin, role) != pid
    finally:
        await admin.close()


async def test_a_subscriber_that_was_busy_when_the_listener_died_reconnects_at_once(
    postgres_dsn: str,
) -> None:
    admin = await asyncpg.connect(postgres_dsn)
    try:
        async with open_storage(postgres_dsn) as backend, backend.listen("busy") as stream:
            assert isinstance(backend, PostgresBackend)
            await backend.terminate_listener_for_tests()
            # asyncpg reports the loss with call_soon: one checkpoint lets it run while
            # nobody waits on the subscription, so no wake-up can reach a waiter.
            await anyio.lowlevel.checkpoint()
            with anyio.fail_after(10):
                marker = await stream.receive()
                assert marker.gap
                await admin.execute("SELECT pg_notify('busy', 'after-reconnect')")
                note = await stream.receive()
            assert note.payload == "after-reconnect"
            assert backend.statistics().listener_reconnects == 1
    finally:
        await admin.close()


async def test_a_cancelled_reconnecting_subscriber_hands_over_to_the_next(
    postgres_dsn: str, role_dsn: tuple[str, str]
) -> None:
    dsn, role = role_dsn
    admin = await asyncpg.connect(postgres_dsn)
    try:
        async with (
            open_storage(StorageSettings(url=SecretStr(dsn))) as backend,
            backend.listen("a") as first,
            backend.listen("b") as second,
        ):
            assert isinstance(backend, PostgresBackend)
            pid = await listener_pid(admin, role)
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            gaps: list[str] = []

            async def wait_gap() -> None:
                gaps.append((await second.receive()).channel)

            async def failures_reach(n: int) -> None:
                await wait_for(lambda: backend.statistics().listener_reconnect_failures >= n)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    async with anyio.create_task_group() as driver:
                        # `first` is the only waiting subscriber: it runs the reconnect loop.
                        driver.start_soon(first.receive)
                        await failures_reach(1)
                        tg.start_soon(wait_gap)  # `second` waits for the loop to end
                        await failures_reach(3)
                        driver.cancel_scope.cancel()
                    # Cancelled mid-loop, `first` hands over: attempts go on through `second`.
                    await failures_reach(backend.statistics().listener_reconnect_failures + 2)
                    await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            assert gaps == ["b"]
            assert backend.statistics().listener_reconnects == 1
            with anyio.fail_after(10):
                marker = await first.receive()  # its gap waited for it
            assert marker.gap
    finally:
        await admin.close()
