"""The WebSocket endpoint of ``EventStreams``: JSON messages, ``ping`` and ``cancel``.

Owns the WebSocket protocol of the streams (the ``subscribe`` first message, close codes,
commands and their answers under the connection's lock) and its delivery paths: the
fan-out (``ws_send="fanout"``), ``batched`` (both ``fanout.stream_batched``) and the
legacy ``per_frame``. Relies on ``asgi_base.StreamsBase`` for the open streams.
"""

from __future__ import annotations

import contextlib
import inspect
from datetime import UTC
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from asyncstore.orchestrator.asgi_base import (
    _FRAME_CACHE,
    _WS_BATCH,
    WS_GOING_AWAY,
    WS_POLICY_VIOLATION,
    WS_SERVICE_RESTART,
    WS_TRY_AGAIN_LATER,
    StreamsBase,
    _Connection,
    _event_body,
    _Items,
    _Refused,
    format_event_id,
    log,
    parse_event_id,
)
from asyncstore.orchestrator.broadcast import Position, StreamReset
from asyncstore.orchestrator.errors import OrchestratorError
from asyncstore.orchestrator.fanout import Message, stream_batched
from asyncstore.storage import StorageError, StreamEvent


class WebSocketEndpoints(StreamsBase):
    """The WebSocket side of ``EventStreams``."""

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
        start, items = self._open_stream(conn, after, "ws")
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
        await self._anchor(items)
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
            if isinstance(exc, OSError):  # what Starlette's WebSocket.send would record
                websocket.application_state = WebSocketState.DISCONNECTED
            self._client_gone_or_raise(websocket, conn, exc)

        mode = self.config.ws_send
        send = websocket.send
        if mode == "fanout":
            # The ASGI send Starlette's WebSocket wraps: one coroutine and one state check
            # less per frame. Only ``websocket.send`` messages go this way; the handshake,
            # the close and the commands' answers stay on the wrapper. Its disconnect (an
            # OSError, which the wrapper turns into WebSocketDisconnect) goes to ``gone``.
            send = getattr(websocket, "_send", send)

        cut = await stream_batched(
            conn,
            items,
            lock,
            send=send,
            encode=self._ws_messages,
            counts=self._counts,
            heartbeat={"type": "websocket.send", "text": '{"type":"heartbeat"}'},
            gone=gone,
            errors=(WebSocketDisconnect, OSError, RuntimeError),
            heartbeat_s=self.config.heartbeat_interval_s,
            send_timeout_s=self.config.send_timeout_s,
            batch=_WS_BATCH,
            fanout=mode in ("fanout", "fanout_starlette"),
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
            shared = self._ws_batch
            if item is shared[0]:  # the usual case: the event its session is being sent now
                self._counts["events_sent"] += 1
                return shared[1]
            text = self._ws_text(item)
            messages: list[tuple[Message, int]] = [({"type": "websocket.send", "text": text}, 1)]
            if type(item) is StreamEvent:
                self._ws_batch = (item, messages)  # for the session's other subscribers
            return messages
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
            text = orjson.dumps(_ws_event(item)).decode()
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


def _ws_event(event: StreamEvent) -> dict[str, Any]:
    """An event's WebSocket message: ``{"type": "event", "id": ...}`` and ``_event_body``'s
    fields, in that order, built as one dict (once per event, for every subscriber)."""
    created = event.created_at
    tz = created.tzinfo
    epoch, seq = event.epoch, event.seq
    return {
        "type": "event",
        "id": format_event_id(epoch, seq),
        "session_id": event.session_id,
        "epoch": epoch,
        "seq": seq,
        "kind": event.kind,
        "payload": event.payload,
        # As ``_event_body``: orjson writes a UTC (or naive) datetime as isoformat() does.
        "created_at": created if tz is UTC or tz is None else created.isoformat(),
    }


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
