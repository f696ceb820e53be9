"""The SSE fan-out (``EndpointConfig.sse_send="fanout"``) over real sockets.

uvicorn serves ``EventStreams`` on 127.0.0.1 in the test's loop; clients are httpx streams
(and a raw socket that never reads). A publisher writes each event straight to every idle
SSE stream, coalescing what is ready into one body write; these tests hold it to what the
per-connection path promises: every subscriber sees every seq once and in order under
concurrent producers, a reader that stops is cut by the lag policy (with a counter) and
holds up nobody, a reconnect with ``Last-Event-ID`` resumes exactly, and shutdown drains
with a final ``shutdown`` event. The legacy path (``per_connection``) runs the same
exactness test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from asyncstore.orchestrator.asgi import EndpointConfig
from tests.integration.test_asgi import Frame, Served, frames, serve, wait_until
from tests.integration.test_asgi_fanout import _paced_emit, _produce

BOUND_S = 60.0  # a generous correctness bound for a loaded 2-core machine


@dataclass
class Reader:
    """One SSE subscriber over httpx: its frames, and a condition to wait on."""

    events: list[Frame] = field(default_factory=list)
    other: list[Frame] = field(default_factory=list)
    ready: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, client: httpx.AsyncClient, sid: str, last_id: str | None = None) -> None:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with client.stream("GET", f"/s/{sid}/events", headers=headers) as response:
                async for frame in frames(response):
                    if frame.event == "ready":
                        self.ready.set()
                    elif frame.event is None and frame.data:
                        self.events.append(frame)
                    elif frame.data:
                        self.other.append(frame)
                    self.changed.set()
                    self.changed = anyio.Event()
        finally:
            self.ended.set()

    async def wait_for(self, n: int) -> None:
        with anyio.fail_after(BOUND_S):
            while len(self.events) < n:
                await self.changed.wait()

    def seqs(self) -> list[int]:
        return [f.json()["seq"] for f in self.events]

    def payloads(self) -> list[Any]:
        return [f.json()["payload"] for f in self.events]


@contextlib.asynccontextmanager
async def readers(
    srv: Served, tg: anyio.abc.TaskGroup, sids: list[str], per_session: int
) -> AsyncIterator[dict[str, list[Reader]]]:
    """``per_session`` connected readers (``ready`` received) on each session."""
    limits = httpx.Limits(max_connections=len(sids) * per_session + 4)
    base = str(srv.client.base_url)
    async with httpx.AsyncClient(base_url=base, timeout=BOUND_S, limits=limits) as client:
        out: dict[str, list[Reader]] = {sid: [] for sid in sids}
        for sid in sids:
            for _ in range(per_session):
                reader = Reader()
                tg.start_soon(reader.run, client, sid)
                with anyio.fail_after(BOUND_S):
                    await reader.ready.wait()
                out[sid].append(reader)
        yield out


@contextlib.asynccontextmanager
async def stalled_reader(srv: Served, sid: str) -> AsyncIterator[socket.socket]:
    """An SSE request on a socket with a tiny receive buffer that is never read."""
    port = srv.client.base_url.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET /s/{sid}/events HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("send", ["fanout", "per_connection"])
async def test_every_sse_subscriber_sees_every_seq_once_in_order_under_concurrent_producers(
    storage_url: str, send: str
) -> None:
    config = EndpointConfig(start="live", sse_send=send)  # type: ignore[arg-type]
    sessions, per_session, n = ["a", "b", "c"], 3, 120
    async with (
        serve(storage_url, config=config) as srv,
        anyio.create_task_group() as tg,
        readers(srv, tg, sessions, per_session) as clients,
    ):
        epochs: dict[str, int] = {}

        async def produce(sid: str) -> None:
            epochs[sid] = await _produce(srv.rt, sid, n, writers=3)

        async with anyio.create_task_group() as producers:
            for sid in sessions:
                producers.start_soon(produce, sid)
        for sid in sessions:
            for reader in clients[sid]:
                await reader.wait_for(n)
                assert reader.seqs() == list(range(1, n + 1))  # once each, in order
                assert [f.id for f in reader.events] == [
                    f"{epochs[sid]}:{seq}" for seq in range(1, n + 1)
                ]
                assert sorted(p["i"] for p in reader.payloads()) == list(range(n))
                assert {f.json()["session_id"] for f in reader.events} == {sid}
        stats = srv.streams.statistics()
        assert stats.events_sent == len(sessions) * per_session * n
        if send == "fanout":
            assert stats.events_pushed > 0  # publishers wrote to the streams themselves
        else:
            assert stats.events_pushed == 0
        tg.cancel_scope.cancel()


async def test_a_stalled_sse_reader_holds_up_nobody_and_is_cut_by_the_lag_policy(
    storage_url: str,
) -> None:
    # The send timeout is far beyond the test's bound: only the lag policy can end the
    # stalled stream in time, from a publish, while its task is blocked in a send.
    config = EndpointConfig(start="live", send_timeout_s=3600)
    broadcast = {"slow_subscriber": "disconnect", "ring_max_events": 32}
    n, size = 250, 40_000  # 10 MB: more than the stalled socket's buffers hold
    async with (
        serve(storage_url, config=config, broadcast=broadcast) as srv,
        anyio.create_task_group() as tg,
        readers(srv, tg, ["s"], 3) as clients,
        stalled_reader(srv, "s"),
    ):
        await wait_until(lambda: srv.subscribers() == 4, timeout_s=BOUND_S)
        fast = clients["s"]
        await _paced_emit(srv, "s", [r.wait_for for r in fast], n, size)
        for reader in fast:
            assert reader.seqs() == list(range(1, n + 1))
        await wait_until(lambda: srv.streams.statistics().ended_lagged == 1, timeout_s=BOUND_S)
        stats = srv.streams.statistics()
        assert stats.open_sse == 3  # the fast ones
        assert stats.ended_stalled == 0
        assert srv.rt.statistics().broadcast["optimized"].lagged_disconnects == 1
        assert srv.subscribers() == 3
        tg.cancel_scope.cancel()


async def test_an_sse_reader_that_reconnects_with_last_event_id_resumes_exactly(
    storage_url: str,
) -> None:
    config = EndpointConfig(start="live")
    async with (
        serve(storage_url, config=config) as srv,
        anyio.create_task_group() as tg,
        readers(srv, tg, ["s"], 2) as clients,
    ):
        steady, leaving = clients["s"]
        async with srv.rt.turn("s") as turn:
            for i in range(30):
                await turn.emit("delta", {"i": i})
            await leaving.wait_for(30)
            assert srv.streams.drop("s") == 2  # both cut, as a network drop would
            with anyio.fail_after(BOUND_S):
                await leaving.ended.wait()
                await steady.ended.wait()
            # Events go on while nobody listens; the reader comes back from its last id.
            for i in range(30, 60):
                await turn.emit("delta", {"i": i})
            back = Reader()
            base = str(srv.client.base_url)
            async with httpx.AsyncClient(base_url=base, timeout=BOUND_S) as client:
                tg.start_soon(back.run, client, "s", leaving.events[-1].id)
                with anyio.fail_after(BOUND_S):
                    await back.ready.wait()
                for i in range(60, 80):
                    await turn.emit("delta", {"i": i})
                await back.wait_for(50)
                assert back.seqs() == list(range(31, 81))  # nothing missed, nothing twice
                assert [p["i"] for p in back.payloads()] == list(range(30, 80))
                assert leaving.seqs() == list(range(1, 31))
                stats = srv.streams.statistics()
                assert (stats.resumed, stats.ended_dropped) == (1, 2)
                assert stats.events_pushed > 0
                tg.cancel_scope.cancel()


async def test_shutdown_drains_parked_sse_streams_with_a_final_event(storage_url: str) -> None:
    config = EndpointConfig(start="live")
    async with (
        serve(storage_url, config=config) as srv,
        anyio.create_task_group() as tg,
        readers(srv, tg, ["a", "b"], 3) as clients,
    ):
        for sid in ("a", "b"):
            await _produce(srv.rt, sid, 30)
        everyone = [r for sid in ("a", "b") for r in clients[sid]]
        for reader in everyone:
            await reader.wait_for(30)
        assert srv.streams.statistics().events_pushed > 0  # parked, at the head
        assert srv.streams.close() == 6
        assert await srv.streams.wait_closed(BOUND_S) == 0  # none had to be cut
        for reader in everyone:
            with anyio.fail_after(BOUND_S):
                await reader.ended.wait()  # the body ended: the server closed it
            assert reader.seqs() == list(range(1, 31))
            assert [f.event for f in reader.other] == ["shutdown"]
        stats = srv.streams.statistics()
        assert (stats.open_sse, stats.ended_shutdown, stats.shutdown_forced) == (0, 6, 0)
        assert srv.subscribers() == 0
        tg.cancel_scope.cancel()
