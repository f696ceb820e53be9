"""``serve_dashboard``: the operator dashboard on its own uvicorn server (``asyncstore
dashboard``).

Binds the socket itself (so ``port=0`` reports the port it got), leaves the process's
signals to the caller (the CLI stops it on SIGTERM / SIGINT), and on cancellation ends the
live streams first (``Dashboard.close``) so uvicorn's graceful stop does not wait on them.
Relies on ``orchestrator.dashboard`` and uvicorn (the ``asgi`` extra).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus

from asyncstore.orchestrator.config import Settings
from asyncstore.orchestrator.dashboard import Dashboard
from asyncstore.storage import AsyncStorageBackend

__all__ = ["serve_dashboard"]

_STOP_GRACE_S = 5.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller owns the process's signals


async def serve_dashboard(
    storage: AsyncStorageBackend,
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a ``Dashboard`` over ``storage`` (flags shown: ``settings.flags``) until
    cancelled; ``task_status`` reports the page's URL.

    Cancelling ends the open live streams, stops accepting, and waits up to 5 s for the
    requests in flight (shielded, so the listener is always closed).
    """
    cfg = settings.dashboard
    dashboard = Dashboard(storage, cfg, flags=lambda: settings.flags)
    bind_host = cfg.host if host is None else host
    bind_port = cfg.port if port is None else port
    family = socket.getaddrinfo(bind_host, bind_port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind_host, bind_port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        dashboard.app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=int(_STOP_GRACE_S),
    )
    server = _Server(config)

    ended = anyio.Event()

    async def run() -> None:
        # Shielded: the server must reach its own stop (close the listener, end the
        # connections) even when the caller is cancelled; should_exit below starts it.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve([sock])
            finally:
                ended.set()

    shown = f"[{bind_host}]" if ":" in bind_host else bind_host
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            while not server.started:
                if ended.is_set():
                    raise OSError(f"the dashboard server on {shown}:{bound_port} did not start")
                await anyio.sleep(0.01)
            task_status.started(f"http://{shown}:{bound_port}/")
            await anyio.sleep_forever()
        finally:
            dashboard.close()
            server.should_exit = True
