"""Webhooks: hooks.toml, synchronous hooks with decisions, batched async webhooks, signing.

``load_hooks`` reads and validates a hooks file; ``open_webhooks`` runs its hooks and
yields a ``Webhooks`` whose ``fire(trigger, context)`` returns a ``HookDecision``.
``AsyncWebhookBatcher`` (built on ``orchestrator.batching.BatchWriter``) queues events and
POSTs them in batches. ``verify`` checks Standard Webhooks signatures on the receiving end.
"""

from __future__ import annotations

from asyncstore.orchestrator.webhooks.batcher import (
    CRITICAL_TRIGGERS,
    AsyncWebhookBatcher,
    AsyncWebhookStatistics,
    Submission,
    WebhookDeadLetter,
    WebhookDrainReport,
    WebhookEvent,
    open_webhook_batcher,
)
from asyncstore.orchestrator.webhooks.config import (
    AsyncWebhookConfig,
    HooksConfig,
    WebhookConfig,
    load_hooks,
    masked_dump,
    parse_hooks,
)
from asyncstore.orchestrator.webhooks.errors import (
    ConfigProblem,
    DestinationRefused,
    HooksConfigError,
    NotPersisted,
    WebhookError,
    WebhookVerificationError,
)
from asyncstore.orchestrator.webhooks.registry import Webhooks, WebhooksStatistics, open_webhooks
from asyncstore.orchestrator.webhooks.signing import (
    generate_secret,
    sign,
    signature_headers,
    verify,
)
from asyncstore.orchestrator.webhooks.sync import HookDecision, HookOutcome, WebhookHook
from asyncstore.orchestrator.webhooks.transport import Transport
from asyncstore.orchestrator.webhooks.triggers import (
    ALIASES,
    DENY_TRIGGERS,
    EVENT_NAMES,
    TRIGGER_NAMES,
    TriggerMatch,
)

__all__ = [
    "ALIASES",
    "CRITICAL_TRIGGERS",
    "DENY_TRIGGERS",
    "EVENT_NAMES",
    "TRIGGER_NAMES",
    "AsyncWebhookBatcher",
    "AsyncWebhookConfig",
    "AsyncWebhookStatistics",
    "ConfigProblem",
    "DestinationRefused",
    "HookDecision",
    "HookOutcome",
    "HooksConfig",
    "HooksConfigError",
    "NotPersisted",
    "Submission",
    "Transport",
    "TriggerMatch",
    "WebhookConfig",
    "WebhookDeadLetter",
    "WebhookDrainReport",
    "WebhookError",
    "WebhookEvent",
    "WebhookHook",
    "WebhookVerificationError",
    "Webhooks",
    "WebhooksStatistics",
    "generate_secret",
    "load_hooks",
    "masked_dump",
    "open_webhook_batcher",
    "open_webhooks",
    "parse_hooks",
    "sign",
    "signature_headers",
    "verify",
]
