"""The webhook package's errors, re-exported from ``asyncstore.orchestrator.errors``.

They are defined once, in the orchestrator's branch of the error tree (drawn there)::

    OrchestratorError
    └── WebhookError
        ├── HooksConfigError          hooks.toml is unreadable or invalid (every problem listed)
        ├── WebhookVerificationError  a received request's signature or timestamp is not valid
        ├── NotPersisted              a durable event's outbox write failed (it is not queued)
        ├── DestinationRefused        a URL resolves to a private, loopback or link-local address
        ├── ResendRefused             a delivery cannot be re-sent (unknown, or body purged)
        ├── DeliveryFailed            one HTTP attempt got no usable answer
        └── AttemptFailed             one batch POST failed (status or transport error)
"""

from __future__ import annotations

from asyncstore.orchestrator.errors import (
    AttemptFailed,
    ConfigProblem,
    DeliveryFailed,
    DestinationRefused,
    HooksConfigError,
    NotPersisted,
    ResendRefused,
    WebhookError,
    WebhookVerificationError,
)

__all__ = [
    "AttemptFailed",
    "ConfigProblem",
    "DeliveryFailed",
    "DestinationRefused",
    "HooksConfigError",
    "NotPersisted",
    "ResendRefused",
    "WebhookError",
    "WebhookVerificationError",
]
