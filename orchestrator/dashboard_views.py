"""What the operator dashboard shows: one snapshot of the database as JSON-able data.

``read_state`` reads everything through the storage contract (cold reads, no lock) and
returns the dict that ``GET /api/state`` answers and ``/api/events`` streams; the helpers
below turn each record into the page's row. A session's subscribers are summed over every
live instance's presence row (``orchestrator.presence``), this process's runtime counted
live when the dashboard runs inside one.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from asyncstore.orchestrator.config import (
    PER_SESSION_FLAGS,
    PROCESS_FLAGS,
    DashboardSettings,
    Flags,
)
from asyncstore.orchestrator.dashboard_actions import Action
from asyncstore.storage import (
    OUTBOX,
    AsyncStorageBackend,
    AuditEntry,
    OutboxMessage,
    OutboxStatus,
    QueueDepth,
    Task,
    TaskStatus,
    WebhookAttempt,
)

__all__ = ["SUBSCRIBERS_UNKNOWN", "read_state"]

SUBSCRIBERS_UNKNOWN = (
    "no live instance publishes its subscribers: each application runtime writes its own"
    " live stream subscribers per session to the database every"
    " runtime.presence_interval_s (default 5 s; 0 turns it off), so none runs against this"
    " database, or every one has it off"
)
"""Why the subscriber counts are not shown (``subscribers_note``): no live instance
publishes presence, and the dashboard does not run inside an application's runtime."""


async def read_state(
    storage: AsyncStorageBackend,
    settings: DashboardSettings,
    *,
    flags: Flags,
    subscribers: Callable[[], Mapping[str, int]] | None,
    instance_id: str | None = None,
    actions: Mapping[str, Action],
    read_only: bool,
    audit_skipped: int,
) -> dict[str, Any]:
    """One snapshot; see ``Dashboard.snapshot`` for its keys."""
    s, rows = storage, settings.rows
    queues, outbox = await s.backlog_depths()
    counts_by_queue = {d.name: d.waiting + d.delayed for d in queues if d.waiting + d.delayed}
    shown_queues = list(counts_by_queue)[:rows]
    queued = (
        await s.list_queued_tasks(shown_queues, limit=settings.queued_rows) if shown_queues else []
    )
    running = await s.list_tasks(TaskStatus.RUNNING, limit=rows)
    dead = await s.list_tasks(TaskStatus.DEAD, limit=rows)
    outbox_dead = await s.list_jobs(OUTBOX, OutboxStatus.DEAD, limit=rows)
    attempts = await s.list_webhook_attempts(limit=rows)
    leases = await s.list_leases(limit=rows)
    audit = await s.list_audit(limit=rows)
    instances = await _instances(s, subscribers, instance_id)
    counts: dict[str, int] | None = None
    if instances:
        counts = {}
        for _, per_session in instances:
            for session_id, n in per_session.items():
                counts[session_id] = counts.get(session_id, 0) + n
    sessions = [
        {
            "session_id": lease.session_id,
            "holder": lease.holder,
            "token": lease.token,
            "expires_at": _iso(lease.expires_at),
            "subscribers": None if counts is None else counts.pop(lease.session_id, 0),
        }
        for lease in leases
    ]
    for session_id, n in sorted((counts or {}).items())[: max(0, rows - len(sessions))]:
        sessions.append(
            {
                "session_id": session_id,
                "holder": None,
                "token": None,
                "expires_at": None,
                "subscribers": n,
            }
        )
    per_queue = [
        {
            "queue": name,
            "count": counts_by_queue[name],
            "shown": sum(1 for t in queued if t.queue == name),
        }
        for name in shown_queues
    ]
    return {
        "generated_at": _iso(datetime.now(UTC)),
        "dialect": s.dialect,
        "read_only": read_only,
        "queues": [_depth(d) for d in queues],
        "outbox": _depth(outbox),
        "tasks": {
            "queued": [_task(t) for t in queued],
            "running": [_task(t) for t in running],
            "dead": [_task(t) for t in dead],
        },
        "queued_per_queue": per_queue,
        "queued_queues_hidden": max(0, len(counts_by_queue) - len(shown_queues)),
        "outbox_dead": [_message(m) for m in outbox_dead],
        "webhooks": [_attempt(a) for a in attempts],
        "sessions": sessions,
        "subscribers_known": counts is not None,
        "subscribers_note": None if counts is not None else SUBSCRIBERS_UNKNOWN,
        "subscriber_instances": [row for row, _ in instances],
        "flags": _flags(flags),
        "audit": [_audit(e) for e in audit],
        "audit_skipped": audit_skipped,
        "actions": {
            name: {"label": a.label, "applies_to": list(a.rows)} for name, a in actions.items()
        },
    }


