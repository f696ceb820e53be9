"""SSE and WebSocket endpoints that stream a session's events to browsers, with exact resume.

:class:`EventStreams` turns a subscribe function (``rt.subscribe`` or
``BroadcastHub.subscribe``) into two Starlette endpoints: ``sse`` (Server-Sent Events, every
event with ``id: epoch:seq``, resumed from ``Last-Event-ID``) and ``websocket`` (the same as
JSON messages, plus ``cancel`` and ``ping`` from the client). It owns the open connections:
``close()`` ends each with a final ``shutdown`` event (WebSockets then close with 1001, or
1012 when restarting), ``wait_closed()`` bounds how long that may take, and
:class:`StreamingServer` runs both on SIGTERM / SIGINT before uvicorn closes connections.
A client that leaves, even in the middle of a send, is an ordinary end: counted, logged at
debug, never an error. Relies on the hub's subscription semantics (resets, slow-subscriber
policy), Starlette and anyio; install the ``asgi`` extra.

Wire format, SSE (unnamed events are stream events, the named ones control the stream)::

    retry: 2000
    event: ready            data: {"session_id", "after"}      sent at once on connect
    id: 3:17                data: {"session_id","epoch","seq","kind","payload","created_at"}
    event: reset  id: 3:40  data: {"reason","epoch","seq"}     reload up to seq, then go on
    event: lagged           data: {"reason"}                   too slow; reconnect to resume
    event: shutdown         data: {"reason"}                   reconnect (elsewhere)
    : heartbeat                                                 a comment when idle

WebSocket: the client's first message is ``{"type": "subscribe", "after": "3:17" | null}``;
the server sends ``{"type": "ready" | "event" | "reset" | "lagged" | "shutdown" |
"heartbeat" | "pong" | "cancel_requested" | "error", ...}`` where an event carries the same
fields as the SSE data plus ``"id"``. Later client messages: ``{"type": "ping", "id": x}``
and ``{"type": "cancel", "reason": "..."}``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import signal
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
import uvicorn
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from asyncstore.orchestrator.broadcast import Position, StreamReset
from asyncstore.orchestrator.errors import OrchestratorError, SubscriberLagged
from asyncstore.orchestrator.fanout import Message, stream_batched
from asyncstore.orchestrator.runtime import Runtime
from asyncstore.storage import StorageError, StreamEvent
from asyncstore.storage.errors import InvalidArgument, UsageError
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "Authorize",
    "CancelFunction",
    "EndpointConfig",
    "EndpointStatistics",
    "EventStreams",
    "StreamingServer",
    "SubscribeFunction",
    "format_event_id",
    "parse_event_id",
]

log = logging.getLogger("asyncstore.asgi")

_EVENT_ID = re.compile(r"(0|[1-9][0-9]{0,17}):(0|[1-9][0-9]{0,17})")
"""``epoch:seq``, decimal without sign or leading zeros: nothing else is a resume point."""

_SSE_HEARTBEAT = b": heartbeat\n\n"
_FRAME_CACHE = 4096  # recent encoded SSE frames shared by a session's subscribers
_WRITES_PER_YIELD = 4  # below asyncio's 5 writes to a lost socket before it logs a warning
_WS_BATCH = _WRITES_PER_YIELD  # ready events sent under one timeout and lock, then a yield
_SSE_BATCH = 16  # ready SSE events coalesced into one body write (one write, then a yield)

# WebSocket close codes (RFC 6455 and the IANA registry).
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013


class _Items(Protocol):
    """What a subscribe function returns: ``Subscription`` satisfies it."""

    def __aiter__(self) -> AsyncIterator[StreamEvent | StreamReset]: ...

    async def __anext__(self) -> StreamEvent | StreamReset: ...

    async def aclose(self) -> None: ...


SubscribeFunction = Callable[[str, Position | None], _Items]
"""``rt.subscribe`` / ``BroadcastHub.subscribe``: ``(session_id, after) -> Subscription``."""

Authorize = Callable[[HTTPConnection, str], "bool | Awaitable[bool]"]
"""The application's decision: may this request (its cookies, headers...) use this session?"""

CancelFunction = Callable[[str, str], Awaitable[None]]
"""``rt.request_cancel``: ``(session_id, reason)``."""


