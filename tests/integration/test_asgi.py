"""The SSE and WebSocket endpoints (orchestrator.asgi) on both drivers: headers, ids,
heartbeat, exact resume, authorization, resets, disconnect, slow clients and shutdown.

SSE tests go through uvicorn on 127.0.0.1 port 0 because httpx's ``ASGITransport`` returns a
response only once the app finished, which a stream never does. WebSocket tests speak the
ASGI WebSocket messages to the app directly, in the test's event loop: Starlette's
``TestClient`` would run the app on another loop in a thread (the runtime's connections
belong to this one), and uvicorn serves WebSockets only with ``websockets`` / ``wsproto``
installed, which the library does not depend on.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message

from asyncstore.orchestrator.asgi import EndpointConfig, EventStreams, StreamingServer
from asyncstore.orchestrator.broadcast import Position, StreamReset
from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.errors import SubscriberLagged
from asyncstore.orchestrator.runtime import Runtime, open_runtime
from asyncstore.storage import StorageUnavailable, StreamEvent
from tests.waiting import wait_for


class _QuietServer(StreamingServer):
    def __init__(self, config: uvicorn.Config, streams: EventStreams) -> None:
        super().__init__(config, streams)
        self.up = anyio.Event()  # set once uvicorn listens

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test process keeps its own signal handlers

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()


@dataclass
class Served:
    rt: Runtime
    streams: EventStreams
    server: StreamingServer
    client: httpx.AsyncClient
    app: Starlette

    def subscribers(self) -> int:
        return self.rt._broadcast.optimized.statistics().subscribers


def _allow_all(conn: HTTPConnection, session_id: str) -> bool:
    return True


@contextlib.asynccontextmanager
async def serve(
    storage_url: str,
    *,
    config: EndpointConfig | None = None,
    authorize: Callable[[HTTPConnection, str], Any] = _allow_all,
    broadcast: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
) -> AsyncIterator[Served]:
    settings = load_settings(
        storage={"url": storage_url, **(storage or {})},
        runtime={"reload_on_sighup": False, "shutdown_grace_s": 0.5},
        broadcast={"resume_wait_s": 0.1, **(broadcast or {})},
    )
    async with open_runtime(settings) as rt:
        streams = EventStreams.for_runtime(rt, authorize=authorize, config=config)
        app = Starlette(
            routes=[
                Route("/s/{session_id}/events", streams.sse),
                WebSocketRoute("/s/{session_id}/ws", streams.websocket),
            ]
        )
        server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off"), streams)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                await server.up.wait()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                yield Served(rt, streams, server, client, app)
            server.should_exit = True


async def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``check`` holds on a statistics snapshot (bounded): ``tests.waiting``."""
    await wait_for(check, timeout_s, what="statistics condition")


@dataclass
class Frame:
    event: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    def json(self) -> Any:
        return orjson.loads("\n".join(self.data))


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """Parse SSE frames from a streaming response as they arrive."""
    frame = Frame()
    async for line in response.aiter_lines():
        if line == "":
            if frame.data or frame.event or frame.comments or frame.retry is not None:
                yield frame
            frame = Frame()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            frame.comments.append(value)
        elif name == "event":
            frame.event = value
        elif name == "id":
            frame.id = value
        elif name == "data":
            frame.data.append(value)
        elif name == "retry":
            frame.retry = int(value)


class WebSocketSession:
    """Drives one ASGI WebSocket connection of ``app`` from the test."""

    def __init__(self, app: ASGIApp, path: str, tg: anyio.abc.TaskGroup) -> None:
        self._to_app, self._app_in = anyio.create_memory_object_stream[Message](100)
        self._app_out, self._from_app = anyio.create_memory_object_stream[Message](1000)
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "subprotocols": [],
            "state": {},
        }
        self.done = anyio.Event()

        async def run() -> None:
            try:
                await app(scope, self._app_in.receive, self._app_out.send)
            finally:
                self.done.set()

        tg.start_soon(run)

    async def connect(self) -> Message:
        await self._to_app.send({"type": "websocket.connect"})
        return await self.receive_message()

    async def receive_message(self) -> Message:
        with anyio.fail_after(10):
            return await self._from_app.receive()

    async def receive_json(self) -> Any:
        message = await self.receive_message()
        if message["type"] != "websocket.send":
            raise AssertionError(f"expected a message, got {message}")
        return orjson.loads(message["text"])

    async def send_json(self, data: Any) -> None:
        await self._to_app.send({"type": "websocket.receive", "text": orjson.dumps(data).decode()})

    async def send_bytes(self, data: bytes) -> None:
        await self._to_app.send({"type": "websocket.receive", "bytes": data})

    async def disconnect(self) -> None:
        await self._to_app.send({"type": "websocket.disconnect", "code": 1001})


