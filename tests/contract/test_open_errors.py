"""Misconfiguration at open: every failure is a storage error that says what is wrong.

A malformed URL, a refused login, a missing database, an unusable SQLite path and a schema
that is behind or ahead of this code each raise a named error from ``storage.errors``
whose message names the thing to fix and never shows the password.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from asyncstore.storage import (
    ConfigurationError,
    InvalidInput,
    MigrationError,
    QueryError,
    StorageError,
    StorageUnavailable,
    open_storage,
)
from asyncstore.storage._schema import latest_version

PASSWORD = "s3cr3t-Pa55"


async def _open(url: str) -> None:
    async with open_storage(url) as storage:
        await storage.ping()


def _server(postgres_dsn: str) -> str:
    """``host:port`` of the test server."""
    return postgres_dsn.rpartition("/")[0].rpartition("@")[2]


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:abc/db",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:99999/db",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:-1/db",
        f"postgresql://postgres:{PASSWORD}@[::1/db",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/db?sslmode=sometimes",
        f"postgres://postgres:{PASSWORD}@127.0.0.1:5432/db?target_session_attrs=odd",
    ],
    ids=["port-not-a-number", "port-too-big", "port-negative", "broken-ipv6", "bad-sslmode",
         "bad-session-attrs"],
)  # fmt: skip
async def test_malformed_postgres_url_is_a_configuration_error_without_the_password(
    url: str,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        await _open(url)
    message = str(caught.value)
    assert PASSWORD not in message
    assert "postgres:***@" in message
    # Still an InvalidInput (and a ValueError): code that caught those keeps working.
    assert isinstance(caught.value, InvalidInput) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "nonsense", f"http://u:{PASSWORD}@host/", "sqlite:relative.db"]
)
async def test_unknown_scheme_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        await _open(url)
    assert PASSWORD not in str(caught.value)


@pytest.mark.postgres
async def test_unknown_role_is_storage_unavailable_naming_user_and_database(
    postgres_dsn: str,
) -> None:
    role = f"asyncstore_nobody_{secrets.token_hex(4)}"
    database = postgres_dsn.rpartition("/")[2]
    url = f"postgresql://{role}:{PASSWORD}@{_server(postgres_dsn)}/{database}"
    with pytest.raises(StorageUnavailable) as caught:
        await _open(url)
    message = str(caught.value)
    assert repr(role) in message and repr(database) in message
    assert "does not exist" in message
    assert PASSWORD not in message


@pytest.mark.postgres
async def test_missing_database_is_storage_unavailable_naming_it(postgres_dsn: str) -> None:
    database = f"asyncstore_missing_{secrets.token_hex(4)}"
    url = f"postgresql://postgres:{PASSWORD}@{_server(postgres_dsn)}/{database}"
    with pytest.raises(StorageUnavailable) as caught:
        await _open(url)
    message = str(caught.value)
    assert repr(database) in message and "'postgres'" in message
    assert "does not exist" in message and PASSWORD not in message


async def test_sqlite_path_under_a_regular_file_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    for target in (blocker / "app.db", blocker / "deeper" / "app.db"):
        with pytest.raises(ConfigurationError) as caught:
            await _open(f"sqlite:///{target}")
        message = str(caught.value)
        assert str(target) in message
        assert f"{str(blocker)!r} is a file, not a directory" in message
    assert blocker.read_text() == "a regular file"


async def test_sqlite_in_a_directory_that_refuses_new_files_names_the_path(
    tmp_path: Path,
) -> None:
    if os.geteuid() == 0:
        # Permission bits do not stop root: /proc/self is a real directory that refuses
        # new files to everyone, root included.
        target = Path("/proc/self/asyncstore.db")
    else:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "app.db"
    with pytest.raises(StorageError) as caught:
        await _open(f"sqlite:///{target}")
    assert isinstance(caught.value, StorageUnavailable | ConfigurationError)
    message = str(caught.value)
    assert str(target) in message and "not writable" in message


async def test_sqlite_directory_that_cannot_be_created_names_it() -> None:
    # /proc refuses new directories to everyone, root included.
    target = Path("/proc/asyncstore-no-such-dir/app.db")
    with pytest.raises(ConfigurationError) as caught:
        await _open(f"sqlite:///{target}")
    assert str(target.parent) in str(caught.value)


async def test_sqlite_missing_directory_is_created_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "new" / "nested" / "app.db"
    with caplog.at_level(logging.INFO, logger="asyncstore.storage"):
        async with open_storage(f"sqlite:///{target}", migrate=True) as storage:
            await storage.ping()
    assert target.exists()
    created = [r for r in caplog.records if r.name == "asyncstore.storage"]
    assert len(created) == 1 and created[0].levelno == logging.INFO
    assert str(target.parent) in created[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asyncstore.storage"):
        async with open_storage(f"sqlite:///{target}"):
            pass
    assert not [r for r in caplog.records if r.name == "asyncstore.storage"]


# -- the schema guard ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An existing database of each dialect with no asyncstore schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    yield request.getfixturevalue("empty_postgres_url")


async def _set_versions(url: str, sql: str) -> None:
    """Run ``sql`` on the database's schema_migrations table through the raw driver."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute(sql.replace("now()", "0"))
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


async def test_opening_an_empty_database_says_run_migrate(empty_url: str) -> None:
    with pytest.raises(MigrationError) as caught:
        async with open_storage(empty_url) as storage:
            await storage.load_messages("s")
    message = str(caught.value)
    assert "asyncstore migrate" in message and "no asyncstore schema" in message
    # migrate=True still migrates, and the guard is then satisfied.
    async with open_storage(empty_url, migrate=True) as storage:
        assert await storage.schema_version() == latest_version(storage.dialect)
        assert await storage.load_messages("s") == []


async def test_opening_a_database_behind_names_the_missing_migrations(empty_url: str) -> None:
    async with open_storage(empty_url, migrate=True) as storage:
        dialect = storage.dialect
    latest = latest_version(dialect)
    await _set_versions(empty_url, f"DELETE FROM schema_migrations WHERE version = {latest}")
    with pytest.raises(MigrationError) as caught:
        async with open_storage(empty_url):
            pass
    message = str(caught.value)
    assert f"migrations {latest}..{latest} are missing" in message
    assert "asyncstore migrate" in message


async def test_opening_a_database_ahead_of_this_code_is_refused(empty_url: str) -> None:
    async with open_storage(empty_url, migrate=True) as storage:
        dialect = storage.dialect
    ahead = latest_version(dialect) + 1
    await _set_versions(
        empty_url,
        f"INSERT INTO schema_migrations (version, name, applied_at) "
        f"VALUES ({ahead}, 'from_the_future', now())",
    )
    for migrate in (False, True):
        with pytest.raises(MigrationError) as caught:
            async with open_storage(empty_url, migrate=migrate):
                pass
        message = str(caught.value)
        assert f"schema version {ahead}, newer than this code" in message
        assert "upgrade asyncstore" in message


async def test_the_guard_can_be_skipped_for_tools_that_inspect_the_schema(
    empty_url: str,
) -> None:
    async with open_storage(empty_url, check_schema_version=False) as storage:
        assert await storage.schema_version() == 0


@pytest.mark.postgres
async def test_a_role_that_may_not_read_the_schema_version_is_told_what_to_grant(
    postgres_dsn: str,
) -> None:
    role = f"asyncstore_noread_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        database = postgres_dsn.rpartition("/")[2]
        with pytest.raises(QueryError) as caught:
            await _open(f"postgresql://{role}@{_server(postgres_dsn)}/{database}")
        assert "grant it SELECT on schema_migrations" in str(caught.value)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
