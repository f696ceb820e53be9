"""hooks.toml: loading, defaults, triggers and aliases, env secrets, every problem reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncstore.orchestrator.webhooks import (
    ALIASES,
    EVENT_NAMES,
    TRIGGER_NAMES,
    HooksConfigError,
    load_hooks,
    masked_dump,
    parse_hooks,
)
from asyncstore.orchestrator.webhooks.triggers import TriggerMatch, parse_triggers

SEED = """
[[webhooks]]
name = "custom-api"
description = "send to a custom API"
trigger = "tool_call_start"
url = "https://api.example.com/atomcode/hooks"
method = "POST"
enabled = true
timeout_secs = 15
retries = 3

[webhooks.headers]
Authorization = "Bearer YOUR_TOKEN"
X-Custom-Header = "value"

[[webhooks]]
name = "slack"
trigger = "post_tool"
url = "https://hooks.slack.com/services/XXX"

[[async_webhooks]]
name = "audit-log"
url = "https://log.example.com/audit"
enabled = true
batch_size = 20
flush_interval_ms = 1000
trigger = "turn_complete,error"

[async_webhooks.headers]
Authorization = "Bearer ${AUDIT_TOKEN}"
"""


def test_seed_format_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "hooks.toml"
    path.write_text(SEED)
    config = load_hooks(path, environ={"AUDIT_TOKEN": "t0k"})
    api, slack = config.webhooks
    assert (api.timeout_secs, api.retries, api.triggers) == (15, 3, {"tool_call_start"})
    assert (slack.timeout_secs, slack.retries, slack.method, slack.enabled) == (10, 2, "POST", True)
    (audit,) = config.async_webhooks
    assert (audit.batch_size, audit.flush_interval_ms) == (20, 1000)
    assert audit.triggers == {"turn_complete", "error"}
    assert audit.header_values() == {"Authorization": "Bearer t0k"}
    assert config.source == str(path)


def test_twelve_triggers_with_aliases_and_event_names() -> None:
    assert len(TRIGGER_NAMES) == 12 and len(EVENT_NAMES) == 12
    assert ALIASES == {
        "before_tool": "pre_tool",
        "after_tool": "post_tool",
        "after_turn": "turn_complete",
        "message_received": "message",
    }
    assert EVENT_NAMES["tool_call_start"] == "on_tool_call_start"
    assert EVENT_NAMES["post_tool"] == "post_tool_execution"
    selected, problems = parse_triggers("before_tool, after_turn,error", TriggerMatch.EXACT)
    assert selected == {"pre_tool", "turn_complete", "error"} and problems == []


def test_contains_mode_reproduces_the_seed_rule() -> None:
    selected, problems = parse_triggers("on_turn_start,turn_complete_hook", TriggerMatch.CONTAINS)
    assert selected == {"turn_start", "turn_complete"} and not problems
    selected, _ = parse_triggers("pre_tool,error", TriggerMatch.CONTAINS)
    assert selected == {"pre_tool", "error"}
    _, problems = parse_triggers("bogus", TriggerMatch.CONTAINS)
    assert problems and "did you mean" in problems[0]


def test_unknown_trigger_names_the_nearest_valid_value() -> None:
    with pytest.raises(HooksConfigError) as caught:
        parse_hooks(
            {"webhooks": [{"name": "x", "trigger": "post_tol", "url": "https://a.b"}]},
            source="hooks.toml",
        )
    (problem,) = caught.value.problems
    where = (problem.file, problem.entry, problem.field)
    assert where == ("hooks.toml", "[[webhooks]] 'x' (#1)", "trigger")
    assert "did you mean 'post_tool'" in problem.message
    with pytest.raises(HooksConfigError, match='trigger_match = "contains"'):
        parse_hooks({"webhooks": [{"name": "x", "trigger": "on_turn_start", "url": "https://a"}]})


def test_every_problem_is_reported_with_file_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "hooks.toml"
    path.write_text(
        """
trigger_mach = "exact"
[[webhooks]]
name = "a"
trigger = "pre_tool"
url = "ftp://nope"
timout_secs = 3
[[webhooks]]
name = "a"
trigger = "eror"
url = "https://x/${MISSING}"
retries = -1
[[async_webhooks]]
name = "orphan"
url = "https://x"
batch_size = 0
[[async_webhooks]]
name = "lonely"
url = "https://x"
"""
    )
    with pytest.raises(HooksConfigError) as caught:
        load_hooks(path, environ={})
    found = {(p.entry, p.field) for p in caught.value.problems}
    assert found == {
        ("", "trigger_mach"),
        ("[[webhooks]] 'a' (#1)", "url"),
        ("[[webhooks]] 'a' (#1)", "timout_secs"),
        ("[[webhooks]] 'a' (#2)", "name"),
        ("[[webhooks]] 'a' (#2)", "trigger"),
        ("[[webhooks]] 'a' (#2)", "url"),
        ("[[webhooks]] 'a' (#2)", "retries"),
        ("[[async_webhooks]] 'orphan' (#1)", "batch_size"),
        ("[[async_webhooks]] 'lonely' (#2)", "trigger"),
    }
    assert all(p.file == str(path) for p in caught.value.problems)
    text = str(caught.value)
    assert "did you mean 'timeout_secs'" in text and "MISSING is not set" in text
    assert "did you mean 'error'" in text


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "hooks.toml"
    path.write_text("[[webhooks]\nname=")
    with pytest.raises(HooksConfigError, match="invalid TOML"):
        load_hooks(path)


def test_env_secrets_are_expanded_and_masked() -> None:
    config = parse_hooks(
        """
[[webhooks]]
name = "signed"
trigger = "error"
url = "https://hooks.example/${PATH_TOKEN}?key=abc"
secret = ["${OLD_SECRET}", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
[webhooks.headers]
Authorization = "Bearer literal-token"
X-Api-Key = "${API_KEY}"
X-Trace = "on"
""",
        environ={
            "PATH_TOKEN": "p4th",
            "OLD_SECRET": "whsec_dGVzdHNlY3JldA==",
            "API_KEY": "k3y",
        },
    )
    (hook,) = config.webhooks
    assert hook.url == "https://hooks.example/p4th?key=abc"
    assert len(hook.signing_keys) == 2
    dumped = masked_dump(config)["webhooks"][0]
    # The template; a literal query value is masked even there.
    assert dumped["url"] == "https://hooks.example/${PATH_TOKEN}?key=***"
    assert dumped["headers"] == {
        "Authorization": "***",
        "X-Api-Key": "*** (from ${API_KEY})",
        "X-Trace": "on",
    }
    assert dumped["secret"] == ["***", "***"]
    shown = str(masked_dump(config)) + repr(config)
    for leaked in ("literal-token", "k3y", "p4th", "dGVzdHNlY3JldA", "MfKQ9r8"):
        assert leaked not in shown


def test_plain_url_query_values_are_masked() -> None:
    config = parse_hooks(
        {
            "webhooks": [
                {
                    "name": "d",
                    "trigger": "error",
                    "url": "https://u:pw@oapi.example/robot/send?access_token=XXX",
                }
            ]
        }
    )
    assert masked_dump(config)["webhooks"][0]["url"] == (
        "https://***@oapi.example/robot/send?access_token=***"  # the user name may be a token
    )


def test_async_trigger_set_twice_is_an_error() -> None:
    with pytest.raises(HooksConfigError, match=r"\[\[webhooks\]\] entry only"):
        parse_hooks(
            {
                "async_webhooks": [{"name": "a", "url": "https://x", "trigger": "error"}],
                "webhooks": [{"name": "a", "url": "https://x", "trigger": "error"}],
            }
        )