async def _emit(rt: Runtime, session_id: str, n: int, kind: str = "delta") -> int:
    """Run a turn emitting ``n`` events; returns its epoch."""
    async with rt.turn(session_id) as turn:
        for i in range(n):
            await turn.emit(kind, {"i": i})
    return turn.lease.token


async def _collect(response: httpx.Response, n: int) -> list[Frame]:
    """The first ``n`` frames after ``ready`` (heartbeats included)."""
    got: list[Frame] = []
    with anyio.fail_after(10):
        async for frame in frames(response):
            if frame.event == "ready":
                continue
            got.append(frame)
            if len(got) == n:
                break
    return got


# -- SSE -----------------------------------------------------------------------------------


async def test_sse_sends_headers_retry_ready_and_an_id_per_event(storage_url: str) -> None:
    async with serve(storage_url, config=EndpointConfig(retry_ms=1234)) as srv:
        epoch = await _emit(srv.rt, "s1", 3)
        async with srv.client.stream("GET", "/s/s1/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            stream = frames(response)
            first = await anext(stream)
            assert first.retry == 1234
            assert first.event == "ready"
            assert first.json() == {"session_id": "s1", "after": "0:0"}
            events = [await anext(stream) for _ in range(3)]
        assert [f.id for f in events] == [f"{epoch}:{i}" for i in (1, 2, 3)]
        assert [f.event for f in events] == [None, None, None]
        assert [f.json()["payload"] for f in events] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert {f.json()["session_id"] for f in events} == {"s1"}


async def test_sse_ready_arrives_at_once_and_live_events_follow(storage_url: str) -> None:
    config = EndpointConfig(start="live")
    async with serve(storage_url, config=config) as srv:
        await _emit(srv.rt, "s1", 2)
        async with srv.client.stream("GET", "/s/s1/events") as response:
            stream = frames(response)
            with anyio.fail_after(2):
                ready = await anext(stream)
            assert ready.event == "ready"
            assert ready.json()["after"] is None
            epoch = await _emit(srv.rt, "s1", 1, kind="live")
            event = await anext(stream)
        assert event.json()["kind"] == "live"
        assert event.id == f"{epoch}:3"


async def test_sse_heartbeat_comment_when_idle(storage_url: str) -> None:
    config = EndpointConfig(heartbeat_interval_s=0.1)
    async with serve(storage_url, config=config) as srv:
        async with srv.client.stream("GET", "/s/quiet/events") as response:
            beats = await _collect(response, 2)
        assert all(f.comments == ["heartbeat"] and not f.data for f in beats)
        assert srv.streams.statistics().heartbeats >= 2


async def test_sse_resumes_exactly_from_last_event_id_header(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        epoch = await _emit(srv.rt, "s1", 10)
        headers = {"Last-Event-ID": f"{epoch}:4"}
        async with srv.client.stream("GET", "/s/s1/events", headers=headers) as response:
            got = await _collect(response, 6)
        assert [f.id for f in got] == [f"{epoch}:{seq}" for seq in range(5, 11)]
        assert srv.streams.statistics().resumed == 1


async def test_sse_resumes_from_query_parameter_and_the_header_wins(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        epoch = await _emit(srv.rt, "s1", 10)
        url = f"/s/s1/events?last_event_id={epoch}:7"
        async with srv.client.stream("GET", url) as response:
            got = await _collect(response, 3)
        assert [f.id for f in got] == [f"{epoch}:8", f"{epoch}:9", f"{epoch}:10"]
        # A browser reconnecting sends Last-Event-ID to the URL it first opened.
        url = "/s/s1/events?last_event_id=0:0"
        headers = {"Last-Event-ID": f"{epoch}:9"}
        async with srv.client.stream("GET", url, headers=headers) as response:
            got = await _collect(response, 1)
        assert [f.id for f in got] == [f"{epoch}:10"]


async def test_sse_refuses_an_unauthorized_session_even_with_a_valid_id(
    storage_url: str,
) -> None:
    def only_alice(conn: HTTPConnection, session_id: str) -> bool:
        return session_id == "alice"

    async with serve(storage_url, authorize=only_alice) as srv:
        epoch = await _emit(srv.rt, "alice", 3)
        await _emit(srv.rt, "bob", 3)
        headers = {"Last-Event-ID": f"{epoch}:1"}
        response = await srv.client.get("/s/bob/events", headers=headers)
        assert response.status_code == 403
        response = await srv.client.get(f"/s/bob/events?last_event_id={epoch}:1")
        assert response.status_code == 403
        assert srv.subscribers() == 0
        assert srv.streams.statistics().refused == 2


async def test_sse_rejects_malformed_resume_points_without_subscribing(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        for raw in ("bob:1:2", "1:2:3", "-1:2", "01:2", "1:", ":1", "1:2x", "abc", "1.0:2"):
            response = await srv.client.get("/s/alice/events", headers={"Last-Event-ID": raw})
            assert response.status_code == 400, raw
        response = await srv.client.get("/s/alice/events?last_event_id=bob%3A1%3A2")
        assert response.status_code == 400
        assert srv.subscribers() == 0


async def test_sse_id_from_another_session_reads_only_the_path_session(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        alice = await _emit(srv.rt, "alice", 5)
        await _emit(srv.rt, "carol", 2)
        headers = {"Last-Event-ID": f"{alice}:1"}
        async with srv.client.stream("GET", "/s/carol/events", headers=headers) as response:
            got = await _collect(response, 1)
        assert {f.json().get("session_id", "carol") for f in got} == {"carol"}


async def test_sse_turns_a_reset_into_a_named_event(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        epoch = await _emit(srv.rt, "s1", 3)
        headers = {"Last-Event-ID": f"{epoch}:99"}
        async with srv.client.stream("GET", "/s/s1/events", headers=headers) as response:
            (reset,) = await _collect(response, 1)
        assert reset.event == "reset"
        assert reset.json() == {"reason": "unknown_resume_point", "epoch": epoch, "seq": 3}
        assert reset.id == f"{epoch}:3"
        headers = {"Last-Event-ID": f"{epoch + 5}:2"}
        async with srv.client.stream("GET", "/s/s1/events", headers=headers) as response:
            (reset,) = await _collect(response, 1)
        assert reset.event == "reset"
        assert reset.json()["reason"] == "epoch_changed"


async def test_sse_large_backlog_arrives_as_one_event_each(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        epoch = await _emit(srv.rt, "big", 1200)
        async with srv.client.stream("GET", "/s/big/events") as response:
            got = await _collect(response, 1200)
        assert [f.id for f in got] == [f"{epoch}:{seq}" for seq in range(1, 1201)]
        assert all(len(f.data) == 1 and f.event is None for f in got)


async def test_sse_disconnect_frees_the_subscription_and_keeps_the_turn(
    storage_url: str,
) -> None:
    async with serve(storage_url) as srv:
        async with srv.rt.turn("s1") as turn:
            await turn.emit("delta", {"i": 0})
            async with srv.client.stream("GET", "/s/s1/events") as response:
                await _collect(response, 1)
                assert srv.subscribers() == 1
                assert srv.streams.statistics().open_sse == 1
            await wait_until(lambda: srv.subscribers() == 0)
            await wait_until(lambda: srv.streams.statistics().ended_by_client == 1)
            assert srv.streams.statistics().open_sse == 0
            assert not turn.cancelled
            await turn.emit("delta", {"i": 1})
        assert not turn.cancelled


async def test_sse_disconnect_cancels_the_turn_when_asked(storage_url: str) -> None:
    config = EndpointConfig(cancel_on_disconnect=True)
    async with serve(storage_url, config=config) as srv:
        async with srv.rt.turn("s1") as turn:
            await turn.emit("delta", {"i": 0})
            async with srv.client.stream("GET", "/s/s1/events") as response:
                await _collect(response, 1)
            with anyio.fail_after(5):
                await anyio.sleep_forever()  # the turn's scope is cancelled by the request
        assert turn.cancelled
        assert turn.token.reason == "client disconnected"
        assert srv.streams.statistics().cancels_requested == 1


async def test_sse_shutdown_ends_open_streams_with_a_final_event(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        got: list[list[Frame]] = [[], []]

        async def reader(slot: list[Frame], started: anyio.Event) -> None:
            async with srv.client.stream("GET", "/s/s1/events") as response:
                async for frame in frames(response):
                    slot.append(frame)
                    started.set()

        async with anyio.create_task_group() as tg:
            for slot in got:
                started = anyio.Event()
                tg.start_soon(reader, slot, started)
                await started.wait()
            assert srv.streams.statistics().open_sse == 2
            with anyio.fail_after(5):
                srv.server.should_exit = True  # what SIGTERM does
                await wait_until(lambda: srv.streams.statistics().open_sse == 0)
        for slot in got:
            assert [f.event for f in slot] == ["ready", "shutdown"]
            assert slot[-1].json() == {"reason": "server shutting down"}
        assert srv.streams.statistics().ended_shutdown == 2
        assert srv.subscribers() == 0


async def test_sse_refuses_new_streams_once_closing(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        assert srv.streams.close() == 0
        response = await srv.client.get("/s/s1/events")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"


async def test_sse_drop_ends_the_stream_and_the_client_resumes_exactly(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        seen: list[str] = []
        async with srv.rt.turn("s1") as turn:
            for i in range(3):
                await turn.emit("delta", {"i": i})
            async with srv.client.stream("GET", "/s/s1/events") as response:
                stream = frames(response)
                assert (await anext(stream)).event == "ready"
                seen += [(await anext(stream)).id or "" for _ in range(3)]
                assert srv.streams.drop("s1") == 1
                with anyio.fail_after(5):
                    rest = [frame async for frame in stream]
                assert rest == []  # no final event: like a network drop
            for i in range(3, 6):
                await turn.emit("delta", {"i": i})
            headers = {"Last-Event-ID": seen[-1]}
            async with srv.client.stream("GET", "/s/s1/events", headers=headers) as response:
                got = await _collect(response, 3)
                seen += [f.id for f in got if f.id]
        epoch = turn.lease.token
        assert seen == [f"{epoch}:{seq}" for seq in range(1, 7)]
        assert srv.streams.statistics().ended_dropped == 1


class _LaggingSubscription:
    """Yields one event, then is disconnected by the hub's ``disconnect`` policy."""

    def __init__(self, session_id: str) -> None:
        self.items = 0
        self.closed = False
        self.session_id = session_id

    def __aiter__(self) -> _LaggingSubscription:
        return self

    async def __anext__(self) -> StreamEvent | StreamReset:
        self.items += 1
        if self.items == 1:
            return StreamEvent(self.session_id, 1, 1, "delta", {"i": 0}, datetime.now(UTC))
        raise SubscriberLagged("fell behind the ring (wanted seq 2)")

    async def aclose(self) -> None:
        self.closed = True


async def test_sse_lagging_client_gets_a_reason_and_is_disconnected(storage_url: str) -> None:
    async with serve(storage_url) as srv:
        subs: list[_LaggingSubscription] = []

        def subscribe(session_id: str, after: Position | None) -> _LaggingSubscription:
            subs.append(_LaggingSubscription(session_id))
            return subs[-1]

        streams = EventStreams(subscribe, authorize=_allow_all)
        srv.app.router.routes.append(Route("/lag/{session_id}/events", streams.sse))
        async with srv.client.stream("GET", "/lag/s1/events") as response:
            got = [f async for f in frames(response)]
        assert [(f.event, f.id) for f in got] == [("ready", None), (None, "1:1"), ("lagged", None)]
        assert "fell behind" in got[-1].json()["reason"]
        assert subs[0].closed
        assert streams.statistics().ended_lagged == 1


async def test_sse_slow_reader_catches_up_from_the_database(storage_url: str) -> None:
    # A tiny ring: a reader that falls behind must be served the rest from storage.
    async with serve(storage_url, broadcast={"ring_max_events": 4}) as srv:
        async with srv.client.stream("GET", "/s/s1/events") as response:
            stream = frames(response)
            assert (await anext(stream)).event == "ready"
            epoch = await _emit(srv.rt, "s1", 300)
            got = [await anext(stream) for _ in range(300)]
        assert [f.id for f in got] == [f"{epoch}:{seq}" for seq in range(1, 301)]


# -- WebSocket -------------------------------------------------------------------------------


async def test_ws_resumes_from_the_first_message(storage_url: str) -> None:
    async with serve(storage_url) as srv, anyio.create_task_group() as tg:
        epoch = await _emit(srv.rt, "s1", 6)
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        assert (await ws.connect())["type"] == "websocket.accept"
        await ws.send_json({"type": "subscribe", "after": f"{epoch}:2"})
        ready = await ws.receive_json()
        assert ready == {"type": "ready", "session_id": "s1", "after": f"{epoch}:2"}
        got = [await ws.receive_json() for _ in range(4)]
        assert [m["id"] for m in got] == [f"{epoch}:{seq}" for seq in range(3, 7)]
        assert {m["type"] for m in got} == {"event"}
        assert [m["payload"] for m in got] == [{"i": i} for i in range(2, 6)]
        await ws.disconnect()
        await ws.done.wait()
        await wait_until(lambda: srv.subscribers() == 0)


async def test_ws_ping_gets_pong_and_idle_gets_heartbeat(storage_url: str) -> None:
    config = EndpointConfig(heartbeat_interval_s=0.2)
    async with serve(storage_url, config=config) as srv, anyio.create_task_group() as tg:
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe", "after": None})
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_json({"type": "ping", "id": 7})
        assert await ws.receive_json() == {"type": "pong", "id": 7}
        await ws.send_bytes(b'{"type": "ping", "id": 8}')
        assert await ws.receive_json() == {"type": "pong", "id": 8}
        assert await ws.receive_json() == {"type": "heartbeat"}
        await ws.send_json({"type": "nonsense"})
        assert (await ws.receive_json())["type"] == "error"
        await ws.disconnect()


async def test_ws_cancel_message_stops_the_turn(storage_url: str) -> None:
    async with serve(storage_url) as srv, anyio.create_task_group() as tg:
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe", "after": "0:0"})
        assert (await ws.receive_json())["type"] == "ready"
        async with srv.rt.turn("s1") as turn:
            await turn.emit("delta", {"i": 0})
            assert (await ws.receive_json())["kind"] == "delta"
            await ws.send_json({"type": "cancel", "reason": "user pressed stop"})
            with anyio.fail_after(5):
                await anyio.sleep_forever()  # the cancel request cancels the turn's scope
        assert turn.cancelled
        assert turn.token.reason == "user pressed stop"
        # The acknowledgement and the turn's critical "cancelled" event, in either order.
        got = [await ws.receive_json() for _ in range(2)]
        assert {"type": "cancel_requested", "reason": "user pressed stop"} in got
        (event,) = [m for m in got if m["type"] == "event"]
        assert (event["kind"], event["payload"]) == ("cancelled", {"reason": "user pressed stop"})
        await ws.disconnect()


async def test_ws_refuses_unauthorized_and_malformed_resume_points(storage_url: str) -> None:
    def only_alice(conn: HTTPConnection, session_id: str) -> bool:
        return session_id == "alice"

    async with serve(storage_url, authorize=only_alice) as srv, anyio.create_task_group() as tg:
        ws = WebSocketSession(srv.app, "/s/bob/ws", tg)
        refused = await ws.connect()
        assert (refused["type"], refused["code"]) == ("websocket.close", 1008)
        for after in ("bob:1:2", "1:2:3", 5):
            ws = WebSocketSession(srv.app, "/s/alice/ws", tg)
            assert (await ws.connect())["type"] == "websocket.accept"
            await ws.send_json({"type": "subscribe", "after": after})
            closed = await ws.receive_message()
            assert (closed["type"], closed["code"]) == ("websocket.close", 1008)
        assert srv.subscribers() == 0
        assert srv.streams.statistics().refused == 4


@pytest.mark.parametrize(("restarting", "code"), [(False, 1001), (True, 1012)])
async def test_ws_shutdown_sends_a_final_message_and_closes(
    storage_url: str, restarting: bool, code: int
) -> None:
    async with serve(storage_url) as srv, anyio.create_task_group() as tg:
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe"})
        assert (await ws.receive_json())["type"] == "ready"
        assert srv.streams.close("deploy", restarting=restarting) == 1
        assert await ws.receive_json() == {"type": "shutdown", "reason": "deploy"}
        closed = await ws.receive_message()
        assert (closed["type"], closed["code"]) == ("websocket.close", code)
        await ws.disconnect()
        await ws.done.wait()
        assert srv.subscribers() == 0


async def test_ws_cancel_that_fails_answers_an_error_and_keeps_the_stream(storage_url: str) -> None:
    async def cancel_fails(session_id: str, reason: str) -> None:
        raise StorageUnavailable("database restarting")

    async with serve(storage_url) as srv, anyio.create_task_group() as tg:
        streams = EventStreams(
            srv.rt.subscribe, authorize=_allow_all, cancel=cancel_fails, authorize_cancel=None
        )
        app = Starlette(routes=[WebSocketRoute("/s/{session_id}/ws", streams.websocket)])
        ws = WebSocketSession(app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe", "after": "0:0"})
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_json({"type": "cancel", "reason": "stop"})
        answer = await ws.receive_json()
        assert answer["type"] == "error" and "database restarting" in answer["message"]
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json())["type"] == "pong"  # the stream is still open
        await ws.disconnect()


async def test_wait_closed_cuts_a_client_that_does_not_read_after_the_grace_period(
    storage_url: str,
) -> None:
    async with serve(storage_url) as srv, anyio.create_task_group() as tg:
        await _emit(srv.rt, "s1", 1100)  # more than the test connection buffers (1000)
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe"})
        # The client buffer holds 1000 messages (accept, ready, 998 events): once 998 events
        # are in it, every further send blocks, the final shutdown message included. (At
        # 990 the handler could still be between sends, see the close and obey at once.)
        await wait_until(lambda: srv.streams.statistics().events_sent >= 998)
        assert srv.streams.close() == 1  # the handler is blocked sending: it cannot obey
        assert await srv.streams.wait_closed(0.2) == 1
        stats = srv.streams.statistics()
        assert (stats.open_websockets, stats.ended_shutdown, stats.shutdown_forced) == (0, 1, 1)
        await ws.done.wait()
        assert srv.subscribers() == 0


@pytest.mark.parametrize("send", ["batched", "per_frame"])
async def test_ws_subscribers_of_a_session_share_one_encoded_frame_per_event(
    storage_url: str, send: str
) -> None:
    # Batched (the default): every subscriber of a session is sent the same encoded frame,
    # so the JSON is encoded once per event, not once per subscriber; per_frame (the
    # legacy path) encodes each frame again. Either way: every event once, in order.
    config = EndpointConfig(ws_send=send)  # type: ignore[arg-type]
    async with serve(storage_url, config=config) as srv, anyio.create_task_group() as tg:
        epoch = await _emit(srv.rt, "s1", 40)
        texts: list[list[str]] = []
        for _ in range(3):
            ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
            await ws.connect()
            await ws.send_json({"type": "subscribe", "after": "0:0"})
            assert (await ws.receive_json())["type"] == "ready"
            got = [await ws.receive_message() for _ in range(40)]
            assert {m["type"] for m in got} == {"websocket.send"}
            texts.append([m["text"] for m in got])
            await ws.disconnect()
            await ws.done.wait()
        events = [orjson.loads(t) for t in texts[0]]
        assert [e["id"] for e in events] == [f"{epoch}:{seq}" for seq in range(1, 41)]
        assert [e["payload"] for e in events] == [{"i": i} for i in range(40)]
        assert texts[0] == texts[1] == texts[2]
        shared = all(a is b for a, b in zip(texts[0], texts[1], strict=True))
        assert shared is (send == "batched")
        assert srv.streams.statistics().events_sent == 120


@pytest.mark.parametrize("send", ["batched", "per_frame"])
async def test_ws_client_that_stops_reading_is_dropped_after_the_send_timeout(
    storage_url: str, send: str
) -> None:
    config = EndpointConfig(ws_send=send, send_timeout_s=0.3)  # type: ignore[arg-type]
    async with serve(storage_url, config=config) as srv, anyio.create_task_group() as tg:
        await _emit(srv.rt, "s1", 1100)  # more than the test connection buffers (1000)
        ws = WebSocketSession(srv.app, "/s/s1/ws", tg)
        await ws.connect()
        await ws.send_json({"type": "subscribe"})
        await wait_until(lambda: srv.streams.statistics().ended_stalled == 1, timeout_s=20)
        stats = srv.streams.statistics()
        assert stats.open_websockets == 0 and stats.events_sent >= 990
        await ws.done.wait()
        assert srv.subscribers() == 0
