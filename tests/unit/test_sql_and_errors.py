"""Named SQL, migrations and error mapping: static checks that need no database."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from asyncstore.storage import (
    ConflictError,
    InvalidInput,
    QueryError,
    StorageSettings,
    StorageUnavailable,
    dialect_of,
)
from asyncstore.storage._sql import load_migrations, load_queries, parse_queries
from asyncstore.storage.base import render_job_queries
from asyncstore.storage.postgres import map_postgres_error
from asyncstore.storage.sqlite import map_sqlite_error


def test_both_dialects_define_the_same_public_queries() -> None:
    # As the drivers load them: the job templates rendered per kind (a dialect may write a
    # kind's own statement where the other renders the template).
    pg = {n for n in render_job_queries(load_queries("postgres")) if not n.startswith("_")}
    lite = {n for n in render_job_queries(load_queries("sqlite")) if not n.startswith("_")}
    assert pg == lite
    assert "acquire_lease" in pg and "claim_tasks" in pg


def test_both_dialects_have_the_same_migration_versions() -> None:
    pg = [m.version for m in load_migrations("postgres")]
    lite = [m.version for m in load_migrations("sqlite")]
    assert pg == lite and pg[0] == 1


def test_duplicate_query_names_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


def test_acquire_path_has_no_count_or_delete() -> None:
    for dialect in ("postgres", "sqlite"):
        sql = load_queries(dialect)["acquire_lease"].upper()
        assert "COUNT(" not in sql and "DELETE" not in sql


def test_postgres_errors_map_by_sqlstate() -> None:
    assert isinstance(map_postgres_error(asyncpg.UniqueViolationError("dup")), ConflictError)
    assert isinstance(map_postgres_error(asyncpg.UntranslatableCharacterError("x")), InvalidInput)
    assert isinstance(map_postgres_error(asyncpg.AdminShutdownError("bye")), StorageUnavailable)
    assert isinstance(map_postgres_error(asyncpg.SyntaxOrAccessError("bad")), QueryError)
    assert isinstance(map_postgres_error(ConnectionRefusedError()), StorageUnavailable)
    assert map_postgres_error(KeyError("not ours")) is None


def test_sqlite_errors_map_by_class() -> None:
    assert isinstance(map_sqlite_error(sqlite3.IntegrityError("UNIQUE")), ConflictError)
    busy = sqlite3.OperationalError("database is locked")
    assert isinstance(map_sqlite_error(busy), StorageUnavailable)
    assert isinstance(map_sqlite_error(sqlite3.OperationalError("no such table")), QueryError)
    assert map_sqlite_error(KeyError("not ours")) is None


def test_unknown_url_scheme_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput, match="unsupported storage URL scheme 'mysql'"):
        dialect_of("mysql://x")
    assert dialect_of("postgres://x") == "postgres"


def test_settings_keep_the_url_secret() -> None:
    settings = StorageSettings(url="postgresql://u:hunter2@h/db")  # type: ignore[arg-type]
    assert "hunter2" not in repr(settings)
