"""The operator dashboard: one page of live state from the database, and audited actions.

:class:`Dashboard` is a Starlette app (mount it in any ASGI app, or run ``asyncstore
dashboard --url ...``) with four routes, relative to where it is mounted::

    GET  /                   the page (inline HTML and JavaScript, no build step)
    GET  /api/state          one snapshot as JSON (see ``Dashboard.snapshot``)
    GET  /api/events         the same snapshots as Server-Sent Events (``event: state``),
                             one whenever it changed, re-read every refresh_interval_s
                             (``event: error`` while the database fails; 503 on /api/state)
    POST /api/actions/{name} an action from ``ACTIONS``; JSON body {"target": .., "confirm": true}

The snapshot is real data read through the storage contract: queue and outbox depths with
the oldest wait, running and dead-lettered tasks, the webhook delivery log, the live
session leases (with their subscribers when the dashboard runs inside the application's
process, through ``Runtime.subscriber_counts``), the feature flags and their rollout
share, and the audit log. One snapshot serves every open page: it is re-read at most once
per ``refresh_interval_s`` (and at once after an action).

Actions are off unless ``dashboard.operator_token`` is set (then the dashboard is no longer
read-only): each request must carry ``Authorization: Bearer <token>`` and ``"confirm":
true`` (the page asks the operator first), and every attempt that passes the token check
or fails it is written to the audit log (``operator_audit``, migration 0013) with who, what,
on what and how it ended. Answers: 200 done; 400 a malformed body or target; 401 a missing
or wrong token; 403 read-only; 404 an unknown action; 409 ``ActionRefused`` (no such
target, or not in a state the action applies to); 503 the database failed. Adding an
action is one entry in ``ACTIONS`` (``task.cancel`` is ``cancel_task``).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from asyncstore.orchestrator.config import (
    PER_SESSION_FLAGS,
    PROCESS_FLAGS,
    DashboardSettings,
    Flags,
)
from asyncstore.orchestrator.dashboard_page import PAGE
from asyncstore.orchestrator.errors import ActionRefused, ResendRefused
from asyncstore.orchestrator.runtime import Runtime
from asyncstore.orchestrator.webhooks.admin import resend
from asyncstore.storage import (
    TASKS,
    AsyncStorageBackend,
    AuditEntry,
    NewTask,
    QueueDepth,
    StorageError,
    Task,
    TaskStatus,
    WebhookAttempt,
)
from asyncstore.storage._validate import check_id, check_int, check_name
from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.task_cancel import TaskCancelOutcome

__all__ = ["ACTIONS", "Action", "Dashboard", "DashboardStatistics"]

_HEARTBEAT_S = 15.0


@dataclass(frozen=True, slots=True)
class Action:
    """One operator action: what it applies to and what it does.

    ``parse`` turns the request's ``target`` into the argument of ``run`` (raising
    ``InvalidArgument`` for a malformed one: 400); ``run`` does the action through the
    storage contract and returns what the page shows, or raises ``ActionRefused`` (409).
    ``applies_to`` names the rows that show its button (``task:dead``, ``webhook``).
    """

    label: str
    applies_to: str
    parse: Callable[[object], Any]
    run: Callable[[AsyncStorageBackend, Any], Awaitable[dict[str, Any]]]

    def target_name(self, target: Any) -> str:
        """How the audit log names the target: ``task:17``, ``webhook:msg_...``."""
        return f"{self.applies_to.split(':')[0]}:{target}"


def _task_id(raw: object) -> int:
    return check_int(raw, "target (a task id)", minimum=1)


def _webhook_id(raw: object) -> str:
    return check_id(raw, "target (a webhook-id)")


async def _dead_task(storage: AsyncStorageBackend, task_id: int, verb: str) -> Task:
    task = await storage.get_task(task_id)
    if task is None:
        raise ActionRefused(f"there is no task {task_id}")
    if task.status is not TaskStatus.DEAD:
        raise ActionRefused(
            f"task {task_id} is {task.status.value}: only a dead-lettered task can be {verb}"
        )
    return task


async def _retry_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Enqueue a fresh copy of a dead task (same queue, payload, priority and attempt
    budget; its idempotency key too, so a repeated retry does not queue two copies). The
    dead row stays as the record of what failed."""
    task = await _dead_task(storage, task_id, "retried")
    (copy,) = await storage.enqueue_tasks(
        [
            NewTask(
                task.queue,
                task.payload,
                priority=task.priority,
                idempotency_key=task.idempotency_key,
                max_attempts=task.max_attempts,
            )
        ]
    )
    return {"task": task_id, "new_task": copy.id}


