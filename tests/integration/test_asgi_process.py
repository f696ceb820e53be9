"""The stream endpoints in a real uvicorn process, with real sockets and real signals.

``asgi_server.py`` runs in its own OS process; WebSocket clients (the ``websockets``
package) and SSE clients (httpx, or a raw socket when it must be cut) connect over TCP.
Clients that vanish mid-send (the socket reset, no close frame) are counted and never
make uvicorn log an error; SIGTERM / SIGINT end every open WebSocket with a ``shutdown``
message and close code 1001 (1012 when the server is told it is restarting, here by
SIGUSR1), every SSE stream with a final ``shutdown`` event, within the grace period.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from anyio.abc import SocketAttribute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.test_asgi import Frame, frames
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("asgi_server.py")
GRACE_S = 5.0
EXIT_BOUND_S = GRACE_S + 20.0  # the grace period plus the runtime's drain, generously


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def stats(self) -> dict[str, int]:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            stats: dict[str, int] = (await client.get("/stats")).raise_for_status().json()
            return stats

    async def wait_stats(self, check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
        """Wait until ``check`` holds on ``/stats`` (another process: no event to wait on)."""
        seen: list[dict[str, int]] = []

        async def holds() -> bool:
            seen.append(await self.stats())
            return check(seen[-1])

        await wait_for(holds, 30, what="/stats condition")
        return seen[-1]

    async def stop(self, sig: int) -> int:
        """Send ``sig``; wait (bounded) for the exit; read the rest of stdout."""
        self.proc.send_signal(sig)
        code = await anyio.to_thread.run_sync(lambda: self.proc.wait(timeout=EXIT_BOUND_S))
        assert self.proc.stdout is not None
        self.stdout_lines += self.proc.stdout.read().splitlines()
        return code

    def final_stats(self) -> dict[str, int]:
        (line,) = [line for line in self.stdout_lines if line.startswith("stats ")]
        stats: dict[str, int] = orjson.loads(line.removeprefix("stats "))
        return stats


@contextlib.asynccontextmanager
async def server_process(tmp_path: Path, interval_s: float) -> AsyncIterator[ServerProcess]:
    url = f"sqlite:///{tmp_path / 'asgi.db'}"
    stderr_path = tmp_path / "server.stderr"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, read line by line
            [sys.executable, str(SERVER), url, str(interval_s), str(GRACE_S)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), line + stderr_path.read_text()
        srv = ServerProcess(proc, int(line.split()[1]), stderr_path)
        await srv.wait_stats(lambda s: True)  # the lifespan (the runtime) has started
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _reset_on_close(sock: socket.socket) -> None:
    # SO_LINGER 0: closing sends a TCP RST at once, as a crashed client or a dead NAT would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _ws_subscribe(port: int) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}/s/live/ws", max_queue=None)
    await ws.send(orjson.dumps({"type": "subscribe"}).decode())
    assert orjson.loads(await ws.recv())["type"] == "ready"
    return ws


async def ws_abort(port: int, after_events: int) -> None:
    """Subscribe, read a few events while the server is sending, then reset the socket."""
    ws = await _ws_subscribe(port)
    for _ in range(after_events):
        await ws.recv()
    _reset_on_close(ws.transport.get_extra_info("socket"))
    ws.transport.abort()


async def sse_abort(port: int, after_bytes: int) -> None:
    """Open the SSE stream on a raw socket, read some of it, then reset the socket."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    request = b"GET /s/live/events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n"
    await stream.send(request)
    received = b""
    while b"event: ready" not in received or len(received) < after_bytes:
        received += await stream.receive()
    _reset_on_close(stream.extra(SocketAttribute.raw_socket))
    await stream.aclose()


@dataclass
class WsOutcome:
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None


async def ws_until_closed(ws: ClientConnection, outcome: WsOutcome) -> None:
    try:
        async for message in ws:
            outcome.messages.append(orjson.loads(message))
    except ConnectionClosed:
        pass
    outcome.close_code = ws.close_code


async def sse_until_ended(port: int, got: list[Frame], ready: anyio.Event) -> None:
    async with (
        httpx.AsyncClient(timeout=EXIT_BOUND_S) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/s/live/events") as response,
    ):
        assert response.status_code == 200
        async for frame in frames(response):
            if frame.event == "ready":
                ready.set()
            got.append(frame)


def assert_no_errors_logged(stderr: str) -> None:
    assert "Exception in ASGI application" not in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert "ERROR" not in stderr, stderr
    # asyncio's warning for writes to a reset socket: the SSE writer must notice the loss.
    assert "socket.send() raised exception" not in stderr, stderr


@pytest.mark.parametrize("interval_s", [0.02, 0.001], ids=["slow-events", "fast-events"])
async def test_clients_that_vanish_mid_send_are_counted_and_never_logged_as_errors(
    tmp_path: Path, interval_s: float
) -> None:
    ws_clients, sse_clients = 30, 10
    async with server_process(tmp_path, interval_s) as srv:
        # Let a backlog build up, so new subscribers are sent a burst to replay.
        await srv.wait_stats(lambda s: True)
        async with anyio.create_task_group() as tg:
            for i in range(ws_clients):
                tg.start_soon(ws_abort, srv.port, 1 + i % 5)
            for i in range(sse_clients):
                tg.start_soon(sse_abort, srv.port, 300 * (1 + i % 4))
        total = ws_clients + sse_clients
        stats = await srv.wait_stats(
            lambda s: (
                s["ended_by_client"] == total and s["open_websockets"] == 0 and s["open_sse"] == 0
            )
        )
        assert stats["accepted"] == total
        assert_no_errors_logged(srv.stderr())
        assert await srv.stop(signal.SIGTERM) == 0
        assert_no_errors_logged(srv.stderr())
        final = srv.final_stats()
        assert final["ended_by_client"] == total
        assert final["disconnected_mid_send"] <= total


@pytest.mark.parametrize(
    ("sig", "close_code"),
    [(signal.SIGTERM, 1001), (signal.SIGINT, 1001), (signal.SIGUSR1, 1012)],
    ids=["SIGTERM", "SIGINT", "restart"],
)
async def test_a_signal_sends_shutdown_then_closes_every_stream_within_the_grace_period(
    tmp_path: Path, sig: int, close_code: int
) -> None:
    n = 5
    async with server_process(tmp_path, 0.01) as srv:
        outcomes = [WsOutcome() for _ in range(n)]
        sse_frames: list[list[Frame]] = [[] for _ in range(n)]
        async with anyio.create_task_group() as tg:
            for outcome in outcomes:
                tg.start_soon(ws_until_closed, await _ws_subscribe(srv.port), outcome)
            for got in sse_frames:
                ready = anyio.Event()
                tg.start_soon(sse_until_ended, srv.port, got, ready)
                await ready.wait()
            await srv.wait_stats(lambda s: s["open_websockets"] == n and s["open_sse"] == n)
            started = anyio.current_time()
            assert await srv.stop(sig) == 0
            assert anyio.current_time() - started < EXIT_BOUND_S
        for outcome in outcomes:
            assert outcome.messages[-1] == {"type": "shutdown", "reason": "server shutting down"}
            assert outcome.close_code == close_code
        for got in sse_frames:
            assert (got[-1].event, got[-1].json()) == (
                "shutdown",
                {"reason": "server shutting down"},
            )
        assert_no_errors_logged(srv.stderr())
        stats = srv.final_stats()
        assert stats["ended_shutdown"] == 2 * n
        assert stats["open_websockets"] == stats["open_sse"] == 0
        assert any(line.startswith("report RuntimeReport(") for line in srv.stdout_lines)
