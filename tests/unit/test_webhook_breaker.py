"""The per-receiver circuit breaker, driven by a hand-moved clock."""

from __future__ import annotations

from asyncstore.orchestrator.webhooks.breaker import BreakerConfig, Breakers, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_probes_once_and_backs_off() -> None:
    clock = Clock()
    breaker = CircuitBreaker("o", BreakerConfig(failure_threshold=3, reset_timeout_secs=8), clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record(False)
    assert not breaker.allow() and breaker.state().state == "open"
    assert breaker.retry_in_s() == 1.0
    clock.now += 1.0
    assert breaker.allow()  # the half-open probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record(False)  # failed probe: twice as long
    assert breaker.retry_in_s() == 2.0
    clock.now += 2.0
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
