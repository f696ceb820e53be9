"""What the SSE and WebSocket endpoints share: open streams, their lifecycle and counters.

``StreamsBase`` owns the open connections (``_Connection``: how to interrupt one, why it
ends), ``close()`` / ``wait_closed()`` / ``drop()``, the counters behind ``statistics()``,
admission (authorization, shutdown refusals) and the end-of-stream bookkeeping; the
transports (``asgi_sse``, ``asgi_ws``) build on it and ``asgi.EventStreams`` combines them.
Also the wire helpers both use: event ids (``epoch:seq``) and the JSON body of an event.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
from starlette.requests import HTTPConnection

from asyncstore.orchestrator.asgi_config import EndpointConfig, EndpointStatistics
from asyncstore.orchestrator.broadcast import Position, StreamReset
from asyncstore.orchestrator.errors import SubscriberLagged
from asyncstore.storage import StreamEvent
from asyncstore.storage.errors import InvalidArgument, UsageError

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
    created = event.created_at
    tz = created.tzinfo
    return {
        "session_id": event.session_id,
        "epoch": event.epoch,
        "seq": event.seq,
        "kind": event.kind,
        "payload": event.payload,
        # orjson writes a UTC (or naive) datetime as isoformat() does, several times faster;
        # other zones keep isoformat() (orjson drops an offset's seconds).
        "created_at": created if tz is UTC or tz is None else created.isoformat(),
    }


def _sse(data: Any, *, event: str | None = None, id_: str | None = None) -> bytes:
    # orjson never emits a raw newline, so one ``data:`` line holds the whole JSON.
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id_ is not None:
        head += b"id: " + id_.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class StreamsBase:
    """The open streams of ``EventStreams`` and what both transports do with them."""

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
        # The ASGI messages of the event being fanned out to its session right now, shared
        # by every subscriber of the session (nobody mutates a sent message).
        self._ws_batch: tuple[StreamEvent | None, list[tuple[dict[str, Any], int]]] = (None, [])
        self._sse_batch: tuple[StreamEvent | None, list[tuple[dict[str, Any], int]]] = (None, [])

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

    def _open_stream(
        self, conn: _Connection, after: Position | None, transport: Literal["sse", "ws"]
    ) -> tuple[Position | None, _Items]:
        """Subscribe an admitted connection and register it as open (both transports):
        its start position and its items."""
        start = self._start(after)
        items = self._subscribe(conn.session_id, start)
        self._open[conn] = transport
        if self._closing:
            # close() ran while this request was being admitted: it did not see us.
            conn.end("shutdown:server shutting down")
        self._count("accepted")
        if after is not None:
            self._count("resumed")
        return start, items

    @staticmethod
    async def _anchor(items: _Items) -> None:
        """Fix a stream's start before its ``ready`` (``Subscription.anchor``: the poll path
        reads the stored head there; other subscribe functions may have nothing to call),
        so every event stored after the client's ``ready`` reaches it."""
        anchor = getattr(items, "anchor", None)
        if anchor is not None:
            await anchor()

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
