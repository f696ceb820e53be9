"""S2 over real sockets: WebSocket and SSE subscribers in their own processes, a bare ceiling.

The suite's S2. Servers run in their own processes on uvicorn (127.0.0.1):

* ``library``: the runtime and ``EventStreams`` (``orchestrator/asgi.py``); producers are
  agent turns (``rt.turn`` / ``turn.emit``) at 20 tokens/s per stream (the seed's). Its flags
  switch between the optimized path (memory delivery) and the legacy one (poll).
* ``bare``: the ceiling: Starlette on uvicorn, per-session in-memory fan-out to the
  connected sockets (the frame encoded once per event), no storage, no library.
* ``cross``: two library servers on one Postgres database; producers on the first,
  subscribers spread over both (the cross-instance path).

Subscribers are client processes (``--client``), asyncio with the ``websockets`` package
(a tenth of them raw-socket SSE readers), each checking that it sees every seq once and
in order, and measuring the delivery latency: the producer's wall clock travels in the
event, the client compares it with its own on receipt (one machine, one clock). Figures
per case: deliveries/s, p50/p99 latency, server CPU per delivery, the clients' busiest
process CPU (the load generator must not be the bottleneck), live database reads, RSS per
connection, and the exactness violations.

    python -m benchmarks.s2_sockets [--url URL] [--streams 40] [--subscribers 240]
        [--events 40] [--clients 2]
        [--cases bare,library,legacy,cross,batched,per_frame,sse_per_connection]

``library`` serves WebSockets and SSE with the fan-out (``EndpointConfig(ws_send="fanout",
sse_send="fanout")``, the defaults); ``batched`` and ``per_frame`` (this command only) run the
WebSocket endpoint's earlier send paths, and ``sse_per_connection`` SSE's legacy task per
connection, each on a server of its own. The summary line gives the RSS growth per 1,000
idle subscribers (connected, subscribed, before any producer starts, on a fresh server).
The producers' turns close after the measured window (as they open before it). With
``ASYNCSTORE_S2_PROFILE=FILE`` the library servers run under cProfile (process CPU time)
and write FILE; with ``ASYNCSTORE_S2_SAMPLE=DIR`` py-spy (when installed) samples the
producing server over each measured window only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import orjson

from benchmarks._common import percentile

__all__ = ["S2Case", "extra_rows", "main", "notes", "run_cases"]

RATE = 20.0  # tokens/s per stream (the seed's)
SSE_EVERY = 10  # one subscriber in this many is an SSE client
CASES = ("bare", "library", "legacy", "cross")
SEND_CASES = ("batched", "per_frame")  # this command only: the WebSocket endpoint's older paths
SSE_LEGACY = "sse_per_connection"  # this command only: SSE on its legacy task per connection
CLOSE_LIMIT_S = 120.0  # how long /finish waits for the producers' turns to close
_LEGACY_FLAGS = {"stream_batching": "per_event", "stream_delivery": "poll"}
_OPTIMIZED_FLAGS = {"stream_batching": "batched", "stream_delivery": "memory"}

# -- server processes ------------------------------------------------------------------------

Sink = Callable[[str], Awaitable[None]]


def _cpu_s(pid: int, part: slice = slice(11, 13)) -> float:
    """User + system CPU seconds of a process (Linux /proc); ``part``: user or system only."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(x) for x in fields[part]) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _gc_setting() -> None:
    """``ASYNCSTORE_S2_GC=freeze`` (an experiment, both servers alike): once the clients are
    connected, move every object alive to the permanent generation, so the cyclic
    collector's full passes no longer scan the connections, rings and runtime."""
    if os.environ.get("ASYNCSTORE_S2_GC") == "freeze":
        import gc

        gc.collect()
        gc.freeze()


