"""Issue 13 (webhooks, part a): trigger matching, URL masking, seed 000's examples."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from asyncstore.orchestrator.webhooks import HooksConfigError, masked_dump, parse_hooks
from asyncstore.orchestrator.webhooks.masking import mask_url
from asyncstore.orchestrator.webhooks.transport import Transport
from asyncstore.orchestrator.webhooks.triggers import TriggerMatch, parse_triggers

SLACK = "https://hooks.slack.com/services/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"


def test_contains_matches_one_way_only() -> None:
    # Seed 001: the configured value must contain the trigger's name, never the reverse.
    selected, problems = parse_triggers("on_turn_start,turn_start_hook", TriggerMatch.CONTAINS)
    assert selected == {"turn_start"} and not problems
    selected, problems = parse_triggers("tool", TriggerMatch.CONTAINS)
    assert selected == frozenset()
    (problem,) = problems
    assert "matches no trigger" in problem
    for name in ("pre_tool", "post_tool", "tool_call_start"):
        assert name in problem  # the triggers it was probably meant to be
    selected, _ = parse_triggers("message_received", TriggerMatch.CONTAINS)
    assert selected == {"message"}


def test_contains_filter_that_matches_nothing_is_a_config_error() -> None:
    entry = {"name": "x", "trigger": "tool", "url": "https://a.example/h"}
    with pytest.raises(HooksConfigError, match="'tool' matches no trigger"):
        parse_hooks({"trigger_match": "contains", "webhooks": [entry]})


@pytest.mark.parametrize(
    ("url", "hidden", "kept"),
    [
        (SLACK, ("T0123ABCD", "B0456EFGH", "Xy7Kq2mN9pL4sR8tV1wZ3bC6"), ("services",)),
        (
            "https://discord.com/api/webhooks/112233445566778899/aBcD-eFgH_iJkLmNoPqRsTuVwXyZ",
            ("112233445566778899", "aBcD-eFgH_iJkLmNoPqRsTuVwXyZ"),
            ("/api/webhooks/",),
        ),
        ("https://tok3n:pw@h.example/hook", ("tok3n", "pw"), ("h.example/hook",)),
        ("https://h.example/robot/send?access_token=s3cr3t", ("s3cr3t",), ("/robot/send",)),
        ("https://h.example/api/token/abc/x", ("abc",), ("/api/token/",)),
    ],
)
def test_url_secrets_are_masked_wherever_they_are(
    url: str, hidden: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    masked = mask_url(url)
    for secret in hidden:
        assert secret not in masked
    for part in kept:
        assert part in masked
    assert "***" in masked


def test_path_token_is_masked_in_masked_dump_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_hooks({"webhooks": [{"name": "s", "trigger": "error", "url": SLACK}]})
    assert "Xy7Kq2mN9pL4sR8tV1wZ3bC6" not in str(masked_dump(config))
    Transport(httpx.AsyncClient())  # installs the filter on the httpx logger
    with caplog.at_level(logging.INFO, logger="httpx"):
        logging.getLogger("httpx").info(
            'HTTP Request: %s %s "%s %d %s"', "POST", httpx.URL(SLACK), "HTTP/1.1", 200, "OK"
        )
    assert "Xy7Kq2mN9pL4sR8tV1wZ3bC6" not in caplog.text and "T0123ABCD" not in caplog.text


# Seed 000's three [[async_webhooks]] examples, verbatim.
SEED_000 = {
    "high-frequency": """
[[async_webhooks]]
name = "audit-log"
url = "https://log.example.com/audit"
enabled = true
batch_size = 50
flush_interval_ms = 1000
retries = 3
[async_webhooks.headers]
Authorization = "Bearer AUDIT_TOKEN"
""",
    "low-latency": """
[[async_webhooks]]
name = "realtime-notify"
url = "https://notify.example.com/realtime"
enabled = true
batch_size = 1
flush_interval_ms = 100
""",
    "mixed": """
[[webhooks]]
name = "error-alert"
trigger = "error"
url = "https://alert.example.com/error"
enabled = true

[[async_webhooks]]
name = "audit-log"
url = "https://log.example.com/audit"
enabled = true
batch_size = 20
flush_interval_ms = 1000
""",
}


@pytest.mark.parametrize("example", sorted(SEED_000))
def test_seed_000_examples_fail_saying_exactly_what_to_add(example: str) -> None:
    text = SEED_000[example]
    with pytest.raises(HooksConfigError) as caught:
        parse_hooks(text)
    (problem,) = caught.value.problems
    found = re.search(r"add the line (trigger = \"[^\"]+\")", problem.message)
    assert found, problem.message
    # Adding exactly that line after the entry's name makes the example load.
    name_line = re.search(r'\[\[async_webhooks\]\]\nname = "[^"]+"\n', text)
    assert name_line is not None
    fixed = text.replace(name_line.group(0), name_line.group(0) + found.group(1) + "\n", 1)
    config = parse_hooks(fixed)
    assert config.async_webhooks[0].triggers
