"""The error tree of asyncstore's storage layer.

Driver exceptions (asyncpg, sqlite3) never leave a driver: each driver maps them in one
place (``map_error`` in the driver module) to this tree and raises ``from`` the original::

    StorageError
    ├── InvalidInput          bad argument, rejected before anything is written
    │   └── ConfigurationError  the storage URL or path cannot be used as given, or the
    │                             settings do not fit the topology (LISTEN through a pooler)
    ├── StorageClosed         the backend was used after ``aclose()``
    ├── StorageUnavailable    the database cannot be reached (connect, network, pool)
    ├── ConflictError         a uniqueness or integrity rule refused the write
    ├── LeaseLost             a lease or claim token is no longer the current one (fencing)
    ├── MigrationError        the schema is not at this code's version (behind: run
    │                         ``asyncstore migrate``; ahead: newer code migrated it) or a
    │                         migration failed
    └── QueryError            anything else the database refused
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "InvalidInput",
    "LeaseLost",
    "MigrationError",
    "QueryError",
    "StorageClosed",
    "StorageError",
    "StorageUnavailable",
]


class StorageError(Exception):
    """Base class of every error raised by the storage layer."""


class InvalidInput(StorageError, ValueError):
    """An argument is invalid; nothing was written."""


class ConfigurationError(InvalidInput):
    """The storage URL (or SQLite path) is malformed or names something that cannot be used,
    or the settings do not fit the topology (LISTEN or a session lock through a transaction
    pooler, an undeclared pooler: see ``storage._topology``).

    A subclass of ``InvalidInput`` (and so of ``ValueError``): the URL is an argument, it is
    refused before anything is written, and retrying the same URL cannot succeed. The
    message never contains the URL's password.
    """


class StorageClosed(StorageError):
    """The backend is closed (or was never opened)."""


class StorageUnavailable(StorageError):
    """The database could not be reached or the connection was lost mid-call."""


class ConflictError(StorageError):
    """A uniqueness or integrity constraint refused the write."""


class LeaseLost(StorageError):
    """The caller's lease or claim token is not the current one; the write was refused."""


class MigrationError(StorageError):
    """The schema is not the one this code expects, or a migration failed.

    Raised when a handle is opened on a database whose schema is behind (run
    ``asyncstore migrate``, or open with ``migrate=True``) or ahead of this version.
    """


class QueryError(StorageError):
    """The database refused a statement for another reason."""


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying a storage call may succeed: storage trouble yes (unavailable, a
    conflict or query error that may be transient, such as a deadlock); a closed handle,
    input the storage refuses, a lost lease or an error that is not the storage's (a bug)
    no: the same call would fail the same way, and a writer retrying it on an outage budget
    would hold everything queued behind it for that long."""
    return isinstance(exc, StorageError) and not isinstance(
        exc, StorageClosed | InvalidInput | LeaseLost
    )
