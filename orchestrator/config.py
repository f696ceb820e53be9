"""Settings: the one place that reads the environment and the TOML configuration file.

``load_settings()`` builds a frozen ``Settings`` tree from, in order of precedence: explicit
arguments, environment variables (``ASYNCSTORE_`` prefix, ``__`` between nested names, e.g.
``ASYNCSTORE_STORAGE__URL``), a TOML file (``ASYNCSTORE_CONFIG`` or the ``config_file``
argument), then the documented defaults. The sections reuse the components' own frozen
config models (``stream`` is a ``StreamConfig``, ``broadcast`` a ``HubConfig``...); the
operator feature flags live in one table, ``flags``, where a per-session flag is either its
optimized / legacy value or a rollout percentage (``"10%"``) decided by a stable hash of
the session id (:func:`in_rollout`). Nothing else in the library reads either source:
``load_webhooks`` hands the environment to the hooks file's ``${VAR}`` expansion.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from asyncstore.orchestrator.auth import AttemptLimiterConfig, PasswordHashingConfig
from asyncstore.orchestrator.broadcast import DeliveryMode, HubConfig
from asyncstore.orchestrator.cancellation import CancellationConfig
from asyncstore.orchestrator.locks import LimiterConfig
from asyncstore.orchestrator.maintenance import MaintenanceConfig
from asyncstore.orchestrator.metrics import MetricsConfig
from asyncstore.orchestrator.outbox import OutboxConfig, RetryTemplate
from asyncstore.orchestrator.periodic import PeriodicConfig
from asyncstore.orchestrator.queue import QueueConfig
from asyncstore.orchestrator.streams import StreamConfig
from asyncstore.orchestrator.webhooks import HooksConfig, load_hooks
from asyncstore.storage import StorageSettings
from asyncstore.storage import mask_url as _mask_url
from asyncstore.storage.errors import InvalidArgument

__all__ = [
    "PER_SESSION_FLAGS",
    "PROCESS_FLAGS",
    "AuthSettings",
    "DashboardSettings",
    "Flags",
    "OutboxSettings",
    "QueueSettings",
    "RuntimeSettings",
    "Settings",
    "WebhooksSettings",
    "config_path",
    "in_rollout",
    "load_settings",
    "load_webhooks",
    "mask_url",
    "masked_dump",
    "setting_sources",
]

ENV_PREFIX = "ASYNCSTORE_"


# -- feature flags ----------------------------------------------------------------------


def _percent_parser(optimized: str, legacy: str) -> Any:
    """A validator turning a flag value into the share (0..100) of sessions optimized."""

    def parse(value: object) -> float:
        if isinstance(value, bool):
            return 100.0 if value else 0.0
        if isinstance(value, (int, float)):
            # A bare number is ambiguous (10, or 10%? 1, or true?): ask for "10%".
            raise ValueError(f'write a rollout share as a string, e.g. "{value}%"')
        if isinstance(value, str):
            text = value.strip().lower()
            if text in (optimized, "true", "on", "yes"):
                return 100.0
            if text in (legacy, "false", "off", "no"):
                return 0.0
            if text.endswith("%"):
                try:
                    share = float(text[:-1])
                except ValueError:
                    share = math.nan
                if 0.0 <= share <= 100.0:
                    return share
        raise ValueError(
            f'expected "{optimized}" (or true), "{legacy}" (or false), or a share of '
            f'sessions such as "10%", got {value!r}'
        )

    return parse


def _percent_shower(optimized: str | bool, legacy: str | bool) -> Any:
    def show(share: float) -> str | bool:
        if share >= 100.0:
            return optimized
        if share <= 0.0:
            return legacy
        return f"{share:g}%"

    return show


StreamBatchingFlag = Annotated[
    float,
    BeforeValidator(_percent_parser("batched", "per_event")),
    PlainSerializer(_percent_shower(True, False), return_type=str | bool),
]
DeliveryFlag = Annotated[
    float,
    BeforeValidator(_percent_parser("memory", "poll")),
    PlainSerializer(_percent_shower("memory", "poll"), return_type=str | bool),
]
LockFlag = Annotated[
    float,
    BeforeValidator(_percent_parser("two_level", "db_poll")),
    PlainSerializer(_percent_shower("two_level", "db_poll"), return_type=str | bool),
]
CancelFlag = Annotated[
    float,
    BeforeValidator(_percent_parser("notify", "poll")),
    PlainSerializer(_percent_shower("notify", "poll"), return_type=str | bool),
]

PER_SESSION_FLAGS: tuple[str, ...] = ("stream_batching", "stream_delivery", "lock", "cancel")
"""Flags decided per session (a value or a rollout share); fixed for a turn once taken."""
PROCESS_FLAGS: tuple[str, ...] = ("queue", "outbox")
"""Flags decided per process: they apply to workers and relays started after a change."""


class Flags(BaseModel):
    """The operator feature flags of DESIGN.md, each with its optimized default.

    A per-session flag (``stream_batching``, ``stream_delivery``, ``lock``, ``cancel``) takes
    its optimized value, its legacy value, or a share of sessions (``"10%"``) that take the
    optimized path, chosen by :func:`in_rollout` (a stable hash of the flag name and the
    session id: the same session always gets the same answer for a given share, and raising
    the share only moves sessions from legacy to optimized). Internally each is stored as
    that share (0..100). ``queue`` and ``outbox`` are process-wide modes. Any share of
    ``lock`` keeps ``lock.max_running``: both lock paths take slots of one pool.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stream_batching: StreamBatchingFlag = Field(
        default=100.0, description="true: batched writer; false: one INSERT per event"
    )
    stream_delivery: DeliveryFlag = Field(
        default=100.0, description="memory: ring buffers; poll: every subscriber polls the db"
    )
    lock: LockFlag = Field(
        default=100.0, description="two_level: gate + one-statement lease; db_poll: legacy loop"
    )
    cancel: CancelFlag = Field(
        default=100.0, description="notify: event driven; poll: read every 200 ms"
    )
    queue: Literal["claim", "poll_spawn"] = Field(
        default="claim", description="claim: capped batched claims + NOTIFY; poll_spawn: legacy"
    )
    outbox: Literal["grouped", "serial"] = Field(
        default="grouped", description="grouped: per-lane bounded concurrency; serial: legacy"
    )

    def share(self, flag: str) -> float:
        """The share (0..100) of sessions on the optimized path of a per-session flag."""
        if flag not in PER_SESSION_FLAGS:
            raise InvalidArgument(f"{flag!r} is not a per-session flag: one of {PER_SESSION_FLAGS}")
        value: float = getattr(self, flag)
        return value

    def optimized(self, flag: str, session_id: str) -> bool:
        """Whether ``session_id`` takes the optimized path of ``flag`` under these flags."""
        return in_rollout(flag, session_id, self.share(flag))


