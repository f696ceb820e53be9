"""The operator dashboard: one page of live state from the database, and audited actions.

:class:`Dashboard` is a Starlette app (mount it in any ASGI app, or run ``asyncstore
dashboard --url ...``) with four routes, relative to where it is mounted::

    GET  /                   the page (inline HTML and JavaScript, no build step)
    GET  /api/state          one snapshot as JSON (see ``Dashboard.snapshot``)
    GET  /api/events         the same snapshots as Server-Sent Events (``event: state``),
                             one whenever it changed, re-read every refresh_interval_s
                             (``event: error`` while the database fails; 503 on /api/state)
    POST /api/actions/{name} an action from ``ACTIONS``; JSON body {"target": .., "confirm": true}

The snapshot is real data read through the storage contract (``dashboard_views``): queue
and outbox depths with the oldest wait, each queue's next queued tasks, running and
dead-lettered tasks, dead-lettered outbox messages, the webhook delivery log, the live
session leases and the sessions with live stream subscribers (summed over every instance
of the fleet that publishes its presence, ``orchestrator.presence``, and this process's
runtime counted live through ``Runtime.subscriber_counts`` when the dashboard runs inside
one; when no instance publishes, the snapshot says why), the feature flags and their
rollout share, and the audit log. One snapshot serves every open page: it is re-read at most once
per ``refresh_interval_s`` (and at once after an action).

Actions are off unless ``dashboard.operator_token`` is set (then the dashboard is no longer
read-only): each request must carry ``Authorization: Bearer <token>`` and ``"confirm":
true`` (the page asks the operator first), and every attempt that passes the token check
or fails it is written to the audit log (``operator_audit``, migration 0013) with who, what,
on what and how it ended; refused attempts within a per-client-address budget
(``RefusalBudget``: ``audit_refused_burst``, then ``audit_refused_per_minute``), the rest
only counted (``audit_skipped``) and said in the client's next written refusal. Answers:
200 done; 400 a malformed body or target; 401 a missing or wrong token; 403 read-only; 404
an unknown action; 409 ``ActionRefused`` (no such target, or not in a state the action
applies to); 503 the database failed. Adding an action is one entry in ``ACTIONS``
(``dashboard_actions``: ``task.cancel`` is ``cancel_task`` on a queued or running task,
``outbox.redrive`` is ``redrive_outbox``).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from asyncstore.orchestrator.config import DashboardSettings, Flags
from asyncstore.orchestrator.consumer_spec import first_of
from asyncstore.orchestrator.dashboard_actions import ACTIONS, Action, RefusalBudget
from asyncstore.orchestrator.dashboard_page import PAGE
from asyncstore.orchestrator.dashboard_views import read_state
from asyncstore.orchestrator.errors import ActionRefused
from asyncstore.orchestrator.runtime import Runtime
from asyncstore.storage import AsyncStorageBackend, AuditEntry, StorageError
from asyncstore.storage._validate import check_name
from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.families import Family, MetricSink

__all__ = ["ACTIONS", "Action", "Dashboard", "DashboardStatistics"]

_HEARTBEAT_S = 15.0


@dataclass(frozen=True, slots=True)
class DashboardStatistics:
    """What the dashboard did: snapshots read, live pages open, actions by outcome, audit
    entries that could not be written (the database failed the action and the entry), and
    refused attempts whose audit entry was skipped by the per-client budget
    (``dashboard.audit_refused_*``; they still count in ``actions_refused``)."""

    snapshots: int
    streams_open: int
    actions_done: int
    actions_refused: int
    actions_failed: int
    audit_failed: int
    audit_skipped: int = 0

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("dashboard_snapshots", "counter", "State snapshots read from the database."),
        Family("dashboard_live_pages", "gauge", "Live (SSE) dashboard pages open."),
        Family(
            "dashboard_actions",
            "counter",
            "Operator actions by outcome (refused: read-only, token, input or state).",
            ("outcome",),
            known=("done", "refused", "failed"),
        ),
        Family("dashboard_audit_failed", "counter", "Audit entries that could not be written."),
        Family(
            "dashboard_audit_skipped",
            "counter",
            "Refused attempts whose audit entry the per-client budget skipped.",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("dashboard_snapshots", {}, self.snapshots)
        out.sample("dashboard_live_pages", {}, self.streams_open)
        outcomes = {
            "done": self.actions_done,
            "refused": self.actions_refused,
            "failed": self.actions_failed,
        }
        out.samples("dashboard_actions", {}, outcomes)
        out.sample("dashboard_audit_failed", {}, self.audit_failed)
        out.sample("dashboard_audit_skipped", {}, self.audit_skipped)


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """The operator dashboard over one storage backend; ``app`` is its ASGI app.

    ``Dashboard.for_runtime(rt)`` inside an application (flags of that process; its live
    subscribers counted live, ``instance_id`` naming its own presence row, which is then
    not added), or ``Dashboard(storage, settings)`` on storage alone (the flags shown are
    ``flags``, by default the settings' defaults). Either way the subscribers of every
    other live instance come from their presence rows. ``close()`` ends the open live streams
    (call it before stopping the server: a server waits for open responses to finish).
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        settings: DashboardSettings | None = None,
        *,
        flags: Callable[[], Flags] | None = None,
        subscribers: Callable[[], Mapping[str, int]] | None = None,
        instance_id: str | None = None,
        actions: Mapping[str, Action] = ACTIONS,
    ) -> None:
        self.storage = storage
        self.settings = settings or DashboardSettings()
        self._flags = flags or Flags
        self._subscribers = subscribers
        self._instance_id = instance_id
        self.actions = dict(actions)
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = anyio.Lock()
        self._closing = anyio.Event()
        self._changed = anyio.Event()
        self._snapshots = 0
        self._streams = 0
        self._outcomes = {"done": 0, "refused": 0, "failed": 0, "audit_failed": 0}
        cfg = self.settings
        self._refusals = RefusalBudget(cfg.audit_refused_burst, cfg.audit_refused_per_minute)
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/api/state", self.state),
                Route("/api/events", self.events),
                Route("/api/actions/{name}", self.act, methods=["POST"]),
            ]
        )

    @classmethod
    def for_runtime(
        cls,
        rt: Runtime,
        settings: DashboardSettings | None = None,
        *,
        metrics_name: str | None = "dashboard",
    ) -> Dashboard:
        """The dashboard of a running application: its storage, live flags and subscribers.

        Its statistics are added to the runtime's metrics as source ``metrics_name`` (None:
        not exported); a name already in use is an ``InvalidArgument`` (a second dashboard
        of one runtime takes another name, or the first one's is removed with
        ``rt.metrics.remove_source``)."""
        dashboard = cls(
            rt.storage,
            settings or rt.settings.dashboard,
            flags=lambda: rt.flags,
            subscribers=rt.subscriber_counts,
            instance_id=rt.instance_id,
        )
        if metrics_name is not None:
            rt.metrics.add_source(metrics_name, dashboard)
        return dashboard

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
            self._refusals.skipped,
        )

    # -- reading -----------------------------------------------------------------------

    async def snapshot(self, *, fresh: bool = False) -> dict[str, Any]:
        """The dashboard's state as JSON-able data, read at most once per refresh interval.

        Keys: ``generated_at``, ``dialect``, ``read_only``, ``queues`` and ``outbox``
        (depths, ``oldest_wait_s``), ``tasks`` (``queued``: each queue's next
        ``queued_rows`` in claim order, for the first ``rows`` queues with a backlog;
        ``running``, ``dead``: newest first), ``queued_per_queue`` (per queue: ``count``
        waiting or delayed, ``shown``) and ``queued_queues_hidden``, ``outbox_dead``
        (dead-lettered outbox messages, newest first), ``webhooks`` (the delivery log,
        newest first), ``sessions`` (live leases, then sessions with subscribers but no lease;
        ``subscribers`` summed over ``subscriber_instances``, the live instances that publish
        presence; None when there is none, and ``subscribers_note`` says why), ``flags``,
        ``audit``,
        ``audit_skipped`` (refused attempts not written, see ``statistics``) and
        ``actions``. Cancelling it leaves nothing behind (reads only).
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
        return await read_state(
            self.storage,
            self.settings,
            flags=self._flags(),
            subscribers=self._subscribers,
            instance_id=self._instance_id,
            actions=self.actions,
            read_only=self.read_only,
            audit_skipped=self._refusals.skipped,
        )

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
            await self._refused(request, actor, name, "-", "missing or wrong operator token")
            return _error(401, "a valid operator token is required (Authorization: Bearer ...)")
        target_name = "-"
        try:
            target = await self._target(request, action)
            target_name = action.target_name(target)
            result = await action.run(self.storage, target)
        except _Refusal as exc:
            await self._refused(request, actor, name, target_name, str(exc))
            return _error(exc.status, str(exc))
        except InvalidArgument as exc:
            await self._refused(request, actor, name, target_name, str(exc))
            return _error(400, str(exc))
        except ActionRefused as exc:
            await self._refused(request, actor, name, target_name, str(exc))
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

    async def _refused(
        self, request: Request, actor: str, action: str, target: str, reason: str
    ) -> None:
        """Audit a refused attempt if the client's budget allows (by its address: the
        operator name is the client's to choose); the row says how many were skipped."""
        self._outcomes["refused"] += 1
        write, skipped = self._refusals.take(_client(request))
        if not write:  # counted; the page shows the count at its next regular refresh
            return
        detail = "" if not skipped else f"{skipped} earlier refused attempts not recorded"
        await self._audit(actor, action, target, f"refused: {reason}", detail, count=False)

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
        await first_of(*events)


def _actor(request: Request) -> str:
    """``name@address``: the name the page sends (``X-Operator``, else ``operator``) and
    the client's address."""
    raw = request.headers.get("x-operator") or "operator"
    try:
        name = check_name(raw, "operator")
    except InvalidArgument:
        name = "operator"
    return f"{name}@{_client(request)}"


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _error(status: int, message: str) -> Response:
    return _json({"ok": False, "error": message}, status)


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(data),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
