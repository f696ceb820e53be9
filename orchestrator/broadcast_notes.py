"""The notifications the stream writer sends and the hub reads: what advanced, and the
stored events themselves when they fit.

``encode_stream_notes`` packs per-session advances (and, inline, the events) into as few
payloads under ``MAX_NOTIFY_BYTES`` as possible; ``decode_stream_notes`` reads them back,
skipping before any event is built what the reader says it does not need. The older
advance-only format (``encode_advances`` / ``decode_advance``) stays readable.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from asyncstore.orchestrator.broadcast_config import MAX_NOTIFY_BYTES
from asyncstore.storage import StreamEvent
from asyncstore.storage.errors import InvalidArgument


def encode_advances(advances: list[tuple[str, int, int, int]]) -> list[str]:
    """Notification payloads for ``(session_id, epoch, first_seq, last_seq)`` advances.

    One payload when it fits, else as few as the size limit allows: a flush sends one
    notification, not one per event or per session. (The advances-only form of
    :func:`encode_stream_notes`.)
    """
    return encode_stream_notes([NoteSegment(*advance) for advance in advances])


def decode_advance(payload: str) -> list[tuple[str, int, int, int]]:
    """The advances of one payload, old or new format; malformed entries are skipped."""
    return [(n.session_id, n.epoch, n.first, n.last) for n in decode_stream_notes(payload)]


@dataclass(frozen=True, slots=True)
class NoteSegment:
    """What a writer announces for one session: seqs ``first..last``, stored, in ``epoch``.

    ``events`` are those events' ``(kind, encoded payload)`` in seq order, to carry inline
    when they fit; ``None`` announces the advance alone (receivers fetch it).
    ``created_at_us``: when they were stored, in microseconds since the Unix epoch.
    """

    session_id: str
    epoch: int
    first: int
    last: int
    created_at_us: int = 0
    events: Sequence[tuple[str, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class StreamNote:
    """One decoded announcement: seqs ``first..last`` of ``epoch`` are stored.

    ``events`` holds them when the notification carried them inline, else ``None``.
    """

    session_id: str
    epoch: int
    first: int
    last: int
    events: tuple[StreamEvent, ...] | None = None


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


class _Packer:
    """Fills payloads of at most ``limit`` bytes with entries, in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.payloads: list[str] = []
        self.entries: list[bytes] = []
        self.size = 1  # "[" + each entry and its "," or "]"

    def room(self) -> int:
        return self.limit - self.size

    def add(self, entry: bytes) -> None:
        if self.entries and len(entry) + 1 > self.room():
            self.close()
        self.entries.append(entry)
        self.size += len(entry) + 1

    def close(self) -> None:
        if self.entries:
            self.payloads.append((b"[" + b",".join(self.entries) + b"]").decode())
            self.entries, self.size = [], 1


