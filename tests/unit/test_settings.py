"""The settings tree: feature flags, rollout shares, sources and masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncstore.orchestrator.cli import main
from asyncstore.orchestrator.config import Flags, in_rollout, load_settings, masked_dump


def test_flags_default_to_the_optimized_paths() -> None:
    flags = load_settings().flags
    assert flags.model_dump() == {
        "stream_batching": True,
        "stream_delivery": "memory",
        "lock": "two_level",
        "cancel": "notify",
        "queue": "claim",
        "outbox": "grouped",
    }


@pytest.mark.parametrize(
    ("value", "share"),
    [(True, 100.0), (False, 0.0), ("poll", 0.0), ("memory", 100.0), ("10%", 10.0), ("on", 100.0)],
)
def test_a_flag_is_a_value_or_a_share(value: object, share: float) -> None:
    assert Flags(stream_delivery=value).share("stream_delivery") == share  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [10, "10", "150%", "fast", "-1%"])
def test_bad_flag_values_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="stream_delivery"):
        Flags(stream_delivery=value)  # type: ignore[arg-type]


def test_flags_come_from_env_and_file_and_section_modes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "a.toml"
    config.write_text(
        '[flags]\nlock = "db_poll"\nstream_batching = "25%"\n[lock]\nlease_ttl_s = 9\n'
    )
    monkeypatch.setenv("ASYNCSTORE_FLAGS__STREAM_BATCHING", "5%")
    monkeypatch.setenv("ASYNCSTORE_FLAGS__QUEUE", "poll_spawn")
    settings = load_settings(config)
    assert settings.flags.lock == 0.0 and settings.lock.lease_ttl_s == 9
    assert settings.flags.stream_batching == 5.0
    assert settings.flags.queue == "poll_spawn"
    config.write_text("[stream]\nbatching = false\n")
    with pytest.raises(ValueError, match=r"set flags\.stream_batching instead"):
        load_settings(config)
    # A partial lock rollout with a global cap is valid: both paths take the pool's slots.
    config.write_text('[flags]\nlock = "50%"\n[lock]\nmax_running = 4\n')
    capped = load_settings(config)
    assert capped.flags.lock == 50.0 and capped.lock.max_running == 4


def test_rollout_is_stable_and_close_to_the_share() -> None:
    ids = [f"session-{i}" for i in range(10_000)]
    for percent in (1.0, 10.0, 50.0, 90.0):
        chosen = [in_rollout("stream_batching", sid, percent) for sid in ids]
        assert abs(sum(chosen) / len(ids) * 100 - percent) <= 2.0
        assert chosen == [in_rollout("stream_batching", sid, percent) for sid in ids]
    # Raising the share only moves sessions onto the optimized path.
    ten = {sid for sid in ids if in_rollout("lock", sid, 10.0)}
    twenty = {sid for sid in ids if in_rollout("lock", sid, 20.0)}
    assert ten < twenty
    # Different flags canary independent slices.
    other = {sid for sid in ids if in_rollout("cancel", sid, 10.0)}
    assert len(ten & other) < len(ten) / 2
    flags = Flags(lock="10%")
    assert {sid for sid in ids if flags.optimized("lock", sid)} == ten


def test_config_command_shows_sources_and_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "a.toml"
    config.write_text('[flags]\ncancel = "poll"\n[broadcast]\nring_max_events = 64\n')
    monkeypatch.setenv("ASYNCSTORE_STORAGE__URL", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("ASYNCSTORE_FLAGS__STREAM_DELIVERY", "10%")
    assert main(["--config", str(config), "config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    shown = json.loads(out)
    assert shown["storage"]["url"] == {"value": "postgresql://u:***@db/x", "source": "env"}
    assert shown["flags"]["stream_delivery"] == {"value": "10%", "source": "env"}
    assert shown["flags"]["cancel"] == {"value": "poll", "source": "file"}
    assert shown["broadcast"]["ring_max_events"] == {"value": 64, "source": "file"}
    assert shown["flags"]["lock"] == {"value": "two_level", "source": "default"}
    assert masked_dump(load_settings(config))["flags"]["cancel"] == "poll"
