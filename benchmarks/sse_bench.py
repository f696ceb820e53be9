"""SSE fan-out on one uvicorn process: many clients, many sessions, events at token rate.

A server process (this module with ``--serve``) runs the runtime and ``EventStreams`` on
uvicorn; this process connects raw-socket SSE clients (spread evenly over the sessions),
starts one turn per session emitting ``--rate`` events per second, and measures
deliveries per second, emit-to-receipt latency (the emit's wall clock travels in the
payload; both processes share the host clock), the server's RSS growth per connection, and
the hub's database reads by cause, then drops a tenth of the clients and resumes them from
their last id. Live delivery should read nothing from the database; resumes may.

    python -m benchmarks.sse_bench [--clients 1000] [--sessions 100] [--rate 20] [--seconds 10]
        [--sse-send fanout|per_connection]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asyncstore.orchestrator.asgi import EndpointConfig, EventStreams, StreamingServer
from asyncstore.orchestrator.broadcast import Position, Subscription
from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.runtime import Runtime, open_runtime

__all__ = ["main"]


# -- the server process ------------------------------------------------------------------------


class _BenchServer:
    def __init__(self, url: str, sse_send: str = "fanout") -> None:
        self.url = url
        self.rt: Runtime | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        self.streams = EventStreams(
            self._subscribe,
            authorize=_allow,
            config=EndpointConfig(start="live", sse_send=sse_send),  # type: ignore[arg-type]
        )
        self.app = Starlette(
            routes=[
                Route("/s/{session_id}/events", self.streams.sse),
                Route("/start", self.start, methods=["POST"]),
                Route("/stats", self.stats),
            ],
            lifespan=self.lifespan,
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        settings = load_settings(
            storage={"url": self.url},
            migrate_on_start=True,
            runtime={"reload_on_sighup": False, "shutdown_grace_s": 1.0},
        )
        async with open_runtime(settings) as rt, anyio.create_task_group() as tg:
            self.rt, self.tg = rt, tg
            yield
            tg.cancel_scope.cancel()

    def _subscribe(self, session_id: str, after: Position | None) -> Subscription:
        if self.rt is None:
            raise RuntimeError("not running")
        return self.rt.subscribe(session_id, after)

    async def start(self, request: Request) -> Response:
        body = await request.json()
        if self.tg is None:
            return JSONResponse({"error": "not running"}, status_code=503)
        for i in range(int(body["sessions"])):
            self.tg.start_soon(self._turn, f"bench-{i}", float(body["rate"]), int(body["events"]))
        return JSONResponse({"started": body["sessions"]})

    async def _turn(self, session_id: str, rate: float, events: int) -> None:
        if self.rt is None:
            return
        interval = 1.0 / rate
        async with self.rt.turn(session_id) as turn:
            start = time.monotonic()
            for i in range(events):
                await turn.emit("delta", {"i": i, "t": time.time()})
                await anyio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
            await turn.emit("turn_completed", {"t": time.time()})

    async def stats(self, request: Request) -> Response:
        if self.rt is None:
            return JSONResponse({"error": "not running"}, status_code=503)
        hub = (await self.rt._broadcast.get(True)).statistics()  # the memory hub, always running
        ends = self.streams.statistics()
        return JSONResponse(
            {
                "rss_bytes": _rss(os.getpid()),
                "db_reads": dict(hub.db_reads),
                "subscribers": hub.subscribers,
                "delivered": hub.delivered,
                "open_sse": ends.open_sse,
                "resumed": ends.resumed,
                "events_sent": ends.events_sent,
            }
        )


def _allow(conn: HTTPConnection, session_id: str) -> bool:
    return True


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _serve(url: str, sse_send: str = "fanout") -> None:
    server = _BenchServer(url, sse_send)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on", backlog=4096)
    StreamingServer(config, server.streams).run(sockets=[sock])


# -- the clients ---------------------------------------------------------------------------------


class _Client:
    """One SSE connection over a raw socket: cheap enough to run a thousand in one process."""

    def __init__(self, host: str, port: int, session_id: str) -> None:
        self.host, self.port, self.session_id = host, port, session_id
        self.last_id: str | None = None
        self.latencies: list[float] = []
        self.received = 0
        self.out_of_order = 0
        self.done = False
        self.generation = 0
        self.ready = asyncio.Event()

    def drop(self) -> None:
        """The running connection stops at its next line, as if the network dropped it."""
        self.generation += 1

    async def run(self, after: str | None) -> None:
        generation = self.generation
        pending_id: str | None = None
        reader, writer = await asyncio.open_connection(self.host, self.port)
        headers = f"Last-Event-ID: {after}\r\n" if after else ""
        writer.write(
            f"GET /s/{self.session_id}/events HTTP/1.1\r\nHost: bench\r\n{headers}"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        try:
            while not self.done and generation == self.generation:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"event: ready"):
                    self.ready.set()
                elif line.startswith(b"id: "):
                    pending_id = line[4:].strip().decode()
                elif line.startswith(b'data: {"session_id"'):
                    now = time.time()
                    event = orjson.loads(line[6:])
                    if "payload" not in event:
                        continue  # the ready event
                    self.received += 1
                    self.latencies.append(now - event["payload"]["t"])
                    last_seq = 0 if self.last_id is None else int(self.last_id.split(":")[1])
                    self.out_of_order += event["seq"] != last_seq + 1
                    self.last_id = pending_id  # the whole frame arrived: its id is ours
                    if event["kind"] == "turn_completed":
                        self.done = True
        finally:
            writer.close()


async def _drive(args: argparse.Namespace, base: str, pid: int) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        rss_idle = (await http.get("/stats")).json()["rss_bytes"]
        clients = [
            _Client(host, int(port), f"bench-{i % args.sessions}") for i in range(args.clients)
        ]
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(client.run, None)
            with anyio.fail_after(60):
                for client in clients:
                    await client.ready.wait()
            connected = (await http.get("/stats")).json()
            events = int(args.rate * args.seconds)
            started = time.monotonic()
            await http.post(
                "/start", json={"sessions": args.sessions, "rate": args.rate, "events": events}
            )
            # A tenth of the clients drop halfway and resume from their last id.
            await anyio.sleep(args.seconds / 2)
            dropped = clients[::10]
            for client in dropped:
                client.drop()
            await anyio.sleep(0.3)  # every dropped reader saw its next line and left
            for client in dropped:
                tg.start_soon(client.run, client.last_id or "0:0")
            with anyio.fail_after(args.seconds * 3 + 30):
                while not all(c.done for c in clients):  # noqa: ASYNC110 - a progress poll
                    await anyio.sleep(0.1)
            elapsed = time.monotonic() - started
        final = (await http.get("/stats")).json()
    latencies = sorted(x for c in clients for x in c.latencies)
    delivered = sum(c.received for c in clients)
    expected = args.clients * (events + 1)
    return {
        "clients": args.clients,
        "sessions": args.sessions,
        "rate_per_session": args.rate,
        "events_per_session": events + 1,
        "deliveries": delivered,
        "expected_deliveries": expected,
        "out_of_order": sum(c.out_of_order for c in clients),
        "deliveries_per_s": round(delivered / elapsed),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "rss_per_connection_kib": round(
            (connected["rss_bytes"] - rss_idle) / args.clients / 1024, 1
        ),
        "resumed_clients": len(dropped),
        "db_reads": final["db_reads"],
        "server_pid": pid,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second per session")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--url", help="storage URL (default: SQLite in a temp dir)")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument(
        "--sse-send",
        choices=("fanout", "per_connection"),
        default="fanout",
        help="EndpointConfig.sse_send: the fan-out (default) or the legacy task per connection",
    )
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.sse_send)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'sse.db'}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.sse_bench",
                "--serve",
                url,
                "--sse-send",
                args.sse_send,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if proc.stdout is None:
                raise RuntimeError("no server output")
            base = proc.stdout.readline().strip()
            _wait_up(base)
            result = anyio.run(_drive, args, base, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    exact = result["deliveries"] == result["expected_deliveries"] and not result["out_of_order"]
    return 0 if exact else 1


def _wait_up(base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/stats", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