class EndpointConfig(BaseModel):
    """How the endpoints stream; pass one to :class:`EventStreams`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_param: str = Field(default="session_id", description="path parameter of the id")
    resume_query_param: str = Field(
        default="last_event_id",
        description="query parameter for clients that cannot set Last-Event-ID",
    )
    start: Literal["beginning", "live"] = Field(
        default="beginning",
        description="where a client without a resume point starts: all stored events or now",
    )
    heartbeat_interval_s: float = Field(default=15.0, gt=0, le=15.0)
    retry_ms: int = Field(default=2000, ge=0, description="the SSE reconnect delay hint")
    send_timeout_s: float = Field(
        default=30.0, gt=0, description="a client that takes longer to accept a frame is dropped"
    )
    first_message_timeout_s: float = Field(
        default=10.0, gt=0, description="WebSocket: wait this long for the subscribe message"
    )
    cancel_on_disconnect: bool = Field(
        default=False, description="a client leaving cancels the session's turn"
    )
    ws_send: Literal["fanout", "batched", "per_frame"] = Field(
        default="fanout",
        description="WebSocket delivery: fanout writes each event from the publisher's task "
        "straight to every connection that is idle at the live head (no task wake-up per "
        "subscriber; a busy or slow connection's own task takes over, under the send "
        "timeout and the lag policy); batched wakes each connection's task, which sends the "
        "events that are ready together (one timeout and lock per batch, frames encoded "
        "once per session and shared by its subscribers); per_frame is the legacy path "
        "(each frame encoded, timed and locked on its own)",
    )
    sse_send: Literal["fanout", "per_connection"] = Field(
        default="fanout",
        description="SSE delivery: fanout is the WebSocket fan-out's design (the publisher's "
        "task writes each event to every idle stream at the live head; a busy or slow one's "
        "own task takes over, under the send timeout and the lag policy) and coalesces the "
        "events that are ready into one body write; per_connection is the legacy path (each "
        "stream's task is woken per event and writes each frame under its own timeout)",
    )


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    open_sse: int
    open_websockets: int
    accepted: int
    resumed: int
    refused: int  # not authorized, malformed resume point, or closing
    events_sent: int
    events_pushed: int  # of events_sent: written by the publisher's task (ws_send="fanout")
    resets_sent: int
    heartbeats: int
    ended_by_client: int
    disconnected_mid_send: int  # of ended_by_client: the client vanished while being sent to
    ended_lagged: int
    ended_stalled: int  # a send took over send_timeout_s
    ended_shutdown: int
    shutdown_forced: int  # of ended_shutdown: still open when wait_closed's grace ran out
    ended_dropped: int  # drop()
    cancels_requested: int

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family(
            "endpoint_open_streams",
            "gauge",
            "Open SSE and WebSocket streams, by transport.",
            ("transport",),
            known=("sse", "websocket"),
        ),
        Family("endpoint_streams_accepted", "counter", "Streams accepted (SSE and WebSocket)."),
        Family("endpoint_streams_resumed", "counter", "Accepted streams that resumed from an id."),
        Family(
            "endpoint_streams_refused",
            "counter",
            "Streams refused: not authorized, malformed resume point, or shutting down.",
        ),
        Family(
            "endpoint_streams_ended",
            "counter",
            "Streams ended, by reason: client (left), lagged (too slow for the hub), stalled "
            "(a send outlasted send_timeout_s), shutdown, dropped (drop()).",
            ("reason",),
            known=("client", "lagged", "stalled", "shutdown", "dropped"),
        ),
        Family(
            "endpoint_disconnects_mid_send",
            "counter",
            "Of the streams ended by the client: those that vanished while being sent to.",
        ),
        Family(
            "endpoint_shutdown_forced",
            "counter",
            "Streams still open when the shutdown grace ran out, cut without a final message.",
        ),
        Family("endpoint_events_sent", "counter", "Stream events sent to clients."),
        Family(
            "endpoint_events_pushed",
            "counter",
            "Of the events sent: those the publishing task wrote straight to an idle "
            "WebSocket (fan-out), with no task woken for the subscriber.",
        ),
        Family("endpoint_resets_sent", "counter", "Resets sent to clients."),
        Family("endpoint_heartbeats", "counter", "Heartbeats sent to idle streams."),
        Family("endpoint_cancels_requested", "counter", "Cancels requested through the endpoints."),
    )

    def export(self, out: MetricSink) -> None:
        open_ = {"sse": self.open_sse, "websocket": self.open_websockets}
        out.samples("endpoint_open_streams", {}, open_)
        out.sample("endpoint_streams_accepted", {}, self.accepted)
        out.sample("endpoint_streams_resumed", {}, self.resumed)
        out.sample("endpoint_streams_refused", {}, self.refused)
        ended = {
            "client": self.ended_by_client,
            "lagged": self.ended_lagged,
            "stalled": self.ended_stalled,
            "shutdown": self.ended_shutdown,
            "dropped": self.ended_dropped,
        }
        out.samples("endpoint_streams_ended", {}, ended)
        out.sample("endpoint_disconnects_mid_send", {}, self.disconnected_mid_send)
        out.sample("endpoint_shutdown_forced", {}, self.shutdown_forced)
        out.sample("endpoint_events_sent", {}, self.events_sent)
        out.sample("endpoint_events_pushed", {}, self.events_pushed)
        out.sample("endpoint_resets_sent", {}, self.resets_sent)
        out.sample("endpoint_heartbeats", {}, self.heartbeats)
        out.sample("endpoint_cancels_requested", {}, self.cancels_requested)


def format_event_id(epoch: int, seq: int) -> str:
    return f"{epoch}:{seq}"


def parse_event_id(raw: str) -> Position:
    """``"epoch:seq"`` -> ``(epoch, seq)``; anything else raises ``ValueError``."""
    if not _EVENT_ID.fullmatch(raw):
        raise InvalidArgument(f"not an event id (epoch:seq): {raw[:40]!r}")
    epoch, _, seq = raw.partition(":")
    return int(epoch), int(seq)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Connection:
    """One open stream: how to interrupt its wait or its whole handler, why it ends (None:
    it does not) and whether the client is already gone."""

    __slots__ = (
        "client_gone",
        "end_reason",
        "handler_scope",
        "interrupt",
        "session_id",
        "wait_scope",
    )

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.end_reason: str | None = None
        self.client_gone = False
        self.wait_scope: anyio.CancelScope | None = None
        self.handler_scope: anyio.CancelScope | None = None
        self.interrupt: Callable[[], None] | None = None  # ends a ``next_within`` wait

    def end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self.wait_scope is not None:
            self.wait_scope.cancel()
        if self.interrupt is not None:
            self.interrupt()

    def abort(self) -> None:
        """Stop the handler where it is (a send included); its cleanup still runs."""
        if self.handler_scope is not None:
            self.handler_scope.cancel()


def _event_body(event: StreamEvent) -> dict[str, Any]:
    return {
        "session_id": event.session_id,
        "epoch": event.epoch,
        "seq": event.seq,
        "kind": event.kind,
        "payload": event.payload,
        "created_at": event.created_at.isoformat(),
    }


def _sse(data: Any, *, event: str | None = None, id_: str | None = None) -> bytes:
    # orjson never emits a raw newline, so one ``data:`` line holds the whole JSON.
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id_ is not None:
        head += b"id: " + id_.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class EventStreams:
    """SSE and WebSocket endpoints over a subscribe function; owner of the open streams.

    Mount ``sse`` as an HTTP route and ``websocket`` as a WebSocket route whose path holds
    ``{session_id}``. ``authorize(connection, session_id)`` (sync or async) is asked before
    anything is read; a refusal is a 403 (WebSocket: close 1008 before accepting). The
    resume point only ever applies to the session in the path, which is the one
    authorized. ``cancel`` (``rt.request_cancel``) serves the WebSocket ``cancel`` message
    and ``cancel_on_disconnect``; ``authorize_cancel`` defaults to ``authorize``.
    """

    def __init__(
        self,
        subscribe: SubscribeFunction,
        *,
        authorize: Authorize,
        cancel: CancelFunction | None = None,
        authorize_cancel: Authorize | None = None,
        config: EndpointConfig | None = None,
    ) -> None:
        self._subscribe = subscribe
        self._authorize = authorize
        self._cancel = cancel
        self._authorize_cancel = authorize_cancel or authorize
        self.config = config or EndpointConfig()
        self._open: dict[_Connection, Literal["sse", "ws"]] = {}
        self._closing = False
        self._restarting = False
        self._all_closed: anyio.Event | None = None
        self._counts: dict[str, int] = {"events_sent": 0, "events_pushed": 0}
        self._frames: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._ws_frames: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._ws_last: tuple[StreamEvent | None, str] = (None, "")
        self._sse_last: tuple[StreamEvent | None, bytes] = (None, b"")

    @classmethod
    def for_runtime(
        cls,
        rt: Runtime,
        *,
        authorize: Authorize,
        authorize_cancel: Authorize | None = None,
        config: EndpointConfig | None = None,
    ) -> EventStreams:
        """Endpoints over ``rt.subscribe`` that cancel through ``rt.request_cancel``."""
        return cls(
            rt.subscribe,
            authorize=authorize,
            cancel=rt.request_cancel,
            authorize_cancel=authorize_cancel,
            config=config,
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, reason: str = "server shutting down", *, restarting: bool = False) -> int:
        """End every open stream with a final ``shutdown`` event; refuse new ones (503).

        WebSockets then close with 1001 (going away), or 1012 (service restart) when
        ``restarting``: a client may reconnect at once to a restarting server, elsewhere
        otherwise. Returns how many streams were told. Call it when the server begins to
        shut down, then ``wait_closed()`` (:class:`StreamingServer` does both).
        """
        self._closing = True
        self._restarting = restarting
        for conn in list(self._open):
            conn.end(f"shutdown:{reason}")
        return len(self._open)

    async def wait_closed(self, grace_s: float) -> int:
        """Wait until every stream ended after ``close()``; after ``grace_s`` abort the rest.

        A stream still open when the grace period ends (a client that does not read, so a
        send is blocked) is cut where it is, without its final message, and counted in
        ``shutdown_forced``. Returns how many were cut. If cancelled, the streams are left
        as they are (still told to end).
        """
        if not self._closing:
            raise UsageError("wait_closed() needs close() first")
        if self._open:
            self._all_closed = anyio.Event()
            with anyio.move_on_after(grace_s):
                await self._all_closed.wait()
        forced = list(self._open)
        for conn in forced:
            conn.abort()
        self._count("shutdown_forced", len(forced))
        if forced:
            log.warning("%d stream(s) still open after %.1f s: cut", len(forced), grace_s)
            self._all_closed = anyio.Event()
            # The cut handlers only run their (bounded) cleanup now; wait for it.
            with anyio.move_on_after(5.0):
                await self._all_closed.wait()
        return len(forced)

    def drop(self, session_id: str) -> int:
        """End the open streams of one session without a final event, as a network drop
        would; clients reconnect and resume. Returns how many were ended."""
        ended = [conn for conn in self._open if conn.session_id == session_id]
        for conn in ended:
            conn.end("dropped")
        return len(ended)

    def statistics(self) -> EndpointStatistics:
        c = self._counts.get
        kinds = list(self._open.values())
        return EndpointStatistics(
            open_sse=kinds.count("sse"),
            open_websockets=kinds.count("ws"),
            accepted=c("accepted", 0),
            resumed=c("resumed", 0),
            refused=c("refused", 0),
            events_sent=c("events_sent", 0),
            events_pushed=c("events_pushed", 0),
            resets_sent=c("resets_sent", 0),
            heartbeats=c("heartbeats", 0),
            ended_by_client=c("ended_by_client", 0),
            disconnected_mid_send=c("disconnected_mid_send", 0),
            ended_lagged=c("ended_lagged", 0),
            ended_stalled=c("ended_stalled", 0),
            ended_shutdown=c("ended_shutdown", 0),
            shutdown_forced=c("shutdown_forced", 0),
            ended_dropped=c("ended_dropped", 0),
            cancels_requested=c("cancels_requested", 0),
        )

    def _count(self, key: str, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def _forget(self, conn: _Connection) -> None:
        del self._open[conn]
        if not self._open and self._all_closed is not None:
            self._all_closed.set()

    def _client_left_mid_send(self, conn: _Connection, exc: BaseException) -> None:
        # An ordinary event (a closed tab, a lost network), not an error of the server.
        conn.client_gone = True
        self._count("disconnected_mid_send")
        log.debug("a client of session %r left mid-send: %r", conn.session_id, exc)
        if conn.end_reason is None:
            conn.end("client:left mid-send")

    # -- shared ----------------------------------------------------------------------------

    async def _admit(self, conn: HTTPConnection) -> str:
        if self._closing:
            raise _Refused(503, "server shutting down")
        session_id = conn.path_params.get(self.config.session_param)
        if not isinstance(session_id, str) or not session_id:
            raise _Refused(404, "no session in the path")
        allowed = self._authorize(conn, session_id)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if allowed is not True:
            raise _Refused(403, "not authorized for this session")
        return session_id

    def _start(self, after: Position | None) -> Position | None:
        if after is None and self.config.start == "beginning":
            return (0, 0)
        return after

    async def _next_item(
        self, conn: _Connection, items: _Items
    ) -> StreamEvent | StreamReset | None:
        """The next item, or None when the heartbeat interval passed (or the stream ends:
        ``conn.end_reason`` says so). Cancelling the wait loses nothing (the hub's promise)."""
        with anyio.move_on_after(self.config.heartbeat_interval_s) as scope:
            conn.wait_scope = scope
            try:
                if conn.end_reason is not None:
                    return None
                return await items.__anext__()
            except StopAsyncIteration:
                conn.end("shutdown:stream closed")  # the hub (the runtime) is closing
                return None
            except SubscriberLagged as exc:
                conn.end(f"lagged:{exc}")
                return None
            finally:
                conn.wait_scope = None
        return None

    def _tally_end(self, reason: str | None) -> None:
        kind = (reason or "client").partition(":")[0]
        self._count(
            {
                "shutdown": "ended_shutdown",
                "lagged": "ended_lagged",
                "dropped": "ended_dropped",
                "stalled": "ended_stalled",
            }.get(kind, "ended_by_client")
        )

    async def _after_disconnect(self, session_id: str, reason: str | None) -> None:
        by_client = reason is None or reason.startswith("client:")
        if by_client and self.config.cancel_on_disconnect and self._cancel is not None:
            # Shielded: the request handler is being torn down, the cancel must still land.
            with anyio.CancelScope(shield=True):
                await self._cancel(session_id, "client disconnected")
            self._count("cancels_requested")

    # -- SSE -------------------------------------------------------------------------------

    async def sse(self, request: Request) -> Response:
        """The SSE endpoint (a Starlette HTTP endpoint).

        The resume point is the ``Last-Event-ID`` header, else the query parameter; a
        malformed one is a 400. The response streams until the client leaves (noticed at
        once through ``http.disconnect``), the hub disconnects a lagging client, or
        ``close()`` / ``drop()``. If the handler is cancelled the subscription is closed.
        """
        try:
            session_id = await self._admit(request)
            raw = request.headers.get("last-event-id")
            if raw is None:
                raw = request.query_params.get(self.config.resume_query_param)
            try:
                after = parse_event_id(raw) if raw else None
            except ValueError as exc:
                raise _Refused(400, str(exc)) from None
        except _Refused as refused:
            self._count("refused")
            headers = {"Retry-After": "1"} if refused.status == 503 else None
            return PlainTextResponse(refused.reason, status_code=refused.status, headers=headers)
        return _SSEResponse(self, session_id, after)

    async def _serve_sse(
        self, session_id: str, after: Position | None, receive: Receive, send: Send
    ) -> None:
        conn = _Connection(session_id)
        start = self._start(after)
        items = self._subscribe(session_id, start)
        self._open[conn] = "sse"
        if self._closing:
            # close() ran while this request was being admitted: it did not see us.
            conn.end("shutdown:server shutting down")
        self._count("accepted")
        if after is not None:
            self._count("resumed")
        try:
            async with anyio.create_task_group() as tg:
                conn.handler_scope = tg.cancel_scope

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    conn.client_gone = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._stream_sse(conn, items, start, send)
                tg.cancel_scope.cancel()
        finally:
            self._forget(conn)
            # Shielded: the subscription must be released even when the handler is cancelled.
            with anyio.CancelScope(shield=True):
                await items.aclose()
                self._tally_end(conn.end_reason)
                await self._after_disconnect(session_id, conn.end_reason)

    def _sse_frame(self, event: StreamEvent) -> bytes:
        if event is self._sse_last[0]:
            return self._sse_last[1]  # the event being fanned out to its session right now
        # Every subscriber of a session gets the same frame: encode it once, not once each.
        key = (event.session_id, event.epoch, event.seq)
        cache = self._frames
        frame = cache.get(key)
        if frame is None:
            frame = _sse(_event_body(event), id_=format_event_id(event.epoch, event.seq))
            cache[key] = frame
            if len(cache) > _FRAME_CACHE:
                cache.popitem(last=False)
        self._sse_last = (event, frame)
        return frame

    async def _stream_sse(
        self, conn: _Connection, items: _Items, start: Position | None, send: Send
    ) -> None:
        cfg = self.config

        unyielded = 0

        async def write(chunk: bytes, more_body: bool = True) -> bool:
            nonlocal unyielded
            with anyio.move_on_after(cfg.send_timeout_s):
                try:
                    await send(
                        {"type": "http.response.body", "body": chunk, "more_body": more_body}
                    )
                except OSError as exc:  # uvicorn's ClientDisconnected: the client is gone
                    self._client_left_mid_send(conn, exc)
                    return False
                # uvicorn's send does not yield while the socket takes data, so a replay
                # would run without a pause: it would starve other streams, and writes to
                # a reset socket go on until its connection_lost runs (asyncio warns from
                # the 5th such write). Yield every _WRITES_PER_YIELD writes.
                unyielded += 1
                if unyielded >= _WRITES_PER_YIELD:
                    unyielded = 0
                    await anyio.lowlevel.checkpoint()
                return True
            conn.end("stalled")
            return False

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    (b"connection", b"keep-alive"),
                ],
            }
        )
        after = None if start is None else format_event_id(*start)
        ready = {"session_id": conn.session_id, "after": after}
        if not await write(f"retry: {cfg.retry_ms}\n".encode() + _sse(ready, event="ready")):
            return
        if cfg.sse_send == "fanout" and hasattr(items, "take_ready"):
            await self._stream_sse_batched(conn, items, send, write)
            return
        while True:
            item = await self._next_item(conn, items)
            if isinstance(item, StreamEvent):
                chunk = self._sse_frame(item)
                self._count("events_sent")
            elif isinstance(item, StreamReset):
                body = {"reason": item.reason, "epoch": item.epoch, "seq": item.seq}
                chunk = _sse(body, event="reset", id_=format_event_id(item.epoch, item.seq))
                self._count("resets_sent")
            elif conn.end_reason is None:
                chunk = _SSE_HEARTBEAT
                self._count("heartbeats")
            else:
                kind, _, why = conn.end_reason.partition(":")
                if kind in ("shutdown", "lagged"):
                    await write(_sse({"reason": why}, event=kind))
                break
            if not await write(chunk):
                break
        if not conn.client_gone:
            await write(b"", more_body=False)

    async def _stream_sse_batched(
        self,
        conn: _Connection,
        items: Any,
        send: Send,
        write: Callable[[bytes, bool], Awaitable[bool]],
    ) -> None:
        """``_stream_sse`` on the fan-out (``sse_send="fanout"``): publishers write to the
        idle streams at the live head, the events ready together go out as one write."""

        def gone(exc: Exception) -> None:
            self._client_left_mid_send(conn, exc)

        cut = await stream_batched(
            conn,
            items,
            anyio.Lock(fast_acquire=True),  # SSE has no other writer: never contended
            send=send,
            encode=self._sse_messages,
            count=self._count,
            heartbeat={"type": "http.response.body", "body": _SSE_HEARTBEAT, "more_body": True},
            gone=gone,
            errors=(OSError,),
            heartbeat_s=self.config.heartbeat_interval_s,
            send_timeout_s=self.config.send_timeout_s,
            batch=_SSE_BATCH,
            fanout=True,
        )
        if conn.client_gone:
            return
        if cut:
            conn.end("stalled")  # unless a publisher found it lagging first
            if conn.end_reason != "stalled":
                # Lagging while blocked in a send: the socket takes nothing more, not even
                # the end of the body; the handler ends and the server closes it.
                return
        else:
            kind, _, why = (conn.end_reason or "").partition(":")
            if kind in ("shutdown", "lagged") and not await write(
                _sse({"reason": why}, event=kind), True
            ):
                return
        await write(b"", False)

    def _sse_messages(self, batch: list[StreamEvent | StreamReset]) -> list[tuple[Message, int]]:
        if len(batch) == 1:
            item = batch[0]
            last = self._sse_last
            if item is last[0]:  # the usual case: the event its session is being sent now
                self._counts["events_sent"] += 1
                message = {"type": "http.response.body", "body": last[1], "more_body": True}
                return [(message, 1)]
        chunks = [self._sse_chunk(x) for x in batch]
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return [({"type": "http.response.body", "body": body, "more_body": True}, len(batch))]

    def _sse_chunk(self, item: StreamEvent | StreamReset) -> bytes:
        if isinstance(item, StreamReset):
            self._count("resets_sent")
            body = {"reason": item.reason, "epoch": item.epoch, "seq": item.seq}
            return _sse(body, event="reset", id_=format_event_id(item.epoch, item.seq))
        self._count("events_sent")
        return self._sse_frame(item)

    # -- WebSocket -------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        """The WebSocket endpoint (a Starlette WebSocket endpoint); see the module docstring.

        Refusals close before accepting (the handshake answers 403). A malformed first
        message closes with 1008, ``shutdown`` with 1012, ``lagged`` with 1013. If the
        handler is cancelled the subscription is closed.
        """
        try:
            session_id = await self._admit(websocket)
        except _Refused as refused:
            self._count("refused")
            code = self._shutdown_code() if refused.status == 503 else WS_POLICY_VIOLATION
            with contextlib.suppress(WebSocketDisconnect, OSError):
                await websocket.close(code=code, reason=refused.reason)
            return
        conn = _Connection(session_id)
        try:
            await websocket.accept()
            after = await self._first_message(websocket)
        except _Refused as refused:
            self._count("refused")
            await self._ws_close(websocket, conn, WS_POLICY_VIOLATION, refused.reason)
            return
        except (WebSocketDisconnect, OSError):
            return  # the client left before subscribing: nothing was opened
        start = self._start(after)
        items = self._subscribe(session_id, start)
        self._open[conn] = "ws"
        if self._closing:
            # close() ran while this request was being admitted: it did not see us.
            conn.end("shutdown:server shutting down")
        self._count("accepted")
        if after is not None:
            self._count("resumed")
        # Uncontended (the usual case) a fast lock does not yield: one task switch less per
        # batch. The legacy path keeps its lock as it was.
        lock = anyio.Lock(fast_acquire=self.config.ws_send != "per_frame")
        try:
            async with anyio.create_task_group() as tg:
                conn.handler_scope = tg.cancel_scope
                tg.start_soon(self._ws_commands, websocket, conn, lock, tg.cancel_scope)
                if self.config.ws_send != "per_frame":
                    # A task of its own: its every wake-up (one per event) resumes a short
                    # stack, not the whole ASGI middleware chain above this handler.
                    tg.start_soon(self._ws_streamer, websocket, conn, items, start, lock, tg)
                else:
                    await self._stream_ws(websocket, conn, items, start, lock)
                    tg.cancel_scope.cancel()
        finally:
            self._forget(conn)
            # Shielded: the subscription must be released even when the handler is cancelled.
            with anyio.CancelScope(shield=True):
                await items.aclose()
                self._tally_end(conn.end_reason)
                await self._after_disconnect(session_id, conn.end_reason)

    async def _first_message(self, websocket: WebSocket) -> Position | None:
        with anyio.move_on_after(self.config.first_message_timeout_s):
            message = await _receive_message(websocket)
            try:
                data = orjson.loads(message)
            except orjson.JSONDecodeError:
                raise _Refused(400, "the first message must be JSON") from None
            if not isinstance(data, dict) or data.get("type") != "subscribe":
                raise _Refused(400, 'the first message must be {"type": "subscribe"}')
            raw = data.get("after")
            if raw is None:
                return None
            if not isinstance(raw, str):
                raise _Refused(400, "after must be an event id string")
            try:
                return parse_event_id(raw)
            except ValueError as exc:
                raise _Refused(400, str(exc)) from None
        raise _Refused(408, "no subscribe message in time")

    def _shutdown_code(self) -> int:
        return WS_SERVICE_RESTART if self._restarting else WS_GOING_AWAY

    async def _ws_send(
        self, websocket: WebSocket, conn: _Connection, lock: anyio.Lock, data: Any
    ) -> bool:
        """Send one message; False if it took over ``send_timeout_s`` or the client is gone
        (``conn.client_gone`` then says which)."""
        if conn.client_gone:
            return False
        with anyio.move_on_after(self.config.send_timeout_s):
            async with lock:
                try:
                    await websocket.send_text(orjson.dumps(data).decode())
                except (WebSocketDisconnect, OSError, RuntimeError) as exc:
                    self._client_gone_or_raise(websocket, conn, exc)
                    return False
            return True
        return False

    def _client_gone_or_raise(
        self, websocket: WebSocket, conn: _Connection, exc: Exception
    ) -> None:
        # Starlette turns uvicorn's ClientDisconnected (an OSError) into WebSocketDisconnect;
        # once the receiving task has seen the disconnect, uvicorn refuses any send with a
        # RuntimeError instead. Only that RuntimeError means "gone": others are real bugs.
        if isinstance(exc, RuntimeError) and not (
            conn.client_gone or websocket.client_state is WebSocketState.DISCONNECTED
        ):
            raise exc
        self._client_left_mid_send(conn, exc)

    async def _ws_close(
        self, websocket: WebSocket, conn: _Connection, code: int, reason: str
    ) -> None:
        if conn.client_gone or websocket.application_state is not WebSocketState.CONNECTED:
            return
        with anyio.move_on_after(self.config.send_timeout_s):
            try:
                await websocket.close(code=code, reason=reason[:120])
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:
                self._client_gone_or_raise(websocket, conn, exc)

    async def _stream_ws(
        self,
        websocket: WebSocket,
        conn: _Connection,
        items: _Items,
        start: Position | None,
        lock: anyio.Lock,
    ) -> None:
        after = None if start is None else format_event_id(*start)
        ready = {"type": "ready", "session_id": conn.session_id, "after": after}
        if not await self._ws_send(websocket, conn, lock, ready):
            conn.end("stalled")
            return
        next_within = getattr(items, "next_within", None)
        take_ready = getattr(items, "take_ready", None)
        if self.config.ws_send != "per_frame" and next_within and take_ready:
            await self._stream_ws_batched(websocket, conn, items, lock)
            return
        while True:
            item = await self._next_item(conn, items)
            data: dict[str, Any]
            if isinstance(item, StreamEvent):
                data = {"type": "event", "id": format_event_id(item.epoch, item.seq)}
                data.update(_event_body(item))
                self._count("events_sent")
            elif isinstance(item, StreamReset):
                data = {
                    "type": "reset",
                    "id": format_event_id(item.epoch, item.seq),
                    "reason": item.reason,
                    "epoch": item.epoch,
                    "seq": item.seq,
                }
                self._count("resets_sent")
            elif conn.end_reason is None:
                data = {"type": "heartbeat"}
                self._count("heartbeats")
            else:
                await self._ws_end(websocket, conn, lock)
                return
            if not await self._ws_send(websocket, conn, lock, data):
                if not conn.client_gone:
                    conn.end("stalled")
                    await self._ws_close(websocket, conn, WS_TRY_AGAIN_LATER, "stalled")
                return

    async def _ws_streamer(
        self,
        websocket: WebSocket,
        conn: _Connection,
        items: _Items,
        start: Position | None,
        lock: anyio.Lock,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        await self._stream_ws(websocket, conn, items, start, lock)
        tg.cancel_scope.cancel()

    async def _stream_ws_batched(
        self, websocket: WebSocket, conn: _Connection, items: Any, lock: anyio.Lock
    ) -> None:
        """``_stream_ws`` with batches (:func:`fanout.stream_batched`): the events ready now
        go out under one lock, as frames shared by every subscriber of the session. With
        ``ws_send="fanout"`` the task parks while the stream is at the live head, and
        whoever publishes writes to the socket (:class:`fanout.Pusher`)."""

        def gone(exc: Exception) -> None:
            self._client_gone_or_raise(websocket, conn, exc)

        cut = await stream_batched(
            conn,
            items,
            lock,
            send=websocket.send,
            encode=self._ws_messages,
            count=self._count,
            heartbeat={"type": "websocket.send", "text": '{"type":"heartbeat"}'},
            gone=gone,
            errors=(WebSocketDisconnect, OSError, RuntimeError),
            heartbeat_s=self.config.heartbeat_interval_s,
            send_timeout_s=self.config.send_timeout_s,
            batch=_WS_BATCH,
            fanout=self.config.ws_send == "fanout",
        )
        if conn.client_gone:
            return
        if cut:
            conn.end("stalled")  # unless a publisher found it lagging first
            if conn.end_reason == "stalled":
                await self._ws_close(websocket, conn, WS_TRY_AGAIN_LATER, "stalled")
            # Lagging while blocked in a send: the socket takes nothing, not even a close
            # frame; the handler ends and the server closes the connection.
            return
        await self._ws_end(websocket, conn, lock)

    def _ws_messages(self, batch: list[StreamEvent | StreamReset]) -> list[tuple[Message, int]]:
        if len(batch) == 1:
            item = batch[0]
            last = self._ws_last
            if item is last[0]:  # the usual case: the event its session is being sent now
                self._counts["events_sent"] += 1
                return [({"type": "websocket.send", "text": last[1]}, 1)]
        text_of = self._ws_text
        return [({"type": "websocket.send", "text": text_of(x)}, 1) for x in batch]

    def _ws_text(self, item: StreamEvent | StreamReset) -> str:
        if isinstance(item, StreamReset):
            self._count("resets_sent")
            reset = {
                "type": "reset",
                "id": format_event_id(item.epoch, item.seq),
                "reason": item.reason,
                "epoch": item.epoch,
                "seq": item.seq,
            }
            return orjson.dumps(reset).decode()
        self._count("events_sent")
        if item is self._ws_last[0]:
            return self._ws_last[1]  # the event being fanned out to its session right now
        # Every subscriber of a session gets the same frame: encode it once, not once each.
        key = (item.session_id, item.epoch, item.seq)
        cache = self._ws_frames
        text = cache.get(key)
        if text is None:
            data = {"type": "event", "id": format_event_id(item.epoch, item.seq)}
            data.update(_event_body(item))
            text = orjson.dumps(data).decode()
            cache[key] = text
            if len(cache) > _FRAME_CACHE:
                cache.popitem(last=False)
        self._ws_last = (item, text)
        return text

    async def _ws_end(self, websocket: WebSocket, conn: _Connection, lock: anyio.Lock) -> None:
        """The stream ends (``conn.end_reason``): its final message, then the close."""
        kind, _, why = (conn.end_reason or "").partition(":")
        if kind == "shutdown":
            final = {"type": "shutdown", "reason": why}
            if await self._ws_send(websocket, conn, lock, final):
                await self._ws_close(websocket, conn, self._shutdown_code(), why)
        elif kind == "lagged":
            await self._ws_send(websocket, conn, lock, {"type": "lagged", "reason": why})
            await self._ws_close(websocket, conn, WS_TRY_AGAIN_LATER, "lagged")
        else:
            await self._ws_close(websocket, conn, WS_TRY_AGAIN_LATER, kind)

    async def _ws_commands(
        self,
        websocket: WebSocket,
        conn: _Connection,
        lock: anyio.Lock,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            while True:
                message = await _receive_message(websocket)
                try:
                    data = orjson.loads(message)
                except orjson.JSONDecodeError:
                    data = None
                if not isinstance(data, dict):
                    data = {}
                kind = data.get("type")
                if kind == "ping":
                    pong = {"type": "pong", "id": data.get("id")}
                    await self._ws_send(websocket, conn, lock, pong)
                elif kind == "cancel":
                    await self._ws_cancel(websocket, conn, lock, data.get("reason"))
                else:
                    error = {"type": "error", "message": "expected ping or cancel"}
                    await self._ws_send(websocket, conn, lock, error)
        except WebSocketDisconnect:
            conn.client_gone = True
            scope.cancel()  # the client left: stop streaming at once

    async def _ws_cancel(
        self, websocket: WebSocket, conn: _Connection, lock: anyio.Lock, reason: object
    ) -> None:
        allowed = self._authorize_cancel(websocket, conn.session_id)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if self._cancel is None or allowed is not True:
            refusal = {"type": "error", "message": "cancel is not allowed here"}
            await self._ws_send(websocket, conn, lock, refusal)
            return
        why = reason if isinstance(reason, str) and reason else "cancelled by the client"
        try:
            await self._cancel(conn.session_id, why[:200])
        except (OrchestratorError, StorageError) as exc:
            # The runtime is closing or storage is down: answer, keep the stream open.
            log.warning("cancel of session %r failed: %s", conn.session_id, exc)
            failure = {"type": "error", "message": f"cancel failed: {exc}"[:300]}
            await self._ws_send(websocket, conn, lock, failure)
            return
        self._count("cancels_requested")
        done = {"type": "cancel_requested", "reason": why[:200]}
        await self._ws_send(websocket, conn, lock, done)


async def _receive_message(websocket: WebSocket) -> str | bytes:
    """The next text or binary message (JSON either way); raises ``WebSocketDisconnect``."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if isinstance(text, str):
        return text
    data = message.get("bytes")
    return data if isinstance(data, bytes) else b""


