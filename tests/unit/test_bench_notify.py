"""``python -m benchmarks notify`` at a tiny scale, so it cannot rot: every cell yields
figures, and every notification sent while the listener was connected was delivered.
Never a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_tiny_notify_benchmark_reports_every_cell(tmp_path: Path, postgres_dsn: str) -> None:
    out = tmp_path / "notify.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "notify",
            "--url",
            postgres_dsn,
            "--writers",
            "1,3",
            "--duration",
            "0.1",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,  # a hang guard on a loaded machine, not a timing
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "notif/s" in done.stdout
    doc = json.loads(out.read_text())
    cells = {(c["mode"], c["listener"], c["writers"]): c for c in doc["cells"]}
    expected = {
        (mode, listener, writers)
        for writers in (1, 3)
        for mode, listener in (
            ("append", False),
            ("library", True),
            ("library", False),
            ("same_txn", True),
            ("notify", True),
        )
    }
    assert set(cells) == expected
    for key, cell in cells.items():
        assert len(cell["flushes_per_s"]) == 2 and all(r > 0 for r in cell["flushes_per_s"])
        assert all(0 < p50 <= p99 for p50, p99 in zip(cell["p50_ms"], cell["p99_ms"], strict=True))
        if key[1]:  # a listener was connected: nothing it was sent went missing
            assert cell["lost"] == [0, 0], key
            assert all(d > 0 for d in cell["delivered_per_s"])
        else:
            assert cell["delivered_per_s"] == []
    assert doc["environment"]["cpu_count"] and "load_average_before" in doc
