"""hooks.toml: the frozen, validated configuration of synchronous and asynchronous webhooks.

``load_hooks(path)`` reads the seed's format (``[[webhooks]]`` and ``[[async_webhooks]]``,
plus optional top-level options), expands ``${VAR}`` references from the environment in
URLs, header values and secrets, validates every entry with pydantic and raises one
``HooksConfigError`` listing every problem with its file, entry and field. ``masked_dump``
is the representation safe to print: secrets and credential headers never appear in it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asyncstore.orchestrator.batching import OverflowPolicy
from asyncstore.orchestrator.timing import Backoff
from asyncstore.orchestrator.webhooks.breaker import BreakerConfig
from asyncstore.orchestrator.webhooks.errors import ConfigProblem, HooksConfigError
from asyncstore.orchestrator.webhooks.masking import mask_url
from asyncstore.orchestrator.webhooks.signing import decode_secret
from asyncstore.orchestrator.webhooks.triggers import TriggerMatch, parse_triggers

__all__ = [
    "AsyncWebhookConfig",
    "DurableRetry",
    "HooksConfig",
    "WebhookConfig",
    "load_hooks",
    "masked_dump",
    "parse_hooks",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Seed 000's example batch carries tool_call_start and post_tool events: what an audit log
# batches. Suggested, with the exact line to add, when an async entry receives nothing.
_SUGGESTED_TRIGGERS = "tool_call_start,post_tool"
_SENSITIVE = ("auth", "token", "secret", "key", "cookie", "signature", "password", "session")


class _Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    url: str = Field(repr=False)  # may hold a token in its path or query
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    enabled: bool = True
    timeout_secs: float = Field(default=10.0, gt=0, le=600)
    retries: int = Field(default=2, ge=0, le=20)
    secret: tuple[SecretStr, ...] = Field(
        default=(), description="whsec_ secrets; several while rotating keys"
    )
    # Original text of values that referenced ${VAR}s, for the masked dump (no values).
    templates: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("method"), str):
                data["method"] = data["method"].upper()
            if isinstance(data.get("secret"), str):
                data["secret"] = (data["secret"],)
        return data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return url

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for secret in secrets:
            decode_secret(secret.get_secret_value())
        return secrets

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The decoded keys of ``secret`` (one signature each)."""
        return tuple(decode_secret(s.get_secret_value()) for s in self.secret)

    def header_values(self) -> dict[str, str]:
        """The configured headers with their real values, for the HTTP request only."""
        return {k: v.get_secret_value() for k, v in self.headers.items()}


def _check_triggers(trigger: str, info: ValidationInfo) -> None:
    match = info.data.get("trigger_match", TriggerMatch.EXACT)
    _, problems = parse_triggers(trigger, TriggerMatch(match))
    if problems:
        raise ValueError("; ".join(problems))


class WebhookConfig(_Endpoint):
    """One ``[[webhooks]]`` entry: a synchronous hook whose answer can steer the caller."""

    trigger_match: TriggerMatch = TriggerMatch.EXACT
    trigger: str
    fail_closed: bool = Field(
        default=False, description="a failing hook denies pre_tool / tool_call_start"
    )
    triggers: frozenset[str] = Field(default=frozenset(), exclude=True)

    @field_validator("trigger")
    @classmethod
    def _check_trigger(cls, trigger: str, info: ValidationInfo) -> str:
        _check_triggers(trigger, info)
        return trigger

    @model_validator(mode="after")
    def _resolve_triggers(self) -> Self:
        selected, _ = parse_triggers(self.trigger, self.trigger_match)
        object.__setattr__(self, "triggers", selected)
        return self


