"""A uvicorn process serving ``EventStreams`` for tests/integration/test_asgi_process.py.

    python asgi_server.py STORAGE_URL EMIT_INTERVAL_S GRACE_S

Session ``live`` gets an event every EMIT_INTERVAL_S from a turn that runs until shutdown.
``GET /stats`` answers ``EventStreams.statistics()`` as JSON. Prints ``listening PORT`` once
serving and ``stats {...}`` / ``report ...`` on the way out. SIGTERM and SIGINT stop it
(WebSockets close with 1001); SIGUSR1 stops it as a restart (1012). Logs go to stderr:
uvicorn at INFO, ``asyncstore`` at DEBUG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

import anyio
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from asyncstore.orchestrator.asgi import EventStreams, StreamingServer
from asyncstore.orchestrator.broadcast import Position, Subscription
from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import Runtime, open_runtime


def main() -> None:
    url, interval_s, grace_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncstore").setLevel(logging.DEBUG)
    runtime: list[Runtime] = []

    def subscribe(session_id: str, after: Position | None) -> Subscription:
        return runtime[0].subscribe(session_id, after)

    def authorize(conn: HTTPConnection, session_id: str) -> bool:
        return True

    streams = EventStreams(subscribe, authorize=authorize)

    async def produce() -> None:
        async with runtime[0].turn("live") as turn:
            i = 0
            while True:
                await turn.emit("delta", {"i": i, "text": "x" * 200})
                i += 1
                await anyio.sleep(interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings = load_settings(
            storage={"url": url},
            migrate_on_start=True,
            runtime={"reload_on_sighup": False, "shutdown_grace_s": 1.0},
        )
        async with open_runtime(settings) as rt, anyio.create_task_group() as tg:
            runtime.append(rt)
            tg.start_soon(produce)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        print(f"report {rt.report}", flush=True)

    async def stats(request: Request) -> Response:
        body = orjson.dumps(dataclasses.asdict(streams.statistics()))
        return Response(body, media_type="application/json")

    app = Starlette(
        routes=[
            Route("/stats", stats),
            Route("/s/{session_id}/events", streams.sse),
            WebSocketRoute("/s/{session_id}/ws", streams.websocket),
        ],
        lifespan=lifespan,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections made before uvicorn serves wait in the backlog
    config = uvicorn.Config(app, log_level="info", lifespan="on")
    server = StreamingServer(config, streams, grace_s=grace_s, restart_signals=(signal.SIGUSR1,))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    print("stats " + orjson.dumps(dataclasses.asdict(streams.statistics())).decode(), flush=True)


if __name__ == "__main__":
    main()
