"""The per-session parts of the stream writer: its state of a session, the ``SessionStream``
handle ``writer.session()`` yields, the errors of a superseded or exhausted session, and
the fast ``StreamEvent`` constructor of ``emit_nowait``. Split from ``orchestrator/streams.py``,
which re-exports ``SessionStream``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from anyio import WouldBlock

from asyncstore.orchestrator.errors import Dropped
from asyncstore.storage import InvalidInput, LeaseLost, StreamEvent
from asyncstore.storage._validate import INT64_MAX

if TYPE_CHECKING:
    from asyncstore.orchestrator.streams import StreamEventWriter

__all__ = [
    "LeaseView",
    "SessionState",
    "SessionStream",
    "new_stream_event",
    "seq_overflow",
    "superseded",
]


class SessionState:
    """The writer's state of one session: its epoch, next seq and last persisted seq."""

    __slots__ = ("ended", "epoch", "fenced", "last_persisted", "next_seq")

    def __init__(self, epoch: int, next_seq: int) -> None:
        self.epoch = epoch
        self.next_seq = next_seq
        self.last_persisted = next_seq - 1
        self.ended = False
        self.fenced = False  # the database refused this epoch: a newer holder exists


class LeaseView(Protocol):
    """What a ``SessionStream`` needs of a lease: whether it was lost (``HeldLease``)."""

    @property
    def lost(self) -> bool: ...


def superseded(session_id: str, epoch: int) -> LeaseLost:
    return LeaseLost(
        f"session {session_id!r}: epoch {epoch} is no longer the session's lease "
        "(a newer holder took over); its events are refused"
    )


def _event_constructor() -> Callable[[str, int, int, str, Any, datetime], StreamEvent]:
    """``StreamEvent(...)`` at about a third of the cost, for ``emit_nowait``'s hot path.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; this
    sets the slots directly, which makes an equal event (tests/test_streams_persist.py).
    Falls back to the class itself if ``StreamEvent`` is not the slotted dataclass of these
    six fields any more.
    """
    names = ("session_id", "epoch", "seq", "kind", "payload", "created_at")
    if tuple(f.name for f in dataclasses.fields(StreamEvent)) != names or not all(
        isinstance(StreamEvent.__dict__.get(n), types.MemberDescriptorType) for n in names
    ):
        return StreamEvent
    new = object.__new__
    s_id, s_epoch, s_seq, s_kind, s_payload, s_at = (StreamEvent.__dict__[n].__set__ for n in names)

    def make(
        session_id: str, epoch: int, seq: int, kind: str, payload: Any, created_at: datetime
    ) -> StreamEvent:
        event: StreamEvent = new(StreamEvent)
        s_id(event, session_id)
        s_epoch(event, epoch)
        s_seq(event, seq)
        s_kind(event, kind)
        s_payload(event, payload)
        s_at(event, created_at)
        return event

    return make


new_stream_event = _event_constructor()


def seq_overflow(session_id: str) -> InvalidInput:
    return InvalidInput(
        f"session {session_id!r} has used every seq up to {INT64_MAX}: no seq is left to store"
    )


class SessionStream:
    """A handle on one session of a ``StreamEventWriter`` (from ``writer.session()``).

    Emits raise ``LeaseLost`` once the session's lease (if one was given) is lost or the
    database refused the epoch: a superseded holder never emits with an epoch it lost.
    """

    __slots__ = ("lease", "session_id", "writer")

    def __init__(
        self, writer: StreamEventWriter, session_id: str, lease: LeaseView | None = None
    ) -> None:
        self.writer = writer
        self.session_id = session_id
        self.lease = lease

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost:
            raise LeaseLost(
                f"session {self.session_id!r}: the lease was lost; a superseded holder may not emit"
            )

    async def emit(
        self, kind: str, payload: Any, *, critical: bool | None = None
    ) -> StreamEvent | None:
        self._check_lease()
        writer = self.writer
        if writer._writer is not None:
            # ``writer.emit`` inline for the usual case (room in the buffer): one coroutine
            # less per event. A full buffer takes ``writer.emit``, which waits for room.
            try:
                return writer.emit_nowait(self.session_id, kind, payload, critical=critical)
            except Dropped:
                return None
            except WouldBlock:
                pass
        return await writer.emit(self.session_id, kind, payload, critical=critical)

    def emit_nowait(self, kind: str, payload: Any, *, critical: bool | None = None) -> StreamEvent:
        self._check_lease()
        return self.writer.emit_nowait(self.session_id, kind, payload, critical=critical)
