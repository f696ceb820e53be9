"""Synchronous webhooks: one request per matching hook, answers combined into a decision.

A ``WebhookHook`` POSTs the seed's request JSON and reads the documented answer
(``{"result": "ok" | "warning" | "deny" | "modify", "message", "modified_content"}``),
retrying with 100 ms, 200 ms, 400 ms, ... between attempts (none while the receiver's
circuit is open: the call fails at once). A hook that errors, times out or answers
anything else becomes a warning (fail-open), or a deny on pre_tool /
tool_call_start when configured ``fail_closed = true``. ``combine`` folds the outcomes of
one fire into a ``HookDecision``. Relies on the transport; never logs headers or URLs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock
from asyncstore.orchestrator.webhooks.config import WebhookConfig
from asyncstore.orchestrator.webhooks.signing import delivery_id
from asyncstore.orchestrator.webhooks.transport import DeliveryFailed, Transport
from asyncstore.orchestrator.webhooks.triggers import DENY_TRIGGERS, EVENT_NAMES

__all__ = ["HookDecision", "HookOutcome", "WebhookHook", "combine"]

log = logging.getLogger("asyncstore.webhooks")

_RESULTS = frozenset({"ok", "warning", "deny", "modify"})
# 100 ms doubling, no jitter (one caller waits; there is no crowd to spread). Uncapped as it
# always was: the cap is the step of the 20th retry, the most a hook may configure.
_BACKOFF = Backoff(0.1, 52_428.8, jitter=0)


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """What one hook answered for one fire (after retries)."""

    hook: str
    result: str  # ok, warning, deny, modify, or "error" when no valid answer came
    message: str
    modified_content: str | None
    attempts: int
    delivery_id: str
    status: int | None = None  # the last HTTP status, if any
    queued: bool = False  # routed through an async batcher: nothing was awaited
    overflow: bool = False  # the batcher stayed full and no outbox took the event (counted)
    spilled: bool = False  # the batcher stayed full; the event went to the outbox instead


@dataclass(frozen=True, slots=True)
class HookDecision:
    """The combined answer of every hook that matched one fire.

    ``denied``: some hook denied (only pre_tool / tool_call_start; elsewhere a deny is a
    warning). ``modified_content``: the new tool arguments when some hook answered
    ``modify`` and none denied (the last in registration order wins). ``warnings`` holds
    one line per warning, deny elsewhere, or failed hook.
    """

    trigger: str
    denied: bool
    deny_messages: tuple[str, ...]
    warnings: tuple[str, ...]
    modified_content: str | None
    outcomes: tuple[HookOutcome, ...]

    @property
    def allowed(self) -> bool:
        return not self.denied

    @property
    def action(self) -> str:
        """``deny``, ``modify``, ``warning`` or ``ok``, in that precedence."""
        if self.denied:
            return "deny"
        if self.modified_content is not None:
            return "modify"
        return "warning" if self.warnings else "ok"


def combine(trigger: str, outcomes: Sequence[HookOutcome]) -> HookDecision:
    """Fold outcomes given in registration order: any deny wins, modifies apply in order."""
    can_deny = trigger in DENY_TRIGGERS
    denies: list[str] = []
    warnings: list[str] = []
    modified: str | None = None
    for o in outcomes:
        if o.result == "deny" and can_deny:
            denies.append(f"{o.hook}: {o.message}" if o.message else o.hook)
        elif o.result in ("warning", "error", "deny"):
            kind = "deny ignored on this trigger" if o.result == "deny" else o.result
            warnings.append(f"{o.hook}: {kind}: {o.message}" if o.message else f"{o.hook}: {kind}")
        elif o.result == "modify":
            modified = o.modified_content
    return HookDecision(
        trigger,
        bool(denies),
        tuple(denies),
        tuple(warnings),
        None if denies else modified,
        tuple(outcomes),
    )


def request_body(
    hook: WebhookConfig,
    trigger: str,
    context: Mapping[str, Any],
    result: Mapping[str, Any] | None,
) -> bytes:
    """The seed's request JSON for ``trigger`` (a canonical name)."""
    body: dict[str, Any] = {
        "hook_name": hook.name,
        "trigger": hook.trigger,
        "event": EVENT_NAMES[trigger],
        "hook_context": context,
    }
    if result is not None:
        body["result_context"] = result
    return orjson.dumps(body)


