"""asyncstore's storage layer: the ``AsyncStorageBackend`` contract and its two drivers.

``open_storage(url_or_settings)`` picks the driver by URL scheme and imports only that
driver: ``postgresql://`` (asyncpg, production and cross-instance coordination) or
``sqlite:///path.db`` (aiosqlite, the embedded default).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import SecretStr

from asyncstore.storage._partitions import apply_setting as apply_stream_partitioning
from asyncstore.storage._queue_limits import LimitedClaim, QueueLimits
from asyncstore.storage._schema import check_schema, mask_url
from asyncstore.storage._validate import encode_payload
from asyncstore.storage.base import (
    LEASE_EXPIRED,
    OUTBOX,
    TASKS,
    AsyncStorageBackend,
    AuditEntry,
    CancelState,
    ChatMessage,
    Claim,
    EncodedJSON,
    Failure,
    JobKind,
    JournaledEvent,
    Leadership,
    Lease,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    Notification,
    NotificationStream,
    OutboxMessage,
    OutboxStatus,
    Presence,
    QueueDepth,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    Task,
    TaskStatus,
    WebhookAttempt,
)
from asyncstore.storage.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    LeaseLost,
    MigrationError,
    QueryError,
    QueueCoordinated,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)
from asyncstore.storage.task_cancel import (
    TASK_CANCEL_CHANNEL,
    TaskCancellation,
    TaskCancelOutcome,
)

__all__ = [
    "LEASE_EXPIRED",
    "OUTBOX",
    "TASKS",
    "TASK_CANCEL_CHANNEL",
    "AsyncStorageBackend",
    "AuditEntry",
    "CancelState",
    "ChatMessage",
    "Claim",
    "ConfigurationError",
    "ConflictError",
    "EncodedJSON",
    "Failure",
    "InvalidInput",
    "JobKind",
    "JournaledEvent",
    "Leadership",
    "Lease",
    "LeaseLost",
    "LimitedClaim",
    "MigrationError",
    "NewMessage",
    "NewOutboxMessage",
    "NewStreamEvent",
    "NewTask",
    "Notification",
    "NotificationStream",
    "OutboxMessage",
    "OutboxStatus",
    "Presence",
    "QueryError",
    "QueueCoordinated",
    "QueueDepth",
    "QueueLimits",
    "StorageClosed",
    "StorageError",
    "StorageSettings",
    "StorageStatistics",
    "StorageUnavailable",
    "StreamAppend",
    "StreamEvent",
    "StreamPartition",
    "Task",
    "TaskCancelOutcome",
    "TaskCancellation",
    "TaskStatus",
    "WebhookAttempt",
    "check_schema",
    "dialect_of",
    "encode_payload",
    "mask_url",
    "open_storage",
]


def dialect_of(url: str) -> str:
    """``postgres`` or ``sqlite`` for a storage URL; ``ConfigurationError`` for anything else."""
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower()
    if colon and scheme in ("postgresql", "postgres"):
        return "postgres"
    if colon and scheme == "sqlite":
        return "sqlite"
    shown = f"URL scheme {scheme!r}" if colon else f"URL {mask_url(url)!r} (no scheme)"
    raise ConfigurationError(
        f"unsupported storage {shown}: use postgresql://user@host/db or sqlite:///path.db"
    )


@asynccontextmanager
async def open_storage(
    target: str | StorageSettings = "sqlite:///asyncstore.db",
    *,
    migrate: bool = False,
    check_schema_version: bool = True,
) -> AsyncIterator[AsyncStorageBackend]:
    """Open a backend for a URL or settings; ``migrate=True`` applies pending migrations.

    Every failure to open is a ``StorageError`` whose message never shows the URL's
    password: a malformed URL is a ``ConfigurationError``; a server that cannot be reached,
    refuses the login or has no such database is ``StorageUnavailable``; a SQLite path that
    cannot be created or opened names the path and the cause. A missing SQLite directory
    is created (logged at INFO on the ``asyncstore.storage`` logger, naming it).

    The schema guard: unless ``check_schema_version=False`` (``asyncstore migrate`` and
    ``doctor`` inspect the schema themselves), a database whose schema is behind this code
    (or empty) raises ``MigrationError`` naming ``asyncstore migrate``, and one ahead of it
    raises ``MigrationError`` too, after ``migrate=True`` has applied what it could.

    The backend starts no background task (the Postgres LISTEN connection is driven by its
    subscribers' waits); leaving this context closes it, shielded from cancellation, as
    does a failure or a cancellation while opening.
    """
    settings = (
        target if isinstance(target, StorageSettings) else StorageSettings(url=SecretStr(target))
    )
    backend: AsyncStorageBackend
    if dialect_of(settings.url.get_secret_value()) == "postgres":
        from asyncstore.storage.postgres import PostgresBackend

        pg = PostgresBackend(settings)
        await pg.open()
        backend = pg
    else:
        from asyncstore.storage.sqlite import SqliteBackend

        lite = SqliteBackend(settings)
        await lite.open()
        backend = lite
    try:
        if migrate:
            await backend.migrate()
        if check_schema_version:
            await check_schema(backend, mask_url(settings.url.get_secret_value()))
            await apply_stream_partitioning(backend, settings, migrate=migrate)
        yield backend
    finally:
        await backend.aclose()