def encode_stream_notes(
    segments: Iterable[NoteSegment], limit: int = MAX_NOTIFY_BYTES
) -> list[str]:
    """Notification payloads announcing ``segments``, their events inline where they fit.

    The payload is a JSON array. Each announcement is the advance entry
    ``[session_id, epoch, first_seq, last_seq]`` (the format every version reads), and when
    the events ride along, the object ``{"t": created_at_us, "e": [[kind, payload], ...]}``
    right after it, holding exactly the events ``first..last``. A receiver that does not
    know the object skips it (old receivers skip any entry that is not a 4-item list) and
    fetches the advance from the database as before, so mixed fleets keep working.

    Payloads are filled in order up to ``limit`` bytes of UTF-8 (not characters): a
    segment's events continue in the next payload when the current one is full, each
    part announced by its own advance, so every payload stands alone. An event too big to
    fit even an empty payload is announced by its advance only. A session's seqs keep
    their order across payloads; the writer sends the payloads in order.
    """
    packer = _Packer(limit)
    prefixes: dict[str, bytes] = {}  # each kind's '["kind",' once
    for seg in segments:
        if seg.events is None:
            packer.add(orjson.dumps([seg.session_id, seg.epoch, seg.first, seg.last]))
            continue
        if len(seg.events) != seg.last - seg.first + 1:
            raise InvalidArgument(
                f"segment of {seg.session_id!r} announces seqs {seg.first}..{seg.last} but "
                f"carries {len(seg.events)} events"
            )
        items = []
        for kind, data in seg.events:
            prefix = prefixes.get(kind)
            if prefix is None:
                prefix = prefixes[kind] = b"[" + orjson.dumps(kind) + b","
            items.append(prefix + data + b"]")
        # ends[j]: the bytes of items[0..j] joined by commas, plus one (a comma each).
        ends = list(itertools.accumulate(len(item) + 1 for item in items))
        opening = b'{"t":%d,"e":[' % seg.created_at_us
        # The advance of any part is at most this long: its seqs are <= last.
        head_max = len(orjson.dumps([seg.session_id, seg.epoch, seg.last, seg.last]))
        fixed = head_max + 1 + len(opening) + 2 + 1  # advance, body around the events
        i, n = 0, len(items)
        while i < n:
            room = packer.room() - fixed
            # The most events from i on whose joined bytes fit ``room``.
            j = bisect.bisect_right(ends, (ends[i - 1] if i else 0) + room + 1, lo=i)
            if j > i:
                first = seg.first + i
                packer.add(orjson.dumps([seg.session_id, seg.epoch, first, seg.first + j - 1]))
                packer.add(opening + b",".join(items[i:j]) + b"]}")
                i = j
            elif fixed + len(items[i]) + 1 > limit:
                # Too big for any payload: announce the run of such events, receivers fetch.
                k = i + 1
                while k < n and fixed + len(items[k]) + 1 > limit:
                    k += 1
                packer.add(
                    orjson.dumps([seg.session_id, seg.epoch, seg.first + i, seg.first + k - 1])
                )
                i = k
            else:
                packer.close()  # it fits an empty payload
    packer.close()
    return packer.payloads


def _advance_of(entry: object) -> tuple[str, int, int, int] | None:
    if (
        isinstance(entry, list)
        and len(entry) == 4
        and isinstance(entry[0], str)
        and all(type(x) is int for x in entry[1:])
    ):
        return entry[0], entry[1], entry[2], entry[3]
    return None


def _events_of(head: tuple[str, int, int, int], body: object) -> tuple[StreamEvent, ...] | None:
    """The events of an inline body, or None if it does not hold exactly the advance's."""
    session_id, epoch, first, last = head
    if not isinstance(body, dict):
        return None
    stamp, events = body.get("t"), body.get("e")
    if type(stamp) is not int or not isinstance(events, list):
        return None
    if len(events) != last - first + 1 or not events:
        return None
    try:
        created_at = _EPOCH_UTC + timedelta(microseconds=stamp)
    except OverflowError:
        return None
    out: list[StreamEvent] = []
    for seq, item in enumerate(events, first):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        out.append(StreamEvent(session_id, epoch, seq, item[0], item[1], created_at))
    return tuple(out)


def decode_stream_notes(
    payload: str, skip: Callable[[str, int, int, int], bool] | None = None
) -> list[StreamNote]:
    """Inverse of :func:`encode_stream_notes` for one payload; reads the old format too.

    Malformed entries are skipped; an inline body that does not match its advance exactly
    is ignored, so the advance alone remains (the receiver fetches it). ``skip(session_id,
    epoch, first, last)``: advances the receiver has no use for, left out with their events
    (which are then never built: an instance hears its own writes too).
    """
    out: list[StreamNote] = []
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return out
    if not isinstance(data, list):
        return out
    head: tuple[str, int, int, int] | None = None  # an advance still waiting for its body
    for entry in data:
        advance = _advance_of(entry)
        if advance is not None:
            if skip is not None and skip(*advance):
                head = None  # and its body, if one follows, is passed over
                continue
            out.append(StreamNote(*advance))
            head = advance
            continue
        if head is not None:
            events = _events_of(head, entry)
            if events is not None:
                out[-1] = StreamNote(*head, events)
        head = None
    return out
