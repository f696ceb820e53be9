"""The one Backoff policy and the ManualClock that tests drive instead of sleeping."""

from __future__ import annotations

import random

import anyio
import pytest

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock, ManualClock


def test_backoff_steps_double_and_cap() -> None:
    policy = Backoff(base_s=0.1, max_s=1.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay(10_000) == 1.0  # no overflow on huge attempt counts


def test_backoff_jitter_stays_in_its_band() -> None:
    policy = Backoff(base_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(7)
    draws = [policy.delay(3, rng) for _ in range(2_000)]
    assert min(draws) >= 2.0 and max(draws) <= 4.0
    assert max(draws) - min(draws) > 1.5  # actually random, not a constant


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": -1, "max_s": 1},
        {"base_s": 2, "max_s": 1},
        {"base_s": 1, "max_s": 2, "factor": 0.5},
        {"base_s": 1, "max_s": 2, "jitter": 1.5},
        {"base_s": float("nan"), "max_s": 2},
    ],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_backoff_attempts_are_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        Backoff(base_s=1, max_s=2).delay(0)


def test_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SYSTEM_CLOCK, Clock)
    assert isinstance(ManualClock(), Clock)


async def test_manual_clock_wakes_exactly_the_sleepers_it_passes() -> None:
    clock = ManualClock()
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(seconds)

    async with anyio.create_task_group() as tg:
        for seconds in (5.0, 1.0, 3.0):
            tg.start_soon(sleeper, seconds)
        await clock.wait_sleepers(3)
        clock.advance(2.0)
        await clock.wait_sleepers(2)
        await anyio.wait_all_tasks_blocked()
        assert woke == [1.0]
        clock.advance(3.0)
    assert sorted(woke) == [1.0, 3.0, 5.0]
    assert clock.monotonic() == 1_005.0
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_cancelled_sleeper_is_no_longer_counted() -> None:
    clock = ManualClock()
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.sleep, 10.0)
        await clock.wait_sleepers(1)
        tg.cancel_scope.cancel()
    assert clock.sleepers == 0
