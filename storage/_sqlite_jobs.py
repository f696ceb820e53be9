"""SQLite leased jobs: the SQL hooks of the job engine (agent tasks and outbox) on SQLite.

This module owns ``SqliteJobs``, the part of ``SqliteBackend`` that enqueues (with
idempotency keys and the in-process wakeup on commit), claims under a fresh lease token,
heartbeats, completes, fails, releases, dead-letters, redrives, reads and purges jobs of
either ``JobKind``, reports backlog depths, and keeps the operators' audit log and the
runtime instances' presence rows.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from asyncstore.storage import _queue_limits as ql
from asyncstore.storage import _validate as v
from asyncstore.storage._queue_limits import LimitedClaim, QueueLimits
from asyncstore.storage._sqlite_conn import SqliteConnections, _json, _ts, _Tx
from asyncstore.storage.base import (
    TASKS,
    AuditEntry,
    FailureColumns,
    JobKind,
    Lease,
    OutboxMessage,
    Presence,
    QueueDepth,
    Task,
    TaskStatus,
)
from asyncstore.storage.task_cancel import TaskCancellation, encode_task_cancel


class SqliteJobs(SqliteConnections):
    """The leased-job hooks of ``SqliteBackend`` (a base of it)."""

    # -- leased jobs (agent tasks, outbox) ---------------------------------------

    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        now = time.time()
        async with self._transaction() as tx:
            if kind is TASKS:
                records: list[Any] = await self._insert_tasks(tx, rows, now)
            else:
                records = [
                    OutboxMessage.from_row(r) for r in await self._insert_outbox(tx, rows, now)
                ]
            waiting = [r.run_after for r in records if r.status == kind.waiting]
            if notify is not None and waiting:
                # Delivered in process on commit, as Postgres delivers the NOTIFY that its
                # enqueue statement sends: the same payload, the earliest due time.
                self._count("notify")
                tx.notify_on_commit(notify, f"{min(waiting).timestamp():.6f}")
        return records

    async def _insert_tasks(
        self,
        tx: _Tx,
        rows: list[v.PreparedTask],
        now: float,
        groups: list[str | None] | None = None,
    ) -> list[Task]:
        keys = sorted({(r[0], r[4]) for r in rows if r[4] is not None})
        existing: list[dict[str, Any]] = []
        if keys:
            existing = await tx.fetch("_existing_keyed_tasks", {"keys": _json(keys)})
        taken = {(e["queue"], e["idempotency_key"]) for e in existing}
        values: list[tuple[Any, ...]] = []
        for i, (queue, payload, priority, run_after, key, max_attempts) in enumerate(rows):
            if key is not None:
                if (queue, key) in taken:
                    continue
                taken.add((queue, key))
            at = now if run_after is None else run_after.timestamp()
            row = (queue, payload.decode(), priority, at, key, max_attempts, now, now)
            values.append(row if groups is None else (*row, groups[i]))
        before = await tx.scalar("_max_task_id", {})
        name = "enqueue_tasks" if groups is None else "enqueue_grouped_tasks"
        await tx.execute_many(name, values)
        new = await tx.fetch("_tasks_after", {"after": before})
        return v.match_enqueued(rows, [Task.from_row(r) for r in [*existing, *new]])

    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease: float,
        queues: list[str] | None,
    ) -> list[Any]:
        params: dict[str, Any] = {
            "worker_id": worker_id,
            "limit": limit,
            "queue": queues[0] if queues else None,  # a task claim names one queue
            "channels": None if queues is None else _json(queues),
        }
        async with self._transaction() as tx:
            now = time.time()
            token = await tx.next_token("claim_tokens")
            params.update(token=token, now=now, lease_until=now + lease)
            rows = await tx.fetch(kind.statement("claim"), params)
        jobs = [kind.record(r) for r in rows if r["status"] == kind.running]
        if kind is TASKS:
            return sorted(jobs, key=lambda t: (-t.priority, t.id))
        return sorted(jobs, key=lambda m: m.id)

    # -- coordinated task queues (storage._queue_limits) -------------------------

    async def _sql_enqueue_grouped_tasks(
        self, rows: list[Any], groups: list[str | None], notify: str | None
    ) -> list[Task]:
        now = time.time()
        async with self._transaction() as tx:
            for queue in sorted({r[0] for r, g in zip(rows, groups, strict=True) if g}):
                await tx.execute("_ensure_task_queue", {"queue": queue, "now": now})
            records = await self._insert_tasks(tx, rows, now, groups)
            waiting = [r.run_after for r in records if r.status == TASKS.waiting]
            if notify is not None and waiting:
                self._count("notify")
                tx.notify_on_commit(notify, f"{min(waiting).timestamp():.6f}")
        return records

    async def _sql_set_queue_limits(
        self, queue: str, running: int | None, rate: float | None, group: int
    ) -> QueueLimits:
        return await ql.lite_set_queue_limits(self, queue, running, rate, group)

    async def _sql_get_queue_limits(self, queue: str) -> QueueLimits | None:
        return await ql.lite_get_queue_limits(self, queue)

    async def _sql_claim_limited_tasks(
        self, queue: str, worker_id: str, limit: int, lease_s: float
    ) -> LimitedClaim | None:
        return await ql.lite_claim_limited_tasks(
            self, TASKS.record, worker_id, limit, queue, lease_s
        )

    async def _sql_wake_task_queue(self, queue: str, channel: str) -> bool:
        return await ql.lite_wake_task_queue(self, queue, channel)

    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]:
        name = kind.statement("heartbeat")
        return await self._claimed_update(name, ids, tokens, lease_until=lease_s)

    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return await self._claimed_update(kind.statement("complete"), ids, tokens)

    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]:
        rows = await self._failures(kind.statement("fail"), failures)
        return {r["id"]: r["status"] for r in rows}

    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]:
        return await self._claimed_update(kind.statement("release"), ids, tokens)

    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]:
        rows = await self._failures(kind.statement("dead_letter"), failures)
        return sorted(r["id"] for r in rows)

    async def _sql_redrive_jobs(self, kind: JobKind[Any, Any, Any], ids: list[int]) -> list[int]:
        params = {"ids": _json(ids), "now": time.time()}
        return sorted(r["id"] for r in await self._write(kind.statement("redrive"), params))

    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any:
        rows = await self._read(kind.statement("get"), {"id": job_id})
        return kind.record(rows[0]) if rows else None

    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count(kind.statement("purge"), {"cutoff": cutoff})

    async def _sql_cancel_task(
        self, task_id: int, reason: str, channel: str | None
    ) -> TaskCancellation:
        async with self._transaction() as tx:
            rows = await tx.fetch("_task_cancel_state", {"id": task_id})
            if not rows:
                return TaskCancellation.of(task_id, None, None)
            status, worker_id = rows[0]["status"], rows[0]["worker_id"]
            if status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
                params = {"id": task_id, "reason": reason, "now": time.time()}
                await tx.execute("cancel_task", params)
                if status == TaskStatus.RUNNING and channel is not None:
                    # Delivered on commit, as Postgres delivers NOTIFY.
                    tx.notify_on_commit(channel, encode_task_cancel(task_id, worker_id))
                # Its slot and its group are free: the finish wakeup of a coordinated queue.
                queue = rows[0]["queue"]
                await ql.lite_wake_in(tx, queue, ql.task_queue_channel(queue))
        return TaskCancellation.of(task_id, status, worker_id)

    async def _sql_next_task_due_s(self, queue: str) -> float | None:
        params = {"queue": queue, "now": time.time()}
        due = (await self._read("next_task_due", params))[0]["due_s"]
        return None if due is None else max(0.0, float(due))

    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]:
        now = {"now": time.time()}
        tasks = [QueueDepth.from_row(r) for r in await self._read("task_backlog", now)]
        return tasks, QueueDepth.from_row((await self._read("outbox_backlog", now))[0])

    async def _sql_list_jobs(self, kind: JobKind[Any, Any, Any], status: str, limit: int) -> Any:
        rows = await self._read(kind.statement("list"), {"status": status, "limit": limit})
        return [kind.record(r) for r in rows]

    async def _sql_list_queued_tasks(self, queues: list[str], limit: int) -> list[Task]:
        params = {"queues": _json(queues), "limit": limit}
        return [Task.from_row(r) for r in await self._read("list_queued_tasks", params)]

    async def _sql_list_leases(self, limit: int) -> list[Lease]:
        rows = await self._read("list_leases", {"now": time.time(), "limit": limit})
        return [Lease.from_row(r) for r in rows]

    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry:
        params = {
            "now": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
        }
        return AuditEntry.from_row((await self._write("record_audit", params))[0])

    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]:
        return [AuditEntry.from_row(r) for r in await self._read("list_audit", {"limit": limit})]

    async def _sql_publish_presence(
        self, instance_id: str, host: str, pid: int, ttl_s: float, counts: bytes
    ) -> Presence:
        params = {
            "instance_id": instance_id,
            "host": host,
            "pid": pid,
            "now": time.time(),
            "ttl_s": ttl_s,
            "counts": counts.decode(),
        }
        return _presence((await self._write("publish_presence", params))[0])

    async def _sql_list_presence(self, limit: int) -> list[Presence]:
        rows = await self._read("list_presence", {"now": time.time(), "limit": limit})
        return [_presence(r) for r in rows]

    async def _sql_withdraw_presence(self, instance_id: str) -> bool:
        params = {"instance_id": instance_id}
        return await self._write_count("withdraw_presence", params) > 0

    async def _sql_purge_presence(self) -> int:
        return await self._write_count("purge_presence", {"now": time.time()})

    async def _claimed_update(
        self, name: str, ids: list[int], tokens: list[int], *, lease_until: float | None = None
    ) -> list[int]:
        now = time.time()
        params: dict[str, Any] = {"claims": _json(list(zip(ids, tokens, strict=True))), "now": now}
        if lease_until is not None:
            params["lease_until"] = now + lease_until
        return sorted(r["id"] for r in await self._write(name, params))

    async def _failures(self, name: str, failures: FailureColumns) -> list[dict[str, Any]]:
        ids, tokens, errors, retry = failures
        items = [list(f) for f in zip(ids, tokens, errors, map(_ts, retry), strict=True)]
        return await self._write(name, {"failures": _json(items), "now": time.time()})

    async def _insert_outbox(
        self, tx: _Tx, rows: list[tuple[str, str, bytes, int]], now: float
    ) -> list[dict[str, Any]]:
        before = await tx.scalar("_max_outbox_id", {})
        values = [(c, a, p.decode(), m, now, now, now) for c, a, p, m in rows]
        await tx.execute_many("enqueue_outbox", values)
        return await tx.fetch("_outbox_after", {"after": before})


def _presence(row: dict[str, Any]) -> Presence:
    # counts is JSON text here (a json column on Postgres, decoded by its codec).
    return Presence.from_row({**row, "counts": orjson.loads(row["counts"])})
