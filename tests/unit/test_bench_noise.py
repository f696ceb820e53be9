"""The benchmarks' noise rule: a comparison is met, not met or too noisy, never a guess."""

from __future__ import annotations

from benchmarks._common import check, compare


def at_most_30_percent(a: float, b: float) -> bool:
    return a <= 0.3 * b


def test_steady_figures_are_judged_on_their_medians() -> None:
    assert compare([20.0, 21.0, 22.0], [100.0, 101.0, 102.0], at_most_30_percent) == "met"
    assert compare([40.0, 41.0, 42.0], [100.0, 101.0, 102.0], at_most_30_percent) == "NOT met"


def test_noisy_figures_count_only_when_both_extreme_pairings_agree() -> None:
    # Spread over 25%, but even the worst pairing (40 vs 150) is under 30%.
    assert compare([10.0, 20.0, 40.0], [150.0, 200.0, 300.0], at_most_30_percent) == "met"
    # The medians say met (20 vs 100), the worst pairing (40 vs 60) says not.
    assert compare([10.0, 20.0, 40.0], [60.0, 100.0, 140.0], at_most_30_percent) == "too noisy"


def test_a_bound_on_a_noisy_figure_needs_both_extremes_on_one_side() -> None:
    assert check([1.0, 1.1, 1.2], lambda v: v < 2.5) == "met"
    assert check([1.0, 2.0, 3.0], lambda v: v < 2.5) == "too noisy"
    assert check([3.0, 3.5, 5.0], lambda v: v < 2.5) == "NOT met"
