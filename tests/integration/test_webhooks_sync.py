"""Synchronous webhooks against a real local receiver: decisions, retries, failure modes."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest

from asyncstore.orchestrator.timing import ManualClock
from asyncstore.orchestrator.webhooks import HooksConfig, masked_dump, open_webhooks, parse_hooks
from asyncstore.orchestrator.webhooks.sync import HookDecision
from asyncstore.orchestrator.webhooks.testing import Answer, ReceivedRequest, open_test_receiver


def hooks(*entries: dict[str, Any], **options: Any) -> HooksConfig:
    return parse_hooks({**options, "webhooks": list(entries)}, environ={})


def hook(name: str, url: str, trigger: str = "pre_tool", **extra: Any) -> dict[str, Any]:
    return {"name": name, "trigger": trigger, "url": url, **extra}


def by_path(answers: dict[str, Answer]) -> Any:
    def handler(request: ReceivedRequest) -> Answer:
        return answers[request.path]

    return handler


async def test_ok_decision_continues_and_sends_seed_request_shape() -> None:
    async with open_test_receiver() as rx:
        config = hooks(hook("audit", rx.url + "/a", trigger="post_tool"))
        async with open_webhooks(config) as webhooks:
            decision = await webhooks.fire(
                "after_tool", {"tool_name": "edit_file"}, result={"success": True}
            )
    assert decision.action == "ok" and decision.allowed and not decision.warnings
    body = rx.requests[0].json()
    assert body == {
        "hook_name": "audit",
        "trigger": "post_tool",
        "event": "post_tool_execution",
        "hook_context": {"tool_name": "edit_file"},
        "result_context": {"success": True},
    }
    assert rx.requests[0].headers["webhook-id"].startswith("msg_")


async def test_each_decision_type_and_their_combination() -> None:
    answers = {
        "/ok": Answer(body={"result": "ok"}),
        "/warn": Answer(body={"result": "warning", "message": "slow tool"}),
        # The first modify answers last: registration order decides, not arrival order.
        "/mod1": Answer(body={"result": "modify", "modified_content": "one"}, delay_s=0.2),
        "/mod2": Answer(body={"result": "modify", "modified_content": "two"}),
        "/deny": Answer(body={"result": "deny", "message": "rm -rf"}),
    }
    async with open_test_receiver(by_path(answers)) as rx:

        def entry(path: str) -> dict[str, Any]:
            return hook(path.strip("/"), rx.url + path)

        singles = {p: hooks(entry(p)) for p in answers}
        results = {}
        for path, config in singles.items():
            async with open_webhooks(config) as webhooks:
                results[path] = await webhooks.fire("pre_tool", {"tool_args": "{}"})
        assert results["/ok"].action == "ok"
        assert results["/warn"].action == "warning"
        assert results["/warn"].warnings == ("warn: warning: slow tool",)
        assert results["/deny"].denied and results["/deny"].deny_messages == ("deny: rm -rf",)
        assert results["/mod1"].modified_content == "one"

        mods = hooks(entry("/mod1"), entry("/mod2"), entry("/ok"), entry("/warn"))
        async with open_webhooks(mods) as webhooks:
            decision = await webhooks.fire("pre_tool", {})
        assert decision.action == "modify" and decision.modified_content == "two"
        assert len(decision.warnings) == 1 and not decision.denied

        everything = hooks(*(entry(p) for p in answers))
        async with open_webhooks(everything) as webhooks:
            decision = await webhooks.fire("pre_tool", {})
        assert decision.denied and decision.modified_content is None  # any deny wins
        assert [o.hook for o in decision.outcomes] == ["ok", "warn", "mod1", "mod2", "deny"]


async def test_deny_outside_pre_tool_counts_as_warning() -> None:
    async with (
        open_test_receiver(lambda r: Answer(body={"result": "deny"})) as rx,
        open_webhooks(hooks(hook("d", rx.url, trigger="post_tool"))) as webhooks,
    ):
        decision = await webhooks.fire("post_tool", {})
    assert decision.allowed and decision.action == "warning"


async def test_hooks_are_called_concurrently() -> None:
    async with open_test_receiver(lambda r: Answer(delay_s=0.4)) as rx:
        config = hooks(*(hook(f"h{i}", f"{rx.url}/{i}") for i in range(4)))
        async with open_webhooks(config) as webhooks:
            started = time.monotonic()
            decision = await webhooks.fire("pre_tool", {})
            elapsed = time.monotonic() - started
    assert decision.action == "ok" and len(rx.requests) == 4
    assert elapsed < 1.2  # sequential would take 1.6 s


async def test_retries_back_off_100_200_ms_with_one_delivery_id() -> None:
    clock = ManualClock()
    decisions: list[HookDecision] = []
    async with (
        open_test_receiver(lambda r: Answer(status=500, body=b"oops")) as rx,
        open_webhooks(hooks(hook("flaky", rx.url, retries=2)), clock=clock) as webhooks,
    ):

        async def fire() -> None:
            decisions.append(await webhooks.fire("pre_tool", {}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(fire)
            for sent, backoff_s in ((1, 0.1), (2, 0.2)):
                await clock.wait_sleepers(1)  # attempt `sent` failed: the hook backs off
                assert len(rx.requests) == sent
                clock.advance(backoff_s * 0.99)
                await anyio.wait_all_tasks_blocked()
                assert clock.sleepers == 1 and len(rx.requests) == sent  # not yet
                clock.advance(backoff_s * 0.02)  # the retry is due
    (decision,) = decisions
    assert len(rx.requests) == 3
    assert len({r.headers["webhook-id"] for r in rx.requests}) == 1
    assert decision.allowed and decision.action == "warning"
    assert decision.outcomes[0].result == "error" and decision.outcomes[0].attempts == 3


async def test_retry_then_success_uses_the_answer() -> None:
    async with open_test_receiver() as rx:
        rx.handler = lambda r: (
            Answer(status=503) if len(rx.requests) < 2 else Answer(body={"result": "deny"})
        )
        config = hooks(hook("h", rx.url, "tool_call_start", retries=3))
        async with open_webhooks(config) as webhooks:
            decision = await webhooks.fire("tool_call_start", {})
    assert decision.denied and decision.outcomes[0].attempts == 2


async def test_timeout_is_fail_open_by_default() -> None:
    async with open_test_receiver(lambda r: Answer(delay_s=2.0)) as rx:
        config = hooks(hook("slow", rx.url, timeout_secs=0.2, retries=1))
        async with open_webhooks(config) as webhooks:
            started = time.monotonic()
            decision = await webhooks.fire("pre_tool", {})
            elapsed = time.monotonic() - started
    assert decision.allowed and decision.action == "warning"
    assert "no answer within" in decision.warnings[0]
    assert len(rx.requests) == 2 and elapsed < 1.5


async def test_fail_closed_denies_pre_hooks_only() -> None:
    async with open_test_receiver(lambda r: Answer(status=500)) as rx:
        config = hooks(
            hook("guard", rx.url, trigger="pre_tool,post_tool", retries=0, fail_closed=True)
        )
        async with open_webhooks(config) as webhooks:
            pre = await webhooks.fire("before_tool", {})
            post = await webhooks.fire("post_tool", {})
    assert pre.denied and "fail_closed" in pre.deny_messages[0]
    assert post.allowed and post.action == "warning"


async def test_unreachable_hook_never_breaks_the_caller() -> None:
    async with open_test_receiver() as rx:
        dead_url = rx.url  # the port is closed once the receiver is gone
    async with open_webhooks(hooks(hook("gone", dead_url, retries=1))) as webhooks:
        decision = await webhooks.fire("pre_tool", {})
    assert decision.allowed and decision.action == "warning"


@pytest.mark.parametrize(
    "answer",
    [
        Answer(body=b"not json"),
        Answer(body={"result": "maybe"}),
        Answer(body=b"[1, 2]"),
        Answer(body={"result": "modify"}),
    ],
)
async def test_undocumented_answers_are_warnings(answer: Answer) -> None:
    async with (
        open_test_receiver(lambda r: answer) as rx,
        open_webhooks(hooks(hook("odd", rx.url))) as webhooks,
    ):
        decision = await webhooks.fire("pre_tool", {})
    assert decision.action == "warning" and len(rx.requests) == 1  # not retried


async def test_response_body_read_is_capped() -> None:
    big = b'{"result": "ok", "pad": "' + b"x" * 200_000 + b'"}'
    async with open_test_receiver(lambda r: Answer(body=big)) as rx:
        config = hooks(hook("big", rx.url), max_response_bytes=1024)
        async with open_webhooks(config) as webhooks:
            decision = await webhooks.fire("pre_tool", {})
    assert decision.action == "warning" and "max_response_bytes" in decision.warnings[0]


async def test_trigger_matching_exact_alias_contains_and_disabled() -> None:
    async with open_test_receiver() as rx:
        config = hooks(
            hook("exact", rx.url + "/exact", trigger="turn_start"),
            hook("alias", rx.url + "/alias", trigger="message_received, error"),
            hook("legacy", rx.url + "/legacy", trigger="on_turn_start", trigger_match="contains"),
            hook("off", rx.url + "/off", trigger="turn_start", enabled=False),
        )
        async with open_webhooks(config) as webhooks:
            assert webhooks.hooks_for("turn_start") == ["exact", "legacy"]
            assert webhooks.hooks_for("message") == ["alias"]
            assert webhooks.hooks_for("session_end") == []
            await webhooks.fire("turn_start", {})
            await webhooks.fire("error", {})
            with pytest.raises(ValueError, match="unknown trigger"):
                await webhooks.fire("turn_strat", {})
    assert sorted(r.path for r in rx.requests) == ["/alias", "/exact", "/legacy"]
    assert {r.json()["event"] for r in rx.requests} == {"on_turn_start", "on_error"}


async def test_private_destinations_are_refused_when_configured() -> None:
    async with open_test_receiver() as rx:
        url = rx.url.replace("127.0.0.1", "localhost")
        config = hooks(hook("tenant", url, retries=2), refuse_private_destinations=True)
        async with open_webhooks(config) as webhooks:
            decision = await webhooks.fire("pre_tool", {})
    assert rx.requests == [] and decision.action == "warning"
    assert "private" in decision.warnings[0]
    assert decision.outcomes[0].attempts == 1  # a refusal is not retried


async def test_secrets_and_authorization_never_logged_or_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "tok-very-secret-123"
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    caplog.set_level(logging.DEBUG)
    async with open_test_receiver(lambda r: Answer(status=500)) as rx:
        config = parse_hooks(
            {
                "webhooks": [
                    {
                        "name": "auth",
                        "trigger": "pre_tool",
                        "url": rx.url + "/h?access_token=${URL_TOKEN}",
                        "retries": 1,
                        "secret": "${HOOK_SECRET}",
                        "headers": {"Authorization": "Bearer ${TOKEN}", "X-Team": "core"},
                    }
                ]
            },
            environ={"TOKEN": token, "HOOK_SECRET": secret, "URL_TOKEN": "urltok-42"},
        )
        async with open_webhooks(config) as webhooks:
            await webhooks.fire("pre_tool", {})
    assert rx.requests[0].headers["authorization"] == f"Bearer {token}"
    assert "webhook-signature" in rx.requests[0].headers
    shown = str(masked_dump(config)) + repr(config) + str(config) + caplog.text
    for leaked in (token, secret, secret[6:], "urltok-42"):
        assert leaked not in shown
    dumped = masked_dump(config)["webhooks"][0]
    assert dumped["headers"] == {"Authorization": "*** (from ${TOKEN})", "X-Team": "core"}
    assert dumped["secret"] == ["***"]
    assert "Hook Warning" in caplog.text  # failures are logged, without the secrets


async def test_cancelled_fire_abandons_requests() -> None:
    async with (
        open_test_receiver(lambda r: Answer(delay_s=5)) as rx,
        open_webhooks(hooks(hook("slow", rx.url))) as webhooks,
    ):
        with anyio.move_on_after(0.3) as scope:
            await webhooks.fire("pre_tool", {})
    assert scope.cancelled_caught


async def test_open_circuit_spares_callers_the_timeout_of_a_down_receiver() -> None:
    async with open_test_receiver(lambda r: Answer(delay_s=30)) as rx:
        config = parse_hooks(
            {
                "webhooks": [
                    {
                        "name": "slow",
                        "url": rx.url,
                        "trigger": "post_tool",
                        "timeout_secs": 0.2,
                        "retries": 0,
                    }
                ],
                "circuit_breaker": {"failure_threshold": 3, "reset_timeout_secs": 60},
            },
            environ={},
        )
        async with open_webhooks(config) as webhooks:
            decisions = [await webhooks.fire("post_tool", {"i": i}) for i in range(8)]
    assert len(rx.requests) == 3  # the other five calls failed at once, without a request
    assert all(d.action == "warning" for d in decisions)
    assert all("circuit open" in d.warnings[0] for d in decisions[3:])
