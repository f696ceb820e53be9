"""Fixtures of the fault-injection suite: a Postgres cluster the tests own, one database each.

``pg_cluster`` (session scope) runs initdb and starts a server on a free port (see
``cluster.py``), migrates a template database once and removes the whole cluster at the end,
even after a failure. ``fault_db`` gives each test a fresh database cloned from the template
and makes sure the server runs again after a test that stopped it. When the server binaries
are missing the suite is skipped with the reason, unless ``ASYNCSTORE_REQUIRE_POSTGRES=1``,
which makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from asyncstore.storage import open_storage
from tests.faults.cluster import Cluster, ClusterUnavailable, find_bindir

TEMPLATE = "asyncstore_faults_template"


@dataclass(frozen=True)
class FaultDB:
    """A fresh migrated database on the fault cluster."""

    cluster: Cluster
    name: str

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    def url_via(self, port: int) -> str:
        """The same database reached through another local port (a proxy)."""
        return self.cluster.url(self.name, port)


async def _admin(cluster: Cluster, sql: str) -> None:
    conn = await asyncpg.connect(cluster.url(), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    try:
        cluster = Cluster(find_bindir())
    except ClusterUnavailable as exc:
        if os.environ.get("ASYNCSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"Postgres is required (ASYNCSTORE_REQUIRE_POSTGRES=1): {exc}")
        pytest.skip(f"fault suite needs the Postgres server binaries: {exc}")
    try:
        cluster.init()
        cluster.start()

        async def template() -> None:
            await _admin(cluster, f'CREATE DATABASE "{TEMPLATE}"')
            async with open_storage(cluster.url(TEMPLATE), migrate=True):
                pass

        asyncio.run(template())
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def fault_db(pg_cluster: Cluster) -> Iterator[FaultDB]:
    if not pg_cluster.running:
        pg_cluster.start()  # an earlier test failed while the server was down
    name = f"faults_{secrets.token_hex(4)}"
    asyncio.run(_admin(pg_cluster, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"'))
    try:
        yield FaultDB(pg_cluster, name)
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        asyncio.run(_admin(pg_cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
