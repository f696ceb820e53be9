"""``Turn``: one agent turn of a session, as ``Runtime.turn`` yields it.

This module owns what a turn body uses: its session lease and cancel token, its stream
(``emit``), ``append_messages`` fenced by the lease, and ``fire`` for the webhooks, plus
``_superseded``, which tells whether a turn's epoch was superseded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from asyncstore.orchestrator.cancellation import (
    CancelToken,
)
from asyncstore.orchestrator.locks import (
    HeldLease,
)
from asyncstore.orchestrator.streams import (
    SessionStream,
    StreamEventWriter,
)
from asyncstore.orchestrator.webhooks import (
    HookDecision,
)
from asyncstore.storage import (
    ChatMessage,
    LeaseLost,
    NewMessage,
    NewOutboxMessage,
    StreamEvent,
)

if TYPE_CHECKING:
    from asyncstore.orchestrator.runtime import Runtime


class Turn:
    """One agent turn of a session, from ``Runtime.turn``: emit events, fire hooks, stop.

    ``lease`` is the session lease (``lease.token`` is the stream epoch and the fencing
    token of ``append_messages``); ``token`` the session's cancel token; ``cancel_scope``
    the scope the body runs in, cancelled when a cancel request arrives; ``paths`` tells
    which path (True: optimized) each per-session flag took for this turn.
    """

    __slots__ = ("_runtime", "cancel_scope", "lease", "paths", "session_id", "stream", "token")

    def __init__(
        self,
        runtime: Runtime,
        session_id: str,
        lease: HeldLease,
        token: CancelToken,
        stream: SessionStream,
        paths: Mapping[str, bool],
    ) -> None:
        self._runtime = runtime
        self.session_id = session_id
        self.lease = lease
        self.token = token
        self.stream = stream
        self.paths = paths
        self.cancel_scope = anyio.CancelScope()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    async def emit(
        self, kind: str, payload: Any, *, critical: bool | None = None
    ) -> StreamEvent | None:
        """Emit a stream event of this turn (see ``StreamEventWriter.emit``)."""
        return await self.stream.emit(kind, payload, critical=critical)

    async def append_messages(
        self,
        messages: Sequence[NewMessage],
        *,
        deliveries: Sequence[NewOutboxMessage] = (),
    ) -> list[ChatMessage]:
        """Append chat messages to the turn's session under its lease; the stored messages.

        Fenced by ``lease.token``: the database writes them only while it is the session's
        current, unexpired lease, so a turn whose lease was lost (expired and taken over,
        even before this process noticed) gets ``LeaseLost`` and nothing is written.
        ``deliveries`` are outbox rows committed in the same transaction (then the relays
        are woken, see ``Outbox.append_messages``). If cancelled, the messages (and their
        deliveries) were either all committed or not written.
        """
        if self.lease.lost:
            raise LeaseLost(f"session {self.session_id!r}: the turn's lease was lost")
        token = self.lease.token
        if deliveries:
            return await self._runtime.outbox.append_messages(
                self.session_id, messages, deliveries=deliveries, lease_token=token
            )
        return await self._runtime.storage.append_messages(
            self.session_id, messages, lease_token=token
        )

    async def fire(
        self,
        trigger: str,
        context: Mapping[str, Any] | None = None,
        *,
        result: Mapping[str, Any] | None = None,
    ) -> HookDecision | None:
        """Fire a webhook trigger with ``session_id`` in its context; None without hooks.

        If cancelled, see ``Webhooks.fire``: queued events stay queued.
        """
        hooks = self._runtime.webhooks
        if hooks is None:
            return None
        ctx = {"session_id": self.session_id, **(context or {})}
        return await hooks.fire(trigger, ctx, result=result)


def _superseded(turn: Turn, writer: StreamEventWriter) -> bool:
    """Whether the turn's epoch was superseded: its lease lost, or refused by the database."""
    return turn.lease.lost or writer.fenced(turn.session_id)
