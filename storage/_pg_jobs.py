"""Postgres leased jobs: the SQL hooks of the job engine (agent tasks and outbox) on Postgres.

This module owns ``PgJobs``, the part of ``PostgresBackend`` that enqueues (idempotency
keys deduplicated within a call, the NOTIFY sent by the enqueue statement itself), claims,
heartbeats, completes, fails, releases, dead-letters, redrives, reads and purges jobs of
either ``JobKind``, runs the coordinated task queues through ``storage._queue_limits``,
cancels tasks, reports backlog depths, and keeps the operators' audit log and the runtime
instances' presence rows. The statements are the named queries of
``sql/postgres/queries.sql`` (the ``*_jobs`` templates rendered per kind by
``storage.jobkinds``), run on the pool through ``PgConnections``.
"""

from __future__ import annotations

from typing import Any

from asyncstore.storage import _queue_limits as ql
from asyncstore.storage import _validate as v
from asyncstore.storage._pg_conn import PgConnections, _rowcount
from asyncstore.storage._queue_limits import LimitedClaim, QueueLimits
from asyncstore.storage.base import (
    TASKS,
    AuditEntry,
    FailureColumns,
    JobKind,
    Lease,
    Presence,
    QueueDepth,
    Task,
)
from asyncstore.storage.task_cancel import TaskCancellation


class PgJobs(PgConnections):
    """The leased-job hooks of ``PostgresBackend`` (a base of it)."""

    # -- leased jobs (agent tasks, outbox) ---------------------------------------

    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        send = rows
        if kind is TASKS:
            # Same key twice in one call: send it once (ON CONFLICT cannot touch a row twice).
            first_of_key: set[tuple[str, str]] = set()
            send = []
            for row in rows:
                if row[4] is not None:
                    if (row[0], row[4]) in first_of_key:
                        continue
                    first_of_key.add((row[0], row[4]))
                send.append(row)
        columns = [list(c) for c in zip(*send, strict=True)]
        result = await self._fetch(kind.statement("enqueue"), *columns, notify)
        if result and result[0]["notified"]:
            self._count("notify")  # sent by the enqueue statement itself, on its commit
        records = [kind.record(r) for r in result]
        if kind is TASKS:
            return v.match_enqueued(rows, records)
        return sorted(records, key=lambda m: m.id)

    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease_s: float,
        queues: list[str] | None,
    ) -> list[Any]:
        rows = await self._fetch(kind.statement("claim"), worker_id, limit, queues, lease_s)
        return [kind.record(r) for r in rows]

    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]:
        return [r[0] for r in await self._fetch(kind.statement("heartbeat"), ids, tokens, lease_s)]

    # -- coordinated task queues (storage._queue_limits) -------------------------

    async def _sql_enqueue_grouped_tasks(
        self, rows: list[Any], groups: list[str | None], notify: str | None
    ) -> list[Any]:
        return await ql.pg_enqueue_grouped_tasks(self, rows, groups, notify)

    async def _sql_set_queue_limits(
        self, queue: str, running: int | None, rate: float | None, group: int
    ) -> QueueLimits:
        return await ql.pg_set_queue_limits(self, queue, running, rate, group)

    async def _sql_get_queue_limits(self, queue: str) -> QueueLimits | None:
        return await ql.pg_get_queue_limits(self, queue)

    async def _sql_claim_limited_tasks(
        self, queue: str, worker_id: str, limit: int, lease_s: float
    ) -> LimitedClaim | None:
        return await ql.pg_claim_limited_tasks(self, TASKS.record, worker_id, limit, queue, lease_s)

    async def _sql_wake_task_queue(self, queue: str, channel: str) -> bool:
        return await ql.pg_wake_task_queue(self, queue, channel)

    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("complete"), ids, tokens))

    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]:
        rows = await self._fetch(kind.statement("fail"), *failures)
        return {r[0]: r[1] for r in rows}

    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("release"), ids, tokens))

    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]:
        ids, tokens, errors, _ = failures  # retry_at does not apply
        rows = await self._fetch(kind.statement("dead_letter"), ids, tokens, errors)
        return sorted(r[0] for r in rows)

    async def _sql_redrive_jobs(self, kind: JobKind[Any, Any, Any], ids: list[int]) -> list[int]:
        return sorted(r[0] for r in await self._fetch(kind.statement("redrive"), ids))

    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any:
        rows = await self._fetch(kind.statement("get"), job_id)
        return kind.record(rows[0]) if rows else None

    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int:
        return _rowcount(await self._execute(kind.statement("purge"), age_s))

    async def _sql_cancel_task(
        self, task_id: int, reason: str, channel: str | None
    ) -> TaskCancellation:
        rows = await self._fetch("cancel_task", task_id, reason, channel)
        if not rows:
            return TaskCancellation.of(task_id, None, None)
        await ql.pg_wake_after_cancel(self, rows[0])
        return TaskCancellation.of(task_id, rows[0]["status"], rows[0]["worker_id"])

    async def _sql_next_task_due_s(self, queue: str) -> float | None:
        rows = await self._fetch("next_task_due", queue)
        due = rows[0]["due_s"] if rows else None
        return None if due is None else max(0.0, float(due))

    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        tasks = [QueueDepth.from_row(r) for r in await self._fetch("task_backlog")]
        return tasks, QueueDepth.from_row((await self._fetch("outbox_backlog"))[0])

    async def _sql_list_jobs(self, kind: JobKind[Any, Any, Any], status: str, limit: int) -> Any:
        rows = await self._fetch(kind.statement("list"), status, limit)
        return [kind.record(r) for r in rows]

    async def _sql_list_queued_tasks(self, queues: list[str], limit: int) -> list[Task]:
        return [Task.from_row(r) for r in await self._fetch("list_queued_tasks", queues, limit)]

    async def _sql_list_leases(self, limit: int) -> list[Lease]:
        return [Lease.from_row(r) for r in await self._fetch("list_leases", limit)]

    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry:
        rows = await self._fetch("record_audit", actor, action, target, outcome, detail)
        return AuditEntry.from_row(rows[0])

    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self._fetch("list_audit", limit)]

    async def _sql_publish_presence(
        self, instance_id: str, host: str, pid: int, ttl_s: float, counts: bytes
    ) -> Presence:
        rows = await self._fetch("publish_presence", instance_id, host, pid, ttl_s, counts)
        return Presence.from_row(rows[0])

    async def _sql_list_presence(self, limit: int) -> list[Presence]:
        return [Presence.from_row(r) for r in await self._fetch("list_presence", limit)]

    async def _sql_withdraw_presence(self, instance_id: str) -> bool:
        return _rowcount(await self._execute("withdraw_presence", instance_id)) > 0

    async def _sql_purge_presence(self) -> int:
        return _rowcount(await self._execute("purge_presence"))
