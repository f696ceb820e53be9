"""The operator dashboard (``asyncstore dashboard``) in a real headless Chromium: the page
follows the database live over SSE (a task enqueued by another process appears), a wrong
token is refused on the page, and a redrive with the token, confirmed in the page's dialog,
puts the dead task back in its queue and shows up in the audit log; the task then shows
among its queue's queued tasks and its Cancel button cancels it (it never starts). The
sessions table says why it has no subscriber counts (no instance publishes them). A
screenshot goes to ``tests/artifacts/dashboard.png``. Chromium is Debian's package driven
through playwright, as in test_chat_browser.py: skipped without it unless
``ASYNCSTORE_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asyncstore.storage import AsyncStorageBackend, NewTask, TaskStatus, open_storage
from asyncstore.storage.base import Failure
from tests.e2e.test_chat_browser import ARTIFACTS, FLAGS, _chromium

TOKEN = "browser-operator-token"


def _run(url: str, job: Any) -> Any:
    """Run ``job(storage)`` on its own storage handle, in a thread: playwright's sync API
    keeps an event loop running in this one."""

    async def main() -> Any:
        async with open_storage(url, migrate=True) as storage:
            return await job(storage)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, main).result()


async def _make_dead(storage: AsyncStorageBackend) -> int:
    (task,) = await storage.enqueue_tasks([NewTask("billing", {"invoice": 7}, max_attempts=1)])
    (claimed,) = await storage.claim_tasks("billing", "worker-1", limit=1, lease_s=30)
    await storage.dead_letter_tasks([Failure(claimed.id, claimed.claim.token, "card declined")])
    return task.id


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    _run(url, lambda storage: storage.ping())
    env = {
        **os.environ,
        "ASYNCSTORE_DASHBOARD__OPERATOR_TOKEN": TOKEN,
        "ASYNCSTORE_DASHBOARD__REFRESH_INTERVAL_S": "0.2",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncstore.orchestrator.cli",
            "dashboard",
            "--url",
            url,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard at http://"), line
        base = line.split()[2]
        assert httpx.get(base + "api/state", timeout=30).status_code == 200
        yield url, base
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_updates_live_and_redrives_with_the_token(
    dashboard: tuple[str, str],
) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    url, base = dashboard
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before an action
            page.goto(base)
            page.wait_for_function("() => window.dashState.updates >= 1")
            assert page.inner_text("#live") == "live"
            assert "none" in page.inner_text("#dead")

            # Another process enqueues: the page shows it without a reload.
            _run(url, lambda s: s.enqueue_tasks([NewTask("emails", {"to": "a@b.c"})]))
            page.wait_for_function(
                "() => (window.dashState.snapshot.queues.find(q => q.name === 'emails')"
                " || {}).waiting === 1",
                timeout=30_000,
            )
            assert "emails" in page.inner_text("#queues")

            dead = _run(url, _make_dead)
            button = f'#dead tr[data-key="{dead}"] button[data-action="task.redrive"]'
            page.wait_for_selector(button, timeout=30_000)
            assert "card declined" in page.inner_text("#dead")

            # A wrong token: refused, said on the page, the task stays dead.
            page.fill("#operator", "ann")
            page.fill("#token", "not-the-token")
            page.click(button)
            page.wait_for_function("() => window.dashState.results.length === 1")
            assert page.evaluate("() => window.dashState.results[0].status") == 401
            assert "operator token" in page.inner_text("#message")

            page.fill("#token", TOKEN)
            page.click(button)
            page.wait_for_function("() => window.dashState.results.length === 2")
            assert page.evaluate("() => window.dashState.results[1].ok") is True
            page.wait_for_function(
                "() => window.dashState.snapshot.tasks.dead.length === 0"
                " && window.dashState.snapshot.audit.length === 2",
                timeout=30_000,
            )
            audit = page.inner_text("#audit")
            assert "task.redrive" in audit and f"task:{dead}" in audit and "ann@" in audit
            assert "done" in audit and "refused" in audit

            task = _run(url, lambda s: s.get_task(dead))
            assert task.status is TaskStatus.QUEUED
            entries = _run(url, lambda s: s.list_audit())
            assert [e.outcome.split(":")[0] for e in entries] == ["done", "refused"]

            # The redriven task is queued again: listed under its queue, and cancelled
            # from the page.
            cancel = f'#queued tr[data-key="{dead}"] button[data-action="task.cancel"]'
            page.wait_for_selector(cancel, timeout=30_000)
            assert "billing: next 1 of 1" in page.inner_text("#queued-counts")
            page.click(cancel)
            page.wait_for_function("() => window.dashState.results.length === 3")
            assert page.evaluate("() => window.dashState.results[2].ok") is True
            page.wait_for_function(
                f"() => !window.dashState.snapshot.tasks.queued.some(t => t.id === {dead})"
                " && window.dashState.snapshot.audit.length === 3",
                timeout=30_000,
            )
            assert "task.cancel" in page.inner_text("#audit")
            task = _run(url, lambda s: s.get_task(dead))
            assert task.status is TaskStatus.CANCELLED
            note = page.inner_text("#subscribers-note")
            assert "no live instance publishes" in note

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
