"""A real password login refused by a server (the fault cluster, which this suite owns).

The shared server trusts every local login, so a wrong password can only be tried on a
cluster whose ``pg_hba.conf`` we may change: one role is made to need scram-sha-256.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from asyncstore.storage import StorageUnavailable, open_storage
from tests.faults.cluster import Cluster
from tests.faults.conftest import FaultDB
from tests.waiting import wait_for


async def _admin(cluster: Cluster, *sql: str) -> None:
    conn = await asyncpg.connect(cluster.url(), timeout=10)
    try:
        for statement in sql:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_wrong_password_is_storage_unavailable_naming_user_and_database(
    fault_db: FaultDB,
) -> None:
    cluster = fault_db.cluster
    role, password = f"asyncstore_pw_{secrets.token_hex(4)}", secrets.token_hex(12)
    await _admin(
        cluster,
        f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'",
        f'GRANT pg_read_all_data TO "{role}"',  # enough for the schema guard's read
    )
    hba = cluster.data / "pg_hba.conf"
    original = hba.read_text()
    # First matching line wins: this role over TCP needs its password, everyone else
    # keeps trust.
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
    try:
        await asyncio.to_thread(cluster._run, "pg_ctl", "reload", "-D", str(cluster.data))
        base = f"127.0.0.1:{cluster.port}/{fault_db.name}"
        # The reload is asynchronous: wait until the server asks this role for a password
        # (it announces no event; until then the old rules still let a wrong one in).
        refused: list[StorageUnavailable] = []

        async def asks_for_the_password() -> bool:
            try:
                async with open_storage(f"postgresql://{role}:wrong-{password}@{base}"):
                    return False
            except StorageUnavailable as exc:
                refused.append(exc)
                return True

        await wait_for(asks_for_the_password, 30, what="the reloaded pg_hba.conf")
        message = str(refused[0])
        assert "password authentication failed" in message
        assert repr(role) in message and repr(fault_db.name) in message
        assert password not in message
        # The right password logs in (and finds the migrated schema).
        async with open_storage(f"postgresql://{role}:{password}@{base}") as storage:
            await storage.ping()
    finally:
        hba.write_text(original)
        await asyncio.to_thread(cluster._run, "pg_ctl", "reload", "-D", str(cluster.data))
        await _admin(cluster, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')
