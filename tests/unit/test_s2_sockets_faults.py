"""S2's driver through faults: a run that fails or whose close overruns is reported, not fatal.

The full-size S2 once stopped the whole suite when one server's producers took longer than
the driver's limit to close their turns. These tests inject that overrun (a close limit of
zero) and a SIGKILLed server between runs, on real server and client processes over
sockets (SQLite), and check that every other run is still measured.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from benchmarks import s2_sockets

CASE = s2_sockets.S2Case(streams=2, subscribers=4, events=3, clients=1)


def _server_children() -> list[int]:
    """Pids of this process's S2 server children (``--serve``), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"--serve" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_close_past_the_limit_is_counted_and_its_server_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s2_sockets, "CLOSE_LIMIT_S", 0.0)
    url = f"sqlite:///{tmp_path / 's2.db'}"
    out = anyio.run(s2_sockets.run_cases, url, CASE, ["library"], 2)
    figures = out["library"]
    assert figures["close_timed_out"] == [1.0, 1.0]
    assert "failed_runs" not in figures
    assert figures["undelivered"] == [0.0, 0.0]
    # RSS per connection is measured on a fresh server only: both runs had one, so the
    # server whose close overran was replaced.
    assert len(figures["rss_per_conn_kib"]) == 2


def test_a_run_on_a_killed_server_fails_alone_and_the_next_runs_on_a_new_one(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 's2.db'}"
    errors: list[str] = []
    killed: list[int] = []

    def tick(name: str) -> None:
        if not killed:  # after the first run: SIGKILL the server the next run will use
            (pid,) = _server_children()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = anyio.run(s2_sockets.run_cases, url, CASE, ["library"], 3, tick, errors)
    figures = out["library"]
    assert figures["failed_runs"] == [1.0]
    assert len(figures["deliveries_per_s"]) == 2  # the runs before and after the failure
    assert figures["undelivered"] == [0.0, 0.0]
    assert len(errors) == 1 and "library run 2" in errors[0]
    assert killed and killed[0] not in _server_children()
