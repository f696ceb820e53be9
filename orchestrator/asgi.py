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
policy), Starlette and anyio; install the ``asgi`` extra. The endpoints live by transport in
``asgi_sse`` and ``asgi_ws`` over ``asgi_base`` (the open streams), with ``asgi_config`` and
the fan-out delivery loop in ``fanout``; import them from here.

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
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from asyncstore.orchestrator.asgi_base import (
    Authorize,
    CancelFunction,
    SubscribeFunction,
    format_event_id,
    parse_event_id,
)
from asyncstore.orchestrator.asgi_config import EndpointConfig, EndpointStatistics
from asyncstore.orchestrator.asgi_sse import SSEEndpoints
from asyncstore.orchestrator.asgi_ws import WebSocketEndpoints
from asyncstore.orchestrator.runtime import Runtime

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


class EventStreams(SSEEndpoints, WebSocketEndpoints):
    """SSE and WebSocket endpoints over a subscribe function; owner of the open streams.

    Mount ``sse`` as an HTTP route and ``websocket`` as a WebSocket route whose path holds
    ``{session_id}``. ``authorize(connection, session_id)`` (sync or async) is asked before
    anything is read; a refusal is a 403 (WebSocket: close 1008 before accepting). The
    resume point only ever applies to the session in the path, which is the one
    authorized. ``cancel`` (``rt.request_cancel``) serves the WebSocket ``cancel`` message
    and ``cancel_on_disconnect``; ``authorize_cancel`` defaults to ``authorize``.
    """

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
