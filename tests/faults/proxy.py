"""A small TCP proxy on 127.0.0.1 between the library and Postgres, for injecting faults.

``open_proxy(upstream_port)`` listens on a free local port and forwards every connection to
the upstream port. While it runs, a test can add ``latency_s`` to every forwarded chunk,
``stall()`` (stop forwarding in both directions while every socket stays open, as a network
that black-holes packets), ``cut()`` (close every connection at once, with a reset),
``refuse_new`` connections (closed on accept, as a server that is down) and ``resume()``.
It runs in the test process; a subprocess reaches it through ``port``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketStream

CHUNK = 65536


class _Link:
    """One proxied connection: the client's socket, the upstream's, and their pumps."""

    def __init__(self, client: SocketStream) -> None:
        self.client = client
        self.upstream: SocketStream | None = None
        self.scope = anyio.CancelScope()


class Proxy:
    """Controls of a running proxy (see the module docstring)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.latency_s = 0.0
        self.refuse_new = False
        self.connections = 0  # accepted and forwarded, in all
        self.cuts = 0
        self.refused = 0  # connections closed on accept while refusing
        self._refusal = anyio.Event()
        self._flowing = anyio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def open_links(self) -> int:
        return len(self._links)

    def stall(self) -> None:
        """Stop forwarding bytes; connections stay open, so peers see silence, not an error."""
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def resume(self) -> None:
        """Forward again (what was held is delivered) and accept new connections."""
        self.refuse_new = False
        self._flowing.set()

    def cut(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        links = list(self._links)
        for link in links:
            for stream in (link.client, link.upstream):
                if stream is not None:
                    _reset_on_close(stream)
            link.scope.cancel()
        self.cuts += len(links)
        return len(links)

    async def wait_refused(self, count: int) -> None:
        """Wait until ``count`` connection attempts in all were refused."""
        while self.refused < count:
            await self._refusal.wait()

    async def _serve(self, client: SocketStream) -> None:
        if self.refuse_new:
            self.refused += 1
            self._refusal.set()
            self._refusal = anyio.Event()
            _reset_on_close(client)
            await client.aclose()
            return
        link = _Link(client)
        self._links.add(link)
        try:
            with link.scope:
                # A connection opened while stalled stays silent too, like the others.
                await self._flowing.wait()
                link.upstream = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
                self.connections += 1
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, client, link.upstream, tg.cancel_scope)
                    tg.start_soon(self._pump, link.upstream, client, tg.cancel_scope)
        except OSError:
            pass  # upstream refused or the link broke: the client sees the close below
        finally:
            self._links.discard(link)
            with anyio.CancelScope(shield=True):  # shielded: the sockets must be closed
                for stream in (client, link.upstream):
                    if stream is not None:
                        await stream.aclose()

    async def _pump(
        self, source: SocketStream, sink: SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            while True:
                try:
                    data = await source.receive(CHUNK)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
                if self.latency_s > 0:
                    await anyio.sleep(self.latency_s)
                await self._flowing.wait()
                try:
                    await sink.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
        finally:
            scope.cancel()  # one direction ended: close the link (Postgres has no half-close)


def _reset_on_close(stream: SocketStream) -> None:
    """Make the next close send RST instead of FIN, as a dropped network path would."""
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, anyio.TypedAttributeLookupError):
        pass


@asynccontextmanager
async def open_proxy(upstream_port: int) -> AsyncIterator[Proxy]:
    """Run a proxy to ``127.0.0.1:upstream_port`` for the block; every link is closed after."""
    proxy = Proxy(upstream_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = int(listener.extra(SocketAttribute.local_port))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, proxy._serve)
            try:
                yield proxy
            finally:
                proxy.resume()
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()
