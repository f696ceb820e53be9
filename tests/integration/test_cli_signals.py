"""Long-running commands stop on SIGTERM (what systemd and Kubernetes send) exactly as on
Ctrl-C: the runtime drains and reports, and the process exits 0.

Each command runs in its own OS process; the tests wait on its output lines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXIT_BOUND_S = 30.0


# Runs the CLI with the ASGI extra (uvicorn, starlette, websockets) unimportable: what the
# core install has.
CORE_INSTALL = """
import importlib.abc, sys

class NoASGIExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"uvicorn", "starlette", "websockets"}:
            raise ModuleNotFoundError(f"{name} is not installed (core install)", name=name)
        return None

sys.meta_path.insert(0, NoASGIExtra())
from asyncstore.orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextmanager
def _serving(storage_url: str, *python: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    command = [*python, "serve-metrics", "--url", storage_url]
    proc = subprocess.Popen(
        [sys.executable, *command, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving metrics at "), line + proc.stdout.read()
        yield proc, line.split()[3]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def serve_metrics(storage_url: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with _serving(storage_url, "-m", "asyncstore.orchestrator.cli") as served:
        yield served


def test_serve_metrics_runs_on_the_core_install_without_an_asgi_server(storage_url: str) -> None:
    with _serving(storage_url, "-c", CORE_INSTALL) as (proc, url):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        assert "asyncstore_storage_" in response.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_BOUND_S) == 0
        assert proc.stdout is not None
        assert "serve-metrics: drained: RuntimeReport(" in proc.stdout.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_metrics_drains_the_runtime_on_sigterm_and_sigint(
    serve_metrics: tuple[subprocess.Popen[str], str], sig: signal.Signals
) -> None:
    proc, url = serve_metrics
    assert httpx.get(url, timeout=10).status_code == 200
    proc.send_signal(sig)
    assert proc.wait(timeout=EXIT_BOUND_S) == 0
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert f"serve-metrics: {sig.name}: draining the runtime" in out, out
    assert "serve-metrics: drained: RuntimeReport(stream_events_lost=0" in out, out
