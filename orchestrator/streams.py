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
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from operator import itemgetter
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, Protocol, Self

import anyio
import anyio.abc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from asyncstore.orchestrator.batching import (
    DROP_REASONS,
    Batch,
    BatchConfig,
    BatchWriter,
    BatchWriterStatistics,
    DeadLetter,
    Health,
    OverflowPolicy,
)
from asyncstore.orchestrator.broadcast import (
    MAX_NOTIFY_BYTES,
    BroadcastHub,
    NoteSegment,
    encode_advances,
    encode_stream_notes,
)
from asyncstore.orchestrator.errors import Dropped, StreamNotStarted, WriterClosed
from asyncstore.orchestrator.timing import Backoff
from asyncstore.storage import (
    AsyncStorageBackend,
    EncodedJSON,
    InvalidInput,
    LeaseLost,
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
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "CRITICAL_KINDS",
    "SessionStream",
    "StreamConfig",
    "StreamEventWriter",
    "StreamWriterStatistics",
    "open_stream_writer",
]

log = logging.getLogger("asyncstore.streams")

# A failed stream notification is retried twice, 50 then 100 ms later (then counted).
_NOTIFY_RETRY = Backoff(base_s=0.05, max_s=0.1, jitter=0.0)

CRITICAL_KINDS = frozenset({"turn_completed", "tool_result", "error", "cancelled"})

_STREAM_BATCH = BatchConfig(
    max_batch=500,
    max_batch_bytes=1 << 20,
    # A small batch waits at most 5 ms: other instances see events within p99 < 25 ms at
    # 20 events/s per session. Measured against group commit (``eager``), which flushes as
    # soon as the last batch is done: the same p99, 4x the inserts and notifications per
    # event at that rate (benchmarks/streams_bench.py, cross-process section). Under load
    # batches fill up to max_batch either way.
    flush_interval_s=0.005,
    capacity=50_000,
    overflow=OverflowPolicy.DROP_NEWEST,  # an ephemeral delta is dropped before it gets a seq
    block_timeout_s=5.0,
    # Ride out a database restart or failover: retry for 2 minutes of outage (while the
    # events fit in capacity) rather than a number of attempts, which a 5 s restart used
    # to exhaust in 1.5 s. Set stream.batch.retry_budget_s to change it.
    max_retries=None,
    retry_budget_s=120.0,
    retry_base_s=0.05,
    # Capped at 1 s: buffered events reach storage within about a second of its return,
    # and a process probes a down database at most once a second.
    retry_max_s=1.0,
)


