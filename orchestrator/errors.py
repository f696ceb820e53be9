"""The orchestrator's branch of asyncstore's error tree (the root is ``storage.errors``).

Every class here derives from ``OrchestratorError``, itself an ``AsyncstoreError``; the
components (runtime, writers, hubs, auth, webhooks) import their errors from here and
re-export them where they were defined before. ``(+X)`` names an extra base::

    OrchestratorError                (AsyncstoreError)
    ├── RuntimeClosed                (+UsageError) the runtime is closing: no new turn
    ├── ComponentNotBuilt            a flag's path has no running instance yet
    ├── WriterClosed                 (+UsageError) put on a writer that is closing or closed
    ├── WriterOverloaded             a blocking put waited ``block_timeout_s`` for room in vain
    ├── Dropped                      (+anyio.WouldBlock) a ``*_nowait`` item the overflow
    │                                  policy dropped (counted)
    ├── StreamNotStarted             (+UsageError) emit for a session the writer was not told
    │                                  about (``begin``)
    ├── SubscriberLagged             a slow subscriber was disconnected (``disconnect`` policy)
    ├── ActionRefused                a dashboard action cannot be done (no such target, wrong
    │                                  state); nothing was changed
    ├── AuthError                    password hashing and login limiting
    │   ├── InvalidHash              the stored hash is not an argon2 hash this can read
    │   ├── PasswordTooLong          the password exceeds ``max_password_bytes``
    │   ├── HashingOverloaded        ``max_waiting`` callers already wait for a hashing slot
    │   └── LoginLocked              the account or address is locked out (``retry_after_s``)
    └── WebhookError                 the webhook package
        ├── HooksConfigError         hooks.toml is unreadable or invalid (every problem listed)
        ├── WebhookVerificationError  a received request's signature or timestamp is bad
        ├── NotPersisted             a durable event's outbox write failed (it is not queued)
        ├── DestinationRefused       a URL resolves to a private, loopback or link-local address
        ├── ResendRefused            a delivery cannot be re-sent (unknown, or body purged)
        ├── DeliveryFailed           one HTTP attempt got no usable answer
        └── AttemptFailed            one batch POST failed (status or transport error)

The ``*_nowait`` rule (anyio's): such a call returns only when it did what it says (the
item is buffered; evicting older droppable items under ``drop_oldest`` counts them as
dropped and is an accepted outcome). When it cannot, it raises ``anyio.WouldBlock``: plain
when waiting could help (``block`` policy, or a critical item, which is never dropped:
use the waiting variant), ``Dropped`` when the policy dropped the item itself (full under
``drop_newest``, or a webhook endpoint disabled by a 410), already counted in the
component's ``statistics().dropped``; the waiting variant does not wait for it either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import anyio

from asyncstore.storage.errors import AsyncstoreError, UsageError

__all__ = [
    "ActionRefused",
    "AttemptFailed",
    "AuthError",
    "ComponentNotBuilt",
    "ConfigProblem",
    "DeliveryFailed",
    "DestinationRefused",
    "Dropped",
    "HashingOverloaded",
    "HooksConfigError",
    "InvalidHash",
    "LoginLocked",
    "NotPersisted",
    "OrchestratorError",
    "PasswordTooLong",
    "ResendRefused",
    "RuntimeClosed",
    "StreamNotStarted",
    "SubscriberLagged",
    "WebhookError",
    "WebhookVerificationError",
    "WriterClosed",
    "WriterOverloaded",
]


class OrchestratorError(AsyncstoreError):
    """Base class of every error the orchestrator raises itself."""


class RuntimeClosed(OrchestratorError, UsageError):
    """The runtime is closing or closed: it starts no new turn."""


class ComponentNotBuilt(OrchestratorError):
    """The path a session takes has no running instance yet (``Switch.pick``).

    Only between a live flag change and the end of the build it started; ``Switch.choose``
    and ``Switch.get`` wait for (or start) the build instead.
    """


class WriterClosed(OrchestratorError, UsageError):
    """The writer is closing or closed (or not started); it accepts nothing more."""


class WriterOverloaded(OrchestratorError):
    """A blocking put found no room within its timeout. Nothing was written by the caller."""


class Dropped(OrchestratorError, anyio.WouldBlock):
    """A ``*_nowait`` call's item was dropped by the overflow policy, and counted.

    An ``anyio.WouldBlock``, so ``except anyio.WouldBlock`` catches every item a
    ``*_nowait`` call did not buffer; catch ``Dropped`` first to tell a policy drop (the
    waiting variant would not wait for it either) from a full buffer worth waiting for.
    ``reason`` is the counter it was added to (``overflow_newest``, ``overflow``,
    ``disabled``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StreamNotStarted(OrchestratorError, UsageError):
    """``emit`` for a session that has no epoch on this writer: call ``begin`` first."""


class SubscriberLagged(OrchestratorError):
    """The subscriber fell behind the ring and the hub is configured to disconnect it."""


class ActionRefused(OrchestratorError):
    """An operator action (``orchestrator.dashboard``) cannot be done: its target does not
    exist or is not in a state the action applies to. Nothing was changed."""


class AuthError(OrchestratorError):
    """Base class of the errors raised by ``orchestrator.auth``."""


class InvalidHash(AuthError):
    """The stored hash cannot be parsed or verified (corrupt, or not argon2)."""


class PasswordTooLong(AuthError):
    """The password is longer than ``max_password_bytes``; nothing was hashed."""


class HashingOverloaded(AuthError):
    """Too many callers already wait for a hashing slot; nothing was hashed. Retry later."""


class LoginLocked(AuthError):
    """The account or the client address is locked out; no hashing was done."""

    def __init__(self, scope: Literal["account", "address"], retry_after_s: float) -> None:
        super().__init__(f"too many failed logins for this {scope}; retry in {retry_after_s:.0f} s")
        self.scope: Literal["account", "address"] = scope
        self.retry_after_s = retry_after_s


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


class NotPersisted(WebhookError):
    """A durable webhook's event could not be written to the outbox; it is not queued."""


class DestinationRefused(WebhookError):
    """The destination resolves to an address the policy refuses (private, loopback, ...)."""


class ResendRefused(WebhookError):
    """The delivery cannot be re-sent (unknown webhook-id, or its body was purged)."""


class DeliveryFailed(WebhookError):
    """An attempt that did not end in a usable answer (network error, timeout, refusal).

    ``retry_in_s`` is set when the receiver's circuit is open: no request was sent, and
    none will be before that many seconds.
    """

    def __init__(
        self, message: str, *, retryable: bool = True, retry_in_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_in_s = retry_in_s


class AttemptFailed(WebhookError):
    """One failed delivery attempt of a batch (HTTP status or transport error)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = True,
        retry_after_s: float | None = None,
        circuit_open: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.circuit_open = circuit_open  # nothing was sent: the receiver's circuit is open
