"""asyncstore: native-async storage and session machinery for agent and chat backends.

``import asyncstore`` is the public API; every name below is documented on its object::

    import asyncstore

    settings = asyncstore.load_settings(storage={"url": "sqlite:///app.db"})
    async with asyncstore.open_runtime(settings) as rt:
        async with rt.turn(session_id) as turn:
            await turn.append_messages([asyncstore.NewMessage("user", {"text": "Hi"})])
            await turn.emit("token", {"text": "Hello"})

- ``open_runtime`` / ``Runtime`` / ``Turn``: the orchestrator (session lease, batched stream
  writer, live broadcast, cancellation, agent queue, outbox, webhooks, metrics), built from
  one ``Settings`` (``load_settings`` reads ``ASYNCSTORE_*`` and an optional TOML file;
  ``load_hooks`` a hooks file). A queue handler may raise ``RetryTask`` or
  ``PermanentFailure``, an outbox sender ``SendError``; ``cancel_task`` (on the runtime,
  its queue or the storage) cancels a task from any process and answers a
  ``TaskCancellation`` (``TaskCancelOutcome``: cancelled now, already, finished, unknown).
- ``open_storage`` / ``AsyncStorageBackend``: the storage contract alone, on Postgres
  (asyncpg) or SQLite (aiosqlite), chosen by the URL's scheme.
- The records (``StreamEvent``, ``ChatMessage``, ``Task``, ...), ``Subscription`` and
  ``StreamReset`` (what a live subscriber reads).
- The errors: one tree under ``AsyncstoreError``, drawn in ``asyncstore.storage.errors``.
  Misuse raises ``UsageError`` or ``InvalidArgument``; a ``*_nowait`` call that cannot act
  raises ``anyio.WouldBlock`` (``Dropped`` when the overflow policy dropped the item).
- ``Periodic`` / ``open_periodic`` / ``PeriodicRunner``: cron (``Cron``) and interval
  schedules whose ticks are enqueued as agent tasks, once per tick across a fleet (also
  declared in settings, ``periodic.schedules``, and run by the runtime).
- ``Backoff``, ``Clock`` and ``ManualClock``: the one retry-delay policy and the injectable
  clock; ``open_test_receiver``: a real local HTTP receiver for webhook tests.
- ``EndpointConfig``, ``EventStreams`` and ``StreamingServer``: SSE and WebSocket endpoints
  (need the ``asgi`` extra: starlette, uvicorn; imported on first use).
- ``Dashboard`` (``asgi`` extra) and ``DashboardSettings``: the operator dashboard, a
  mountable ASGI app; its actions raise ``ActionRefused`` and are kept as ``AuditEntry``.

Every service opens with an ``open_*`` async context manager. The implementation lives in
``asyncstore.storage`` and ``asyncstore.orchestrator``; names not exported here are
internal and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from asyncstore.orchestrator.auth import (
    AuthError,
    HashingOverloaded,
    InvalidHash,
    LoginLocked,
    PasswordTooLong,
)
from asyncstore.orchestrator.broadcast import StreamReset, Subscription
from asyncstore.orchestrator.config import DashboardSettings, Flags, Settings, load_settings
from asyncstore.orchestrator.cron import Cron
from asyncstore.orchestrator.errors import (
    ActionRefused,
    AttemptFailed,
    ComponentNotBuilt,
    DeliveryFailed,
    DestinationRefused,
    Dropped,
    HooksConfigError,
    NotPersisted,
    OrchestratorError,
    ResendRefused,
    RuntimeClosed,
    StreamNotStarted,
    SubscriberLagged,
    WebhookError,
    WebhookVerificationError,
    WriterClosed,
    WriterOverloaded,
)
from asyncstore.orchestrator.outbox import SendError
from asyncstore.orchestrator.periodic import Periodic, PeriodicRunner, open_periodic
from asyncstore.orchestrator.queue import PermanentFailure, RetryTask
from asyncstore.orchestrator.runtime import (
    Runtime,
    RuntimeReport,
    RuntimeStatistics,
    Turn,
    open_runtime,
)
from asyncstore.orchestrator.timing import Backoff, Clock, ManualClock
from asyncstore.orchestrator.webhooks import HookDecision, HooksConfig, load_hooks
from asyncstore.orchestrator.webhooks.testing import open_test_receiver
from asyncstore.storage import (
    AsyncStorageBackend,
    AuditEntry,
    CancelState,
    ChatMessage,
    Claim,
    Lease,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    OutboxMessage,
    QueueLimits,
    StorageSettings,
    StreamEvent,
    Task,
    TaskCancellation,
    TaskCancelOutcome,
    TaskStatus,
    open_storage,
)
from asyncstore.storage.errors import (
    AsyncstoreError,
    ConfigurationError,
    ConflictError,
    InvalidArgument,
    InvalidInput,
    InvalidType,
    LeaseLost,
    MigrationError,
    QueryError,
    QueueCoordinated,
    StorageClosed,
    StorageError,
    StorageUnavailable,
    UsageError,
)

if TYPE_CHECKING:
    from asyncstore.orchestrator.asgi import EndpointConfig, EventStreams, StreamingServer
    from asyncstore.orchestrator.dashboard import Dashboard

_NEEDS_ASGI_EXTRA = {
    "Dashboard": "asyncstore.orchestrator.dashboard",
    "EndpointConfig": "asyncstore.orchestrator.asgi",
    "EventStreams": "asyncstore.orchestrator.asgi",
    "StreamingServer": "asyncstore.orchestrator.asgi",
}


def __getattr__(name: str) -> Any:
    """The ASGI names, imported on first use: they need starlette and uvicorn."""
    module = _NEEDS_ASGI_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ActionRefused",
    "AsyncStorageBackend",
    "AsyncstoreError",
    "AttemptFailed",
    "AuditEntry",
    "AuthError",
    "Backoff",
    "CancelState",
    "ChatMessage",
    "Claim",
    "Clock",
    "ComponentNotBuilt",
    "ConfigurationError",
    "ConflictError",
    "Cron",
    "Dashboard",
    "DashboardSettings",
    "DeliveryFailed",
    "DestinationRefused",
    "Dropped",
    "EndpointConfig",
    "EventStreams",
    "Flags",
    "HashingOverloaded",
    "HookDecision",
    "HooksConfig",
    "HooksConfigError",
    "InvalidArgument",
    "InvalidHash",
    "InvalidInput",
    "InvalidType",
    "Lease",
    "LeaseLost",
    "LoginLocked",
    "ManualClock",
    "MigrationError",
    "NewMessage",
    "NewOutboxMessage",
    "NewStreamEvent",
    "NewTask",
    "NotPersisted",
    "OrchestratorError",
    "OutboxMessage",
    "PasswordTooLong",
    "Periodic",
    "PeriodicRunner",
    "PermanentFailure",
    "QueryError",
    "QueueCoordinated",
    "QueueLimits",
    "ResendRefused",
    "RetryTask",
    "Runtime",
    "RuntimeClosed",
    "RuntimeReport",
    "RuntimeStatistics",
    "SendError",
    "Settings",
    "StorageClosed",
    "StorageError",
    "StorageSettings",
    "StorageUnavailable",
    "StreamEvent",
    "StreamNotStarted",
    "StreamReset",
    "StreamingServer",
    "SubscriberLagged",
    "Subscription",
    "Task",
    "TaskCancelOutcome",
    "TaskCancellation",
    "TaskStatus",
    "Turn",
    "UsageError",
    "WebhookError",
    "WebhookVerificationError",
    "WriterClosed",
    "WriterOverloaded",
    "load_hooks",
    "load_settings",
    "open_periodic",
    "open_runtime",
    "open_storage",
    "open_test_receiver",
]