def in_rollout(flag: str, session_id: str, percent: float) -> bool:
    """Stable per-session decision: True for about ``percent``% of session ids.

    Uses blake2b of ``flag`` and the session id (not ``hash()``, which is salted per
    process), so every instance and every restart decide the same way; the flag name is
    part of the key so the canary slices of different flags are independent.
    """
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    digest = hashlib.blake2b(f"{flag}\x00{session_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < percent / 100.0 * 2.0**64


# -- sections ---------------------------------------------------------------------------


class QueueSettings(QueueConfig):
    """``queue.*``: the agent queue's ``QueueConfig`` plus the queue's name."""

    name: str = Field(default="default", min_length=1, max_length=40)

    def component(self) -> QueueConfig:
        """The plain ``QueueConfig`` the queue and its workers take."""
        return QueueConfig.model_validate(self.model_dump(exclude={"name"}))


class OutboxSettings(OutboxConfig):
    """``outbox.*``: the relay's ``OutboxConfig`` plus per-channel retry templates."""

    templates: dict[str, RetryTemplate] = Field(default_factory=dict)

    def component(self) -> OutboxConfig:
        return OutboxConfig.model_validate(self.model_dump(exclude={"templates"}))


class WebhooksSettings(BaseModel):
    """``webhooks.*``: where the hooks file is (relative paths: from the working directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hooks_file: Path | None = None


class AuthSettings(BaseModel):
    """``auth.*``: password hashing parameters and the login attempt limiter.

    ``auth.attempts.mode`` (env ``ASYNCSTORE_AUTH__ATTEMPTS__MODE``) is ``memory`` (default:
    counts per process) or ``storage`` (counts in the storage backend, shared by every
    process on the database; needed for a fleet). The other ``auth.attempts.*`` keys and
    their defaults are documented on ``AttemptLimiterConfig``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hashing: PasswordHashingConfig = PasswordHashingConfig()
    attempts: AttemptLimiterConfig = AttemptLimiterConfig()


class RuntimeSettings(BaseModel):
    """``runtime.*``: how the runtime runs turns and reloads its flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_id: str | None = Field(default=None, description="holder prefix; default host:pid")
    reload_on_sighup: bool = Field(default=True, description="re-read flags on SIGHUP")
    turn_flush_timeout_s: float = Field(
        default=10.0, gt=0, description="how long a turn's end waits for its events to persist"
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="how long closing waits for running turns"
    )
    heap_trim_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="give the C heap's free pages back to the OS this often (glibc "
        "malloc_trim; orchestrator.heap_trim); 0 turns it off",
    )
    presence_interval_s: float = Field(
        default=5.0,
        ge=0,
        le=86_400,
        description="publish this instance's live subscribers per session to the database "
        "this often, with a TTL of three intervals, so the dashboard of any process sums "
        "them over the fleet (orchestrator.presence); 0 turns it off",
    )


class DashboardSettings(BaseModel):
    """``dashboard.*``: the operator dashboard (``orchestrator.dashboard``).

    Read-only unless ``operator_token`` is set (env ``ASYNCSTORE_DASHBOARD__OPERATOR_TOKEN``,
    at least 16 characters): then an action (retry, redrive, resend, cancel) must carry it
    as ``Authorization: Bearer <token>``, and every action is written to the audit log
    (refused attempts within a per-client budget, the rest counted).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    operator_token: SecretStr | None = Field(
        default=None, description="enables actions; None: the dashboard is read-only"
    )
    refresh_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="how often the live view is re-read"
    )
    rows: int = Field(default=50, ge=1, le=1000, description="rows shown per table")
    queued_rows: int = Field(
        default=10, ge=1, le=1000, description="queued tasks shown per queue (next in claim order)"
    )
    audit_refused_burst: int = Field(
        default=20, ge=0, le=100_000, description="refused attempts audited at once per client"
    )
    audit_refused_per_minute: float | None = Field(
        default=6.0,
        ge=0,
        le=1_000_000,
        description="refused attempts audited per minute per client after the burst;"
        " None: every refused attempt is audited (no budget)",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8089, ge=0, le=65535)

    @model_validator(mode="after")
    def _token_long_enough(self) -> Self:
        token = self.operator_token
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("dashboard.operator_token must be at least 16 characters")
        return self


