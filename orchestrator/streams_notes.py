"""What a ``StreamEventWriter`` tells other instances about the events it stored.

``StreamNotifier`` builds the notifications of persisted batches: carried by the insert
itself (``batch_payloads``, with ``notify_with_insert``) or queued per session
(``announce``) and sent by its own task (``run``), coalescing the flushes that pile up
meanwhile. The events ride inline while they fit the configured budget, else their
advance does (receivers fetch). Split from ``orchestrator/streams.py``.
"""

from __future__ import annotations

import logging

import anyio

from asyncstore.orchestrator.batching import Batch
from asyncstore.orchestrator.broadcast import NoteSegment, encode_stream_notes
from asyncstore.orchestrator.streams_config import StreamConfig
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock
from asyncstore.storage import AsyncStorageBackend
from asyncstore.storage.base import StreamRow

__all__ = ["SessionNote", "StreamNotifier"]

log = logging.getLogger("asyncstore.streams")

# A failed stream notification is retried twice, 50 then 100 ms later (then counted).
_NOTIFY_RETRY = Backoff(base_s=0.05, max_s=0.1, jitter=0.0)


class SessionNote:
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


class StreamNotifier:
    """The notifications of one stream writer, and the task that sends the queued ones.

    ``notifications`` counts payloads sent (by ``send`` or, counted by the writer, with an
    insert), ``failures`` those given up after retries.
    """

    def __init__(
        self, storage: AsyncStorageBackend, config: StreamConfig, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.storage = storage
        self.config = config
        self._clock = clock
        self.notifications = 0
        self.failures = 0
        self._notes: dict[str, SessionNote] = {}
        self._inline_bytes = 0
        self._wake = anyio.Event()
        self._closed = False

    def wake(self) -> None:
        """Tell ``run`` that notes wait."""
        self._wake.set()

    def close(self) -> None:
        """``run`` sends what waits, then returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
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
            while True:
                if not self._notes:
                    if self._closed:
                        return
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                await self.send()

    async def send(self) -> None:
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
                        self.failures += 1
                        log.warning("stream notification failed, not retried: %r", exc)
                    else:
                        await self._clock.sleep(_NOTIFY_RETRY.delay(attempt + 1))
                    continue
                self.notifications += 1
                break

    def batch_payloads(self, batch: Batch[StreamRow], stamp: int) -> list[str]:
        """The notification payloads announcing every event of ``batch`` as stored, their
        events inline while they fit ``notify_inline_max_bytes`` (then the advance alone)."""
        inline = self.config.notify_inline
        left = self.config.notify_inline_max_bytes
        # Sizes as announce counts them (8 bytes a row, kind and payload); a kind is at
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
                note = SessionNote(epoch, first, last, stamp, True)
                note.events = events
                segments.extend(note.segments(session_id))
        return encode_stream_notes(segments)

    def announce(self, session_id: str, events: list[StreamRow], stamp: int) -> None:
        """Queue stored events of a session for the notifier (inline while they fit)."""
        _, first, _, _, _ = events[0]
        _, last, epoch, _, _ = events[-1]
        note = self._notes.get(session_id)
        if note is None:
            note = SessionNote(epoch, first, last, stamp, self.config.notify_inline)
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
