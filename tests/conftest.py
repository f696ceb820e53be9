"""Shared fixtures: a throwaway Postgres database per test run and a fresh SQLite file per test.

Postgres is found at ``ASYNCSTORE_TEST_DSN``, else ``postgresql://postgres@127.0.0.1:5432/
postgres`` if it answers, else a testcontainers Postgres when a Docker engine answers. If
none is available the Postgres tests are skipped with the reason, unless
``ASYNCSTORE_REQUIRE_POSTGRES=1``, which turns that into a failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.storage import AsyncStorageBackend, StorageSettings, open_storage
from asyncstore.storage._topology import split_dsn
from tests.pgbouncer import PgBouncer, PgBouncerUnavailable

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = (
    "chat_sessions, chat_messages, stream_events, session_leases, agent_tasks, outbox,"
    " cancel_requests, lease_slots, lease_slot_pools"
    ", webhook_journal, webhook_attempts, outbox_groups, login_attempts"  # 0005, 0006, 0007
    ", stream_anchors"  # 0009
    ", task_queues"  # 0010
    ", periodic_ticks"  # 0012
    ", operator_audit"  # 0013
    ", instance_presence"  # 0015
)


def _answers(dsn: str) -> bool:
    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


def _find_server() -> tuple[str | None, Any, str]:
    """Return (admin dsn, container to stop, reason if none)."""
    explicit = os.environ.get("ASYNCSTORE_TEST_DSN")
    if explicit:
        if _answers(explicit):
            return explicit, None, ""
        return None, None, f"ASYNCSTORE_TEST_DSN={explicit} does not answer"
    if _answers(DEFAULT_DSN):
        return DEFAULT_DSN, None, ""
    try:
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None)
        container.start()
        return container.get_connection_url(), container, ""
    except Exception as exc:
        return None, None, f"no Postgres at {DEFAULT_DSN} and no Docker engine ({exc})"


def _with_database(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a database created for this test run (migrated) and dropped after it."""
    admin, container, reason = _find_server()
    if admin is None:
        if os.environ.get("ASYNCSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"Postgres is required (ASYNCSTORE_REQUIRE_POSTGRES=1): {reason}")
        pytest.skip(reason)
    name = f"asyncstore_test_{os.getpid()}_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        async with open_storage(_with_database(admin, name), migrate=True):
            pass

    async def drop() -> None:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(create())
    try:
        yield _with_database(admin, name)
    finally:
        asyncio.run(drop())
        if container is not None:
            container.stop()


@pytest.fixture(scope="session")
def partitioned_postgres_dsn(postgres_dsn: str) -> Iterator[str]:
    """A second database of this test run with ``stream_events`` partitioned by session
    start (``storage.stream_partitioning``, issue 17): daily partitions from today on."""
    name = f"asyncstore_parted_{os.getpid()}_{secrets.token_hex(4)}"
    dsn = _with_database(postgres_dsn, name)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create() -> None:
        await admin(f'CREATE DATABASE "{name}"')
        settings = StorageSettings(url=SecretStr(dsn), stream_partitioning=True)
        async with open_storage(settings, migrate=True) as storage:
            await storage.create_stream_partitions(86_400, ahead_s=2 * 86_400)

    asyncio.run(create())
    try:
        yield dsn
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_postgres_url(postgres_dsn: str) -> Iterator[str]:
    """A Postgres database with no asyncstore schema (not even schema_migrations)."""
    name = f"asyncstore_empty_{os.getpid()}_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(postgres_dsn, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pgbouncer(postgres_dsn: str) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the test server (session scope)."""
    parts = urlsplit(postgres_dsn)
    try:
        bouncer = PgBouncer(parts.hostname or "127.0.0.1", parts.port or 5432)
    except PgBouncerUnavailable as exc:
        if os.environ.get("ASYNCSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PgBouncer is required with ASYNCSTORE_REQUIRE_POSTGRES=1: {exc}")
        pytest.skip(str(exc))
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


def pooled_url(bouncer: PgBouncer, direct_dsn: str) -> str:
    """The storage URL of ``direct_dsn``'s database through ``bouncer``, declared pooled,
    with LISTEN and leadership on the direct DSN (the documented PgBouncer setup)."""
    database = urlsplit(direct_dsn).path.lstrip("/")
    return f"{bouncer.url(database)}?pooled=true&listen_url={quote(direct_dsn, safe='')}"


def direct_dsn(url: str) -> str:
    """A DSN for a raw asyncpg connection to ``url``'s database: a pooled storage URL's
    ``listen_url`` (its direct DSN), else the URL itself."""
    dsn, _, listen = split_dsn(url)
    return listen or dsn


# The modules whose ``storage_url`` tests also run through PgBouncer (issue 17): the
# contract suite's chat, stream, lease/task, limiter, queue and outbox modules.
POOLED_MODULES = tuple(
    f"tests/contract/test_{name}"
    for name in ("chat_and_streams", "stream", "leases_and_tasks", "limiter", "queue", "outbox")
)


# The modules whose ``storage_url`` tests also run on the partitioned stream_events layout
# (issue 17): every contract module that appends, loads or purges stream events.
PARTITIONED_MODULES = tuple(
    f"tests/contract/test_{name}"
    for name in (
        "chat_and_streams",
        "stream",
        "maintenance",
        "runtime",
        "number_policy",
        "cancel_anywhere",
    )
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("storage_url") if callspec is not None else None
        if (param == "pgbouncer" and not item.nodeid.startswith(POOLED_MODULES)) or (
            param == "partitioned" and not item.nodeid.startswith(PARTITIONED_MODULES)
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=["sqlite", "postgres", "pgbouncer", "partitioned"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL for an empty, migrated database of each dialect, and (contract suite
    only) the Postgres one through PgBouncer in transaction mode, and one whose
    stream_events is partitioned."""
    if request.param == "partitioned":
        parted: str = request.getfixturevalue("partitioned_postgres_dsn")
        asyncio.run(truncate(parted))
        yield parted
    elif request.param in ("postgres", "pgbouncer"):
        dsn: str = request.getfixturevalue("postgres_dsn")
        asyncio.run(truncate(dsn))
        if request.param == "pgbouncer":
            yield pooled_url(request.getfixturevalue("pgbouncer"), dsn)
        else:
            yield dsn
    else:
        url = f"sqlite:///{tmp_path / 'test.db'}"

        async def migrate() -> None:
            async with open_storage(url, migrate=True):
                pass

        asyncio.run(migrate())
        yield url


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[AsyncStorageBackend]:
    """An open backend on an empty database, one per dialect."""
    async with open_storage(storage_url) as backend:
        yield backend