async def _instances(
    storage: AsyncStorageBackend,
    subscribers: Callable[[], Mapping[str, int]] | None,
    instance_id: str | None,
) -> list[tuple[dict[str, Any], Mapping[str, int]]]:
    """Every live instance's row for the page and its counts, by instance id.

    The live presence rows, with this process's runtime (``instance_id``, when the
    dashboard runs inside one) counted from ``subscribers`` live rather than from its row,
    which may be an interval old (or missing, with presence off).
    """
    out: list[tuple[dict[str, Any], Mapping[str, int]]] = []
    for p in await storage.list_presence():
        if subscribers is not None and p.instance_id == instance_id:
            continue
        out.append((_instance(p.instance_id, p.host, p.pid, p.seen_at, p.counts, False), p.counts))
    if subscribers is not None:
        local = dict(subscribers())
        me = instance_id or "this process"
        row = _instance(me, socket.gethostname(), os.getpid(), datetime.now(UTC), local, True)
        out.append((row, local))
        out.sort(key=lambda e: str(e[0]["instance_id"]))
    return out


def _instance(
    instance_id: str,
    host: str,
    pid: int,
    seen_at: datetime,
    counts: Mapping[str, int],
    this_process: bool,
) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "host": host,
        "pid": pid,
        "seen_at": _iso(seen_at),
        "sessions": sum(1 for n in counts.values() if n),
        "subscribers": sum(counts.values()),
        "this_process": this_process,
    }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat(timespec="milliseconds")


def _depth(d: QueueDepth) -> dict[str, Any]:
    return {
        "name": d.name,
        "waiting": d.waiting,
        "delayed": d.delayed,
        "in_flight": d.in_flight,
        "oldest_wait_s": round(d.oldest_wait_s, 3),
    }


def _task(t: Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "queue": t.queue,
        "status": t.status.value,
        "priority": t.priority,
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "worker_id": t.worker_id,
        "last_error": t.last_error,
        "run_after": _iso(t.run_after),
        "updated_at": _iso(t.updated_at),
        "payload": json.dumps(t.payload)[:200],
    }


def _message(m: OutboxMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "channel": m.channel,
        "account": m.account,
        "status": m.status.value,
        "attempts": m.attempts,
        "max_attempts": m.max_attempts,
        "last_error": m.last_error,
        "created_at": _iso(m.created_at),
        "payload": json.dumps(m.payload)[:200],
    }


def _attempt(a: WebhookAttempt) -> dict[str, Any]:
    return {
        "id": a.id,
        "endpoint": a.endpoint,
        "webhook_id": a.webhook_id,
        "outbox_id": a.outbox_id,
        "attempted_at": _iso(a.attempted_at),
        "status": a.status,
        "ok": a.ok,
        "error": a.error,
    }


def _audit(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": _iso(e.created_at),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "detail": e.detail,
    }


def _flags(flags: Flags) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in PER_SESSION_FLAGS:
        share = flags.share(name)
        out.append({"name": name, "scope": "session", "value": f"{share:g}%", "share": share})
    for name in PROCESS_FLAGS:
        out.append({"name": name, "scope": "process", "value": getattr(flags, name), "share": None})
    return out
