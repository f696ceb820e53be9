"""The legacy (poll) delivery path over real sockets: a live subscriber's start.

uvicorn serves ``EventStreams`` on 127.0.0.1 in the test's loop, on a real SQLite file; the
client is the ``websockets`` package over TCP. With ``stream_delivery = "poll"`` a live
subscription (``after: null``) starts after the stored head it reads from the database.
Under load that read waits for a reader connection (S2's legacy case: thousands of
subscribers polling a few readers); the ``ready`` a client gets must not come before it,
or the events stored between the ``ready`` and the read are skipped without a word (S2
counted them as gaps: issue 16).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from asyncstore.orchestrator.asgi import EndpointConfig
from asyncstore.storage import AsyncStorageBackend, NewStreamEvent, open_storage
from tests.integration.test_asgi import serve
from tests.waiting import wait_for

BOUND_S = 60.0  # a generous correctness bound for a loaded 2-core machine


class _Client:
    """Every message one WebSocket client received, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        # How many events were stored when the client read its ``ready`` (None: not yet).
        self.stored_at_ready: int | None = None
        self.stored = 0

    async def read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                data = orjson.loads(message)
                if data["type"] == "ready":
                    self.stored_at_ready = self.stored
                self.messages.append(data)

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages if m["type"] != "heartbeat"]

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages if m["type"] == "event"]


def _head_reads(storage: AsyncStorageBackend) -> int:
    return storage.statistics().statements.get("last_stream_seq", 0)


async def _store(storage: AsyncStorageBackend, client: _Client, sid: str, seqs: range) -> None:
    """Store events as a writer of epoch 1 would (the poll path reads only the database)."""
    await storage.append_stream_events(
        [NewStreamEvent(sid, 1, seq, "delta", {"i": seq}) for seq in seqs]
    )
    client.stored = seqs[-1]


async def test_a_live_poll_subscriber_gets_every_event_stored_after_its_ready(
    tmp_path: Path,
) -> None:
    """The only reader connection is busy (as under S2's load) while a client subscribes
    live; events are stored, the reader is freed, more events are stored. Every event
    stored after the client read ``ready`` reaches it, once each and in order: ``ready``
    comes only once the start is fixed, not before the head read that fixes it."""
    url = f"sqlite:///{tmp_path / 'poll.db'}"
    sid = "s-live"
    config = EndpointConfig(start="live")
    async with open_storage(url, migrate=True):
        pass
    async with (
        serve(url, config=config, storage={"sqlite_readers": 1}) as srv,
        anyio.create_task_group() as tg,
    ):
        srv.rt.update_flags(stream_delivery="poll")
        storage = srv.rt.storage
        holder = storage._reader()  # type: ignore[attr-defined]
        await holder.__aenter__()  # the only reader is in use: reads wait in line
        held = True
        port = srv.client.base_url.port
        ws = await connect(
            f"ws://127.0.0.1:{port}/s/{sid}/ws", compression=None, open_timeout=BOUND_S
        )
        try:
            client = _Client(ws)
            tg.start_soon(client.read)
            reads = _head_reads(storage)
            await ws.send(orjson.dumps({"type": "subscribe", "after": None}).decode())
            # The subscription asked for the stored head; the read waits for the reader.
            await wait_for(lambda: _head_reads(storage) > reads, BOUND_S, what="head read")
            # A round trip on the same connection: whatever the server sent before its
            # pong (a ``ready`` sent ahead of the head read) has reached the client.
            await ws.send(orjson.dumps({"type": "ping", "id": 1}).decode())
            await wait_for(lambda: "pong" in client.types(), BOUND_S, what="pong")
            await _store(storage, client, sid, range(1, 4))
            held = False
            await holder.__aexit__(None, None, None)
            await wait_for(lambda: "ready" in client.types(), BOUND_S, what="ready")
            await _store(storage, client, sid, range(4, 7))
            await wait_for(lambda: 6 in client.seqs(), BOUND_S, what="seq 6")
            assert client.stored_at_ready is not None
            # Exactly the events stored after the ready, once each, in order.
            assert client.seqs() == list(range(client.stored_at_ready + 1, 7))
            assert client.types().index("pong") < client.types().index("ready")
        finally:
            if held:
                await holder.__aexit__(None, None, None)
            ws.transport.abort()  # no closing handshake for uvicorn to wait out
        tg.cancel_scope.cancel()
