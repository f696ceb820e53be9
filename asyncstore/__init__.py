"""asyncstore: native-async storage and session machinery for agent and chat backends.

``import asyncstore`` is the public API::

    import asyncstore

    settings = asyncstore.load_settings(storage={"url": "sqlite:///app.db"})
    async with asyncstore.open_runtime(settings) as rt:
        async with rt.turn(session_id) as turn:
            await turn.emit("token", {"text": "Hi"})

- ``open_runtime`` / ``Runtime`` / ``Turn``: the orchestrator (session lease, batched stream
  writer, live broadcast, cancellation, agent queue, outbox, webhooks, metrics), built from
  one ``Settings`` (``load_settings`` reads ``ASYNCSTORE_*`` and an optional TOML file).
- ``open_storage`` / ``AsyncStorageBackend``: the storage contract alone, on Postgres
  (asyncpg) or SQLite (aiosqlite), chosen by the URL's scheme.
- The records (``StreamEvent``, ``ChatMessage``, ``Task``, ...) and the errors.

The implementation lives in ``asyncstore.storage`` and ``asyncstore.orchestrator``; names
not re-exported here are internal and may change.
"""

from __future__ import annotations

from asyncstore.orchestrator.broadcast import StreamReset
from asyncstore.orchestrator.config import Flags, Settings, load_settings
from asyncstore.orchestrator.errors import (
    OrchestratorError,
    StreamNotStarted,
    SubscriberLagged,
    WriterClosed,
    WriterOverloaded,
)
from asyncstore.orchestrator.runtime import (
    ComponentNotBuilt,
    Runtime,
    RuntimeClosed,
    RuntimeReport,
    Turn,
    open_runtime,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    CancelState,
    ChatMessage,
    Claim,
    ConfigurationError,
    ConflictError,
    InvalidInput,
    Lease,
    LeaseLost,
    MigrationError,
    NewMessage,
    NewStreamEvent,
    NewTask,
    OutboxMessage,
    QueryError,
    StorageClosed,
    StorageError,
    StorageSettings,
    StorageUnavailable,
    StreamEvent,
    Task,
    TaskStatus,
    open_storage,
)

__all__ = [
    "AsyncStorageBackend",
    "CancelState",
    "ChatMessage",
    "Claim",
    "ComponentNotBuilt",
    "ConfigurationError",
    "ConflictError",
    "Flags",
    "InvalidInput",
    "Lease",
    "LeaseLost",
    "MigrationError",
    "NewMessage",
    "NewStreamEvent",
    "NewTask",
    "OrchestratorError",
    "OutboxMessage",
    "QueryError",
    "Runtime",
    "RuntimeClosed",
    "RuntimeReport",
    "Settings",
    "StorageClosed",
    "StorageError",
    "StorageSettings",
    "StorageUnavailable",
    "StreamEvent",
    "StreamNotStarted",
    "StreamReset",
    "SubscriberLagged",
    "Task",
    "TaskStatus",
    "Turn",
    "WriterClosed",
    "WriterOverloaded",
    "load_settings",
    "open_runtime",
    "open_storage",
]
