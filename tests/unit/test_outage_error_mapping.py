"""Errors a Postgres restart produces are mapped to ``StorageUnavailable`` (retryable)."""

from __future__ import annotations

import asyncpg

from asyncstore.storage.errors import StorageUnavailable, is_retryable
from asyncstore.storage.postgres import map_postgres_error


def test_a_protocol_state_error_from_a_restart_is_storage_unavailable() -> None:
    # Seen on a real restart (pg_ctl stop -m fast) under a stream writer: the first
    # statement on a pool connection the server had ended failed with this.
    exc = asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    mapped = map_postgres_error(exc)
    assert isinstance(mapped, StorageUnavailable) and is_retryable(mapped)


def test_connection_errors_of_a_restart_are_storage_unavailable() -> None:
    for exc in (
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ):
        assert isinstance(map_postgres_error(exc), StorageUnavailable), exc


def test_only_storage_trouble_is_retryable() -> None:
    from asyncstore.storage.errors import (
        ConflictError,
        InvalidInput,
        LeaseLost,
        QueryError,
        StorageClosed,
    )

    assert is_retryable(StorageUnavailable("down"))
    assert is_retryable(QueryError("deadlock detected")) and is_retryable(ConflictError("dup"))
    for permanent in (InvalidInput("bad"), LeaseLost("gone"), StorageClosed("closed")):
        assert not is_retryable(permanent)
    assert not is_retryable(RuntimeError("a bug"))
