"""Every retry site draws its delays from the one ``Backoff``, with its settings' meaning kept.

Each site's schedule is pinned here (un-jittered steps and the jitter band), so a site that
went back to a formula of its own, or changed what a setting means, fails.
"""

from __future__ import annotations

import random

import pytest
from pydantic import SecretStr

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.locks import LimiterConfig
from asyncstore.orchestrator.timing import Backoff
from asyncstore.orchestrator.webhooks import sync
from asyncstore.orchestrator.webhooks.breaker import BreakerConfig
from asyncstore.orchestrator.webhooks.config import DurableRetry
from asyncstore.storage import StorageSettings, sqlite
from asyncstore.storage.postgres import PostgresBackend


def _steps(policy: Backoff, n: int) -> list[float]:
    return [policy.step(attempt) for attempt in range(1, n + 1)]


def _band(policy: Backoff, attempt: int) -> tuple[float, float]:
    rng = random.Random(attempt)
    draws = [policy.delay(attempt, rng) for _ in range(500)]
    return min(draws), max(draws)


def test_batch_writer_retries_double_from_base_to_cap_with_equal_jitter() -> None:
    policy = BatchConfig(retry_base_s=0.05, retry_max_s=0.3).backoff
    assert _steps(policy, 5) == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    low, high = _band(policy, 3)
    assert 0.1 <= low < 0.11 and 0.19 < high <= 0.2
    # A cap below the base meant "always the cap"; it still does.
    assert _steps(BatchConfig(retry_base_s=1.0, retry_max_s=0.5).backoff, 2) == [0.5, 0.5]


def test_limiter_fallback_doubles_from_initial_to_max_with_equal_jitter() -> None:
    policy = LimiterConfig(backoff_initial_s=0.5, backoff_max_s=5.0).backoff
    assert _steps(policy, 6) == pytest.approx([0.5, 1.0, 2.0, 4.0, 5.0, 5.0])
    low, high = _band(policy, 2)
    assert 0.5 <= low < 0.55 and 0.95 < high <= 1.0


def test_durable_webhook_retries_keep_their_schedule_and_jitter_down() -> None:
    retry = DurableRetry()
    assert retry.delays_s() == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600)
    assert retry.budget_s() == sum(retry.delays_s()) + 600 * 8  # 19 delays, the last repeats
    low, high = _band(retry.backoff, 4)
    assert 8 * 0.8 <= low < 8 * 0.82 and 8 * 0.98 < high <= 8  # jittered down by up to 20 %
    assert DurableRetry(first_delay_secs=900, max_delay_secs=600).delays_s() == (600,)
    assert DurableRetry(max_attempts=3).delays_s() == (1, 2, 4, 600)


def test_sync_webhook_retries_are_100_ms_doubling_without_jitter() -> None:
    assert [sync._BACKOFF.delay(n) for n in range(1, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_breaker_open_period_doubles_from_one_second_to_the_reset_timeout() -> None:
    policy = BreakerConfig(reset_timeout_secs=8).open_for
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert BreakerConfig(reset_timeout_secs=0.5).open_for.delay(1) == 0.5


def test_postgres_listener_reconnect_starts_at_50_ms_capped_by_the_setting() -> None:
    def policy(**kw: float) -> Backoff:
        url = SecretStr("postgresql://u@127.0.0.1:1/never-connected")
        return PostgresBackend(StorageSettings(url=url, **kw))._reconnect_backoff  # type: ignore[arg-type]

    assert _steps(policy(), 5) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5])
    assert policy().jitter == 0.5
    assert _steps(policy(listener_reconnect_max_s=0.02), 2) == [0.02, 0.02]


def test_sqlite_busy_retry_doubles_from_5_ms_to_200_ms_with_equal_jitter() -> None:
    policy = sqlite._BUSY_BACKOFF
    assert _steps(policy, 7) == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.2])
    assert policy.jitter == 0.5