class AsyncWebhookConfig(_Endpoint):
    """One ``[[async_webhooks]]`` entry: events are queued and POSTed in batches."""

    retries: int = Field(default=5, ge=0, le=20)
    batch_size: int = Field(default=10, ge=1, le=10_000)
    flush_interval_ms: int = Field(default=1000, ge=1, le=3_600_000)
    capacity: int = Field(default=10_000, ge=1, description="events buffered in memory")
    overflow: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    block_timeout_ms: int = Field(
        default=50,
        ge=0,
        le=60_000,
        description="how long fire() waits for room for an event that is never dropped "
        "(critical triggers, overflow = block); then it spills to the outbox or is counted",
    )
    shutdown_timeout_secs: float = Field(default=10.0, gt=0)
    durable: bool = Field(default=False, description="persist through the outbox first")
    durable_mode: Literal["journal", "direct"] = Field(
        default="journal",
        description="journal: each event is committed alone (group commit) and batched for "
        "HTTP as usual; direct (the previous behaviour): each fire writes its own batch row",
    )
    trigger_match: TriggerMatch = TriggerMatch.EXACT
    trigger: str | None = Field(
        default=None, description="only when no [[webhooks]] entry of the same name exists"
    )
    triggers: frozenset[str] = Field(default=frozenset(), exclude=True)

    @field_validator("trigger")
    @classmethod
    def _check_trigger(cls, trigger: str | None, info: ValidationInfo) -> str | None:
        if trigger is not None:
            _check_triggers(trigger, info)
        return trigger

    @model_validator(mode="after")
    def _check_batching(self) -> Self:
        if self.capacity < self.batch_size:
            raise ValueError(f"capacity ({self.capacity}) must be >= batch_size")
        if self.trigger is not None:
            selected, _ = parse_triggers(self.trigger, self.trigger_match)
            object.__setattr__(self, "triggers", selected)
        return self


class DurableRetry(BaseModel):
    """``[durable_retry]``: how durable rows (and spilled events) are retried by the relay.

    Capped exponential: ``first_delay_secs``, doubled after each failed attempt up to
    ``max_delay_secs``, each jittered down by up to ``jitter``; a row is dead after
    ``max_attempts``. The defaults retry for about two hours (1 s ... 10 min).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_delay_secs: float = Field(default=1.0, gt=0, le=3600)
    max_delay_secs: float = Field(default=600.0, gt=0, le=86_400)
    max_attempts: int = Field(default=20, ge=1, le=10_000)
    jitter: float = Field(default=0.2, ge=0, le=1)
    orphan_after_secs: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="a journaled event not batched by its owner within this is taken over",
    )

    @property
    def backoff(self) -> Backoff:
        """The policy: ``first_delay_secs`` doubling to ``max_delay_secs``, a fraction
        ``jitter`` of each step random (so jittered down by up to ``jitter``)."""
        first = min(self.first_delay_secs, self.max_delay_secs)
        return Backoff(first, self.max_delay_secs, jitter=self.jitter)

    def delays_s(self) -> tuple[float, ...]:
        """The un-jittered delay after each failed attempt (the last one repeats)."""
        policy = self.backoff
        delays: list[float] = []
        while (step := policy.step(len(delays) + 1)) < self.max_delay_secs:
            if len(delays) >= self.max_attempts:
                break
            delays.append(step)
        delays.append(self.max_delay_secs)
        return tuple(delays)

    def budget_s(self) -> float:
        """Seconds from the first attempt to the last, before jitter."""
        delays = self.delays_s()
        steps = self.max_attempts - 1
        return sum(delays[min(i, len(delays) - 1)] for i in range(steps))


class HooksConfig(BaseModel):
    """A whole hooks file: its entries in file order and the file-level options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    webhooks: tuple[WebhookConfig, ...] = ()
    async_webhooks: tuple[AsyncWebhookConfig, ...] = ()
    trigger_match: TriggerMatch = TriggerMatch.EXACT
    refuse_private_destinations: bool = Field(
        default=False, description="refuse URLs resolving to private/loopback/link-local"
    )
    max_response_bytes: int = Field(default=65_536, ge=256, description="response bytes read")
    retry_after_max_secs: float = Field(default=60.0, ge=0, description="Retry-After ceiling")
    durable_retry: DurableRetry = DurableRetry()
    delivery_log: bool = Field(
        default=True, description="log every durable delivery attempt (webhooks log / resend)"
    )
    circuit_breaker: BreakerConfig = BreakerConfig()
    source: str = "<memory>"