async def _redrive_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Put the dead task itself back in its queue, due now, with a fresh attempt budget."""
    await _dead_task(storage, task_id, "redriven")
    moved = await storage.redrive_jobs(TASKS, [task_id])
    if not moved:  # a concurrent redrive took it first
        raise ActionRefused(f"task {task_id} was no longer dead-lettered")
    return {"task": task_id, "status": TaskStatus.QUEUED.value}


async def _resend_webhook(storage: AsyncStorageBackend, webhook_id: str) -> dict[str, Any]:
    """Queue the delivery again (same webhook-id and body), as ``asyncstore webhooks resend``."""
    try:
        row = await resend(storage, webhook_id)
    except ResendRefused as exc:
        raise ActionRefused(str(exc)) from exc
    return {"webhook_id": webhook_id, "outbox_row": row}


async def _cancel_task(storage: AsyncStorageBackend, task_id: int) -> dict[str, Any]:
    """Cancel a queued or running task from the page (``cancel_task``: a running task's
    worker is notified and cancels its handler); a task that already ended is refused."""
    answer = await storage.cancel_task(task_id, "cancelled by an operator")
    if answer.outcome is TaskCancelOutcome.NOT_FOUND:
        raise ActionRefused(f"there is no task {task_id}")
    if answer.outcome is not TaskCancelOutcome.CANCELLED:
        state = answer.status.value if answer.status is not None else "gone"
        raise ActionRefused(f"task {task_id} had already ended ({state})")
    cancelled = TaskStatus.CANCELLED.value
    return {"task": task_id, "status": cancelled, "was_running": answer.was_running}


ACTIONS: Mapping[str, Action] = {
    "task.retry": Action("Retry", "task:dead", _task_id, _retry_task),
    "task.redrive": Action("Redrive", "task:dead", _task_id, _redrive_task),
    "webhook.resend": Action("Resend", "webhook", _webhook_id, _resend_webhook),
    "task.cancel": Action("Cancel", "task:running", _task_id, _cancel_task),
}
"""The actions the dashboard offers, by name (the URL's last segment)."""


@dataclass(frozen=True, slots=True)
class DashboardStatistics:
    """What the dashboard did: snapshots read, live pages open, actions by outcome, and
    audit entries that could not be written (the database failed the action and the entry)."""

    snapshots: int
    streams_open: int
    actions_done: int
    actions_refused: int
    actions_failed: int
    audit_failed: int


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """The operator dashboard over one storage backend; ``app`` is its ASGI app.

    ``Dashboard.for_runtime(rt)`` inside an application (flags and live subscribers of
    that process), or ``Dashboard(storage, settings)`` on storage alone (the flags shown are
    ``flags``, by default the settings' defaults). ``close()`` ends the open live streams
    (call it before stopping the server: a server waits for open responses to finish).
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        settings: DashboardSettings | None = None,
        *,
        flags: Callable[[], Flags] | None = None,
        subscribers: Callable[[], Mapping[str, int]] | None = None,
        actions: Mapping[str, Action] = ACTIONS,
    ) -> None:
        self.storage = storage
        self.settings = settings or DashboardSettings()
        self._flags = flags or Flags
        self._subscribers = subscribers
        self.actions = dict(actions)
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = anyio.Lock()
        self._closing = anyio.Event()
        self._changed = anyio.Event()
        self._snapshots = 0
        self._streams = 0
        self._outcomes = {"done": 0, "refused": 0, "failed": 0, "audit_failed": 0}
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/api/state", self.state),
                Route("/api/events", self.events),
                Route("/api/actions/{name}", self.act, methods=["POST"]),
            ]
        )

    @classmethod
    def for_runtime(cls, rt: Runtime, settings: DashboardSettings | None = None) -> Dashboard:
        """The dashboard of a running application: its storage, live flags and subscribers."""
        return cls(
            rt.storage,
            settings or rt.settings.dashboard,
            flags=lambda: rt.flags,
            subscribers=rt.subscriber_counts,
        )

    @property
    def read_only(self) -> bool:
        """True unless an operator token is configured."""
        return self.settings.operator_token is None

    def close(self) -> None:
        """End every open live stream (each gets ``event: shutdown``); new ones end at once."""
        self._closing.set()

    def statistics(self) -> DashboardStatistics:
        return DashboardStatistics(
            self._snapshots,
            self._streams,
            self._outcomes["done"],
            self._outcomes["refused"],
            self._outcomes["failed"],
            self._outcomes["audit_failed"],
        )

    # -- reading -----------------------------------------------------------------------

    async def snapshot(self, *, fresh: bool = False) -> dict[str, Any]:
        """The dashboard's state as JSON-able data, read at most once per refresh interval.

        Keys: ``generated_at``, ``dialect``, ``read_only``, ``queues`` and ``outbox``
        (depths, ``oldest_wait_s``), ``tasks`` (``running``, ``dead``), ``webhooks`` (the
        delivery log, newest first), ``sessions`` (live leases; ``subscribers`` is None
        when this process cannot know), ``flags``, ``audit`` and ``actions``. Cancelling it
        leaves nothing behind (reads only).
        """
        async with self._lock:
            now = time.monotonic()
            cached = self._cached
            fresh_enough = cached is not None and now - cached[0] < self.settings.refresh_interval_s
            if cached is not None and fresh_enough and not fresh:
                return cached[1]
            data = await self._read()
            self._cached = (time.monotonic(), data)
            self._snapshots += 1
            return data

    async def _read(self) -> dict[str, Any]:
        s, rows = self.storage, self.settings.rows
        queues, outbox = await s.backlog_depths()
        running = await s.list_tasks(TaskStatus.RUNNING, limit=rows)
        dead = await s.list_tasks(TaskStatus.DEAD, limit=rows)
        attempts = await s.list_webhook_attempts(limit=rows)
        leases = await s.list_leases(limit=rows)
        audit = await s.list_audit(limit=rows)
        counts = dict(self._subscribers()) if self._subscribers is not None else None
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
        return {
            "generated_at": _iso(datetime.now(UTC)),
            "dialect": s.dialect,
            "read_only": self.read_only,
            "queues": [_depth(d) for d in queues],
            "outbox": _depth(outbox),
            "tasks": {"running": [_task(t) for t in running], "dead": [_task(t) for t in dead]},
            "webhooks": [_attempt(a) for a in attempts],
            "sessions": sessions,
            "subscribers_known": counts is not None,
            "flags": _flags(self._flags()),
            "audit": [_audit(e) for e in audit],
            "actions": {
                name: {"label": a.label, "applies_to": a.applies_to}
                for name, a in self.actions.items()
            },
        }

    # -- the routes --------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        root = json.dumps(request.scope.get("root_path", "")).replace("<", "\\u003c")
        return HTMLResponse(PAGE.replace("__ROOT_PATH__", root))

    async def state(self, request: Request) -> Response:
        try:
            return _json(await self.snapshot())
        except StorageError as exc:
            return _error(503, f"the database failed: {exc}")

    async def events(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._stream(), media_type="text/event-stream", headers=headers)

    async def _stream(self) -> AsyncIterator[bytes]:
        self._streams += 1
        try:
            yield b"retry: 2000\n\n"
            last: bytes | None = None
            quiet_since = time.monotonic()
            while not self._closing.is_set():
                try:
                    data = await self.snapshot()
                except StorageError as exc:
                    # Said on the page; the stream stays open and reads again next time.
                    last = None
                    yield b"event: error\ndata: " + orjson.dumps({"error": str(exc)}) + b"\n\n"
                    await _wait_any((self._closing,), self.settings.refresh_interval_s)
                    continue
                body = orjson.dumps({k: v for k, v in data.items() if k != "generated_at"})
                if body != last:
                    last, quiet_since = body, time.monotonic()
                    yield b"event: state\ndata: " + orjson.dumps(data) + b"\n\n"
                elif time.monotonic() - quiet_since >= _HEARTBEAT_S:
                    quiet_since = time.monotonic()
                    yield b": heartbeat\n\n"
                await _wait_any((self._changed, self._closing), self.settings.refresh_interval_s)
            yield b'event: shutdown\ndata: {"reason": "dashboard closing"}\n\n'
        finally:
            self._streams -= 1

    async def act(self, request: Request) -> Response:
        name = request.path_params["name"]
        action = self.actions.get(name)
        if action is None:
            return _error(404, f"no action {name!r}: one of {sorted(self.actions)}")
        token = self.settings.operator_token
        if token is None:
            return _error(403, "the dashboard is read-only: no operator token is configured")
        actor = _actor(request)
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken does not tell how much of a wrong token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        ):
            await self._audit(actor, name, "-", "refused: missing or wrong operator token")
            return _error(401, "a valid operator token is required (Authorization: Bearer ...)")
        target_name = "-"
        try:
            target = await self._target(request, action)
            target_name = action.target_name(target)
            result = await action.run(self.storage, target)
        except _Refusal as exc:
            await self._audit(actor, name, target_name, f"refused: {exc}")
            return _error(exc.status, str(exc))
        except InvalidArgument as exc:
            await self._audit(actor, name, target_name, f"refused: {exc}")
            return _error(400, str(exc))
        except ActionRefused as exc:
            await self._audit(actor, name, target_name, f"refused: {exc}")
            return _error(409, str(exc))
        except StorageError as exc:
            self._outcomes["failed"] += 1
            try:
                await self._audit(actor, name, target_name, f"failed: {exc}", count=False)
            except StorageError:
                self._outcomes["audit_failed"] += 1  # the database that failed the action
            return _error(503, f"the database failed: {exc}")
        entry = await self._audit(actor, name, target_name, "done", json.dumps(result))
        return _json({"ok": True, "result": result, "audit_id": entry.id})

    async def _target(self, request: Request, action: Action) -> Any:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise _Refusal(400, "the body must be a JSON object") from None
        if not isinstance(body, dict) or "target" not in body:
            raise _Refusal(400, 'the body must be a JSON object with "target"')
        if body.get("confirm") is not True:
            raise _Refusal(400, 'an action must be confirmed: send "confirm": true')
        return action.parse(body["target"])

    async def _audit(
        self,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        detail: str = "",
        *,
        count: bool = True,
    ) -> AuditEntry:
        if count:
            self._outcomes["done" if outcome == "done" else "refused"] += 1
        # Shielded: an operator's action is recorded even if the client hangs up meanwhile.
        with anyio.CancelScope(shield=True):
            entry = await self.storage.record_audit(actor, action, target, outcome, detail)
        self._cached = None
        self._changed.set()
        self._changed = anyio.Event()
        return entry


async def _wait_any(events: tuple[anyio.Event, ...], timeout_s: float) -> None:
    """Return when one of ``events`` is set, or after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        async with anyio.create_task_group() as tg:

            async def wait(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            for event in events:
                tg.start_soon(wait, event)


def _actor(request: Request) -> str:
    """``name@address``: the name the page sends (``X-Operator``, else ``operator``) and
    the client's address."""
    raw = request.headers.get("x-operator") or "operator"
    try:
        name = check_name(raw, "operator")
    except InvalidArgument:
        name = "operator"
    host = request.client.host if request.client is not None else "unknown"
    return f"{name}@{host}"


def _error(status: int, message: str) -> Response:
    return _json({"ok": False, "error": message}, status)


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(data),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


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
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "worker_id": t.worker_id,
        "last_error": t.last_error,
        "run_after": _iso(t.run_after),
        "updated_at": _iso(t.updated_at),
        "payload": json.dumps(t.payload)[:200],
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