class StreamConfig(BaseModel):
    """Stream writer settings (``stream.batching`` is ``batching``).

    ``batch`` given as a mapping (TOML ``[stream.batch]``, ``ASYNCSTORE_STREAM__BATCH__*``)
    changes only the keys it names; the others keep the stream writer's defaults, not the
    generic ``BatchConfig`` ones.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batching: bool = True
    batch: BatchConfig = _STREAM_BATCH
    critical_kinds: frozenset[str] = CRITICAL_KINDS
    notify: bool = Field(default=True, description="tell other instances what advanced")
    notify_inline: bool = Field(
        default=True,
        description="carry the stored events in the notification when they fit, so other "
        "instances publish them without a read (off: advances only, receivers fetch)",
    )
    notify_inline_max_bytes: int = Field(
        default=4 * MAX_NOTIFY_BYTES,
        ge=0,
        description="bytes of events carried inline at most, per flush with "
        "notify_with_insert, else of what waits for the notifier (it lags); the sessions "
        "beyond it are announced as advances and fetched",
    )
    notify_with_insert: bool = Field(
        default=True,
        description="send a flush's notification with its insert, in the same statement "
        "and transaction (Postgres: pg_notify in the append; SQLite: in process right after "
        "the commit, skipped while nothing in the process listens), instead of from the "
        "separate notifier task, one round trip per payload (off: the previous path)",
    )
    channel: str = "asyncstore_stream"

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_over_stream_defaults(cls, value: object) -> object:
        # Without this, setting one key (say retry_budget_s) would silently reset the rest
        # to BatchConfig's defaults: 5 retries, a blocking 10 000-item buffer.
        if isinstance(value, Mapping):
            return {**_STREAM_BATCH.model_dump(), **value}
        return value


@dataclass(frozen=True, slots=True)
class StreamWriterStatistics:
    sessions: int
    emitted: int
    dropped: Mapping[str, int]
    persisted: int
    lost: int  # dead-lettered after retries or at shutdown: published live, never stored
    notifications: int
    notify_failures: int
    refused: int  # events the database fence refused: their epoch was superseded
    fenced_sessions: int  # sessions whose current epoch the database refused (LeaseLost)
    insert_statements: int  # legacy path: one per event
    writer: BatchWriterStatistics | None

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("stream_sessions", "gauge", "Sessions with a live stream writer state."),
        Family("stream_events_emitted", "counter", "Events published."),
        Family("stream_events_persisted", "counter", "Events stored."),
        Family("stream_events_lost", "counter", "Events published but never stored."),
        Family(
            "stream_events_dropped",
            "counter",
            "Events refused, by reason.",
            ("reason",),
            known=DROP_REASONS,
        ),
        Family(
            "stream_events_refused",
            "counter",
            "Events the database fence refused: their epoch was superseded.",
        ),
        Family("stream_notifications", "counter", "Stream notifications sent."),
        Family("stream_notify_failures", "counter", "Notifications that failed."),
        Family("stream_insert_statements", "counter", "Legacy per-event INSERTs."),
        *(
            replace(f, where=f.where or "the batching writer")
            for f in BatchWriterStatistics.METRIC_FAMILIES
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("stream_sessions", {}, self.sessions)
        out.sample("stream_events_emitted", {}, self.emitted)
        out.sample("stream_events_persisted", {}, self.persisted)
        out.sample("stream_events_lost", {}, self.lost)
        out.samples("stream_events_dropped", {}, self.dropped)
        out.sample("stream_events_refused", {}, self.refused)
        out.sample("stream_notifications", {}, self.notifications)
        out.sample("stream_notify_failures", {}, self.notify_failures)
        out.sample("stream_insert_statements", {}, self.insert_statements)
        if self.writer is not None:
            self.writer.export(out)


class _Session:
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


def _superseded(session_id: str, epoch: int) -> LeaseLost:
    return LeaseLost(
        f"session {session_id!r}: epoch {epoch} is no longer the session's lease "
        "(a newer holder took over); its events are refused"
    )


class _Note:
    """What the notifier will announce for one session: stored seqs ``first..last``.

    ``events`` are the stored rows themselves (``StreamRow``, in seq order), to carry
    inline, until the pending inline bytes exceed the budget: then ``None`` and the
    session is announced by its advance alone.
    """

    __slots__ = ("epoch", "events", "first", "last", "nbytes", "stamp")

    def __init__(self, epoch: int, first: int, last: int, stamp: int, inline: bool) -> None:
        self.epoch = epoch
        self.first = first
        self.last = last
        self.stamp = stamp  # microseconds since the Unix epoch, taken before the insert
        self.events: list[StreamRow] | None = [] if inline else None
        self.nbytes = 0

    def segments(self, session_id: str) -> list[NoteSegment]:
        events = self.events
        if not events:
            return [NoteSegment(session_id, self.epoch, self.first, self.last)]
        out: list[NoteSegment] = []
        start = 0
        for i in range(1, len(events) + 1):
            # One segment per run of contiguous seqs in one epoch (a lost batch leaves a
            # hole; a new epoch may start mid-way).
            if i < len(events) and events[i][1:3] == (events[i - 1][1] + 1, events[i - 1][2]):
                continue
            out.append(self._segment(session_id, events[start:i]))
            start = i
        return out

    def _segment(self, session_id: str, run: list[StreamRow]) -> NoteSegment:
        return NoteSegment(
            session_id, run[0][2], run[0][1], run[-1][1], self.stamp, [(r[3], r[4]) for r in run]
        )


class StreamEventWriter:
    """Assigns, publishes and persists stream events; use as ``async with``.

    Per session: ``await begin(session_id, epoch=lease.token)`` (or ``async with
    writer.session(...)``), then ``emit``. The epoch is the session lease's fencing token,
    so a new holder starts a new epoch that continues after the highest seq this writer
    assigned or, for a session new to it, the highest persisted seq.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        hub: BroadcastHub | None = None,
        config: StreamConfig | None = None,
    ) -> None:
        self.storage = storage
        self.hub = hub
        self.config = config or StreamConfig()
        if self.config.notify and self.config.notify_with_insert and self.config.batching:
            # The trusted append sends it unchecked, in the same transaction as the rows: a
            # bad name must fail here, not every flush.
            check_channel(self.config.channel)
        self._sessions: dict[str, _Session] = {}
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
            )
        self._emitted = 0
        self._dropped_legacy = 0
        self._persisted = 0
        self._lost = 0
        self._notifications = 0
        self._notify_failures = 0
        self._refused = 0
        self._fenced = 0
        self._notes: dict[str, _Note] = {}
        self._inline_bytes = 0
        self._notes_wake = anyio.Event()
        self._notes_closed = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._inserts = 0
        self._closed = False

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.config.notify:
            self._tg.start_soon(self._notifier)
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
            self._notes_closed = True
            self._notes_wake.set()
            tg, self._tg = self._tg, None
            if tg is not None:
                # The notifier sends what the final flushes advanced, then returns.
                await tg.__aexit__(None, None, None)
        return None

    async def _notifier(self) -> None:
        """Announce persisted batches, coalescing whatever piled up meanwhile.

        Runs beside the flusher so a flush never waits for its notification's round trip;
        under load several flushes share one notification. The events ride inline while
        they fit (``encode_stream_notes``: one payload per 7800 bytes, as few as possible),
        else their advance does. A failed send is retried a few times, then counted: other
        instances catch up at the session's next notification, which then does not
        continue their ring, so they fetch from where they are.
        """
        # Shielded so the last flushes are still announced when the owner is cancelled;
        # it returns as soon as the writer has closed and nothing is left to send.
        with anyio.CancelScope(shield=True):
            await self._notify_loop()

    async def _notify_loop(self) -> None:
        while True:
            if not self._notes:
                if self._notes_closed:
                    return
                await self._notes_wake.wait()
                self._notes_wake = anyio.Event()
                continue
            await self._send_notes()

    async def _send_notes(self) -> None:
        """Send what the notes hold, then forget them (a failed send is retried, counted)."""
        notes, self._notes = self._notes, {}
        self._inline_bytes = 0
        payloads = encode_stream_notes(
            [seg for sid, note in notes.items() for seg in note.segments(sid)]
        )
        for payload in payloads:
            for attempt in range(3):
                try:
                    await self.storage.notify(self.config.channel, payload)
                except Exception as exc:
                    if attempt == 2:
                        self._notify_failures += 1
                        log.warning("stream notification failed, not retried: %r", exc)
                    else:
                        await anyio.sleep(_NOTIFY_RETRY.delay(attempt + 1))
                    continue
                self._notifications += 1
                break

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
                state = _Session(epoch, last + 1)
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
            raise _superseded(session_id, state.epoch)
        if kind not in self._kinds:
            self._kinds.add(check_name(kind, "kind"))
        data = encode_json(payload)
        seq = state.next_seq
        if seq > INT64_MAX:
            raise _seq_overflow(session_id)
        epoch = state.epoch
        is_critical = kind in self.config.critical_kinds if critical is None else critical
        size = len(data)
        writer.put_nowait((session_id, seq, epoch, kind, data), critical=is_critical, nbytes=size)
        state.next_seq = seq + 1
        event = new_stream_event(session_id, epoch, seq, kind, payload, datetime.now(UTC))
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
            raise _superseded(session_id, state.epoch)
        check_name(kind, "kind")
        data = encode_json(payload)
        seq = state.next_seq
        if seq > INT64_MAX:
            raise _seq_overflow(session_id)
        state.next_seq = seq + 1
        event = StreamEvent(session_id, state.epoch, seq, kind, payload, datetime.now(UTC))
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
            raise _superseded(session_id, state.epoch)
        self._persisted += 1
        state.last_persisted = seq
        if self.hub is not None:
            self.hub.mark_persisted(session_id, seq)
        if self.config.notify:
            for note in encode_advances([(session_id, state.epoch, seq, seq)]):
                await self.storage.notify(self.config.channel, note)
                self._notifications += 1
        return event

    async def flush(self) -> None:
        """Barrier: returns once every event emitted before the call is persisted (or lost).

        If cancelled, stops waiting; the flush still happens.
        """
        if self._writer is not None:
            await self._writer.flush()

    # -- the sink --------------------------------------------------------------------------

    async def _persist(self, batch: Batch[StreamRow]) -> None:
        stamp = time.time_ns() // 1000  # ~ the database's now() for these rows
        cfg = self.config
        notify = cfg.notify
        with_insert = notify and cfg.notify_with_insert
        payloads: list[str] | None = None
        if with_insert and self.storage._notify_listened(cfg.channel):
            payloads = self._batch_payloads(batch, stamp)
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
            self._notifications += len(payloads)
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
                self._announce(session_id, events, stamp)
        self._persisted += len(batch.items)
        if announce:
            if with_insert:
                # The insert sent nothing (the fence refused some events): announce what it
                # stored now, before the next flush's notification, so receivers see each
                # session's seqs in order.
                await self._send_notes()
            else:
                # At most one notification per flush, sent by the notifier (never per
                # event: Postgres serializes committing NOTIFY transactions on one lock).
                self._notes_wake.set()

    def _batch_payloads(self, batch: Batch[StreamRow], stamp: int) -> list[str]:
        """The notification payloads announcing every event of ``batch`` as stored, their
        events inline while they fit ``notify_inline_max_bytes`` (then the advance alone)."""
        inline = self.config.notify_inline
        left = self.config.notify_inline_max_bytes
        # Sizes as _announce counts them (8 bytes a row, kind and payload); a kind is at
        # most 64 characters, so a batch under this bound fits whole without counting.
        count = inline and batch.nbytes + 73 * len(batch.items) > left
        segments: list[NoteSegment] = []
        for key, events in batch.groups.items():
            session_id = str(key)
            first, last = events[0][1], events[-1][1]
            epoch = events[-1][2]
            carry = inline
            if count:
                size = 8 * len(events)
                for row in events:
                    size += len(row[3]) + len(row[4])
                carry = size <= left
                if carry:
                    left -= size
            if not carry:
                segments.append(NoteSegment(session_id, epoch, first, last))
            elif last - first == len(events) - 1 and events[0][2] == epoch:
                # One run of contiguous seqs in one epoch: the usual case.
                runs = [r[3:] for r in events]  # (kind, payload) of each row
                segments.append(NoteSegment(session_id, epoch, first, last, stamp, runs))
            else:
                note = _Note(epoch, first, last, stamp, True)
                note.events = events
                segments.extend(note.segments(session_id))
        return encode_stream_notes(segments)

    def _announce(self, session_id: str, events: list[StreamRow], stamp: int) -> None:
        """Queue stored events of a session for the notifier (inline while they fit)."""
        _, first, _, _, _ = events[0]
        _, last, epoch, _, _ = events[-1]
        note = self._notes.get(session_id)
        if note is None:
            note = _Note(epoch, first, last, stamp, self.config.notify_inline)
            self._notes[session_id] = note
        else:
            note.epoch, note.first, note.last = epoch, min(note.first, first), last
        carried = note.events
        if carried is None:
            return
        size = 8 * len(events)
        for row in events:
            size += len(row[3]) + len(row[4])
        if self._inline_bytes + size <= self.config.notify_inline_max_bytes:
            carried.extend(events)
            note.nbytes += size
            self._inline_bytes += size
        else:
            # The notifier lags: announce this session's advance and let receivers fetch,
            # rather than hold (and send) ever more notifications' worth of events.
            self._inline_bytes -= note.nbytes
            note.events = None

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
            notifications=self._notifications,
            notify_failures=self._notify_failures,
            refused=self._refused,
            fenced_sessions=self._fenced,
            insert_statements=self._inserts,
            writer=writer,
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
    s_id, s_epoch, s_seq, s_kind, s_payload, s_at = (
        StreamEvent.__dict__[n].__set__ for n in names
    )

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


def _seq_overflow(session_id: str) -> InvalidInput:
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
                f"session {self.session_id!r}: the lease was lost; a superseded holder "
                "may not emit"
            )

    async def emit(
        self, kind: str, payload: Any, *, critical: bool | None = None
    ) -> StreamEvent | None:
        self._check_lease()
        return await self.writer.emit(self.session_id, kind, payload, critical=critical)

    def emit_nowait(self, kind: str, payload: Any, *, critical: bool | None = None) -> StreamEvent:
        self._check_lease()
        return self.writer.emit_nowait(self.session_id, kind, payload, critical=critical)


@asynccontextmanager
async def open_stream_writer(
    storage: AsyncStorageBackend,
    hub: BroadcastHub | None = None,
    config: StreamConfig | None = None,
) -> AsyncIterator[StreamEventWriter]:
    """Run a ``StreamEventWriter`` while the block runs; leaving it flushes what is buffered.

    ``hub`` (optional) receives every emitted event for live subscribers. ``async with
    StreamEventWriter(...)`` does the same.
    """
    async with StreamEventWriter(storage, hub, config) as writer:
        yield writer
