"""S2's search for the largest size a server holds (``find_held``), on real processes.

The bisection runs real server and client processes (SQLite) at each probed size; the
verdict of a probe is made to depend on its size so the search's answer is known.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from benchmarks import s2_sockets

CASE = s2_sockets.S2Case(streams=5, subscribers=10, events=3, clients=1)


def test_the_search_finds_the_largest_size_held_and_measures_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = s2_sockets.held
    probed: list[float] = []

    def held_up_to_three(figures: dict[str, list[float]]) -> bool:
        subscribers = figures["offered_per_s"][0] / CASE.rate
        probed.append(subscribers)
        return real(figures) and subscribers <= 3

    monkeypatch.setattr(s2_sockets, "held", held_up_to_three)
    url = f"sqlite:///{tmp_path / 's2.db'}"
    found = anyio.run(s2_sockets.find_held, url, CASE, ["library"])
    # Ladder 10, 8, 6, 4, 3, 2, 2: bisection probes 4 (no), 2 (yes), 3 (yes).
    assert probed == [4, 2, 3]
    size = found["library"]
    assert (size["subscribers"], size["streams"]) == (3, 2)
    assert size["offered_per_s"] == 3 * CASE.rate
    assert size["deliveries_per_s"] > 0 and size["p99_ms"] > 0
    assert "3 subscribers on 2 streams" in s2_sockets.held_text(size)


def test_a_case_that_holds_no_size_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s2_sockets, "HELD_P99_MS", -1.0)  # no run can be within it
    monkeypatch.setattr(s2_sockets, "HELD_FRACTIONS", (1.0, 0.5))
    url = f"sqlite:///{tmp_path / 's2.db'}"
    assert anyio.run(s2_sockets.find_held, url, CASE, ["library"]) == {}
    assert "none of the sizes" in s2_sockets.held_text(None)
