"""``python -m benchmarks maintenance`` at a tiny scale, so it cannot rot: both purges
remove exactly the expired rows (the benchmark asserts it) and report their WAL, and both
layouts report an append rate. Never a timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_tiny_maintenance_benchmark_reports_both_purges_and_both_layouts(
    postgres_dsn: str,
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "maintenance",
            "--url",
            postgres_dsn,
            "--rows",
            "3000",
            "--batch",
            "1000",
            "--repeats",
            "2",
            "--writers",
            "2",
            "--appends",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard on a loaded machine, not a timing
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for method in ("batched", "drop"):
        assert re.search(rf"^{method}\s+\d+\.\d+\s+\d+%\s+[\d,]+\s+\d+\.\d+$", done.stdout, re.M)
    assert re.search(r"^drop / batched: time [\d.]+x, WAL [\d.]+x$", done.stdout, re.M)
    for layout in ("plain", "parted"):
        assert re.search(rf"^{layout}\s+[\d,]+ events/s", done.stdout, re.M)
    assert "partitioned / plain:" in done.stdout


def test_bad_arguments_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "maintenance", "--rows", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--rows must be at least 5" in done.stderr
