"""Contract (Postgres): a backlog read judges the rows it sees against a time after it saw them.

In READ COMMITTED each statement takes a fresh snapshot, but ``now()`` is the start of its
transaction. A read whose transaction started before an enqueue, and whose snapshot was
taken after the enqueue committed, saw the new rows with ``run_after`` (the enqueue's own
``now()``) later than its ``now()``: due tasks read as *delayed*, and the dashboard showed
0 waiting for a moment (seen once in a loaded test run). Here the read runs in a
transaction opened before the enqueue, the widest form of that window.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from asyncstore.storage import NewOutboxMessage, NewTask, open_storage
from asyncstore.storage._sql import load_queries
from tests.conftest import truncate


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    await truncate(postgres_dsn)
    yield postgres_dsn


@pytest.mark.parametrize("query", ["task_backlog", "outbox_backlog"])
async def test_rows_enqueued_before_the_snapshot_read_as_waiting(dsn: str, query: str) -> None:
    sql = load_queries("postgres")[query]
    reader = await asyncpg.connect(dsn)
    try:
        async with reader.transaction():  # READ COMMITTED: now() is fixed here
            await reader.execute("SELECT 1")
            async with open_storage(dsn) as storage:
                if query == "task_backlog":
                    await storage.enqueue_tasks([NewTask("q", {"i": 1}), NewTask("q", {"i": 2})])
                else:
                    await storage.enqueue_outbox(
                        [NewOutboxMessage("ch", "a", {"i": 1}), NewOutboxMessage("ch", "a", {})]
                    )
            rows = [dict(r) for r in await reader.fetch(sql)]
    finally:
        await reader.close()
    row = rows[0]
    assert (row["waiting"], row["delayed"], row["in_flight"]) == (2, 0, 0), rows
    assert row["oldest_wait_s"] is not None and row["oldest_wait_s"] >= 0.0
