"""The SQL side of periodic ticks, for both drivers: record a tick with its task, read the
latest recorded ticks, purge old ones.

A tick is a row of ``periodic_ticks`` keyed by ``(schedule, tick_at)``, inserted in the
transaction that enqueues the tick's task with the job engine's own enqueue statement: the
key refuses a second insert of the same tick (another runner, a restarted one), and the
task exists exactly when its tick row does. The public calls and their validation are the
contract's (``AsyncStorageBackend.record_periodic_tick`` and the two below it); the drivers'
``_sql_*`` hooks call these functions, which only run SQL on prepared values. Postgres
stores ``tick_at`` as ``timestamptz``, SQLite as whole microseconds since the epoch: both
exact, so two runners computing the same tick write the same key.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from asyncstore.storage._validate import PreparedTask, match_enqueued
from asyncstore.storage.base import TASKS, Task

if TYPE_CHECKING:
    from asyncstore.storage.postgres import PostgresBackend
    from asyncstore.storage.sqlite import SqliteBackend

__all__ = [
    "postgres_last_ticks",
    "postgres_purge_ticks",
    "postgres_record_tick",
    "sqlite_last_ticks",
    "sqlite_purge_ticks",
    "sqlite_record_tick",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tick_micros(tick_at: datetime) -> int:
    """A tick as whole microseconds since the Unix epoch (exact, unlike a float)."""
    return (tick_at - _EPOCH) // timedelta(microseconds=1)


def micros_tick(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


# -- Postgres ------------------------------------------------------------------------------


async def postgres_record_tick(
    backend: PostgresBackend,
    schedule: str,
    tick_at: datetime,
    row: PreparedTask,
    notify: str | None,
) -> Task | None:
    enqueue = TASKS.statement("enqueue")
    async with backend._transaction() as conn:
        backend._count("record_periodic_tick")
        # A concurrent transaction recording the same tick makes this insert wait for its
        # outcome: committed, this one records nothing; rolled back, this one records it.
        if await conn.fetchval(backend._q["record_periodic_tick"], schedule, tick_at) is None:
            return None
        backend._count(enqueue)
        columns = [[value] for value in row]
        result = await conn.fetch(backend._q[enqueue], *columns, notify)
        if result and result[0]["notified"]:
            backend._count("notify")  # sent on this transaction's commit
        task = match_enqueued([row], [Task.from_row(r) for r in result])[0]
        backend._count("set_periodic_tick_task")
        await conn.execute(backend._q["set_periodic_tick_task"], schedule, tick_at, task.id)
    return task


async def postgres_last_ticks(backend: PostgresBackend, schedules: list[str]) -> dict[str, Any]:
    rows = await backend._fetch("last_periodic_ticks", schedules)
    return {r["schedule"]: r["tick_at"] for r in rows}


async def postgres_purge_ticks(backend: PostgresBackend, retention_s: float) -> int:
    status = await backend._execute("purge_periodic_ticks", retention_s)
    return int(status.rsplit(" ", 1)[-1])


# -- SQLite --------------------------------------------------------------------------------


async def sqlite_record_tick(
    backend: SqliteBackend,
    schedule: str,
    tick_at: datetime,
    row: PreparedTask,
    notify: str | None,
) -> Task | None:
    now = time.time()
    key = {"schedule": schedule, "tick_at": tick_micros(tick_at)}
    async with backend._transaction() as tx:
        if not await tx.fetch("record_periodic_tick", {**key, "now": now}):
            return None
        task: Task = (await backend._insert_tasks(tx, [row], now))[0]
        if notify is not None and task.status == TASKS.waiting:
            backend._count("notify")
            tx.notify_on_commit(notify, f"{task.run_after.timestamp():.6f}")
        await tx.execute("set_periodic_tick_task", {**key, "task_id": task.id})
    return task


async def sqlite_last_ticks(backend: SqliteBackend, schedules: list[str]) -> dict[str, Any]:
    rows = await backend._read(
        "last_periodic_ticks", {"schedules": orjson.dumps(schedules).decode()}
    )
    return {r["schedule"]: micros_tick(r["tick_at"]) for r in rows}


async def sqlite_purge_ticks(backend: SqliteBackend, retention_s: float) -> int:
    return await backend._write_count("purge_periodic_ticks", {"cutoff": time.time() - retention_s})
