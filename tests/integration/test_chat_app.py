"""examples/chat_app.py in its own process, without a browser: only the user a session was
made for (a signed cookie) may stream or drive it, a WebSocket from another site's page is
refused, and SIGTERM ends open streams with their final event and drains the runtime.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.integration.test_asgi import Frame, frames

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "chat_app.py"


@pytest.fixture
def chat_app() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", "0", "--token-delay", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("open http://"), line
        url = line.split()[1].rstrip("/")
        # The app prints this once its lifespan (the runtime) has started.
        ready = proc.stdout.readline()
        assert ready.startswith("chat app on "), ready
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def _new_session(client: httpx.AsyncClient) -> str:
    """What a browser does on ``GET /``: it is sent to a new session of its own."""
    response = await client.get("/")
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/?session=chat-")
    assert "chat_user" in client.cookies
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert (await client.get(location)).status_code == 200
    return location.removeprefix("/?session=")


async def _first_frame(client: httpx.AsyncClient, session: str) -> Frame:
    async with client.stream("GET", f"/sessions/{session}/events") as response:
        assert response.status_code == 200
        async for frame in frames(response):
            return frame
    raise AssertionError("the stream ended without a frame")


async def test_only_the_user_a_session_was_made_for_can_stream_or_drive_it(
    chat_app: tuple[str, subprocess.Popen[str]],
) -> None:
    url, _ = chat_app
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as owner,
        httpx.AsyncClient(base_url=url, timeout=10) as other,
        httpx.AsyncClient(base_url=url, timeout=10) as anonymous,
        httpx.AsyncClient(base_url=url, timeout=10) as forger,
    ):
        session = await _new_session(owner)
        await _new_session(other)
        user, _, mac = owner.cookies["chat_user"].rpartition(".")
        forger.cookies.set("chat_user", f"{user}x.{mac}")  # another user id, same signature
        assert (await _first_frame(owner, session)).event == "ready"

        for client in (other, anonymous, forger):
            assert (await client.get(f"/sessions/{session}/events")).status_code == 403
            for action in ("turns", "cancel", "drop"):
                refused = await client.post(f"/sessions/{session}/{action}", json={"prompt": "x"})
                assert refused.status_code == 403, action
            # Someone else's session id in the address: a new session of one's own instead.
            page = await client.get(f"/?session={session}")
            assert page.status_code == 303 and session not in page.headers["location"]

        started = await owner.post(f"/sessions/{session}/turns", json={"prompt": "hello"})
        assert started.status_code == 202

        ws_url = url.replace("http://", "ws://") + f"/sessions/{session}/ws"
        cookie = {"Cookie": f"chat_user={owner.cookies['chat_user']}"}
        async with connect(ws_url, additional_headers=cookie, origin=Origin(url)) as ws:
            await ws.send(orjson.dumps({"type": "subscribe"}).decode())
            assert orjson.loads(await ws.recv())["type"] == "ready"
        for headers, origin in [(cookie, "http://evil.example"), ({}, url)]:
            with pytest.raises(InvalidStatus) as refused_ws:
                async with connect(ws_url, additional_headers=headers, origin=Origin(origin)):
                    pass
            assert refused_ws.value.response.status_code == 403
        # The endpoints are a metrics source: the refusals above are counted.
        exposition = (await owner.get("/metrics")).text
        refused_line = next(
            line
            for line in exposition.splitlines()
            if line.startswith('asyncstore_endpoint_streams_refused_total{source="endpoints"}')
        )
        assert float(refused_line.split()[-1]) >= 3


async def test_sigterm_ends_open_streams_with_a_final_event_and_drains_the_runtime(
    chat_app: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = chat_app
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        session = await _new_session(client)
        got: list[Frame] = []
        async with client.stream("GET", f"/sessions/{session}/events") as response:
            async for frame in frames(response):
                got.append(frame)
                if frame.event == "ready":
                    proc.send_signal(signal.SIGTERM)
        assert (got[-1].event, got[-1].json()) == ("shutdown", {"reason": "server shutting down"})
    code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=30))
    assert code == 0
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert "chat app stopped: RuntimeReport(stream_events_lost=0" in out, out
    assert "stopped by SIGTERM" in out, out