def _bare_app() -> Any:
    """The ceiling: per-session sets of sinks, each event encoded once and sent to each."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.types import Receive, Scope, Send
    from starlette.websockets import WebSocket, WebSocketDisconnect

    sinks: dict[str, set[Sink]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def ws(websocket: WebSocket) -> None:
        sid = websocket.path_params["session_id"]
        await websocket.accept()
        await websocket.receive_text()  # {"type": "subscribe"}
        await websocket.send_text(orjson.dumps({"type": "ready", "session_id": sid}).decode())
        sink: Sink = websocket.send_text
        sinks.setdefault(sid, set()).add(sink)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            sinks[sid].discard(sink)

    class _SSE(Response):
        def __init__(self, sid: str) -> None:
            super().__init__(media_type="text/event-stream")
            self.sid = sid

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )

            async def sink(text: str) -> None:
                body = b"data: " + text.encode() + b"\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})

            await send(
                {
                    "type": "http.response.body",
                    "body": b"event: ready\ndata: {}\n\n",
                    "more_body": True,
                }
            )
            sinks.setdefault(self.sid, set()).add(sink)
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:
                sinks[self.sid].discard(sink)

    async def sse(request: Request) -> Response:
        return _SSE(request.path_params["session_id"])

    go = asyncio.Event()

    async def produce(sid: str, events: int, rate: float, offset: float) -> None:
        await go.wait()
        await asyncio.sleep(offset)
        start = time.monotonic()
        created = datetime.now(UTC).isoformat()
        for seq in range(1, events + 1):
            event = {
                "type": "event",
                "id": f"1:{seq}",
                "session_id": sid,
                "epoch": 1,
                "seq": seq,
                "kind": "delta",
                "payload": {"t": time.time()},
                "created_at": created,
            }
            text = orjson.dumps(event).decode()
            for sink in list(sinks.get(sid, ())):
                with suppress(Exception):
                    await sink(text)
            await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))

    async def start(request: Request) -> Response:
        body = await request.json()
        _gc_setting()
        go.clear()
        for i, sid in enumerate(body["sessions"]):
            offset = (i / len(body["sessions"])) / body["rate"]
            task = asyncio.ensure_future(produce(sid, body["events"], body["rate"], offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return JSONResponse({"started": len(body["sessions"])})

    async def start_go(request: Request) -> Response:
        go.set()
        return JSONResponse({})

    async def stats(request: Request) -> Response:
        return JSONResponse({"live_db_reads": 0, "db_reads": 0})

    return Starlette(
        routes=[
            WebSocketRoute("/s/{session_id}/ws", ws),
            Route("/s/{session_id}/events", sse),
            Route("/start", start, methods=["POST"]),
            Route("/go", start_go, methods=["POST"]),
            Route("/finish", stats, methods=["POST"]),
            Route("/stats", stats),
        ]
    )


def _library_app(url: str, ws_send: str = "fanout", sse_send: str = "fanout") -> tuple[Any, Any]:
    """The runtime's endpoints, producers as agent turns, and /flags to switch paths."""
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    from asyncstore.orchestrator.asgi import EndpointConfig, EventStreams
    from asyncstore.orchestrator.broadcast import Position, Subscription
    from asyncstore.orchestrator.config import load_settings
    from asyncstore.orchestrator.runtime import Runtime, open_runtime

    state: dict[str, Any] = {}

    def subscribe(session_id: str, after: Position | None) -> Subscription:
        rt: Runtime = state["rt"]
        return rt.subscribe(session_id, after)

    def allow(conn: HTTPConnection, session_id: str) -> bool:
        return True

    streams = EventStreams(
        subscribe,
        authorize=allow,
        config=EndpointConfig(start="live", ws_send=ws_send, sse_send=sse_send),  # type: ignore[arg-type]
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings = load_settings(
            storage={"url": url},
            migrate_on_start=True,
            runtime={"reload_on_sighup": False, "shutdown_grace_s": 1.0},
        )
        async with open_runtime(settings) as rt, anyio.create_task_group() as tg:
            state["rt"], state["tg"] = rt, tg
            yield
            tg.cancel_scope.cancel()

    async def turn(
        sid: str, events: int, rate: float, offset: float, ready: Callable[[], None]
    ) -> None:
        rt: Runtime = state["rt"]
        async with rt.turn(sid) as t:
            ready()
            await state["go"].wait()
            await anyio.sleep(offset)
            start = time.monotonic()
            for i in range(events):
                await t.emit("delta", {"t": time.time()})
                await anyio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
            # Closing the turn (final flush, lease release) waits for /finish: the measured
            # window is the streaming, as opening the turns and the connections is not.
            await state["finish"].wait()
        state["open"] -= 1
        if state["open"] == 0:
            state["closed"].set()

    async def start(request: Request) -> Response:
        """Open every producer's turn (lease, epoch); they stream on /go."""
        body = await request.json()
        _gc_setting()
        tg: anyio.abc.TaskGroup = state["tg"]
        state["go"] = anyio.Event()
        state["finish"] = anyio.Event()
        state["closed"] = anyio.Event()
        sessions = body["sessions"]
        state["open"] = len(sessions)
        all_in = anyio.Event()
        count = [0]

        def ready() -> None:
            count[0] += 1
            if count[0] == len(sessions):
                all_in.set()

        for i, sid in enumerate(sessions):
            offset = (i / len(sessions)) / body["rate"]
            tg.start_soon(turn, sid, body["events"], body["rate"], offset, ready)
        with anyio.fail_after(120):
            await all_in.wait()
        return JSONResponse({"started": len(sessions)})

    async def go(request: Request) -> Response:
        state["go"].set()
        return JSONResponse({})

    async def finish(request: Request) -> Response:
        """Close every turn of the run; answer once they are closed, or at ``limit_s`` with
        how many are still open (a saturated legacy path can take minutes to flush)."""
        limit = float((await request.json()).get("limit_s", CLOSE_LIMIT_S))
        state["finish"].set()
        started = time.monotonic()
        with anyio.move_on_after(limit):
            await state["closed"].wait()
        return JSONResponse(
            {
                "closed": state["closed"].is_set(),
                "close_s": time.monotonic() - started,
                "open": state["open"],
            }
        )

    async def flags(request: Request) -> Response:
        body = await request.json()
        rt: Runtime = state["rt"]
        rt.update_flags(**(_LEGACY_FLAGS if body["path"] == "legacy" else _OPTIMIZED_FLAGS))
        return JSONResponse({"path": body["path"]})

    async def stats(request: Request) -> Response:
        rt: Runtime = state["rt"]
        built = (rt._broadcast.optimized, rt._broadcast.legacy)  # a path not built read nothing
        hubs = [h.statistics() for h in built if h is not None]
        return JSONResponse(
            {
                "live_db_reads": sum(h.live_db_reads for h in hubs),
                "db_reads": sum(h.db_reads_total for h in hubs),
            }
        )

    app = Starlette(
        routes=[
            WebSocketRoute("/s/{session_id}/ws", streams.websocket),
            Route("/s/{session_id}/events", streams.sse),
            Route("/start", start, methods=["POST"]),
            Route("/go", go, methods=["POST"]),
            Route("/finish", finish, methods=["POST"]),
            Route("/flags", flags, methods=["POST"]),
            Route("/stats", stats),
        ],
        lifespan=lifespan,
    )
    return app, streams


def _serve(kind: str, url: str, ws_send: str = "fanout", sse_send: str = "fanout") -> None:
    import logging

    import uvicorn

    from asyncstore.orchestrator.asgi import StreamingServer

    logging.getLogger("asyncstore").setLevel(logging.ERROR)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    if kind == "bare":
        config = uvicorn.Config(_bare_app(), log_level="error", lifespan="off", backlog=4096)
        uvicorn.Server(config).run(sockets=[sock])
        return
    app, streams = _library_app(url, ws_send, sse_send)
    config = uvicorn.Config(app, log_level="error", lifespan="on", backlog=4096)
    server = StreamingServer(config, streams, grace_s=2.0)
    profile = os.environ.get("ASYNCSTORE_S2_PROFILE")
    if not profile:
        server.run(sockets=[sock])
        return
    import cProfile

    # CPU time, not wall time: on a loaded machine a wall-clock profile charges the time
    # the process waited for a core to whatever it was running.
    profiler = cProfile.Profile(time.process_time)
    profiler.runctx("server.run(sockets=[sock])", globals(), locals())
    profiler.dump_stats(profile)


# -- client processes --------------------------------------------------------------------------


class _Seen:
    """One subscriber's record: seqs in order, once each, and the latency of each delta."""

    __slots__ = ("count", "done", "last_at", "last_seq", "latencies", "violations")

    def __init__(self) -> None:
        self.done = False
        self.count = 0
        self.last_at = 0.0
        self.last_seq = 0
        self.violations = 0
        self.latencies: list[float] = []

    def event(self, event: dict[str, Any], now: float) -> None:
        seq = event["seq"]
        if seq != self.last_seq + 1:
            self.violations += 1
        self.last_seq = seq
        if event["kind"] == "delta":
            self.count += 1
            self.last_at = now
            self.latencies.append(now - event["payload"]["t"])


async def _ws_subscriber(
    base: str, sid: str, events: int, seen: _Seen, ready: Callable[[], None], close: asyncio.Event
) -> None:
    from websockets.asyncio.client import connect

    uri = base.replace("http://", "ws://") + f"/s/{sid}/ws"
    async with connect(uri, compression=None, max_queue=None, open_timeout=60) as ws:
        await ws.send('{"type": "subscribe", "after": null}')
        await ws.recv()  # ready
        ready()
        loads = orjson.loads
        while seen.count < events:
            message = await ws.recv()
            now = time.time()
            data = loads(message)
            if data["type"] == "event":
                seen.event(data, now)
        seen.done = True
        await close.wait()  # closing is not part of the measured run


async def _sse_subscriber(
    base: str, sid: str, events: int, seen: _Seen, ready: Callable[[], None], close: asyncio.Event
) -> None:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    writer.write(
        f"GET /s/{sid}/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    try:
        while seen.count < events:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the SSE stream ended early")
            if line.startswith(b"event: ready"):
                ready()
            elif line.startswith(b'data: {"'):
                now = time.time()
                data = orjson.loads(line[6:])
                if "seq" in data and "payload" in data:
                    seen.event(data, now)
        seen.done = True
        await close.wait()
    finally:
        writer.close()


async def _client(spec: dict[str, Any]) -> dict[str, Any]:
    """Open every connection of ``spec``, say ``ready``, receive, report as JSON."""
    # (base, session, sse, remote: served by another server than the producers')
    conns: list[tuple[str, str, bool, bool]] = spec["connections"]
    events: int = spec["events"]
    seen = [_Seen() for _ in conns]
    left = len(conns)
    all_ready = asyncio.Event()
    close = asyncio.Event()
    errors: list[str] = []

    def one_ready() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            all_ready.set()

    async def run(i: int) -> None:
        base, sid, sse, _ = conns[i]
        fn = _sse_subscriber if sse else _ws_subscriber
        try:
            await fn(base, sid, events, seen[i], one_ready, close)
        except Exception as exc:
            errors.append(repr(exc)[:200])

    tasks = []
    for i in range(len(conns)):
        tasks.append(asyncio.ensure_future(run(i)))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let handshakes progress rather than queue thousands
    try:
        await asyncio.wait_for(all_ready.wait(), spec["connect_timeout_s"])
    except TimeoutError:
        errors.append(f"{left} connection(s) not ready in time")
    print("ready", flush=True)
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    deadline = wall0 + spec["timeout_s"]
    while not all(s.done for s in seen) and time.monotonic() < deadline:
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)  # a progress poll of this process's own counters
    late = sum(not s.done for s in seen)
    if late:
        errors.append(f"{late} subscriber(s) did not receive everything in time")
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    latencies = [round(x * 1000, 3) for s in seen for x in s.latencies]
    result = {
        "received": sum(s.count for s in seen),
        "expected": events * len(conns),
        "violations": sum(s.violations for s in seen),
        "latencies_ms": latencies,
        "remote_latencies_ms": [
            round(x * 1000, 3)
            for s, c in zip(seen, conns, strict=True)
            if c[3]
            for x in s.latencies
        ],
        "last_at": max((s.last_at for s in seen), default=0.0),
        "cpu_s": cpu,
        "wall_s": wall,
        "errors": errors[:5],
        "error_count": len(errors),
    }
    # Report first: the driver reads the servers' CPU now, before the connections close.
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    close.set()
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result


def _client_main() -> int:
    spec = json.loads(sys.stdin.readline())
    asyncio.run(_client(spec))
    return 0


# -- the driver ------------------------------------------------------------------------------


@dataclass
class _Server:
    kind: str
    proc: subprocess.Popen[str]
    base: str


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.s2_sockets", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def _start_server(
    kind: str, url: str, ws_send: str = "fanout", sse_send: str = "fanout"
) -> _Server:
    proc = _spawn(["--serve", kind, "--url", url, "--ws-send", ws_send, "--sse-send", sse_send])
    assert proc.stdout is not None
    base = (await anyio.to_thread.run_sync(proc.stdout.readline)).strip()
    if not base:
        raise RuntimeError(f"the {kind} server did not start")
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        with anyio.fail_after(60):
            while True:
                with suppress(httpx.TransportError):
                    if (await http.get("/stats")).status_code == 200:
                        break
                await anyio.sleep(0.05)
    return _Server(kind, proc, base)


