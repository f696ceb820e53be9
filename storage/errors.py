"""asyncstore's error tree: one root, the misuse errors, and the storage layer's errors.

Every error asyncstore raises itself derives from ``AsyncstoreError``; ``except
asyncstore.AsyncstoreError`` catches them all, and nothing else. Misuse of the API raises
a named error (``UsageError``: the call does not fit the component's state;
``InvalidArgument``: an argument is refused), which keeps ``RuntimeError`` / ``ValueError``
/ ``TypeError`` as an extra base, so code written against the builtin still catches it.
Driver exceptions (asyncpg, sqlite3) never leave a driver: each driver maps them in one
place (``map_error`` in the driver module) to this tree and raises ``from`` the original.
The root and the storage branch are defined here (storage is the lower layer); the
orchestrator branch in ``asyncstore.orchestrator.errors``. ``(+X)`` names an extra base::

    AsyncstoreError                  every error asyncstore raises itself
    ├── UsageError                   (+RuntimeError) the call does not fit the state (closed,
    │   │                              entered twice, not started)
    │   └── QueueCoordinated         a plain task claim on a queue with limits or groups
    │                                  (claim through ``claim_limited_tasks``); nothing claimed
    ├── InvalidArgument              (+ValueError) an argument is refused; nothing was done
    │   └── InvalidType              (+TypeError) an argument, or a driver class, of a type the
    │                                  library cannot use
    ├── StorageError                 the storage layer (this module)
    │   ├── InvalidInput             (+InvalidArgument) a storage call's argument is refused,
    │   │   │                          before anything is written
    │   │   └── ConfigurationError   the storage URL or path cannot be used as given, or the
    │   │                              settings do not fit the topology (LISTEN through a pooler)
    │   ├── StorageClosed            (+UsageError) the backend was used after ``aclose()``
    │   ├── StorageUnavailable       the database cannot be reached (connect, network, pool)
    │   ├── ConflictError            a uniqueness or integrity rule refused the write
    │   ├── LeaseLost                a lease or claim token is no longer the current one
    │   ├── MigrationError           the schema is not at this code's version (behind: run
    │   │                              ``asyncstore migrate``; ahead: newer code migrated it)
    │   └── QueryError               anything else the database refused
    └── OrchestratorError            the orchestrator (``asyncstore.orchestrator.errors``)
        ├── RuntimeClosed            (+UsageError) the runtime is closing: no new turn
        ├── ComponentNotBuilt        a flag's path has no running instance yet
        ├── WriterClosed             (+UsageError) put on a writer that is closing or closed
        ├── WriterOverloaded         a blocking put waited ``block_timeout_s`` in vain
        ├── Dropped                  (+anyio.WouldBlock) a ``*_nowait`` item the overflow
        │                              policy dropped (counted)
        ├── StreamNotStarted         (+UsageError) emit for a session not begun on the writer
        ├── SubscriberLagged         a slow subscriber was disconnected (``disconnect`` policy)
        ├── ActionRefused            a dashboard action cannot be done (no such target,
        │                              wrong state); nothing was changed
        ├── AuthError                password hashing and login limiting
        │   ├── InvalidHash          the stored hash is not an argon2 hash this can read
        │   ├── PasswordTooLong      the password exceeds ``max_password_bytes``
        │   ├── HashingOverloaded    ``max_waiting`` callers already wait for a hashing slot
        │   └── LoginLocked          the account or address is locked out (``retry_after_s``)
        └── WebhookError             the webhook package
            ├── HooksConfigError     hooks.toml is unreadable or invalid (every problem listed)
            ├── WebhookVerificationError  a received request's signature or timestamp is bad
            ├── NotPersisted         a durable event's outbox write failed (it is not queued)
            ├── DestinationRefused   a URL resolves to a private, loopback or link-local address
            ├── ResendRefused        a delivery cannot be re-sent (unknown, or body purged)
            ├── DeliveryFailed       one HTTP attempt got no usable answer
            └── AttemptFailed        one batch POST failed (status or transport error)

A test (``tests/unit/test_error_hierarchy.py``) checks this drawing against the classes.
"""

from __future__ import annotations

__all__ = [
    "AsyncstoreError",
    "ConfigurationError",
    "ConflictError",
    "InvalidArgument",
    "InvalidInput",
    "InvalidType",
    "LeaseLost",
    "MigrationError",
    "QueryError",
    "QueueCoordinated",
    "StorageClosed",
    "StorageError",
    "StorageUnavailable",
    "UsageError",
]


class AsyncstoreError(Exception):
    """The root of every error asyncstore raises itself (storage and orchestrator)."""


class UsageError(AsyncstoreError, RuntimeError):
    """The call does not fit the component's state: it is closed, not started, entered
    twice, or the call needs another one first. Fix the calling code; retrying the same
    call cannot succeed. Also a ``RuntimeError``."""


class QueueCoordinated(UsageError):
    """A plain task claim (``claim_tasks``, ``claim_jobs(TASKS, ...)``) named a coordinated
    queue (declared limits, or grouped tasks): the plain claim would bypass them, so it
    took nothing. Claim through ``claim_limited_tasks`` (workers switch to it on this)."""

    def __init__(self, queue: str) -> None:
        super().__init__(
            f"queue {queue!r} has limits or ordering groups: claim it through "
            "claim_limited_tasks (the plain claim would bypass them; nothing was claimed)"
        )
        self.queue = queue


class InvalidArgument(AsyncstoreError, ValueError):
    """An argument is refused; nothing was done or written. Also a ``ValueError``."""


class InvalidType(InvalidArgument, TypeError):
    """An argument (or a driver class handed to the library) is of a type it cannot use.
    Also a ``TypeError``."""


class StorageError(AsyncstoreError):
    """Base class of every error raised by the storage layer."""


class InvalidInput(StorageError, InvalidArgument):
    """An argument of a storage call is invalid; nothing was written."""


class ConfigurationError(InvalidInput):
    """The storage URL (or SQLite path) is malformed or names something that cannot be used,
    or the settings do not fit the topology (LISTEN or a session lock through a transaction
    pooler, an undeclared pooler: see ``storage._topology``).

    A subclass of ``InvalidInput`` (and so of ``ValueError``): the URL is an argument, it is
    refused before anything is written, and retrying the same URL cannot succeed. The
    message never contains the URL's password.
    """


class StorageClosed(StorageError, UsageError):
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
