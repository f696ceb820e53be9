"""The S1-S4 suite's command at a tiny scale: every scenario yields figures for both paths.

A smoke test of ``python -m benchmarks`` on SQLite and on Postgres (peers included when
installed): it checks the JSON's shape and that the plot is a PNG, never a timing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncstore.orchestrator.config import load_settings

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("S1", "S2", "S3", "S4")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_suite(tmp_path: Path, *extra: str) -> dict[str, object]:
    out, png = tmp_path / "suite.json", tmp_path / "suite.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--scale",
            "0.03",
            "--json",
            str(out),
            "--plot",
            str(png),
            *extra,
        ],
        cwd=REPO,  # benchmarks/ runs from a checkout; it is not installed
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard on a loaded machine, not a timing
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "opt/legacy" in done.stdout
    doc: dict[str, object] = json.loads(out.read_text())
    return doc


def _check(doc: dict[str, object]) -> None:
    scenarios = doc["scenarios"]
    assert isinstance(scenarios, dict)
    for name in SCENARIOS:
        assert "error" not in scenarios[name], scenarios[name]["notes"]
        figures = scenarios[name]["figures"]
        for path in ("optimized", "legacy"):
            assert figures[path], f"{name} has no {path} figures"
            assert all(len(values) >= 1 for values in figures[path].values())
    s3 = scenarios["S3"]["figures"]
    for path in ("optimized", "legacy"):
        assert s3[path]["duplicates"] == [0.0] * len(s3[path]["duplicates"])
        assert s3[path]["lost"] == [0.0] * len(s3[path]["lost"])
        # timed to outcomes stored: nothing left in a live worker's writer at its stop
        assert s3[path]["outcomes_undelivered"] == [0.0] * len(s3[path]["lost"])
        # The kill always finds the victim holding claims, and their re-run is timed.
        assert all(held > 0 for held in s3[path]["held_at_kill"])
        assert len(s3[path]["kill_rerun_s"]) == len(s3[path]["held_at_kill"])
    s1 = scenarios["S1"]["figures"]
    for path in ("optimized", "legacy"):
        for key in ("lib_p95_ms", "low_lib_p95_ms", "lag_p95_ms", "low_lease_p50_ms"):
            assert s1[path][key], f"S1 {path} has no {key}"
        # Library time is part of the overhead, never more.
        for lib, total in zip(s1[path]["lib_p50_ms"], s1[path]["p50_ms"], strict=True):
            assert 0 < lib <= total + 1e-6
    env = doc["environment"]
    assert isinstance(env, dict) and "git_head" in env and "cpu_count" in env
    assert doc["settings"] and doc["table"]


def test_quick_pass_on_sqlite_reports_every_scenario_for_both_paths(tmp_path: Path) -> None:
    doc = _run_suite(tmp_path)
    assert doc["database"] == "sqlite"
    _check(doc)


@pytest.mark.postgres
def test_quick_pass_on_postgres_reports_every_scenario_for_both_paths(
    tmp_path: Path, postgres_dsn: str
) -> None:
    doc = _run_suite(tmp_path, "--url", postgres_dsn)
    assert doc["database"] == "postgres"
    _check(doc)
    assert not list(tmp_path.glob("*.log"))


def test_a_failed_scenario_is_a_row_and_a_failure_not_a_crash(tmp_path: Path) -> None:
    """The table, the failure list and the plot take a scenario that raised (its figures
    empty) and an S2 whose runs partly failed."""
    from benchmarks import suite

    failed = suite._result()
    failed["error"] = "RuntimeError: boom"
    s2 = suite._result()
    s2["figures"]["optimized"] = {"deliveries_per_s": [100.0], "close_s": [0.5]}
    s2["figures"]["legacy"] = {"deliveries_per_s": [50.0], "close_timed_out": [1.0, 0.0]}
    s2["ceiling"] = {"failed_runs": [1.0]}
    results = {"S1": failed, "S2": s2}
    rows = suite.judge(results)
    assert [r.verdict for r in rows if r.scenario == "S1"] == ["failed"]
    late = [r for r in rows if r.figure.startswith("runs whose close passed")]
    assert [(r.optimized, r.legacy) for r in late] == [("0", "1")]
    assert suite._failures(results) == ["S1", "S2"]
    suite.plot(results, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


async def test_s4_measures_growth_once_the_hubs_rings_are_at_their_bound(storage_url: str) -> None:
    """Issue 16: every S4 session leaves a ring in the memory hub (both paths publish to
    it), held until ``broadcast.max_rings`` newer ones or ``ring_idle_ttl_s`` push it out,
    about 4 KiB each; the Postgres soak's 6-8% "growth" was that bounded cache filling
    during the measured window. The full suite fills it first, so every repetition's
    window (from its first quarter on) holds exactly ``max_rings`` rings.

    It cannot pass by luck: before the first window the warm-ups (2 x 1 s) and the first
    quarter (0.5 s) run at most 2 loops x 100 sessions/s (each turn sleeps 10 ms), fewer
    than the 600 rings of the bound."""
    from benchmarks import suite
    from benchmarks.scenarios import Sizes

    bound = 600
    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        broadcast={"max_rings": bound},
    )
    sizes = dataclasses.replace(
        Sizes.for_mode(True, 0.03), s4_segment_s=2.0, s4_concurrency=2, s4_repeats=1
    )
    res = await suite._with_runtime("S4", settings, None, sizes, None)
    for path in ("optimized", "legacy"):
        series = res["series"][path]
        window = [s for s in series if s["t"] >= sizes.s4_segment_s / 4]
        assert window, f"{path}: no samples in the measured window"
        assert {s["rings"] for s in window} == {float(bound)}, (path, series)
    assert res["fill"]["fill_reached"] == 1.0
    assert res["fill"]["fill_rings"] == bound
    assert any("ring bound was reached" in note for note in res["notes"])
