"""The SSE endpoint of ``EventStreams``: one ``text/event-stream`` response per stream.

Owns the SSE wire format (ids, named ``ready`` / ``reset`` / ``lagged`` / ``shutdown``
events, heartbeat comments), the frames shared by a session's subscribers, and the two
delivery paths: the fan-out (``sse_send="fanout"``, ``fanout.stream_batched``) and the
legacy task per connection. Relies on ``asgi_base.StreamsBase`` for the open streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from asyncstore.orchestrator.asgi_base import (
    _FRAME_CACHE,
    _SSE_BATCH,
    _SSE_HEARTBEAT,
    _WRITES_PER_YIELD,
    StreamsBase,
    _Connection,
    _event_body,
    _Items,
    _Refused,
    _sse,
    format_event_id,
    parse_event_id,
)
from asyncstore.orchestrator.broadcast import Position, StreamReset
from asyncstore.orchestrator.fanout import Message, stream_batched
from asyncstore.storage import StreamEvent


class SSEEndpoints(StreamsBase):
    """The SSE side of ``EventStreams``."""

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
        start, items = self._open_stream(conn, after, "sse")
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
        await self._anchor(items)
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
            counts=self._counts,
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
            shared = self._sse_batch
            if item is shared[0]:  # the usual case: the event its session is being sent now
                self._counts["events_sent"] += 1
                return shared[1]
            chunk = self._sse_chunk(item)
            message = {"type": "http.response.body", "body": chunk, "more_body": True}
            messages: list[tuple[Message, int]] = [(message, 1)]
            if type(item) is StreamEvent:
                self._sse_batch = (item, messages)  # for the session's other subscribers
            return messages
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


class _SSEResponse(Response):
    """The streaming body of one SSE connection (a raw ASGI response)."""

    def __init__(self, streams: SSEEndpoints, session_id: str, after: Position | None) -> None:
        super().__init__(media_type="text/event-stream")
        self._streams = streams
        self._session_id = session_id
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._streams._serve_sse(self._session_id, self._after, receive, send)
