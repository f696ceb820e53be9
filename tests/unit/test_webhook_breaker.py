"""The per-receiver circuit breaker, driven by a hand-moved clock."""

from __future__ import annotations

from asyncstore.orchestrator.timing import ManualClock as Clock
from asyncstore.orchestrator.webhooks.breaker import BreakerConfig, Breakers, CircuitBreaker


def test_opens_after_threshold_probes_once_and_backs_off() -> None:
    clock = Clock()
    breaker = CircuitBreaker("o", BreakerConfig(failure_threshold=3, reset_timeout_secs=8), clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record(False)
    assert not breaker.allow() and breaker.state().state == "open"
    assert breaker.retry_in_s() == 1.0
    clock.advance(1.0)
    assert breaker.allow()  # the half-open probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record(False)  # failed probe: twice as long
    assert breaker.retry_in_s() == 2.0
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record(None)  # a cancelled probe gives its slot back
    assert breaker.allow()
    breaker.record(True)
    assert breaker.closed and breaker.allow() and breaker.state().state == "closed"
    assert breaker.state().opened == 1 and breaker.state().short_circuited == 2


def test_answers_below_500_keep_it_closed_and_the_flag_turns_it_off() -> None:
    breaker = CircuitBreaker("o", BreakerConfig(failure_threshold=2), Clock())
    for _ in range(5):
        breaker.record(False)
        breaker.record(True)  # e.g. a 404 or 429 in between: the receiver is up
    assert breaker.closed
    off = CircuitBreaker("o", BreakerConfig(enabled=False, failure_threshold=1), Clock())
    off.record(False)
    off.record(False)
    assert off.allow()


def test_one_breaker_per_origin() -> None:
    breakers = Breakers()
    a = breakers.for_url("https://h.example/a?x=1")
    assert breakers.for_url("https://h.example:443/b") is a
    assert breakers.for_url("http://h.example/a") is not a


def test_open_period_doubles_to_the_cap_on_the_registry_clock() -> None:
    clock = Clock()
    breakers = Breakers(BreakerConfig(failure_threshold=1, reset_timeout_secs=5), clock=clock)
    breaker = breakers.for_url("https://h.example/")
    breaker.record(False)
    periods = []
    for _ in range(5):
        periods.append(breaker.retry_in_s())
        clock.advance(periods[-1])
        assert breaker.allow()  # the probe, due exactly when the clock says so
        breaker.record(False)
    assert periods == [1.0, 2.0, 4.0, 5.0, 5.0]
    breaker.record(True)
    breaker.record(False)
    assert breaker.retry_in_s() == 1.0  # a new outage starts from the first step
