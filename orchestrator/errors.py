"""Errors raised by the orchestrator's components (storage errors live in ``storage.errors``).

    OrchestratorError
    ├── WriterClosed          put on a writer that is closing or closed
    ├── WriterOverloaded      a blocking put waited ``block_timeout_s`` for room in vain
    ├── StreamNotStarted      emit for a session the writer was not told about (``begin``)
    └── SubscriberLagged      a slow subscriber was disconnected by the ``disconnect`` policy

A full buffer on the non-blocking path raises ``anyio.WouldBlock`` (trio's convention).
"""

from __future__ import annotations

__all__ = [
    "OrchestratorError",
    "StreamNotStarted",
    "SubscriberLagged",
    "WriterClosed",
    "WriterOverloaded",
]


class OrchestratorError(Exception):
    """Base class of every error the orchestrator raises itself."""


class WriterClosed(OrchestratorError):
    """The writer is closing or closed; it accepts nothing more."""


class WriterOverloaded(OrchestratorError):
    """A blocking put found no room within its timeout. Nothing was written by the caller."""


class StreamNotStarted(OrchestratorError):
    """``emit`` for a session that has no epoch on this writer: call ``begin`` first."""


class SubscriberLagged(OrchestratorError):
    """The subscriber fell behind the ring and the hub is configured to disconnect it."""
