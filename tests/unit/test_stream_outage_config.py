"""The stream writer's outage settings: defaults that ride out a restart, and overrides
from the environment or TOML that change only the keys they name."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncstore.orchestrator.batching import OverflowPolicy, outcome_batches
from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.streams import StreamConfig


def test_stream_writer_defaults_ride_out_a_minute_of_outage() -> None:
    batch = StreamConfig().batch
    assert batch.retry_budget_s is not None and batch.retry_budget_s >= 60
    assert batch.max_retries is None  # the budget decides, not a count of attempts
    assert batch.retry_max_s <= 1.0


def test_outcome_writers_retry_on_a_budget_too() -> None:
    config = outcome_batches(100)
    assert config.max_retries is None
    assert config.retry_budget_s is not None and config.retry_budget_s >= 60


def test_budget_from_env_keeps_the_other_stream_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCSTORE_STREAM__BATCH__RETRY_BUDGET_S", "300")
    batch = load_settings().stream.batch
    assert batch.retry_budget_s == 300
    assert batch == StreamConfig().batch.model_copy(update={"retry_budget_s": 300.0})
    assert batch.overflow is OverflowPolicy.DROP_NEWEST and batch.capacity == 50_000


def test_budget_from_toml_keeps_the_other_stream_defaults(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text("[stream.batch]\nretry_budget_s = 90\n")
    batch = load_settings(config).stream.batch
    assert batch == StreamConfig().batch.model_copy(update={"retry_budget_s": 90.0})
