"""StreamEventWriter: per-session sequence numbers, memory-first publish, batched persistence.

``emit`` assigns the next ``(epoch, seq)`` of a session in memory, publishes the event to
the BroadcastHub at once (live subscribers never wait for the database) and hands it to a
BatchWriter whose sink appends whole batches for many sessions in one round trip, with
the flush's notification in the same statement and transaction (``notify_with_insert``;
off, a separate notifier task sends it, coalescing flushes). It carries the stored events
when they fit (other instances publish them without a read) and otherwise says what
advanced (they fetch it). Events are announced only once stored.
Boundary events (turn completed, tool result, error, cancelled) are critical: never
dropped, and they trigger an immediate flush. With ``batching=False`` (the legacy path,
flag ``stream.batching``) every event is inserted by the caller, one statement each.

Settings and statistics live in ``streams_config``, the notifications in
``streams_notes``, the per-session state and handle in ``streams_session``; the public
names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from operator import itemgetter
from types import MappingProxyType, TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from asyncstore.orchestrator.batching import Batch, BatchWriter, DeadLetter, Health
from asyncstore.orchestrator.broadcast import BroadcastHub, encode_advances
from asyncstore.orchestrator.errors import Dropped, StreamNotStarted, WriterClosed
from asyncstore.orchestrator.streams_config import (
    CRITICAL_KINDS,
    StreamConfig,
    StreamWriterStatistics,
)
from asyncstore.orchestrator.streams_notes import StreamNotifier
from asyncstore.orchestrator.streams_session import (
    LeaseView,
    SessionState,
    SessionStream,
    new_stream_event,
    seq_overflow,
    superseded,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import (
    AsyncStorageBackend,
    EncodedJSON,
    InvalidInput,
    NewStreamEvent,
    StreamAppend,
    StreamEvent,
)
from asyncstore.storage._validate import (
    INT64_MAX,
    check_channel,
    check_int,
    check_name,
    encode_json,
)
from asyncstore.storage.base import StreamRow
from asyncstore.storage.errors import UsageError, is_retryable

__all__ = [
    "CRITICAL_KINDS",
    "LeaseView",
    "SessionStream",
    "StreamConfig",
    "StreamEventWriter",
    "StreamWriterStatistics",
    "open_stream_writer",
]

log = logging.getLogger("asyncstore.streams")


class StreamEventWriter:
    """Assigns, publishes and persists stream events; use as ``async with``.

    Per session: ``await begin(session_id, epoch=lease.token)`` (or ``async with
    writer.session(...)``), then ``emit``. The epoch is the session lease's fencing token,
    so a new holder starts a new epoch that continues after the highest seq this writer
    assigned or, for a session new to it, the highest persisted seq. ``clock``: see
    ``open_stream_writer``.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        hub: BroadcastHub | None = None,
        config: StreamConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.storage = storage
        self.hub = hub
        self.config = config or StreamConfig()
        if self.config.notify and self.config.notify_with_insert and self.config.batching:
            # The trusted append sends it unchecked, in the same transaction as the rows: a
            # bad name must fail here, not every flush.
            check_channel(self.config.channel)
        self._clock = clock
        # An emitted event's created_at: datetime.now(UTC) itself on the system clock.
        self._utcnow: Callable[[], datetime] = (
            partial(datetime.now, UTC)
            if clock is SYSTEM_CLOCK
            else lambda: datetime.fromtimestamp(clock.time(), UTC)
        )
        self._sessions: dict[str, SessionState] = {}
        self._kinds: set[str] = set()
        self._writer: BatchWriter[StreamRow] | None = None
        if self.config.batching:
            self._writer = BatchWriter(
                self._persist,
                self.config.batch,
                key=itemgetter(0),  # the row's session_id
                on_dead_letter=self._lost_batch,
                retry_if=is_retryable,  # a bug or a closed storage is not an outage
                name="stream-events",
                clock=clock,
            )
        self._emitted = 0
        self._dropped_legacy = 0
        self._persisted = 0
        self._lost = 0
        self._refused = 0
        self._fenced = 0
        self._notifier = StreamNotifier(storage, self.config, clock)
        self._tg: anyio.abc.TaskGroup | None = None
        self._inserts = 0
        self._closed = False

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.config.notify:
            self._tg.start_soon(self._notifier.run)
        if self._writer is not None:
            await self._writer.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        try:
            if self._writer is not None:
                # The batch writer drains (shielded, bounded by its drain timeout).
                await self._writer.__aexit__(exc_type, exc, tb)
        finally:
            self._notifier.close()
            tg, self._tg = self._tg, None
            if tg is not None:
                # The notifier sends what the final flushes advanced, then returns.
                await tg.__aexit__(None, None, None)
        return None

    # -- sessions ------------------------------------------------------------------------

    async def begin(self, session_id: str, epoch: int) -> int:
        """Start (or continue) writing a session under ``epoch``; returns the last seq before.

        Reads the highest persisted seq once when this writer has not seen the session.
        ``epoch`` may not go back; a newer epoch lifts a refusal of the older one. If
        cancelled, nothing changed.
        """
        check_int(epoch, "epoch")  # what the database can store (a row's epoch)
        state = self._sessions.get(session_id)
        if state is None:
            last = await self.storage.last_stream_seq(session_id)
            state = self._sessions.get(session_id)  # another begin may have won meanwhile
            if state is None:
                state = SessionState(epoch, last + 1)
                self._sessions[session_id] = state
                if self.hub is not None:
                    self.hub.note_head(session_id, epoch, last)
        if epoch < state.epoch:
            raise InvalidInput(
                f"epoch {epoch} of session {session_id!r} is older than its current epoch "
                f"{state.epoch}: a superseded holder may not write"
            )
        if epoch > state.epoch:
            state.fenced = False
        state.epoch = epoch
        state.ended = False
        return state.next_seq - 1

    def end(self, session_id: str) -> None:
        """Stop writing a session; its state is dropped once its events are persisted."""
        state = self._sessions.get(session_id)
        if state is None:
            return
        state.ended = True
        if state.last_persisted >= state.next_seq - 1 or self._writer is None:
            del self._sessions[session_id]

    def fenced(self, session_id: str) -> bool:
        """Whether the database refused the session's current epoch (a newer holder)."""
        state = self._sessions.get(session_id)
        return state is not None and state.fenced

    @asynccontextmanager
    async def session(
        self, session_id: str, epoch: int, *, lease: LeaseView | None = None
    ) -> AsyncIterator[SessionStream]:
        """``begin`` on entry, ``end`` on exit; yields a handle bound to the session.

        With ``lease`` (the ``HeldLease`` whose token is ``epoch``), the handle refuses to
        emit once the lease is lost (``LeaseLost``), before the database would refuse it.
        """
        await self.begin(session_id, epoch)
        try:
            yield SessionStream(self, session_id, lease)
        finally:
            self.end(session_id)

    # -- emitting ------------------------------------------------------------------------

    def emit_nowait(
        self, session_id: str, kind: str, payload: Any, *, critical: bool | None = None
    ) -> StreamEvent:
        """Assign, publish and buffer an event without waiting; the event, else raises.

        ``critical`` defaults to ``kind in critical_kinds``. The ``*_nowait`` rule
        (``orchestrator.errors``): a full buffer drops an ephemeral event (counted, before
        it gets a seq, so nobody sees a gap) and raises ``Dropped``, an
        ``anyio.WouldBlock``; a critical one (never dropped), or any under the ``block``
        policy, raises plain ``anyio.WouldBlock``: ``emit`` is the waiting variant. Invalid
        input raises ``InvalidInput`` and changes nothing. ``LeaseLost`` once the database
        refused the session's current epoch (a newer lease holder exists). Legacy mode: use
        ``emit``.

        The row buffered here is stored as it is, not validated again
        (``storage._append_stream_rows``), so everything the public ``append_stream_events``
        would refuse is refused here or in ``begin``, by the same checks: the session id
        (``check_id``, through ``begin``'s ``last_stream_seq``), the epoch (``check_int`` in
        ``begin``), the seq (at most ``2**63 - 1``), the kind (``check_name``, once per
        distinct kind) and the payload (``encode_json``, which also encodes it, once). Seqs
        only grow within a session, so a batch never holds one ``(session_id, seq)`` twice.
        """
        writer = self._writer
        if writer is None:
            raise UsageError("stream.batching is off: use `await emit(...)`")
        state = self._sessions.get(session_id)
        if state is None or state.ended:
            raise StreamNotStarted(f"session {session_id!r} has no epoch here: begin() first")
        if state.fenced:
            raise superseded(session_id, state.epoch)
        if kind not in self._kinds:
            self._kinds.add(check_name(kind, "kind"))
        data = encode_json(payload)
        seq = state.next_seq
        if seq > INT64_MAX:
            raise seq_overflow(session_id)
        epoch = state.epoch
        is_critical = kind in self.config.critical_kinds if critical is None else critical
        size = len(data)
        writer.put_nowait((session_id, seq, epoch, kind, data), critical=is_critical, nbytes=size)
        state.next_seq = seq + 1
        event = new_stream_event(session_id, epoch, seq, kind, payload, self._utcnow())
        self._emitted += 1
        if self.hub is not None:
            self.hub.publish(event, size)
        if is_critical:
            writer.request_flush()
        return event

    async def emit(
        self, session_id: str, kind: str, payload: Any, *, critical: bool | None = None
    ) -> StreamEvent | None:
        """Like ``emit_nowait``, but a critical event waits for room instead of raising.

        None when the overflow policy dropped the event (where ``emit_nowait`` raises
        ``Dropped``). Waits at most the batch ``block_timeout_s`` (then
        ``WriterOverloaded``). In legacy mode (``batching=False``) it inserts the event and
        waits for the insert. If cancelled while waiting for room, the event was not emitted.
        """
        if self._writer is None:
            return await self._emit_legacy(session_id, kind, payload)
        while True:
            try:
                return self.emit_nowait(session_id, kind, payload, critical=critical)
            except Dropped:
                return None
            except anyio.WouldBlock:
                await self._writer.wait_for_room(len(encode_json(payload)))

    async def _emit_legacy(self, session_id: str, kind: str, payload: Any) -> StreamEvent:
        if self._closed:
            raise WriterClosed("stream writer is closed")
        state = self._sessions.get(session_id)
        if state is None or state.ended:
            raise StreamNotStarted(f"session {session_id!r} has no epoch here: begin() first")
        if state.fenced:
            raise superseded(session_id, state.epoch)
        check_name(kind, "kind")
        data = encode_json(payload)
        seq = state.next_seq
        if seq > INT64_MAX:
            raise seq_overflow(session_id)
        state.next_seq = seq + 1
        event = StreamEvent(session_id, state.epoch, seq, kind, payload, self._utcnow())
        self._emitted += 1
        if self.hub is not None:
            self.hub.publish(event, len(data))
        try:
            result = await self.storage.append_stream_events(
                [NewStreamEvent(session_id, state.epoch, seq, kind, EncodedJSON(data))]
            )
        except BaseException:
            self._lost += 1
            raise
        self._inserts += 1
        if result.refused:
            self._note_refused(result, [(session_id, seq, state.epoch, kind, data)])
            state.last_persisted = seq
            raise superseded(session_id, state.epoch)
        self._persisted += 1
        state.last_persisted = seq
        if self.hub is not None:
            self.hub.mark_persisted(session_id, seq)
        if self.config.notify:
            for note in encode_advances([(session_id, state.epoch, seq, seq)]):
                await self.storage.notify(self.config.channel, note)
                self._notifier.notifications += 1
        return event

    async def flush(self) -> None:
        """Barrier: returns once every event emitted before the call is persisted (or lost).

        If cancelled, stops waiting; the flush still happens.
        """
        if self._writer is not None:
            await self._writer.flush()

    # -- the sink --------------------------------------------------------------------------

    async def _persist(self, batch: Batch[StreamRow]) -> None:
        stamp = int(self._clock.time() * 1_000_000)  # ~ the database's now() for these rows
        cfg = self.config
        notify = cfg.notify
        with_insert = notify and cfg.notify_with_insert
        payloads: list[str] | None = None
        if with_insert and self.storage._notify_listened(cfg.channel):
            payloads = self._notifier.batch_payloads(batch, stamp)
        # Trusted: every row was built and checked by emit_nowait (see its docstring). With
        # ``payloads``, the storage sends them in the insert's transaction unless the fence
        # refused any of the batch's events.
        result = await self.storage._append_stream_rows(
            batch.items, notify=(cfg.channel, payloads) if payloads else None
        )
        refused = result.refused
        if refused:
            self._note_refused(result, batch.items)
        elif payloads:
            self._notifier.notifications += len(payloads)
        announce = notify and (refused or not with_insert)
        for key, events in batch.groups.items():
            session_id = str(key)
            self._settled(session_id, events[-1][1])
            if refused:
                # Refused events are not stored: nobody is told about them.
                events = [e for e in events if (session_id, e[2]) not in refused]
                if not events:
                    continue
            if announce:
                self._notifier.announce(session_id, events, stamp)
        self._persisted += len(batch.items)
        if announce:
            if with_insert:
                # The insert sent nothing (the fence refused some events): announce what it
                # stored now, before the next flush's notification, so receivers see each
                # session's seqs in order.
                await self._notifier.send()
            else:
                # At most one notification per flush, sent by the notifier (never per
                # event: Postgres serializes committing NOTIFY transactions on one lock).
                self._notifier.wake()

    def _note_refused(self, result: StreamAppend, written: Iterable[StreamRow]) -> None:
        """Count what the fence refused, stop the sessions whose current epoch it was, and
        take the refused events back from the hub (they were published before persisting)."""
        refused = 0
        first: dict[tuple[str, int], int] = {}
        for session_id, seq, epoch, _, _ in written:
            pair = (session_id, epoch)
            if pair in result.refused:
                refused += 1
                first[pair] = min(first.get(pair, seq), seq)
        self._refused += refused
        if self.hub is not None:
            for (session_id, epoch), seq in first.items():
                self.hub.retract(session_id, epoch, seq)
        for session_id, epoch in result.refused:
            state = self._sessions.get(session_id)
            if state is not None and state.epoch == epoch and not state.fenced:
                state.fenced = True
                self._fenced += 1
        log.warning(
            "%d stream events refused: sessions %s were taken over by a newer lease holder",
            refused,
            sorted(sid for sid, _ in result.refused),
        )

    def _lost_batch(self, letter: DeadLetter[StreamRow]) -> None:
        self._lost += len(letter.items)
        log.error(
            "%d stream events could not be persisted (%s): %r",
            len(letter.items),
            letter.reason,
            letter.error,
        )
        last: dict[str, int] = {}
        for session_id, seq, _, _, _ in letter.items:
            last[session_id] = seq
        for session_id, seq in last.items():
            self._settled(session_id, seq)

    def _settled(self, session_id: str, seq: int) -> None:
        if self.hub is not None:
            self.hub.mark_persisted(session_id, seq)
        state = self._sessions.get(session_id)
        if state is None:
            return
        state.last_persisted = max(state.last_persisted, seq)
        if state.ended and state.last_persisted >= state.next_seq - 1:
            del self._sessions[session_id]

    # -- observation -----------------------------------------------------------------------

    def health(self) -> Health:
        """The batch writer's health: e.g. ``storage unavailable for 4.2 s: 123 items
        buffered, oldest 4.3 s``; the legacy path (no buffer) is always healthy while open."""
        if self._writer is not None:
            return self._writer.health()
        return Health(False, "stream writer is closed") if self._closed else Health(True)

    def statistics(self) -> StreamWriterStatistics:
        writer = self._writer.statistics() if self._writer is not None else None
        dropped = dict(writer.dropped) if writer is not None else {}
        return StreamWriterStatistics(
            sessions=len(self._sessions),
            emitted=self._emitted,
            dropped=MappingProxyType(dropped),
            persisted=self._persisted,
            lost=self._lost,
            notifications=self._notifier.notifications,
            notify_failures=self._notifier.failures,
            refused=self._refused,
            fenced_sessions=self._fenced,
            insert_statements=self._inserts,
            writer=writer,
        )


@asynccontextmanager
async def open_stream_writer(
    storage: AsyncStorageBackend,
    hub: BroadcastHub | None = None,
    config: StreamConfig | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[StreamEventWriter]:
    """Run a ``StreamEventWriter`` while the block runs; leaving it flushes what is buffered.

    ``hub`` (optional) receives every emitted event for live subscribers. ``clock`` (as
    ``open_batch_writer``'s) times the batch writer's flushes and retries, the notifier's
    retries and the events' ``created_at``; a test passes a ``ManualClock``. ``async with
    StreamEventWriter(...)`` does the same.
    """
    async with StreamEventWriter(storage, hub, config, clock=clock) as writer:
        yield writer
