"""``RefusalBudget`` (orchestrator.dashboard_actions): how many refused dashboard action
attempts per client get an audit row. A token bucket per client address on a clock the test
moves by hand (no sleeps): the burst, the refill, the skipped count said in the next
written row, separate clients, the bound on tracked clients, and no budget (None)."""

from __future__ import annotations

from asyncstore.orchestrator.dashboard_actions import RefusalBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_per_refill_and_the_skipped_count_is_told() -> None:
    clock = Clock()
    budget = RefusalBudget(3, 6.0, clock=clock)  # 6 per minute: one every 10 s
    assert [budget.take("10.0.0.1") for _ in range(3)] == [(True, 0)] * 3
    assert [budget.take("10.0.0.1") for _ in range(4)] == [(False, n) for n in (1, 2, 3, 4)]
    assert budget.skipped == 4
    clock.now += 9.9
    assert budget.take("10.0.0.1") == (False, 5)
    clock.now += 0.2  # 10.1 s: one token back
    assert budget.take("10.0.0.1") == (True, 5)  # written, and says 5 were skipped
    assert budget.take("10.0.0.1") == (False, 1)
    clock.now += 3600  # refills up to the burst only
    assert [budget.take("10.0.0.1")[0] for _ in range(4)] == [True, True, True, False]
    assert budget.skipped == 7


def test_each_client_has_its_own_budget_and_old_clients_are_forgotten() -> None:
    budget = RefusalBudget(1, 0.0, max_clients=2, clock=Clock())
    assert budget.take("a") == (True, 0) and budget.take("a") == (False, 1)
    assert budget.take("b") == (True, 0)
    assert budget.take("c") == (True, 0)  # "a", least recently seen, is dropped
    assert len(budget._clients) == 2
    assert budget.take("a") == (True, 0)  # so it starts again with a full bucket


def test_a_zero_burst_writes_no_refusal_and_none_writes_every_one() -> None:
    silent = RefusalBudget(0, 60.0, clock=Clock())
    assert [silent.take("a")[0] for _ in range(5)] == [False] * 5 and silent.skipped == 5
    legacy = RefusalBudget(0, None, clock=Clock())
    assert [legacy.take("a") for _ in range(5)] == [(True, 0)] * 5 and legacy.skipped == 0
