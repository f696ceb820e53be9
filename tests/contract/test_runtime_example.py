"""examples/agent_turn.py runs as a user would run it, on SQLite and on Postgres."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_turn.py"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _check(out: str) -> None:
    assert re.search(r"client: \d+/12 turn_completed", out)
    assert "cancelled {'reason': 'user pressed stop'}" in out
    assert "turn 2 cancelled: True (user pressed stop)" in out
    assert "'on_turn_start', 'post_tool_execution', 'on_turn_complete'" in out
    assert "stream_events_lost=0" in out


def test_example_runs_on_sqlite_with_no_arguments() -> None:
    _check(_run())


@pytest.mark.postgres
def test_example_runs_on_postgres(postgres_dsn: str) -> None:
    _check(_run("--url", postgres_dsn))
