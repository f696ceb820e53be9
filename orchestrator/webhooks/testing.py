"""A real local HTTP receiver for testing webhooks (tests, benchmarks, your own checks).

``open_test_receiver()`` listens on 127.0.0.1 (a free port), speaks just enough HTTP/1.1
(Content-Length bodies, keep-alive), records every request and answers through a
scriptable handler: status, body, headers (e.g. Retry-After) and a delay. It runs in the
caller's event loop, in a task group owned by the ``async with``; anyio only.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["Answer", "ReceivedRequest", "TestReceiver", "open_test_receiver"]

_REASONS = {200: "OK", 204: "No Content", 410: "Gone", 429: "Too Many Requests"}


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic() when the request was complete

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the receiver sends back (after ``delay_s``)."""

    status: int = 200
    body: bytes | str | Mapping[str, Any] = b'{"result": "ok"}'
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Handler = Callable[[ReceivedRequest], Answer | Awaitable[Answer]]


class TestReceiver:
    """The running receiver: ``url``, the recorded ``requests`` and its ``handler``."""

    __test__ = False  # not a pytest test class

    def __init__(self, handler: Handler | None) -> None:
        self.handler: Handler = handler or (lambda request: Answer())
        self.requests: list[ReceivedRequest] = []
        self.url = ""
        self._arrived = anyio.Event()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedRequest]:
        """Wait until ``count`` requests arrived; ``TimeoutError`` after ``timeout_s``."""
        await self.wait_until(lambda requests: len(requests) >= count, timeout_s)
        return list(self.requests)

    async def wait_until(
        self, predicate: Callable[[list[ReceivedRequest]], bool], timeout_s: float = 10.0
    ) -> None:
        """Wait until ``predicate(requests)`` holds, re-checked on every arrival."""
        with anyio.fail_after(timeout_s):
            while not predicate(self.requests):
                if self._arrived.is_set():
                    self._arrived = anyio.Event()
                await self._arrived.wait()

    def events(self) -> list[Any]:
        """Every batched event received so far (``{"events": [...]}`` bodies), in order."""
        return [e for r in self.requests for e in r.json().get("events", ())]

    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            try:
                while True:
                    head = await reader.receive_until(b"\r\n\r\n", 65_536)
                    lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = lines[0].split(" ", 2)
                    headers: dict[str, str] = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    length = int(headers.get("content-length", "0"))
                    body = await reader.receive_exactly(length) if length else b""
                    request = ReceivedRequest(method, path, headers, body, time.monotonic())
                    self.requests.append(request)
                    self._arrived.set()
                    answer = self.handler(request)
                    if inspect.isawaitable(answer):
                        answer = await answer
                    if answer.delay_s:
                        await anyio.sleep(answer.delay_s)
                    await stream.send(_encode(answer))
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.DelimiterNotFound,
                ValueError,
            ):
                return


def _encode(answer: Answer) -> bytes:
    body = answer.body
    if isinstance(body, Mapping):
        data = orjson.dumps(dict(body))
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    reason = _REASONS.get(answer.status, "Status")
    lines = [f"HTTP/1.1 {answer.status} {reason}", f"content-length: {len(data)}"]
    lines.append("content-type: application/json")
    lines.extend(f"{k}: {v}" for k, v in answer.headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


@asynccontextmanager
async def open_test_receiver(handler: Handler | None = None) -> AsyncIterator[TestReceiver]:
    """Serve on 127.0.0.1 while the block runs; yields the receiver (``.url`` is its base).

    Leaving the block (or cancellation) closes the listener and every connection.
    """
    receiver = TestReceiver(handler)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    receiver.url = f"http://127.0.0.1:{port}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, receiver._serve, tg)
        try:
            yield receiver
        finally:
            tg.cancel_scope.cancel()
