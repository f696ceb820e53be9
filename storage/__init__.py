"""asyncstore's storage layer: the ``AsyncStorageBackend`` contract and its two drivers.

``open_storage(url_or_settings)`` picks the driver by URL scheme and imports only that
driver: ``postgresql://`` (asyncpg, production and cross-instance coordination) or
``sqlite:///path.db`` (aiosqlite, the embedded default).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import SecretStr

from storage._validate import encode_payload
from storage.base import (
    LEASE_EXPIRED,
    AsyncStorageBackend,
    CancelState,
    ChatMessage,
    Claim,
    EncodedJSON,
    Failure,
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
    QueueDepth,
    StorageSettings,
    StorageStatistics,
    StreamAppend,
    StreamEvent,
    Task,
    TaskStatus,
    WebhookAttempt,
)
from storage.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    LeaseLost,
    MigrationError,
    QueryError,
    StorageClosed,
    StorageError,
    StorageUnavailable,
)

__all__ = [
    "LEASE_EXPIRED",
    "AsyncStorageBackend",
    "CancelState",
    "ChatMessage",
    "Claim",
    "ConfigurationError",
    "ConflictError",
    "EncodedJSON",
    "Failure",
    "InvalidInput",
    "JournaledEvent",
    "Leadership",
    "Lease",
    "LeaseLost",
    "MigrationError",
    "NewMessage",
    "NewOutboxMessage",
    "NewStreamEvent",
    "NewTask",
    "Notification",
    "NotificationStream",
    "OutboxMessage",
    "OutboxStatus",
    "QueryError",
    "QueueDepth",
    "StorageClosed",
    "StorageError",
    "StorageSettings",
    "StorageStatistics",
    "StorageUnavailable",
    "StreamAppend",
    "StreamEvent",
    "Task",
    "TaskStatus",
    "WebhookAttempt",
    "dialect_of",
    "encode_payload",
    "open_storage",
]


def dialect_of(url: str) -> str:
    """``postgres`` or ``sqlite`` for a storage URL; ``InvalidInput`` for anything else."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    if scheme == "sqlite":
        return "sqlite"
    raise InvalidInput(
        f"unsupported storage URL scheme {scheme!r}: use postgresql://... or sqlite:///path.db"
    )


@asynccontextmanager
async def open_storage(
    target: str | StorageSettings = "sqlite:///asyncstore.db", *, migrate: bool = False
) -> AsyncIterator[AsyncStorageBackend]:
    """Open a backend for a URL or settings; ``migrate=True`` applies pending migrations.

    The backend starts no background task (the Postgres LISTEN connection is driven by its
    subscribers' waits); leaving this context closes it, shielded from cancellation.
    """
    settings = (
        target if isinstance(target, StorageSettings) else StorageSettings(url=SecretStr(target))
    )
    backend: AsyncStorageBackend
    if dialect_of(settings.url.get_secret_value()) == "postgres":
        from storage.postgres import PostgresBackend

        pg = PostgresBackend(settings)
        await pg.open()
        backend = pg
    else:
        from storage.sqlite import SqliteBackend

        lite = SqliteBackend(settings)
        await lite.open()
        backend = lite
    try:
        if migrate:
            await backend.migrate()
        yield backend
    finally:
        await backend.aclose()
