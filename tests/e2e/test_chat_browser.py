"""examples/chat_app.py in a real headless Chromium: a turn streams into the page, survives a
dropped connection and a reload with every token exactly once and in order, and the stop
button stops the next turn. Chromium is Debian's package, driven through Python's
playwright (its own browser downloads are not used). Without Chromium the test is skipped,
unless ``ASYNCSTORE_REQUIRE_BROWSER=1`` (CI), which turns that into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "chat_app.py"
ARTIFACTS = ROOT / "tests" / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    found = os.environ.get("ASYNCSTORE_CHROMIUM") or shutil.which("chromium")
    reason = ""
    if found is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright (PyPI) is not installed"
    if reason:
        if os.environ.get("ASYNCSTORE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"a browser is required (ASYNCSTORE_REQUIRE_BROWSER=1): {reason}")
        pytest.skip(reason)
    assert found is not None
    return found


@pytest.fixture
def chat_server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", "0", "--token-delay", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("open http://"), line
        url = line.split()[1]
        # The app listens before it prints the URL: this request waits in the socket's
        # backlog until the app serves it, no polling. "/" sends a new browser to a new
        # session of its own (303, a cookie).
        assert httpx.get(url, timeout=30, follow_redirects=True).status_code == 200
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _state(page: Any) -> dict[str, Any]:
    state: dict[str, Any] = page.evaluate("() => window.chatState")
    return state


def test_chat_page_resumes_exactly_and_stops_a_turn(
    chat_server: tuple[str, subprocess.Popen[str]],
) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    spec = importlib.util.spec_from_file_location("chat_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    chat_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_app)
    answer, answer_text = chat_app.ANSWER, chat_app.ANSWER_TEXT

    url, proc = chat_server
    n = len(answer)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.goto(url)
            page.wait_for_function("() => window.chatState.connects >= 1")

            # A turn; the server drops the stream halfway; the browser resumes by itself.
            page.fill("#prompt", "What is the weather in Paris?")
            page.click("#send")
            page.wait_for_function("() => window.chatState.tokens.length >= 5")
            page.click("#drop")
            page.wait_for_function("() => window.chatState.connects >= 2")
            before_end = len(_state(page)["tokens"])
            page.wait_for_function("() => window.chatState.completed === 1", timeout=20_000)
            state = _state(page)
            assert before_end < n, "the drop must happen mid-turn"
            assert state["tokens"] == list(range(n))
            assert state["seqs"] == list(range(1, n + 5))  # user, tool call/result, tokens, end
            assert page.inner_text(".msg.agent.done") == answer_text

            # A reload replays the session from the start, each event once.
            page.reload()
            page.wait_for_function("() => window.chatState.completed === 1")
            assert _state(page)["tokens"] == list(range(n))
            assert _state(page)["seqs"] == list(range(1, n + 5))

            # The stop button stops the next turn.
            page.fill("#prompt", "And tomorrow?")
            page.click("#send")
            page.wait_for_function(f"() => window.chatState.tokens.length >= {n + 3}")
            page.click("#stop")
            page.wait_for_function("() => window.chatState.cancelled === 1")
            stopped = len(_state(page)["tokens"])
            time.sleep(0.5)  # tokens would keep coming at 20/s if the turn still ran
            state = _state(page)
            assert len(state["tokens"]) == stopped < 2 * n
            assert state["tokens"][n:] == list(range(stopped - n))
            assert "stopped: user pressed stop" in page.inner_text("#log")
            assert page.locator(".msg.agent.stopped").count() == 1

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat_app.png"), full_page=True)

            # Shutting the server down ends the open stream instead of hanging.
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
            assert proc.stdout is not None
            out = proc.stdout.read()
            assert "chat app stopped: RuntimeReport(stream_events_lost=0" in out, out
        finally:
            browser.close()