class _SSEResponse(Response):
    """The streaming body of one SSE connection (a raw ASGI response)."""

    def __init__(self, streams: EventStreams, session_id: str, after: Position | None) -> None:
        super().__init__(media_type="text/event-stream")
        self._streams = streams
        self._session_id = session_id
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._streams._serve_sse(self._session_id, self._after, receive, send)


class StreamingServer(uvicorn.Server):
    """``uvicorn.Server`` that drains open streams before uvicorn closes connections.

    On SIGTERM or SIGINT (or ``should_exit``) it stops accepting connections, ends every
    open stream with its final ``shutdown`` message (``EventStreams.close``), gives them
    ``grace_s`` to be sent and closed (WebSockets with 1001), cuts what is left, and only
    then lets uvicorn shut down (close idle connections, run the lifespan shutdown, where
    the runtime drains). A signal in ``restart_signals``, or ``restart()``, does the same
    as a restart: WebSockets close with 1012 so clients reconnect without backing off.
    ``serve()`` / ``run()`` return normally after a signal (``exit_signal`` says which)
    rather than re-raising it as plain uvicorn does, so the caller decides the exit code.
    A second SIGINT forces the exit, as in uvicorn.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        streams: EventStreams,
        *,
        grace_s: float = 10.0,
        restart_signals: tuple[int, ...] = (),
    ) -> None:
        super().__init__(config)
        self.streams = streams
        self.grace_s = grace_s
        self.restart_signals = restart_signals
        self.restarting = False
        self.exit_signal: int | None = None

    def restart(self) -> None:
        """Shut down as a restart: streams are told, WebSockets close with 1012."""
        self.restarting = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals can only be handled in the main thread (uvicorn's own rule).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM, *self.restart_signals)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler: only set flags here (logging could re-enter a held lock).
        if self.exit_signal is None:
            self.exit_signal = sig
            self.restarting = self.restarting or sig in self.restart_signals
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        # Stop accepting first: a connection made during the grace period would be refused.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        cause = "" if self.exit_signal is None else f" on {signal.Signals(self.exit_signal).name}"
        log.info("shutting down%s%s", cause, " for a restart" if self.restarting else "")
        told = self.streams.close(restarting=self.restarting)
        if told:
            log.info("told %d open stream(s) to end; waiting up to %.1f s", told, self.grace_s)
        await self.streams.wait_closed(self.grace_s)
        await super().shutdown(sockets=sockets)
