"""``asyncstore doctor`` against real databases: healthy, unreachable, unmigrated, no listener."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from asyncstore.orchestrator.cli import latest_migration, main
from asyncstore.storage import open_storage


def test_doctor_passes_on_a_migrated_database(
    storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--url", storage_url]) == 0
    out = capsys.readouterr().out
    for check in ("connectivity", "schema", "notifications", "pool", "clock"):
        assert f"ok   {check}" in out
    assert f"schema version {latest_migration(storage_url)} (latest)" in out


def test_doctor_reports_a_missing_migration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--url", f"sqlite:///{tmp_path / 'fresh.db'}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL schema: the database has no asyncstore schema" in out
    assert "fix: run `asyncstore migrate`" in out
    assert "1 problem(s): schema" in out


def test_doctor_reports_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--url", "postgresql://postgres@127.0.0.1:1/none"]) == 1
    out = capsys.readouterr().out
    assert "FAIL connectivity: cannot reach the database" in out
    assert "fix: check storage.url" in out


@pytest.fixture
def limited_dsn(postgres_dsn: str) -> Iterator[str]:
    """A migrated database reachable only through a role allowed one connection."""
    suffix = secrets.token_hex(4)
    role, db = f"asyncstore_doctor_{suffix}", f"asyncstore_doctor_{suffix}"
    base = postgres_dsn.rpartition("/")[0]
    scheme, _, rest = base.partition("://")
    host = rest.rpartition("@")[2]
    dsn = f"{scheme}://{role}@{host}/{db}"

    async def run(*sql: str) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def migrate() -> None:
        async with open_storage(dsn, migrate=True):
            pass

    asyncio.run(run(f'CREATE ROLE "{role}" LOGIN', f'CREATE DATABASE "{db}" OWNER "{role}"'))
    try:
        asyncio.run(migrate())
        asyncio.run(run(f'ALTER ROLE "{role}" CONNECTION LIMIT 1'))
        yield dsn
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', f'DROP ROLE "{role}"'))


@pytest.mark.postgres
def test_doctor_reports_a_listener_that_cannot_run(
    limited_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The pool takes the role's only connection: the LISTEN connection is refused.
    monkeypatch.setenv("ASYNCSTORE_STORAGE__POOL_MIN_SIZE", "1")
    monkeypatch.setenv("ASYNCSTORE_STORAGE__POOL_MAX_SIZE", "1")
    assert main(["doctor", "--url", limited_dsn]) == 1
    out = capsys.readouterr().out
    assert "ok   connectivity" in out and "ok   schema" in out
    assert "FAIL notifications: the notification listener could not start" in out
    assert "LISTEN needs its own session connection" in out


@pytest.mark.postgres
def test_doctor_tells_to_migrate_an_empty_postgres_database(
    empty_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--url", empty_postgres_url]) == 1
    out = capsys.readouterr().out
    assert "FAIL schema: the database has no asyncstore schema" in out
    assert "fix: run `asyncstore migrate`" in out
    assert "the check failed" not in out


def test_doctor_reports_a_schema_ahead_of_this_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'ahead.db'}"
    assert main(["migrate", "--url", url]) == 0
    ahead = latest_migration(url) + 1
    conn = sqlite3.connect(tmp_path / "ahead.db")
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0)", (ahead,))
    conn.close()
    capsys.readouterr()
    assert main(["doctor", "--url", url]) == 1
    out = capsys.readouterr().out
    assert f"FAIL schema: the database (version {ahead}) is newer than this code" in out
    # `asyncstore migrate` refuses it too instead of calling it up to date.
    assert main(["migrate", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"schema version {ahead}, newer than this code" in err


def test_doctor_reports_a_malformed_url_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["doctor", "--url", "postgresql://app:hunter2@db.example:port/app"]) == 1
    out = capsys.readouterr().out
    assert "FAIL connectivity: the storage URL cannot be used" in out
    assert "hunter2" not in out and "app:***@" in out
