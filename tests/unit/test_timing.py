"""The one Backoff policy and the ManualClock that tests drive instead of sleeping."""

from __future__ import annotations

import random

import anyio
import pytest

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock, ManualClock, jittered


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


async def test_manual_move_on_after_times_out_only_when_advanced_past() -> None:
    clock = ManualClock()
    event = anyio.Event()
    outcome: list[bool] = []

    async def waiter() -> None:
        with clock.move_on_after(5.0) as scope:
            await event.wait()
        outcome.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await clock.wait_sleepers(1)
        clock.advance(4.9)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []  # not yet: real time passing does not matter either
        clock.advance(0.1)
    assert outcome == [True]
    assert clock.sleepers == 0


async def test_manual_move_on_after_leaves_a_block_that_ends_first() -> None:
    clock = ManualClock()
    with clock.move_on_after(1.0) as scope:
        assert clock.sleepers == 1
        await anyio.lowlevel.checkpoint()
    assert not scope.cancelled_caught and clock.sleepers == 0
    clock.advance(2.0)  # the disarmed deadline fires nothing
    with clock.move_on_after(0) as scope:
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    with clock.move_on_after(float("inf")) as scope:
        assert clock.sleepers == 0  # never times out: not a sleeper
        await anyio.lowlevel.checkpoint()
    assert not scope.cancelled_caught


async def test_system_clock_move_on_after_is_anyios() -> None:
    with SYSTEM_CLOCK.move_on_after(0) as scope:
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught


def test_jittered_spreads_symmetrically() -> None:
    rng = random.Random(3)
    draws = [jittered(10.0, 0.2, rng) for _ in range(2_000)]
    assert min(draws) >= 8.0 and max(draws) <= 12.0
    assert min(draws) < 8.5 and max(draws) > 11.5
    assert jittered(10.0, 0.0) == 10.0
    with pytest.raises(ValueError):
        jittered(10.0, 1.0)
