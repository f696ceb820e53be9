"""The operator dashboard (orchestrator.dashboard, issue 19) over real HTTP on both drivers.

Each test serves a ``Dashboard`` with uvicorn on 127.0.0.1 (port 0) and talks to it with
httpx: the page, the JSON snapshot, the SSE stream (a new task shows up in the next state),
and every action: read-only without a token, 401 without the right token, clear 4xx for a
malformed request, 409 for a target in the wrong state, and an audit row for every
attempt past the read-only check. One test mounts it inside an application with a runtime
(live flags and subscribers); one runs ``asyncstore dashboard`` as a process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncstore.orchestrator.config import DashboardSettings, load_settings
from asyncstore.orchestrator.dashboard import Dashboard
from asyncstore.orchestrator.runtime import open_runtime
from asyncstore.storage import (
    AsyncStorageBackend,
    NewOutboxMessage,
    NewTask,
    TaskStatus,
    WebhookAttempt,
    open_storage,
)
from asyncstore.storage.base import Failure
from asyncstore.storage.errors import InvalidArgument
from tests.waiting import wait_for

TOKEN = "s3cret-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Operator": "ann"}


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test process keeps its own signal handlers


@dataclass
class Served:
    dashboard: Dashboard
    client: httpx.AsyncClient
    storage: AsyncStorageBackend


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await wait_for(lambda: server.started, what="uvicorn started")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        server.should_exit = True


@contextlib.asynccontextmanager
async def serve(
    storage: AsyncStorageBackend,
    token: str | None = TOKEN,
    refresh_s: float = 0.05,
    **more: Any,
) -> AsyncIterator[Served]:
    settings = DashboardSettings(
        operator_token=None if token is None else SecretStr(token),
        refresh_interval_s=refresh_s,
        **more,
    )
    dashboard = Dashboard(storage, settings)
    try:
        async with serve_app(dashboard.app) as client:
            yield Served(dashboard, client, storage)
    finally:
        dashboard.close()


async def _dead_task(storage: AsyncStorageBackend, payload: Any = None) -> int:
    (task,) = await storage.enqueue_tasks(
        [NewTask("jobs", payload or {"do": "x"}, max_attempts=1, idempotency_key=None)]
    )
    (claimed,) = await storage.claim_tasks("jobs", "w-1", limit=1, lease_s=30)
    await storage.dead_letter_tasks([Failure(claimed.id, claimed.claim.token, "boom")])
    return task.id


async def _post(s: Served, name: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await s.client.post(
        f"/api/actions/{name}", content=raw, headers=AUTH if headers is None else headers
    )
    return r.status_code, r.json()


async def test_page_and_state_show_real_data(storage: AsyncStorageBackend) -> None:
    dead = await _dead_task(storage)
    await storage.enqueue_tasks([NewTask("jobs", {"i": 1}), NewTask("mail", {"i": 2})])
    (running,) = await storage.claim_tasks("mail", "worker-9", limit=1, lease_s=30)
    lease = await storage.acquire_lease("chat-1", "host-a", ttl_s=30)
    assert lease is not None
    await storage.record_webhook_attempts(
        [WebhookAttempt("billing", "msg_1", None, running.created_at, 500, "HTTP 500", False)]
    )
    async with serve(storage) as s:
        page = await s.client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "asyncstore operator dashboard" in page.text
        assert 'const ROOT = "";' in page.text
        state = (await s.client.get("/api/state")).json()
    assert state["dialect"] == storage.dialect and state["read_only"] is False
    by_queue = {q["name"]: q for q in state["queues"]}
    assert by_queue["jobs"]["waiting"] == 1 and by_queue["mail"]["in_flight"] == 1
    assert state["outbox"]["name"] == "outbox"
    assert [t["id"] for t in state["tasks"]["dead"]] == [dead]
    assert state["tasks"]["dead"][0]["last_error"] == "boom"
    assert [(t["id"], t["worker_id"]) for t in state["tasks"]["running"]] == [
        (running.id, "worker-9")
    ]
    assert [(w["webhook_id"], w["status"], w["ok"]) for w in state["webhooks"]] == [
        ("msg_1", 500, False)
    ]
    assert [(x["session_id"], x["holder"], x["token"]) for x in state["sessions"]] == [
        ("chat-1", "host-a", lease.token)
    ]
    assert state["subscribers_known"] is False and state["sessions"][0]["subscribers"] is None
    flags = {f["name"]: f["value"] for f in state["flags"]}
    assert flags["lock"] == "100%" and flags["queue"] == "claim"
    # No instance publishes presence on this database: the note says so and why.
    assert "no live instance publishes" in state["subscribers_note"]
    assert state["subscriber_instances"] == []
    assert set(state["actions"]) == {
        "task.retry",
        "task.redrive",
        "task.cancel",
        "webhook.resend",
        "outbox.redrive",
    }
    assert state["actions"]["task.cancel"]["applies_to"] == ["task:queued", "task:running"]


async def _next_state(lines: AsyncIterator[str]) -> dict[str, Any]:
    event = None
    async for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "state":
            data: dict[str, Any] = orjson.loads(line.removeprefix("data: "))
            return data
    raise AssertionError("the stream ended")


async def test_events_stream_a_new_state_when_a_task_is_enqueued(
    storage: AsyncStorageBackend,
) -> None:
    async with (
        serve(storage) as s,
        s.client.stream("GET", "/api/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        first = await _next_state(lines)
        assert first["queues"] == []
        await storage.enqueue_tasks([NewTask("jobs", {"i": 1}), NewTask("jobs", {"i": 2})])
        with anyio.fail_after(30):
            while True:
                state = await _next_state(lines)
                if state["queues"]:
                    break
        assert state["queues"][0]["name"] == "jobs" and state["queues"][0]["waiting"] == 2
        s.dashboard.close()
        async for line in lines:  # the stream ends with a shutdown event
            if line == "event: shutdown":
                break
        else:
            raise AssertionError("no shutdown event")


async def test_read_only_refuses_actions_and_writes_nothing(storage: AsyncStorageBackend) -> None:
    dead = await _dead_task(storage)
    async with serve(storage, token=None) as s:
        status, body = await _post(s, "task.redrive", {"target": dead, "confirm": True})
        assert status == 403 and "read-only" in body["error"]
        assert (await s.client.get("/api/state")).json()["read_only"] is True
    assert (await storage.get_task(dead)).status is TaskStatus.DEAD  # type: ignore[union-attr]
    assert await storage.list_audit() == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}],
    ids=["missing", "wrong", "no-scheme"],
)
async def test_actions_need_the_token_and_refusals_are_audited(
    storage: AsyncStorageBackend, headers: dict[str, str]
) -> None:
    dead = await _dead_task(storage)
    async with serve(storage) as s:
        status, body = await _post(s, "task.redrive", {"target": dead, "confirm": True}, headers)
    assert status == 401 and "operator token" in body["error"]
    assert (await storage.get_task(dead)).status is TaskStatus.DEAD  # type: ignore[union-attr]
    (entry,) = await storage.list_audit()
    assert entry.action == "task.redrive" and entry.outcome.startswith("refused: ")
    assert entry.actor == "operator@127.0.0.1"


async def test_redrive_puts_the_dead_task_back_and_is_audited(
    storage: AsyncStorageBackend,
) -> None:
    dead = await _dead_task(storage)
    async with serve(storage) as s:
        status, body = await _post(s, "task.redrive", {"target": dead, "confirm": True})
        assert status == 200 and body["ok"] is True
        assert body["result"] == {"task": dead, "status": "queued"}
        task = await storage.get_task(dead)
        assert task is not None and task.status is TaskStatus.QUEUED and task.attempts == 0
        (entry,) = await storage.list_audit()
        assert (entry.id, entry.actor, entry.action, entry.target, entry.outcome) == (
            body["audit_id"],
            "ann@127.0.0.1",
            "task.redrive",
            f"task:{dead}",
            "done",
        )
        state = (await s.client.get("/api/state")).json()  # the action refreshed the view
        assert state["tasks"]["dead"] == [] and state["audit"][0]["target"] == f"task:{dead}"
        # Again: the task is no longer dead, so the action is refused (409) and audited.
        status, body = await _post(s, "task.redrive", {"target": dead, "confirm": True})
        assert status == 409 and "queued" in body["error"]
    assert [e.outcome.split(":")[0] for e in await storage.list_audit()] == ["refused", "done"]
    stats = s.dashboard.statistics()
    assert (stats.actions_done, stats.actions_refused, stats.actions_failed) == (1, 1, 0)


async def _until(lines: AsyncIterator[str], wanted: str) -> AsyncIterator[str]:
    async for line in lines:
        yield line
        if line == wanted:
            return
    raise AssertionError(f"no {wanted!r} line")


async def test_a_database_failure_is_a_503_and_counted(storage_url: str) -> None:
    async with open_storage(storage_url) as storage:
        dead = await _dead_task(storage)
    # The handle is closed: every call now fails (StorageClosed, a StorageError), the
    # action and its audit entry alike.
    async with serve(storage) as s:
        status, body = await _post(s, "task.redrive", {"target": dead, "confirm": True})
        assert status == 503 and "database failed" in body["error"]
        stats = s.dashboard.statistics()
        assert (stats.actions_failed, stats.audit_failed, stats.actions_done) == (1, 1, 0)
        answer = await s.client.get("/api/state")
        assert answer.status_code == 503 and "database failed" in answer.json()["error"]
        async with s.client.stream("GET", "/api/events") as response:
            lines = response.aiter_lines()
            assert [line async for line in _until(lines, "event: error")][-1] == "event: error"
            assert "closed" in await anext(lines)
    async with open_storage(storage_url) as storage:
        task = await storage.get_task(dead)
        assert task is not None and task.status is TaskStatus.DEAD


async def test_retry_enqueues_a_copy_and_keeps_the_dead_row(storage: AsyncStorageBackend) -> None:
    dead = await _dead_task(storage, {"do": "retry me"})
    async with serve(storage) as s:
        status, body = await _post(s, "task.retry", {"target": dead, "confirm": True})
    assert status == 200
    new_id = body["result"]["new_task"]
    copy = await storage.get_task(new_id)
    assert copy is not None and new_id != dead
    assert (copy.queue, copy.payload, copy.status) == ("jobs", {"do": "retry me"}, "queued")
    assert (await storage.get_task(dead)).status is TaskStatus.DEAD  # type: ignore[union-attr]
    assert (await storage.list_audit())[0].outcome == "done"


@pytest.mark.parametrize(
    ("name", "body", "status", "message"),
    [
        ("task.nope", {"target": 1, "confirm": True}, 404, "no action"),
        ("task.redrive", b"{not json", 400, "JSON object"),
        ("task.redrive", [1], 400, "JSON object"),
        ("task.redrive", {"confirm": True}, 400, '"target"'),
        ("task.redrive", {"target": 1}, 400, "confirmed"),
        ("task.redrive", {"target": 1, "confirm": "yes"}, 400, "confirmed"),
        ("task.redrive", {"target": "1", "confirm": True}, 400, "must be an int"),
        ("task.redrive", {"target": 0, "confirm": True}, 400, "between 1"),
        ("task.retry", {"target": True, "confirm": True}, 400, "must be an int"),
        ("task.redrive", {"target": 999999, "confirm": True}, 409, "no task 999999"),
        ("webhook.resend", {"target": "", "confirm": True}, 400, "must not be empty"),
        ("webhook.resend", {"target": "msg_x", "confirm": True}, 409, "no delivery"),
    ],
)
async def test_bad_requests_get_a_clear_4xx_and_change_nothing(
    storage: AsyncStorageBackend, name: str, body: Any, status: int, message: str
) -> None:
    dead = await _dead_task(storage)
    async with serve(storage) as s:
        got, answer = await _post(s, name, body)
    assert got == status and answer["ok"] is False and message in answer["error"]
    assert (await storage.get_task(dead)).status is TaskStatus.DEAD  # type: ignore[union-attr]
    audit = await storage.list_audit()
    if status == 404:
        assert audit == []  # no such action: nothing to attribute
    else:
        assert [(e.action, e.actor, e.outcome.split(":")[0]) for e in audit] == [
            (name, "ann@127.0.0.1", "refused")
        ]


async def test_webhook_resend_queues_the_delivery_again(storage: AsyncStorageBackend) -> None:
    payload = {"delivery_id": "msg_42", "events": 1, "body": '{"a":1}'}
    (row,) = await storage.enqueue_outbox([NewOutboxMessage("webhook", "billing", payload)])
    await storage.record_webhook_attempts(
        [WebhookAttempt("billing", "msg_42", row.id, row.created_at, 503, "HTTP 503", False)]
    )
    async with serve(storage) as s:
        status, body = await _post(s, "webhook.resend", {"target": "msg_42", "confirm": True})
    assert status == 200 and body["result"]["webhook_id"] == "msg_42"
    again = await storage.get_outbox(body["result"]["outbox_row"])
    assert again is not None and again.id != row.id and again.payload == payload
    (entry,) = await storage.list_audit()
    assert (entry.target, entry.outcome) == ("webhook:msg_42", "done")


async def test_mounted_in_an_application_shows_live_flags_and_subscribers(
    storage_url: str,
) -> None:
    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False, "shutdown_grace_s": 0.5},
        dashboard={"refresh_interval_s": 0.05},
    )
    async with open_runtime(settings) as rt:
        dashboard = Dashboard.for_runtime(rt)
        app = Starlette(routes=[Mount("/ops", app=dashboard.app)])
        async with serve_app(app) as client:
            page = await client.get("/ops/")
            assert page.status_code == 200 and 'const ROOT = "/ops";' in page.text
            async with rt.subscribe("chat-7"), rt.subscribe("chat-7"):
                state = (await client.get("/ops/api/state")).json()
                assert state["subscribers_known"] is True and state["subscribers_note"] is None
                assert [(x["session_id"], x["subscribers"]) for x in state["sessions"]] == [
                    ("chat-7", 2)
                ]
                # Another instance of the fleet publishes its own: the sessions show the
                # sum; this process counts live (its own row, maybe older, is not added).
                await rt.storage.publish_presence("other", {"chat-7": 4, "chat-9": 1}, 60)

                async def summed() -> bool:
                    nonlocal state
                    state = (await client.get("/ops/api/state")).json()
                    return len(state["subscriber_instances"]) == 2

                await wait_for(summed, what="the other instance on the dashboard")
                assert [(x["session_id"], x["subscribers"]) for x in state["sessions"]] == [
                    ("chat-7", 6),
                    ("chat-9", 1),
                ]
                instances = {i["instance_id"]: i for i in state["subscriber_instances"]}
                assert set(instances) == {rt.instance_id, "other"}
                assert instances[rt.instance_id]["this_process"] is True
                assert instances[rt.instance_id]["subscribers"] == 2
            rt.update_flags(lock="10%", queue="poll_spawn")

            async def flags_shown() -> bool:
                state = (await client.get("/ops/api/state")).json()
                flags = {f["name"]: f["value"] for f in state["flags"]}
                return flags["lock"] == "10%" and flags["queue"] == "poll_spawn"

            await wait_for(flags_shown, what="the new flags on the dashboard")
            status = (await client.post("/ops/api/actions/task.retry", json={})).status_code
            assert status == 403  # no token in the settings: read-only
            # The runtime's /metrics carries the dashboard's counters (source "dashboard");
            # a read-only dashboard's 403 is not an action attempt.
            text = rt.metrics.render()[0].decode()
            snapshots = dashboard.statistics().snapshots
            assert snapshots >= 2  # the page's state reads
            line = f'asyncstore_dashboard_snapshots_total{{source="dashboard"}} {snapshots:.1f}'
            assert line in text
            for outcome in ("done", "refused", "failed"):
                line = (
                    f'asyncstore_dashboard_actions_total{{outcome="{outcome}",source="dashboard"}}'
                )
                assert f"{line} 0.0" in text
        dashboard.close()
        # A second dashboard of the same runtime, with a token, under its own name: a wrong
        # token is a refused action, on its own series.
        settings2 = DashboardSettings(operator_token=SecretStr(TOKEN), refresh_interval_s=0.05)
        ops2 = Dashboard.for_runtime(rt, settings2, metrics_name="ops2")
        async with serve_app(ops2.app) as client:
            bad = {"Authorization": "Bearer nope", "X-Operator": "eve"}
            r = await client.post("/api/actions/task.retry", json={}, headers=bad)
            assert r.status_code == 401
        ops2.close()
        text = rt.metrics.render()[0].decode()
        assert 'asyncstore_dashboard_actions_total{outcome="refused",source="ops2"} 1.0' in text
        with pytest.raises(InvalidArgument, match="already registered"):
            Dashboard.for_runtime(rt, metrics_name="ops2")
        Dashboard.for_runtime(rt, metrics_name=None).close()  # not exported
        assert set(rt.metrics.families()) >= {"dashboard", "ops2"}


async def test_a_separate_dashboard_sums_subscribers_over_every_live_instance(
    storage: AsyncStorageBackend,
) -> None:
    # Two instances published their subscribers (issue 19); a third's row expired. A
    # dashboard on storage alone (as under `asyncstore dashboard`) sums the live ones per
    # session and lists the instances; sessions without a lease are listed too.
    lease = await storage.acquire_lease("chat-1", "web-1", ttl_s=30)
    assert lease is not None
    await storage.publish_presence("web-1", {"chat-1": 2, "chat-2": 1}, ttl_s=60, host="a", pid=1)
    await storage.publish_presence("web-2", {"chat-1": 3}, ttl_s=60, host="b", pid=2)
    await storage.publish_presence("web-3", {"chat-1": 50}, ttl_s=0.05, host="c", pid=3)
    async with serve(storage) as s:

        async def web3_expired() -> bool:
            state = (await s.client.get("/api/state")).json()
            return len(state["subscriber_instances"]) == 2

        await wait_for(web3_expired, what="web-3's row expired on the dashboard")
        state = (await s.client.get("/api/state")).json()
    assert state["subscribers_known"] is True and state["subscribers_note"] is None
    assert [(x["session_id"], x["holder"], x["subscribers"]) for x in state["sessions"]] == [
        ("chat-1", "web-1", 5),
        ("chat-2", None, 1),
    ]
    assert [
        (i["instance_id"], i["host"], i["pid"], i["sessions"], i["subscribers"])
        for i in state["subscriber_instances"]
    ] == [("web-1", "a", 1, 2, 3), ("web-2", "b", 2, 1, 3)]


def test_cli_serves_the_dashboard_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    async def prepare() -> None:
        async with open_storage(url, migrate=True) as storage:
            await storage.enqueue_tasks([NewTask("cli-queue", {})])

    anyio.run(prepare)
    env = {**os.environ, "ASYNCSTORE_DASHBOARD__OPERATOR_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncstore.orchestrator.cli",
            "dashboard",
            "--url",
            url,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard at http://127.0.0.1:") and "actions on" in line, line
        base = line.split()[2]
        state = httpx.get(base + "api/state", timeout=30).json()
        assert [q["name"] for q in state["queues"]] == ["cli-queue"]
        answer = httpx.post(base + "api/actions/task.redrive", json={}, timeout=30)
        assert answer.status_code == 401
        with httpx.stream("GET", base + "api/events", timeout=30) as events:
            lines = events.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: state"
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the open stream ends instead of holding the stop back
        assert "event: shutdown" in rest
        assert proc.wait(timeout=30) == 0
        assert "dashboard: SIGTERM: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_cancel_ends_a_running_task_and_refuses_a_finished_one(
    storage: AsyncStorageBackend,
) -> None:
    (task,) = await storage.enqueue_tasks([NewTask("jobs", {"do": "y"})])
    (claimed,) = await storage.claim_tasks("jobs", "w-1", limit=1, lease_s=30)
    assert claimed.id == task.id
    async with serve(storage) as s:
        state = (await s.client.get("/api/state")).json()
        assert [t["id"] for t in state["tasks"]["running"]] == [task.id]
        status, body = await _post(s, "task.cancel", {"target": task.id, "confirm": True})
        assert status == 200 and body["ok"] is True
        assert body["result"] == {"task": task.id, "status": "cancelled", "was_running": True}
        stored = await storage.get_task(task.id)
        assert stored is not None and stored.status is TaskStatus.CANCELLED
        # Again: the task already ended, so the action is refused (409) and audited.
        status, body = await _post(s, "task.cancel", {"target": task.id, "confirm": True})
        assert status == 409 and "already ended" in body["error"]
        status, body = await _post(s, "task.cancel", {"target": 10**9, "confirm": True})
        assert status == 409 and "no task" in body["error"]
    outcomes = [(e.action, e.outcome.split(":")[0]) for e in await storage.list_audit()]
    assert outcomes == [("task.cancel", "refused")] * 2 + [("task.cancel", "done")]


async def test_queued_tasks_are_listed_per_queue_and_one_is_cancelled(
    storage: AsyncStorageBackend,
) -> None:
    jobs = await storage.enqueue_tasks([NewTask("jobs", {"i": i}) for i in range(8)])
    mail = await storage.enqueue_tasks([NewTask("mail", {"i": i}) for i in range(2)])
    async with serve(storage, queued_rows=3) as s:
        state = (await s.client.get("/api/state")).json()
        # Each queue's next three in claim order, bounded per queue, with its count.
        assert [(t["queue"], t["id"]) for t in state["tasks"]["queued"]] == [
            *[("jobs", t.id) for t in jobs[:3]],
            *[("mail", t.id) for t in mail],
        ]
        assert state["queued_per_queue"] == [
            {"queue": "jobs", "count": 8, "shown": 3},
            {"queue": "mail", "count": 2, "shown": 2},
        ]
        target = jobs[0].id
        status, body = await _post(s, "task.cancel", {"target": target, "confirm": True})
        assert status == 200
        assert body["result"] == {"task": target, "status": "cancelled", "was_running": False}
        # A cancelled queued task never starts: the next claim takes the one after it.
        (claimed,) = await storage.claim_tasks("jobs", "w-1", limit=1, lease_s=30)
        assert claimed.id == jobs[1].id
        state = (await s.client.get("/api/state")).json()  # the action refreshed the view
        assert [t["id"] for t in state["tasks"]["queued"]][:3] == [t.id for t in jobs[2:5]]
        assert state["queued_per_queue"][0] == {"queue": "jobs", "count": 6, "shown": 3}
        status, body = await _post(s, "task.cancel", {"target": target, "confirm": True})
        assert status == 409 and "already ended (cancelled)" in body["error"]
    stored = await storage.get_task(target)
    assert stored is not None and stored.status is TaskStatus.CANCELLED
    audit = [(e.action, e.target, e.outcome.split(":")[0]) for e in await storage.list_audit()]
    assert audit == [
        ("task.cancel", f"task:{target}", "refused"),
        ("task.cancel", f"task:{target}", "done"),
    ]


async def _dead_outbox(storage: AsyncStorageBackend) -> int:
    (row,) = await storage.enqueue_outbox([NewOutboxMessage("push", "acct-1", {"n": 1})])
    (claimed,) = await storage.claim_outbox("w-1", limit=1, lease_s=30)
    await storage.dead_letter_outbox([Failure(claimed.id, claimed.claim.token, "gateway gone")])
    return row.id


async def test_outbox_redrive_lists_dead_messages_and_puts_one_back(
    storage: AsyncStorageBackend,
) -> None:
    dead = await _dead_outbox(storage)
    (pending,) = await storage.enqueue_outbox([NewOutboxMessage("push", "acct-2", {"n": 2})])
    async with serve(storage) as s:
        state = (await s.client.get("/api/state")).json()
        assert [(m["id"], m["channel"], m["last_error"]) for m in state["outbox_dead"]] == [
            (dead, "push", "gateway gone")
        ]
        status, body = await _post(s, "outbox.redrive", {"target": pending.id, "confirm": True})
        assert status == 409 and "only a dead-lettered message" in body["error"]
        status, body = await _post(s, "outbox.redrive", {"target": "x", "confirm": True})
        assert status == 400 and "outbox message id" in body["error"]
        status, body = await _post(s, "outbox.redrive", {"target": dead, "confirm": True})
        assert status == 200 and body["result"] == {"outbox": dead, "status": "pending"}
        assert (await s.client.get("/api/state")).json()["outbox_dead"] == []
        status, body = await _post(s, "outbox.redrive", {"target": dead, "confirm": True})
        assert status == 409 and "is pending" in body["error"]
    message = await storage.get_outbox(dead)
    assert message is not None and message.status == "pending" and message.attempts == 0
    claimed = await storage.claim_outbox("w-2", limit=5, lease_s=30)  # deliverable again
    assert sorted(m.id for m in claimed) == sorted([dead, pending.id])
    outcomes = [(e.target, e.outcome.split(":")[0]) for e in await storage.list_audit()]
    assert outcomes[:2] == [(f"outbox:{dead}", "refused"), (f"outbox:{dead}", "done")]
    assert len(outcomes) == 4


@pytest.mark.parametrize(
    ("per_minute", "written"), [(0.001, 3), (None, 25)], ids=["limited", "legacy"]
)
async def test_a_flood_of_refused_attempts_writes_a_bounded_number_of_audit_rows(
    storage: AsyncStorageBackend, per_minute: float | None, written: int
) -> None:
    # 0.001 per minute: no refill within any test run, so the count does not depend on speed.
    dead = await _dead_task(storage)
    wrong = {"Authorization": "Bearer wrong-token-wrong-token"}
    body = {"target": dead, "confirm": True}
    async with serve(storage, audit_refused_burst=3, audit_refused_per_minute=per_minute) as s:
        for _ in range(20):
            assert (await _post(s, "task.redrive", body, wrong))[0] == 401
        for _ in range(5):  # with the token but not confirmed: refused (400) too
            assert (await _post(s, "task.redrive", {"target": dead}))[0] == 400
        stats = s.dashboard.statistics()
        assert (stats.actions_refused, stats.audit_skipped) == (25, 25 - written)

        async def skipped_shown() -> bool:
            state = (await s.client.get("/api/state")).json()
            return bool(state["audit_skipped"] == 25 - written)

        await wait_for(skipped_shown, what="the skipped count in the state")
        # Another client address has its own budget: its refusal is written.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=s.client.base_url, transport=transport) as other:
            answer = await other.post("/api/actions/task.redrive", json=body, headers=wrong)
            assert answer.status_code == 401
        # An action that is done is always written.
        assert (await _post(s, "task.redrive", body))[0] == 200
    audit = await storage.list_audit(limit=100)
    assert len(audit) == written + 2
    assert audit[0].outcome == "done" and audit[1].actor == "operator@127.0.0.2"
    assert (await storage.get_task(dead)).status is TaskStatus.QUEUED  # type: ignore[union-attr]
