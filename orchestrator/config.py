"""Settings: the one place that reads the environment and the TOML configuration file.

``load_settings()`` builds a frozen ``Settings`` tree from, in order of precedence: explicit
arguments, environment variables (``ASYNCSTORE_`` prefix, ``__`` between nested names, e.g.
``ASYNCSTORE_STORAGE__URL``), a TOML file (``ASYNCSTORE_CONFIG`` or the ``config_file``
argument), then the documented defaults. Nothing else in the library reads either source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from storage import StorageSettings

__all__ = ["Settings", "load_settings", "mask_url", "masked_dump"]


class Settings(BaseSettings):
    """Everything asyncstore can be configured with (more sections arrive with their issues)."""

    model_config = SettingsConfigDict(
        env_prefix="ASYNCSTORE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    toml_file: ClassVar[Path | None] = None

    storage: StorageSettings = StorageSettings()
    migrate_on_start: bool = False

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


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the effective settings; ``config_file`` defaults to ``$ASYNCSTORE_CONFIG``."""
    path = config_file or os.environ.get("ASYNCSTORE_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    # A throwaway subclass carries the file path, so concurrent loads never share state.
    bound = type(
        "BoundSettings",
        (Settings,),
        {"toml_file": Path(path) if path else None, "model_config": Settings.model_config},
    )
    settings = bound(**overrides)
    return Settings.model_validate(settings.model_dump())


def mask_url(url: str) -> str:
    """Hide the password of a URL (``postgresql://user:***@host/db``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked (URLs keep all but the password)."""

    def walk(value: Any) -> Any:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            return mask_url(secret) if "://" in secret else "***"
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(settings.model_dump()) or {}