async def _stop(server: _Server) -> None:
    server.proc.terminate()
    try:
        await anyio.to_thread.run_sync(lambda: server.proc.wait(timeout=30))
    except subprocess.TimeoutExpired:
        server.proc.kill()


def _sample(pid: int, tag: str) -> subprocess.Popen[bytes] | None:
    """With ``ASYNCSTORE_S2_SAMPLE=DIR``: py-spy (if installed) samples the producing server
    over the measured window only, into ``DIR/TAG.txt`` (collapsed stacks)."""
    folder = os.environ.get("ASYNCSTORE_S2_SAMPLE")
    if not folder:
        return None
    out = Path(folder) / f"{tag}.txt"
    args = ["py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(out)]
    return subprocess.Popen([*args, "--nonblocking"], stdout=subprocess.DEVNULL)


@dataclass(frozen=True, slots=True)
class S2Case:
    """Sizes of one run: ``subscribers`` spread evenly over ``streams``."""

    streams: int
    subscribers: int
    events: int
    clients: int
    rate: float = RATE


async def _run_case(
    tag: str,
    producer: _Server,
    servers: Sequence[_Server],
    case: S2Case,
    fresh: set[int],
) -> dict[str, float]:
    """One run; ``fresh``: the server pids no run used yet (RSS per connection is measured
    on a fresh server only: a used one has grown its heap already)."""
    sessions = [f"{tag}-{i}" for i in range(case.streams)]
    conns = [
        (
            servers[j % len(servers)].base,
            sessions[j % case.streams],
            j % SSE_EVERY == SSE_EVERY - 1,
            servers[j % len(servers)] is not producer,
        )
        for j in range(case.subscribers)
    ]
    rss0 = {s.proc.pid: _rss(s.proc.pid) for s in servers}
    clients: list[subprocess.Popen[str]] = []
    try:
        return await _drive(tag, producer, servers, case, fresh, sessions, conns, rss0, clients)
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait)