_SECTION_FLAGS: tuple[tuple[str, str, object, str], ...] = (
    ("stream", "batching", True, "flags.stream_batching"),
    ("broadcast", "mode", DeliveryMode.MEMORY, "flags.stream_delivery"),
    ("lock", "mode", "two_level", "flags.lock"),
    ("cancel", "mode", "notify", "flags.cancel"),
    ("queue", "mode", "claim", "flags.queue"),
    ("outbox", "mode", "grouped", "flags.outbox"),
)


class Settings(BaseSettings):
    """Everything asyncstore can be configured with; see the module docstring."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    toml_file: ClassVar[Path | None] = None

    storage: StorageSettings = StorageSettings()
    migrate_on_start: bool = False
    flags: Flags = Flags()
    stream: StreamConfig = StreamConfig()
    broadcast: HubConfig = HubConfig()
    lock: LimiterConfig = LimiterConfig()
    cancel: CancellationConfig = CancellationConfig()
    queue: QueueSettings = QueueSettings()
    outbox: OutboxSettings = OutboxSettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    periodic: PeriodicConfig = PeriodicConfig()
    metrics: MetricsConfig = MetricsConfig()
    auth: AuthSettings = AuthSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    dashboard: DashboardSettings = DashboardSettings()

    @model_validator(mode="after")
    def _flags_live_in_flags(self) -> Self:
        for section, field, default, flag in _SECTION_FLAGS:
            if getattr(getattr(self, section), field) != default:
                raise ValueError(
                    f"{section}.{field} is a feature flag: set {flag} instead "
                    f"(ASYNCSTORE_{flag.upper().replace('.', '__')})"
                )
        if self.stream.channel != self.broadcast.channel:
            raise ValueError("stream.channel and broadcast.channel must be the same channel")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


def config_path(config_file: str | Path | None = None) -> Path | None:
    """The TOML file in effect: ``config_file``, else ``$ASYNCSTORE_CONFIG``, else None."""
    path = config_file or os.environ.get("ASYNCSTORE_CONFIG") or None
    return Path(path) if path is not None else None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the effective settings; ``config_file`` defaults to ``$ASYNCSTORE_CONFIG``."""
    path = config_path(config_file)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    # A throwaway subclass carries the file path, so concurrent loads never share state.
    bound = type(
        "BoundSettings",
        (Settings,),
        {"toml_file": path, "model_config": Settings.model_config},
    )
    settings = bound(**overrides)
    return Settings.model_validate(settings.model_dump())