_TOP_LEVEL = set(HooksConfig.model_fields) - {"webhooks", "async_webhooks", "source"}


def load_hooks(path: str | Path, *, environ: Mapping[str, str] | None = None) -> HooksConfig:
    """Read and validate a hooks file; ``HooksConfigError`` lists every problem found.

    ``environ`` (default ``os.environ``) supplies the ``${VAR}`` references.
    """
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise HooksConfigError([ConfigProblem(source, "", "", f"cannot read: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise HooksConfigError([ConfigProblem(source, "", "", f"invalid TOML: {exc}")]) from None
    return parse_hooks(data, source=source, environ=environ)


def parse_hooks(
    data: Mapping[str, Any] | str,
    *,
    source: str = "<string>",
    environ: Mapping[str, str] | None = None,
) -> HooksConfig:
    """Validate hooks given as TOML text or parsed data; see ``load_hooks``."""
    env = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    if isinstance(data, str):
        try:
            data = tomllib.loads(data)
        except tomllib.TOMLDecodeError as exc:
            problem = ConfigProblem(source, "", "", f"invalid TOML: {exc}")
            raise HooksConfigError([problem]) from None
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("webhooks", "async_webhooks"):
            continue
        if key in _TOP_LEVEL:
            options[key] = value
        else:
            problems.append(ConfigProblem(source, "", key, _unknown_field(key, _TOP_LEVEL)))
    default_match = options.get("trigger_match", TriggerMatch.EXACT)
    sections: dict[str, list[Any]] = {}
    for section, model in (("async_webhooks", AsyncWebhookConfig), ("webhooks", WebhookConfig)):
        raw = data.get(section, [])
        if not isinstance(raw, list):
            problems.append(ConfigProblem(source, "", section, f"use [[{section}]] tables"))
            continue
        seen: set[str] = set()
        entries: list[Any] = []
        for number, entry in enumerate(raw, 1):
            label = _label(section, entry, number)
            if not isinstance(entry, dict):
                problems.append(ConfigProblem(source, label, "", "must be a table"))
                continue
            raw_name = entry.get("name")
            if isinstance(raw_name, str) and raw_name in seen:
                problems.append(ConfigProblem(source, label, "name", "duplicate name"))
            seen.add(str(raw_name))
            prepared = _expand(entry, env, source, label, problems)
            prepared.setdefault("trigger_match", default_match)
            try:
                validated = model.model_validate(prepared)
            except ValidationError as exc:
                problems.extend(_problems(exc, source, label, model))
                continue
            entries.append(validated)
        sections[section] = entries
    sync_names = {w.name for w in sections.get("webhooks", [])}
    raw_async = data.get("async_webhooks", [])
    numbers = {
        e.get("name"): n
        for n, e in enumerate(raw_async if isinstance(raw_async, list) else [], 1)
        if isinstance(e, dict)
    }
    for hook in sections.get("async_webhooks", []):
        label = _label("async_webhooks", {"name": hook.name}, numbers[hook.name])
        if hook.trigger is None and hook.name not in sync_names:
            problems.append(
                ConfigProblem(
                    source,
                    label,
                    "trigger",
                    "receives no events. To batch events for it, add the line "
                    f'trigger = "{_SUGGESTED_TRIGGERS}" (the triggers it should batch, '
                    "comma-separated) after its name, or add a [[webhooks]] entry with "
                    f"name = {hook.name!r} and a trigger (it then routes through this batcher)",
                )
            )
        elif hook.trigger is not None and hook.name in sync_names:
            problems.append(
                ConfigProblem(
                    source, label, "trigger", "set the trigger in the [[webhooks]] entry only"
                )
            )
    try:
        config = HooksConfig.model_validate(
            {
                **options,
                "webhooks": sections.get("webhooks", []),
                "async_webhooks": sections.get("async_webhooks", []),
                "source": source,
            }
        )
    except ValidationError as exc:
        problems.extend(_problems(exc, source, "", HooksConfig))
        raise HooksConfigError(problems) from None
    if problems:
        raise HooksConfigError(problems)
    return config


def _label(section: str, entry: object, number: int) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    if isinstance(name, str) and name:
        return f"[[{section}]] {name!r} (#{number})"
    return f"[[{section}]] #{number}"


def _substitute(text: str, env: Mapping[str, str], report: list[str]) -> str:
    def one(match: re.Match[str]) -> str:
        value = env.get(match.group(1))
        if value is None:
            report.append(match.group(1))
            return ""
        return value

    return _VAR.sub(one, text)


def _expand(
    entry: dict[str, Any],
    env: Mapping[str, str],
    source: str,
    label: str,
    problems: list[ConfigProblem],
) -> dict[str, Any]:
    """Replace ${VAR} in url, header values and secrets; remember the templates."""
    out = dict(entry)
    templates: dict[str, str] = {}

    def expand(field: str, value: object) -> object:
        if not isinstance(value, str) or not _VAR.search(value):
            return value
        missing: list[str] = []
        result = _substitute(value, env, missing)
        for name in missing:
            problems.append(
                ConfigProblem(source, label, field, f"environment variable {name} is not set")
            )
        templates[field] = value
        return result

    if "url" in out:
        out["url"] = expand("url", out["url"])
    if isinstance(out.get("headers"), dict):
        out["headers"] = {k: expand(f"headers.{k}", v) for k, v in out["headers"].items()}
    secret = out.get("secret")
    if isinstance(secret, str):
        out["secret"] = expand("secret", secret)
    elif isinstance(secret, list):
        out["secret"] = [expand(f"secret.{i}", s) for i, s in enumerate(secret)]
    out["templates"] = templates
    return out


def _unknown_field(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f"unknown field; did you mean {close[0]!r}?" if close else "unknown field"


def _problems(
    exc: ValidationError, source: str, label: str, model: type[BaseModel]
) -> list[ConfigProblem]:
    known = set(model.model_fields) - {"templates", "triggers", "source"}
    out: list[ConfigProblem] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        field = ".".join(str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            message = _unknown_field(str(loc[-1]), known)
        else:
            message = error["msg"].removeprefix("Value error, ")
        out.append(ConfigProblem(source, label, field, message))
    return out


def _sensitive(header: str) -> bool:
    lowered = header.lower()
    return any(word in lowered for word in _SENSITIVE)


def _masked_endpoint(hook: _Endpoint) -> dict[str, Any]:
    data = hook.model_dump(mode="json", exclude={"headers", "secret", "url"})
    templates = hook.templates
    data["url"] = mask_url(templates.get("url") or hook.url)
    headers: dict[str, str] = {}
    for name, value in hook.headers.items():
        template = templates.get(f"headers.{name}")
        if _sensitive(name):
            refs = _VAR.findall(template) if template else []
            headers[name] = "***" + (f" (from ${{{refs[0]}}})" if refs else "")
        else:
            headers[name] = template if template is not None else value.get_secret_value()
    data["headers"] = headers
    data["secret"] = ["***" for _ in hook.secret]
    if isinstance(hook, WebhookConfig | AsyncWebhookConfig) and hook.triggers:
        data["triggers"] = sorted(hook.triggers)
    return data


def masked_dump(config: HooksConfig) -> dict[str, Any]:
    """The configuration as plain data for display: secrets and credential headers masked.

    Header values whose name suggests a credential (Authorization, *token*, *key*, ...)
    and every secret become ``***``; other values show their ``${VAR}`` template, never the
    value from the environment; URL user info, query values and token-like path segments
    are masked (``orchestrator.webhooks.masking``).
    """
    return {
        "source": config.source,
        "trigger_match": config.trigger_match.value,
        "refuse_private_destinations": config.refuse_private_destinations,
        "max_response_bytes": config.max_response_bytes,
        "retry_after_max_secs": config.retry_after_max_secs,
        "durable_retry": config.durable_retry.model_dump(mode="json"),
        "delivery_log": config.delivery_log,
        "circuit_breaker": config.circuit_breaker.model_dump(mode="json"),
        "webhooks": [_masked_endpoint(h) for h in config.webhooks],
        "async_webhooks": [_masked_endpoint(h) for h in config.async_webhooks],
    }
