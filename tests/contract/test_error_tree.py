"""Issue 14: every failure of a call stays inside the storage error tree.

The ``operation`` wrapper is the one place every contract call passes (closed check, error
mapping); a driver cannot leave a contract method outside it. Connections killed under a
live handle surface as ``StorageError`` (``StorageUnavailable``), never as a raw driver
exception, and the handle works again afterwards.
"""

from __future__ import annotations

import errno
from typing import Any

import asyncpg
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    ChatMessage,
    NewMessage,
    StorageError,
    StorageUnavailable,
)
from asyncstore.storage.base import _CONTRACT_CALLS, operation
from asyncstore.storage.postgres import PostgresBackend
from asyncstore.storage.sqlite import SqliteBackend
from tests.waiting import wait_for


@pytest.mark.parametrize("driver", [PostgresBackend, SqliteBackend])
def test_every_public_call_is_the_one_contract_layer(driver: type[Any]) -> None:
    # The dialects implement _sql_* hooks only; every public method is the base class's,
    # which validates, encodes and maps errors before a dialect sees anything.
    assert len(_CONTRACT_CALLS) > 50
    for name in _CONTRACT_CALLS:
        assert getattr(driver, name) is getattr(AsyncStorageBackend, name), name
    for name in ("migrate", "schema_version", "ping"):
        assert getattr(getattr(driver, name), "__storage_operation__", False), name


def test_a_dialect_overriding_a_public_method_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="get_lease: a dialect implements _sql_get_lease"):

        class Bypass(SqliteBackend):
            async def get_lease(self, session_id: str) -> None:  # type: ignore[override]
                return None

    with pytest.raises(TypeError, match="listen: a dialect implements"):

        class BypassListen(SqliteBackend):
            def listen(self, *channels: str) -> Any:
                return None


def test_a_dialect_call_outside_the_wrapper_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="ping must be decorated"):

        class Forgetful(SqliteBackend):
            async def ping(self) -> None:
                return None


class _DiskFull(SqliteBackend):
    """A driver whose call fails in the operating system (what a full disk raises)."""

    @operation
    async def ping(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_an_os_error_inside_a_call_is_storage_unavailable(tmp_path: Any) -> None:
    from asyncstore.storage.base import StorageSettings

    backend = _DiskFull(StorageSettings(url=f"sqlite:///{tmp_path / 'x.db'}"))
    await backend.open()
    try:
        with pytest.raises(StorageUnavailable, match="No space left"):
            await backend.ping()
    finally:
        await backend.aclose()


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
async def test_a_killed_sqlite_connection_is_storage_unavailable(
    storage: AsyncStorageBackend,
) -> None:
    writer = storage._writer  # type: ignore[attr-defined]
    await writer.close()  # the connection dies under the handle
    with pytest.raises(StorageUnavailable):
        await storage.append_messages("s", [NewMessage("user", 1)])


@pytest.mark.parametrize("storage_url", ["postgres"], indirect=True)
async def test_killed_postgres_connections_stay_in_the_tree(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    await storage.append_messages("s", [NewMessage("user", 1)])
    conn = await asyncpg.connect(storage_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert killed >= 1
    # Each call either succeeds (the pool replaced a dead connection) or fails inside the
    # tree; within a bounded number of calls the handle works again.
    rows: list[ChatMessage] = []

    async def answers() -> bool:
        nonlocal rows
        try:
            rows = await storage.load_messages("s")
        except StorageError:
            return False
        return True

    await wait_for(answers, 60, what="the handle working again")
    assert [m.content for m in rows] == [1]
