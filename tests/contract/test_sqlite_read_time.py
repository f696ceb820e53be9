"""SQLite reads judge liveness at the time they run, not when they were asked for.

A read that waits for one of the driver's reader connections (all in use under load) used
to compare ``expires_at`` with the ``now`` taken when it was called. A lease released while
the read waited (released leases keep their row, with ``expires_at`` set to the release
time) then still counted as live beside the one that replaced it: ``count_leases`` saw 6
live leases under a cap of 5 on a loaded machine. Postgres evaluates ``now()`` in the
statement and never did this.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
from pydantic import SecretStr

from asyncstore.storage import StorageSettings, open_storage

BOUND_S = 30.0


async def test_a_read_that_waited_for_a_reader_does_not_count_a_lease_released_meanwhile(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    settings = StorageSettings(url=SecretStr(url), sqlite_readers=1)
    async with open_storage(settings, migrate=True) as storage:
        old = await storage.acquire_lease("a", "h1", 60)
        assert old is not None
        holder = storage._reader()  # type: ignore[attr-defined]
        await holder.__aenter__()  # the only reader is in use: reads wait in line
        try:
            count = asyncio.ensure_future(storage.count_leases())
            got = asyncio.ensure_future(storage.get_lease("a"))
            await anyio.wait_all_tasks_blocked()
            assert await storage.release_lease("a", old.token)
            assert await storage.acquire_lease("b", "h2", 60) is not None
        finally:
            await holder.__aexit__(None, None, None)
        with anyio.fail_after(BOUND_S):
            assert await count == 1  # "b" only: "a" was released before the read ran
            assert await got is None
