"""Opening a SQLite file another process holds locked: a clear error, no leaked thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from asyncstore.storage import StorageSettings, StorageUnavailable, open_storage
from tests.waiting import wait_for


def _locked(path: Path) -> sqlite3.Connection:
    """A fresh file (rollback journal) held under an exclusive lock by another connection."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN EXCLUSIVE")
    return conn


async def test_open_that_cannot_switch_to_wal_raises_and_leaks_no_thread(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    holder = _locked(path)
    before = threading.active_count()
    settings = StorageSettings(url=SecretStr(f"sqlite:///{path}"), sqlite_busy_timeout_s=0.2)
    try:
        with pytest.raises(StorageUnavailable, match="locked"):
            async with open_storage(settings):
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Every connection thread opened by the failed open is gone (a leaked one kept a
    # process that failed to open alive forever).
    await wait_for(lambda: threading.active_count() <= before, what="the threads to end")


async def test_open_waits_for_a_lock_released_within_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    holder = _locked(path)
    release = threading.Timer(0.3, lambda: (holder.execute("ROLLBACK"), holder.close()))
    release.start()
    settings = StorageSettings(url=SecretStr(f"sqlite:///{path}"), sqlite_busy_timeout_s=10)
    try:
        async with open_storage(settings, migrate=True) as storage:
            assert await storage.schema_version() > 0
    finally:
        release.join()
