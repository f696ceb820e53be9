"""Settings sources and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncstore.orchestrator.cli import main
from asyncstore.orchestrator.config import load_settings, mask_url, masked_dump


def test_env_overrides_toml_which_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "asyncstore.toml"
    config.write_text('[storage]\nurl = "sqlite:///from-file.db"\npool_max_size = 7\n')
    monkeypatch.delenv("ASYNCSTORE_STORAGE__URL", raising=False)
    from_file = load_settings(config)
    assert from_file.storage.url.get_secret_value() == "sqlite:///from-file.db"
    assert from_file.storage.pool_max_size == 7
    assert from_file.storage.pool_min_size == 2
    monkeypatch.setenv("ASYNCSTORE_STORAGE__POOL_MAX_SIZE", "3")
    assert load_settings(config).storage.pool_max_size == 3
    assert load_settings().storage.url.get_secret_value() == "sqlite:///asyncstore.db"


def test_bad_settings_are_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[storage]\npool_max_size = 0\nnot_a_field = 1\n")
    with pytest.raises(ValueError, match="pool_max_size"):
        load_settings(config)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_secrets_are_masked() -> None:
    assert mask_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
    dumped = masked_dump(load_settings(storage={"url": "postgresql://u:hunter2@h/db"}))
    assert "hunter2" not in str(dumped) and dumped["storage"]["url"].startswith("postgresql://u:")


def test_cli_migrate_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["migrate", "--url", url]) == 0
    assert "applied migrations [1, 2" in capsys.readouterr().out
    assert main(["migrate", "--url", url]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["migrate", "--url", "mysql://nope"]) == 2
    assert "unsupported storage URL scheme" in capsys.readouterr().err
    assert main(["config"]) == 0
    assert '"storage"' in capsys.readouterr().out


def test_cli_demo_walks_the_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", f"sqlite:///{tmp_path / 'demo.db'}"]) == 0
    out = capsys.readouterr().out
    assert "streamed 6 events in one batch (retry stored 0)" in out
    assert "session deleted: True" in out


def test_cli_webhooks_log_and_resend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    assert main(["migrate", "--url", url]) == 0
    assert main(["webhooks", "log", "--url", url, "--endpoint", "ledger", "--failed"]) == 0
    assert "no delivery attempts not delivered" in capsys.readouterr().out
    assert main(["webhooks", "resend", "msg_nope", "--url", url]) == 1
    assert "no delivery 'msg_nope'" in capsys.readouterr().err