async def _drive(
    tag: str,
    producer: _Server,
    servers: Sequence[_Server],
    case: S2Case,
    fresh: set[int],
    sessions: list[str],
    conns: list[tuple[str, str, bool, bool]],
    rss0: dict[int, int],
    clients: list[subprocess.Popen[str]],
) -> dict[str, float]:
    """The body of one run (``_run_case``); ``clients`` collects the client processes."""
    timeout = 15 + 3 * case.events / case.rate
    for k in range(case.clients):
        mine = conns[k :: case.clients]
        proc = _spawn(["--client"])
        assert proc.stdin is not None
        proc.stdin.write(
            json.dumps(
                {
                    "connections": mine,
                    "events": case.events,
                    "timeout_s": timeout,
                    "connect_timeout_s": 120,
                }
            )
            + "\n"
        )
        proc.stdin.flush()
        clients.append(proc)
    for proc in clients:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"S2 client failed to start: {line!r}")
    rss_per_conn = sum(_rss(pid) - before for pid, before in rss0.items()) / case.subscribers
    pids = {s.proc.pid for s in (producer, *servers)}
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"sessions": sessions, "events": case.events, "rate": case.rate}
        # Opening hundreds of turns on a saturated server (legacy polling) takes a while.
        start = await http.post(producer.base + "/start", json=body, timeout=300)
        start.raise_for_status()
        before = [(await http.get(s.base + "/stats")).json() for s in servers]
        cpu0 = {pid: _cpu_s(pid) for pid in pids}
        sys0 = {pid: _cpu_s(pid, slice(12, 13)) for pid in pids}
        spy = _sample(producer.proc.pid, tag)
        started = time.time()
        (await http.post(producer.base + "/go")).raise_for_status()
        results = []
        for proc in clients:
            assert proc.stdout is not None
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            results.append(json.loads(line))
        cpu = sum(_cpu_s(pid) - cpu0[pid] for pid in pids)
        kernel = sum(_cpu_s(pid, slice(12, 13)) - sys0[pid] for pid in pids)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await anyio.to_thread.run_sync(spy.wait)
        after = [(await http.get(s.base + "/stats")).json() for s in servers]
        finish = await http.post(
            producer.base + "/finish", json={"limit_s": CLOSE_LIMIT_S}, timeout=CLOSE_LIMIT_S + 30
        )
        finish.raise_for_status()
        closed = finish.json()
        for proc in clients:
            await anyio.to_thread.run_sync(proc.wait)
        # Until the last delivery, as the clients' clock says (one clock on this machine).
        elapsed = max(max(r["last_at"] for r in results) - started, 1e-3)
    received = sum(r["received"] for r in results)
    expected = sum(r["expected"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    remote = sorted(x for r in results for x in r["remote_latencies_ms"])
    errors = [e for r in results for e in r["errors"]]
    if errors:
        print(f"S2 {tag}: client errors: {errors[:3]}", file=sys.stderr)
    figures = {
        "deliveries_per_s": received / elapsed,
        "offered_per_s": case.subscribers * case.rate,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "server_us_per_delivery": cpu / max(1, received) * 1e6,
        "server_cpu_pct": 100 * cpu / elapsed,
        "server_kernel_share": kernel / cpu if cpu else 0.0,  # of its CPU: in the kernel
        "client_cpu_pct_max": max(100 * r["cpu_s"] / max(1e-9, r["wall_s"]) for r in results),
        "live_reads": float(
            sum(a["live_db_reads"] - b["live_db_reads"] for a, b in zip(after, before, strict=True))
        ),
        "db_reads_per_s": sum(
            a["db_reads"] - b["db_reads"] for a, b in zip(after, before, strict=True)
        )
        / elapsed,
        "undelivered": float(expected - received),  # not received within the time limit
        "misordered": float(sum(r["violations"] for r in results)),  # gaps, duplicates, order
        "client_errors": float(sum(r["error_count"] for r in results)),
        # Closing the producers' turns after the window (final flush, lease release); a
        # close still running at CLOSE_LIMIT_S is counted, and its server restarted.
        "close_s": float(closed.get("close_s", 0.0)),
        "close_timed_out": 0.0 if closed.get("closed", True) else 1.0,
    }
    if remote:
        figures["remote_p50_ms"] = percentile(remote, 0.50)
        figures["remote_p99_ms"] = percentile(remote, 0.99)
    if all(s.proc.pid in fresh for s in servers):
        figures["rss_per_conn_kib"] = rss_per_conn / 1024
        # Server RSS growth per 1,000 subscribers connected, subscribed and idle (the clients
        # are all ready, no producer has started), on a fresh server.
        figures["rss_per_1000_idle_mib"] = rss_per_conn * 1000 / 2**20
    fresh.difference_update(s.proc.pid for s in servers)
    return figures


async def run_cases(
    url: str,
    case: S2Case,
    cases: Sequence[str],
    repeats: int,
    tick: Callable[[str], None] = lambda label: None,
    errors: list[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Every case ``repeats`` times, interleaved; figures per case (lists, one per run).

    A run that fails (a server that stops answering, a client that cannot start) does not
    stop the others: it counts in the case's ``failed_runs``, its message goes to
    ``errors``, and the servers it used are restarted, as are those of a run whose
    producers' turns did not close within ``CLOSE_LIMIT_S``."""
    if url.startswith("sqlite") and "cross" in cases:
        cases = [c for c in cases if c != "cross"]
    out: dict[str, dict[str, list[float]]] = {c: {} for c in cases}
    # Each server's role and how to start it: (kind, ws_send, sse_send).
    specs: dict[str, tuple[str, str, str]] = {}
    if "bare" in cases:
        specs["bare"] = ("bare", "fanout", "fanout")
    if {"library", "legacy", "cross"} & set(cases):
        specs["lib"] = ("library", "fanout", "fanout")
    if "cross" in cases:
        specs["lib2"] = ("library", "fanout", "fanout")
    # The WebSocket endpoint's earlier send paths (EndpointConfig.ws_send), each on a server
    # of its own: batched (a task wake-up per subscriber per event) and per_frame; SSE's legacy
    # path (EndpointConfig.sse_send="per_connection"): a task per connection woken per event.
    for name in SEND_CASES:
        if name in cases:
            specs[name] = ("library", name, "fanout")
    if SSE_LEGACY in cases:
        specs[SSE_LEGACY] = ("library", "fanout", "per_connection")
    pool: dict[str, _Server] = {}
    fresh: set[int] = set()

    async def start(role: str) -> None:
        kind, ws_send, sse_send = specs[role]
        pool[role] = await _start_server(kind, url, ws_send, sse_send)
        fresh.add(pool[role].proc.pid)

    def roles_of(name: str) -> list[str]:
        if name in ("bare", *SEND_CASES, SSE_LEGACY):
            return [name]
        return ["lib", "lib2"] if name == "cross" else ["lib"]

    try:
        for role in specs:
            await start(role)
        async with httpx.AsyncClient(timeout=30) as http:
            for rep in range(repeats):
                order = list(cases) if rep % 2 == 0 else list(reversed(cases))
                for name in order:
                    tag = f"s2{name[:3]}{rep}{os.getpid()}{time.monotonic_ns() % 100000}"
                    roles = roles_of(name)
                    servers = [pool[r] for r in roles]
                    restart = False
                    try:
                        if name in ("library", "legacy", "cross"):
                            path = "legacy" if name == "legacy" else "optimized"
                            flagged = await http.post(
                                pool["lib"].base + "/flags", json={"path": path}
                            )
                            flagged.raise_for_status()
                        figures = await _run_case(tag, servers[0], servers, case, fresh)
                        restart = figures["close_timed_out"] > 0
                    except Exception as exc:  # one failed run: count it, go on
                        figures = {"failed_runs": 1.0}
                        message = f"S2 {name} run {rep + 1}: {type(exc).__name__}: {exc}"[:300]
                        print(message, file=sys.stderr)
                        if errors is not None:
                            errors.append(message)
                        restart = True
                    for key, value in figures.items():
                        out[name].setdefault(key, []).append(value)
                    if restart:
                        for role in roles:
                            await _stop(pool.pop(role))
                            await start(role)
                    tick(name)
    finally:
        for server in pool.values():
            await _stop(server)
    return out


HELD_P99_MS = 1000.0  # a size is held when everything arrives in time, p99 within this
HELD_FRACTIONS = (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1)  # of the case's size, largest first


def held(figures: dict[str, list[float]]) -> bool:
    """Whether one run held its size: every delivery in time, no client error, p99 bound."""
    return (
        not figures.get("failed_runs")
        and bool(figures.get("p99_ms"))
        and max(figures["undelivered"]) == 0
        and max(figures["client_errors"]) == 0
        and max(figures["p99_ms"]) <= HELD_P99_MS
    )


async def find_held(
    url: str,
    case: S2Case,
    cases: Sequence[str],
    tick: Callable[[str], None] = lambda label: None,
    errors: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """The largest size each case holds (``held``), searched by bisection over
    ``HELD_FRACTIONS`` of ``case`` (subscribers per stream kept), one run per probe; a case
    that holds none of them is absent. Assumes a size held implies every smaller one is."""
    found: dict[str, dict[str, float]] = {}
    for name in cases:
        lo, hi = 0, len(HELD_FRACTIONS)  # the answer's index is in [lo, hi); hi: none held
        best: dict[str, float] | None = None
        while lo < hi:
            mid = (lo + hi) // 2
            subscribers = max(2, round(case.subscribers * HELD_FRACTIONS[mid]))
            streams = max(1, round(case.streams * HELD_FRACTIONS[mid]))
            probe = S2Case(streams, subscribers, case.events, case.clients, case.rate)
            figures = (await run_cases(url, probe, [name], 1, tick, errors))[name]
            if held(figures):
                best = {
                    "subscribers": float(subscribers),
                    "streams": float(streams),
                    "offered_per_s": subscribers * case.rate,
                    "deliveries_per_s": figures["deliveries_per_s"][0],
                    "p99_ms": figures["p99_ms"][0],
                }
                hi = mid  # held: look at larger sizes (smaller indexes)
            else:
                lo = mid + 1
        if best is not None:
            found[name] = best
    return found


def notes(case: S2Case, url: str, repeats: int) -> list[str]:
    """What the S2 table's figures are, for the suite's notes."""
    out = [
        f"over sockets: {case.subscribers} subscribers ({case.subscribers // SSE_EVERY} SSE, "
        f"the rest WebSocket) on {case.streams} streams at {case.rate:g} tokens/s, "
        f"{case.events} tokens each: {case.subscribers * case.rate:,.0f} deliveries/s offered; "
        f"{case.clients} client processes; uvicorn, one server process; "
        f"{repeats} run(s) per case, interleaved",
        "bare = Starlette broadcast server (in-memory fan-out, no storage, no library); "
        "server CPU includes the producers (turns and persistence for the library)",
    ]
    if url.startswith("sqlite"):
        out.append("two-server row: Postgres only (skipped on SQLite)")
    else:
        out.append("two servers on one Postgres: producers on one, subscribers on both")
    return out


def extra_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The S2 rows beyond optimized vs legacy: the bare ceiling and the cross-instance run,
    as (figure, optimized, reference, ratio, target, verdict)."""
    from benchmarks._common import median

    rows: list[tuple[str, str, str, str, str, str]] = []
    lib = res["figures"]["optimized"]
    bare = res.get("ceiling") or {}
    if bare.get("deliveries_per_s") and lib.get("deliveries_per_s"):
        lib_us = median(lib["server_us_per_delivery"])
        bare_us = median(bare["server_us_per_delivery"])
        for key, label, unit in (
            ("deliveries_per_s", "deliveries/s vs bare server", "/s"),
            ("p99_ms", "p99 latency vs bare server", "ms"),
            ("server_us_per_delivery", "server CPU/delivery vs bare", "us"),
        ):
            o, b = median(lib[key]), median(bare[key])
            ratio = f"{o / b:.2f}x" if b else "-"
            target = verdict = ""
            if key == "server_us_per_delivery":
                target = "capacity >= 70% of bare"
                capacity = bare_us / lib_us if lib_us else 0.0
                ratio = f"{capacity:.2f} cap."
                verdict = "met" if capacity >= 0.7 else "NOT met"
            rows.append(
                (label, f"{o:,.1f} {unit}", f"bare {b:,.1f} {unit}", ratio, target, verdict)
            )
        cpu = max(bare["client_cpu_pct_max"])
        rows.append(
            (
                "busiest client process CPU (bare)",
                f"{cpu:.0f}%",
                "",
                "",
                "< 90%",
                "met" if cpu < 90 else "NOT met",
            )
        )
    if "held" in res:
        sizes = res["held"]
        rows.append(
            (
                f"largest size held (all in time, p99 <= {HELD_P99_MS:,.0f} ms)",
                held_text(sizes.get("library")),
                "bare " + held_text(sizes.get("bare")),
                "",
                "seed: 3,000 on 500",
                "",
            )
        )
    cross = res.get("cross") or {}
    if cross.get("deliveries_per_s"):
        for key, label, unit in (
            ("deliveries_per_s", "2 servers: deliveries/s", "/s"),
            ("p99_ms", "2 servers: p99 latency", "ms"),
            ("live_reads", "2 servers: live reads", ""),
            ("remote_p50_ms", "2 servers: p50, subscribers on the other", "ms"),
            ("remote_p99_ms", "2 servers: p99, subscribers on the other", "ms"),
            ("undelivered", "2 servers: not delivered in time", ""),
            ("misordered", "2 servers: gaps/duplicates/out of order", ""),
        ):
            counts = key in ("undelivered", "misordered")
            v = max(cross[key]) if counts else median(cross[key])  # counts: the worst run
            target = verdict = ""
            if key in ("live_reads", "undelivered", "misordered"):
                target, verdict = "0", "met" if max(cross[key]) == 0 else "NOT met"
            rows.append((label, f"{v:,.1f} {unit}".strip(), "", "", target, verdict))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="storage URL (default: SQLite in a temp dir)")
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--subscribers", type=int, default=240)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--held",
        action="store_true",
        help="find the largest size (a fraction of the given one) each case holds",
    )
    parser.add_argument("--serve", choices=("bare", "library"), help=argparse.SUPPRESS)
    parser.add_argument("--ws-send", default="fanout", help=argparse.SUPPRESS)
    parser.add_argument("--sse-send", default="fanout", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return _client_main()
    if args.serve:
        _serve(args.serve, args.url or "", args.ws_send, args.sse_send)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 's2.db'}"
        case = S2Case(args.streams, args.subscribers, args.events, args.clients, args.rate)
        if args.held:
            found = anyio.run(find_held, url, case, args.cases.split(","), lambda n: None)
            print(json.dumps(found))
            for name in args.cases.split(","):
                print(f"{name}: " + held_text(found.get(name)))
            return 0
        out = anyio.run(
            run_cases, url, case, args.cases.split(","), args.repeats, lambda n: print(n, "done")
        )
    for name, figures in out.items():
        print(name, json.dumps({k: [round(x, 2) for x in v] for k, v in figures.items()}))
    print(summary(out))
    return 0


def held_text(size: dict[str, float] | None) -> str:
    """One case's ``find_held`` answer in words."""
    if size is None:
        return f"none of the sizes searched (down to {HELD_FRACTIONS[-1]:.0%})"
    return (
        f"{size['subscribers']:,.0f} subscribers on {size['streams']:,.0f} streams "
        f"({size['offered_per_s']:,.0f}/s offered, p99 {size['p99_ms']:,.0f} ms)"
    )


def summary(out: dict[str, dict[str, list[float]]]) -> str:
    """Medians per case: CPU per delivery, capacity vs bare, p99, RSS per 1,000 idle."""
    from benchmarks._common import median

    bare = out.get("bare", {}).get("server_us_per_delivery")
    lines = []
    for name, figures in out.items():
        if not figures.get("server_us_per_delivery"):
            continue
        us = median(figures["server_us_per_delivery"])
        capacity = f"{median(bare) / us:.2f}" if bare and us else "-"
        rss = figures.get("rss_per_1000_idle_mib")
        lines.append(
            f"{name}: {median(figures['deliveries_per_s']):,.0f} deliveries/s, "
            f"{us:.1f} us server CPU/delivery (capacity vs bare {capacity}), "
            f"p99 {median(figures['p99_ms']):.1f} ms, "
            f"RSS per 1,000 idle subscribers {f'{rss[0]:.1f} MiB' if rss else '-'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