class WebhookHook:
    """One ``[[webhooks]]`` entry delivering synchronously through a shared transport."""

    def __init__(
        self, config: WebhookConfig, transport: Transport, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config
        self._clock = clock
        self.name = config.name
        self._transport = transport
        self._keys = config.signing_keys
        self._headers = config.header_values()
        self.requests = 0  # HTTP requests sent, retries included

    async def call(
        self,
        trigger: str,
        context: Mapping[str, Any],
        result: Mapping[str, Any] | None = None,
    ) -> HookOutcome:
        """Deliver one request (with retries) and return the hook's outcome; never raises.

        Every attempt carries the same ``webhook-id``. A failure after the last retry is an
        ``error`` outcome, or ``deny`` on a deny trigger when ``fail_closed``. If
        cancelled, the request in flight is abandoned and the cancellation propagates.
        """
        cfg = self.config
        body = request_body(cfg, trigger, context, result)
        msg_id = delivery_id()
        status: int | None = None
        error = ""
        attempt = 0
        retry_after = 0.0
        for attempt in range(1, cfg.retries + 2):
            if attempt > 1:
                # 100 ms, 200 ms, 400 ms, ... or the receiver's Retry-After if longer
                # (bounded by the hook's timeout: a caller is waiting).
                await self._clock.sleep(max(_BACKOFF.delay(attempt - 1), retry_after))
            self.requests += 1
            try:
                reply = await self._transport.send(
                    cfg.method,
                    cfg.url,
                    body,
                    msg_id=msg_id,
                    headers=self._headers,
                    keys=self._keys,
                    timeout_s=cfg.timeout_secs,
                )
            except DeliveryFailed as exc:
                error = str(exc)
                log.warning("[Hook Warning] %s: %s at attempt %d", cfg.name, error, attempt)
                if not exc.retryable or exc.retry_in_s is not None:
                    # Refused, or the receiver's circuit is open: a caller is waiting, and
                    # no retry within this call can succeed.
                    break
                continue
            status = reply.status
            if not 200 <= reply.status < 300:
                error = f"HTTP {reply.status}"
                log.warning("[Hook Warning] %s: %s at attempt %d", cfg.name, error, attempt)
                retry_after = min(reply.retry_after_s or 0.0, cfg.timeout_secs)
                if 400 <= reply.status < 500 and reply.status not in (408, 425, 429):
                    break  # the receiver rejected the request itself: retrying cannot help
                continue
            parsed = _parse_answer(reply.body, reply.truncated)
            if isinstance(parsed, str):
                error = parsed  # an answer, but not the documented one: not retried
                log.warning("[Hook Warning] %s: %s", cfg.name, error)
                break
            verdict, message, content = parsed
            return HookOutcome(cfg.name, verdict, message, content, attempt, msg_id, status)
        failed = "deny" if cfg.fail_closed and trigger in DENY_TRIGGERS else "error"
        message = error if failed == "error" else f"fail_closed: {error}"
        return HookOutcome(cfg.name, failed, message, None, attempt, msg_id, status)


def _parse_answer(body: bytes, truncated: bool) -> tuple[str, str, str | None] | str:
    if truncated:
        return "answer larger than max_response_bytes"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "answer is not JSON"
    if not isinstance(data, dict):
        return "answer is not a JSON object"
    verdict = data.get("result")
    if verdict not in _RESULTS:
        return f"answer has no valid result (got {str(verdict)[:40]!r})"
    message = data.get("message") or ""
    content = data.get("modified_content")
    if not isinstance(message, str):
        message = str(message)
    if verdict == "modify":
        if content is None:
            return "modify without modified_content"
        if not isinstance(content, str):
            content = orjson.dumps(content).decode()
    return str(verdict), message[:1000], content if verdict == "modify" else None