def load_webhooks(settings: Settings) -> HooksConfig | None:
    """The hooks file of ``settings`` (None if unset), ``${VAR}``s expanded from the environment.

    Raises ``HooksConfigError`` listing every problem of the file.
    """
    path = settings.webhooks.hooks_file
    if path is None:
        return None
    return load_hooks(path, environ=os.environ)


# -- showing the settings ---------------------------------------------------------------


def mask_url(url: str) -> str:
    """Hide the password of a URL (``postgresql://user:***@host/db``), even a malformed one."""
    return _mask_url(url)  # one masker for the storage errors and the CLI


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(_flatten(value, path + "."))
        else:
            keys.append(path)
    return keys


def setting_sources(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Where each explicitly set setting came from: ``argument``, ``env`` or ``file``.

    Keys are dotted paths (``flags.stream_batching``); a value set as a whole table (a
    JSON object in one variable) marks every setting under it. Unlisted: ``default``.
    """
    env = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    path = config_path(config_file)
    if path is not None and path.is_file():
        for key in _flatten(tomllib.loads(path.read_text(encoding="utf-8"))):
            sources[key] = "file"
    for name in env:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper != "ASYNCSTORE_CONFIG":
            sources[".".join(upper[len(ENV_PREFIX) :].lower().split("__"))] = "env"
    for key in _flatten(overrides or {}):
        sources[key] = "argument"
    return sources


def _source_of(path: str, sources: Mapping[str, str]) -> str:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found is not None:
            return found
    return "default"


def masked_dump(settings: Settings, *, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings as plain JSON-able data, every secret masked (URLs keep all but the password).

    With ``sources`` (from :func:`setting_sources`), every leaf becomes
    ``{"value": ..., "source": "default" | "file" | "env" | "argument"}``.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            return mask_url(secret) if "://" in secret else "***"
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        return value

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict) and (value or sources is None):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        shown = plain(value)
        if sources is None:
            return shown
        return {"value": shown, "source": _source_of(path, sources)}

    dumped: dict[str, Any] = walk(settings.model_dump(), "")
    return dumped
