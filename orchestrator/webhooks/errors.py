"""Errors raised by the webhook package.

OrchestratorError
└── WebhookError
    ├── HooksConfigError          hooks.toml is unreadable or invalid (every problem listed)
    ├── WebhookVerificationError  a received request's signature or timestamp is not valid
    ├── NotPersisted              a durable event's outbox write failed (it is not queued)
    └── DestinationRefused        a URL resolves to a private, loopback or link-local address
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncstore.orchestrator.errors import OrchestratorError

__all__ = [
    "ConfigProblem",
    "DestinationRefused",
    "HooksConfigError",
    "NotPersisted",
    "WebhookError",
    "WebhookVerificationError",
]


class WebhookError(OrchestratorError):
    """Base class of the webhook package's errors."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem of a hooks file: where it is (file, entry, field) and what is wrong."""

    file: str
    entry: str  # '[[webhooks]] "slack" (#1)', or "" for the file itself
    field: str  # "" when the problem is the whole entry
    message: str

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.entry, self.field) if p)
        return f"{where}: {self.message}"


class HooksConfigError(WebhookError):
    """The hooks file could not be loaded; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the webhook configuration:\n{lines}")


class WebhookVerificationError(WebhookError):
    """A received webhook failed verification (missing header, stale timestamp, bad signature)."""


class DestinationRefused(WebhookError):
    """The destination resolves to an address the policy refuses (private, loopback, ...)."""


class NotPersisted(WebhookError):
    """A durable webhook's event could not be written to the outbox; it is not queued."""
