"""BroadcastHub: per-session ring buffers that serve live subscribers without the database.

The stream writer publishes every event here before it is persisted; subscribers read the
ring through their own cursor, so publishing never waits for anyone. The database is read
only to resume (a resume point older than the ring), to catch up a subscriber that fell
behind the ring, and to fetch events another instance wrote when its notification could not
carry them (too big, or not continuing the ring; one read per session per notification,
shared by every local subscriber): notifications carry the stored events inline when they
fit, so a live remote subscriber reads nothing in the steady state. A resume point that
cannot be served exactly yields a ``StreamReset`` instead of a silent gap or duplicate.
Relies on the storage contract (``load_stream_events``, ``last_stream_seq``, ``listen``)
and anyio.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import ClassVar, Self

import anyio
import anyio.abc
import orjson
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.errors import SubscriberLagged
from asyncstore.storage import AsyncStorageBackend, Notification, StreamEvent
from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "BroadcastHub",
    "DeliveryMode",
    "HubConfig",
    "HubStatistics",
    "NoteSegment",
    "Position",
    "SlowSubscriberPolicy",
    "StreamNote",
    "StreamReset",
    "Subscription",
    "decode_advance",
    "decode_stream_notes",
    "encode_advances",
    "encode_stream_notes",
    "open_broadcast_hub",
]

log = logging.getLogger("asyncstore.broadcast")

Position = tuple[int, int]
"""A resume point ``(epoch, seq)``: the last event the client has. ``(0, 0)``: from the start."""

MAX_NOTIFY_BYTES = 7800  # under storage's 7900-byte notification limit


class DeliveryMode(StrEnum):
    MEMORY = "memory"  # live subscribers read the ring; the database only for resumes
    POLL = "poll"  # legacy: every subscriber polls the database at a fixed interval


class SlowSubscriberPolicy(StrEnum):
    CATCH_UP = "catch_up"  # read what left the ring from the database, then rejoin it
    DISCONNECT = "disconnect"  # raise SubscriberLagged from the iterator


class HubConfig(BaseModel):
    """Ring bounds, eviction and delivery mode (``stream.delivery`` is ``mode``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: DeliveryMode = DeliveryMode.MEMORY
    ring_max_events: int = Field(default=2048, ge=1)
    ring_max_bytes: int = Field(default=4 << 20, ge=1)
    ring_idle_ttl_s: float = Field(default=300.0, gt=0, description="evict idle rings after")
    max_rings: int = Field(default=10_000, ge=1, description="LRU cap on rings kept")
    sweep_interval_s: float = Field(default=10.0, gt=0)
    slow_subscriber: SlowSubscriberPolicy = SlowSubscriberPolicy.CATCH_UP
    page_size: int = Field(default=500, ge=1, le=10_000, description="rows per database read")
    resume_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="how long a resume point not yet visible here may take to arrive",
    )
    poll_interval_s: float = Field(default=0.2, gt=0, description="legacy poll mode only")
    channel: str = "asyncstore_stream"
    cross_instance: bool = Field(default=True, description="fetch other instances' events")


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The subscriber's view cannot be continued exactly: reload, then keep reading.

    ``seq`` is the last event the stream holds at the reset (reload up to it); the next item
    the subscription yields is the event after it. ``epoch`` is the stream's current epoch.
    ``reason``: ``epoch_changed`` (the client's events were superseded by a new lease
    holder), ``unknown_resume_point`` (never stored, or from the future), ``gap`` (events
    the subscriber needs were purged or could not be persisted).
    """

    session_id: str
    reason: str
    epoch: int
    seq: int


DB_READ_CAUSES = ("resume", "catch_up", "fan_in", "head", "poll")
"""Why a subscriber caused a database read (``HubStatistics.db_reads``)."""
RESET_REASONS = ("epoch_changed", "unknown_resume_point", "gap")
HUB_DROP_REASONS = ("stale_epoch", "duplicate", "fetch_untaken")


@dataclass(frozen=True, slots=True)
class HubStatistics:
    mode: str
    rings: int
    subscribers: int
    published: int
    delivered: int
    db_reads: Mapping[str, int]  # by cause: resume, catch_up, fan_in, head, poll
    resets: Mapping[str, int]
    dropped: Mapping[str, int]  # refused: stale_epoch, duplicate; fetch_untaken (fan-in)
    rings_evicted: int
    lagged_disconnects: int
    fetch_errors: int
    notifications: int
    inline_events: int = 0  # other instances' events taken from notifications, no read

    @property
    def db_reads_total(self) -> int:
        return sum(self.db_reads.values())

    @property
    def live_db_reads(self) -> int:
        """Reads caused by subscribers that were live (not resuming): catch-up and polling."""
        return self.db_reads.get("catch_up", 0) + self.db_reads.get("poll", 0)

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("broadcast_rings", "gauge", "Per-session ring buffers."),
        Family("broadcast_subscribers", "gauge", "Live stream subscribers (WS/SSE)."),
        Family("broadcast_published", "counter", "Events put in rings."),
        Family("broadcast_delivered", "counter", "Events handed to subscribers."),
        Family(
            "broadcast_db_reads",
            "counter",
            "Database reads caused by subscribers.",
            ("cause",),
            known=DB_READ_CAUSES,
        ),
        Family(
            "broadcast_resets", "counter", "Resets sent, by reason.", ("reason",), RESET_REASONS
        ),
        Family(
            "broadcast_dropped", "counter", "Publishes refused.", ("reason",), HUB_DROP_REASONS
        ),
        Family("broadcast_rings_evicted", "counter", "Idle rings evicted."),
        Family("broadcast_lagged_disconnects", "counter", "Slow subscribers cut."),
        Family("broadcast_fetch_errors", "counter", "Failed event fetches."),
        Family(
            "broadcast_inline_events",
            "counter",
            "Other instances' events taken from notifications without a read.",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("broadcast_rings", {}, self.rings)
        out.sample("broadcast_subscribers", {}, self.subscribers)
        out.sample("broadcast_published", {}, self.published)
        out.sample("broadcast_delivered", {}, self.delivered)
        out.samples("broadcast_db_reads", {}, self.db_reads)
        out.samples("broadcast_resets", {}, self.resets)
        out.samples("broadcast_dropped", {}, self.dropped)
        out.sample("broadcast_rings_evicted", {}, self.rings_evicted)
        out.sample("broadcast_lagged_disconnects", {}, self.lagged_disconnects)
        out.sample("broadcast_fetch_errors", {}, self.fetch_errors)
        out.sample("broadcast_inline_events", {}, self.inline_events)


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


class _Ring:
    """Contiguous recent events of one session, and who reads them."""

    __slots__ = (
        "epoch",
        "events",
        "fetch_from",
        "fetch_target",
        "fetching",
        "last_seq",
        "last_used",
        "nbytes",
        "persisted_seq",
        "refetch",
        "session_id",
        "sinks",
        "sizes",
        "subscribers",
        "waiters",
    )

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.events: deque[StreamEvent] = deque()
        self.sizes: deque[int] = deque()
        self.nbytes = 0
        self.epoch = 0
        self.last_seq: int | None = None  # None: this instance does not know the head
        self.persisted_seq = 0  # events up to here are stored and may leave the ring
        # Weak: a subscription dropped without aclose() must not pin its ring forever.
        self.subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self.waiters: list[Subscription] = []
        # Subscribers written to by whoever publishes (``Subscription.set_sink``).
        self.sinks: dict[Subscription, Callable[[], None]] = {}
        self.last_used = time.monotonic()
        self.fetching = False
        self.refetch = False
        self.fetch_target = 0
        self.fetch_from: int | None = None

    def first_seq(self) -> int | None:
        return self.events[0].seq if self.events else None

    def get(self, seq: int) -> StreamEvent | None:
        if not self.events:
            return None
        first = self.events[0].seq
        if first <= seq <= self.events[-1].seq:
            return self.events[seq - first]
        return None

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for sub in waiters:
            sub._signal()
        if self.sinks:
            for sink in list(self.sinks.values()):
                sink()


def _span(events: deque[StreamEvent], start: int, stop: int) -> Iterable[StreamEvent]:
    """``events[start:stop]`` of a ring, walking it from the nearer end: live subscribers
    read at the head of the ring, and ``islice`` from the left would step over every event
    before (thousands per take in a full ring)."""
    n = len(events)
    if start <= n - stop:
        return itertools.islice(events, start, stop)
    tail = list(itertools.islice(reversed(events), n - stop, n - start))
    tail.reverse()
    return tail


def _adopt_head(ring: _Ring, next_seq: int) -> None:
    """The head became known: live-from-now subscribers start at ``next_seq``."""
    for sub in ring.subscribers:
        if sub._next is None and sub._resume is None:
            sub._next = next_seq


def _seed_head(ring: _Ring, epoch: int, last_seq: int) -> None:
    """This instance learned the stored head of a ring that did not know it."""
    ring.last_seq = last_seq
    ring.epoch = max(ring.epoch, epoch)
    ring.persisted_seq = max(ring.persisted_seq, last_seq)
    _adopt_head(ring, last_seq + 1)


class BroadcastHub:
    """Per-session rings with subscribe-with-resume; use as ``async with`` to run it.

    ``publish`` / ``mark_persisted`` are called by the stream writer (no await, constant
    time); ``subscribe`` registers at once and returns the subscriber's async iterator.
    Running the hub starts the cross-instance listener and the idle-ring sweeper.
    """

    def __init__(self, storage: AsyncStorageBackend, config: HubConfig | None = None) -> None:
        self.storage = storage
        self.config = config or HubConfig()
        self._rings: OrderedDict[str, _Ring] = OrderedDict()
        self._tg: anyio.abc.TaskGroup | None = None
        self._published = 0
        self._delivered = 0
        self._reads: dict[str, int] = {}
        self._resets: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._evicted = 0
        self._lagged = 0
        self._fetch_errors = 0
        self._notifications = 0
        self._inline = 0
        self._subscribers = 0
        self._closing = False
        self._listening = anyio.Event()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._sweeper)
        if self.config.cross_instance and self.config.mode is DeliveryMode.MEMORY:
            await self._tg.start(self._listener)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closing = True
        for ring in self._rings.values():
            for sub in ring.subscribers:
                sub._closed = True
            ring.wake()
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    # -- the writer's side ---------------------------------------------------------------

    def publish(self, event: StreamEvent, nbytes: int = 0, *, persisted: bool = False) -> bool:
        """Add an event to its session's ring and wake the session's subscribers.

        Events must arrive in seq order per session. An event of an older epoch than the
        ring's is refused (a superseded writer); an event of a newer epoch that reuses seqs
        replaces the superseded tail and resets the subscribers that saw it.
        """
        if self.config.mode is not DeliveryMode.MEMORY:
            return False
        ring = self._rings.get(event.session_id)
        if ring is None:
            ring = self._new_ring(event.session_id)
        else:
            self._rings.move_to_end(event.session_id)
        return self._publish(ring, event, nbytes, persisted)

    def _publish(self, ring: _Ring, event: StreamEvent, nbytes: int, persisted: bool) -> bool:
        if event.epoch < ring.epoch:
            self._count(self._dropped, "stale_epoch")
            return False
        last = ring.last_seq
        if last is None:
            _adopt_head(ring, event.seq)
        elif event.seq != last + 1:
            if event.seq <= last:
                if event.epoch == ring.epoch:
                    self._count(self._dropped, "duplicate")
                    return False
                self._supersede(ring, event)
            else:
                # A jump: this ring missed events (written elsewhere, or never stored).
                # Start afresh; subscribers needing the missing seqs read the database.
                self._clear(ring)
        ring.events.append(event)
        ring.sizes.append(nbytes)
        ring.nbytes += nbytes
        ring.epoch = event.epoch
        ring.last_seq = event.seq
        ring.last_used = time.monotonic()
        if persisted and event.seq > ring.persisted_seq:
            ring.persisted_seq = event.seq
        self._published += 1
        cfg = self.config
        if len(ring.events) > cfg.ring_max_events or ring.nbytes > cfg.ring_max_bytes:
            self._trim(ring)
        if ring.waiters or ring.sinks:
            ring.wake()
        return True

    def _supersede(self, ring: _Ring, event: StreamEvent) -> None:
        while ring.events and ring.events[-1].seq >= event.seq:
            ring.events.pop()
            ring.nbytes -= ring.sizes.pop()
        ring.persisted_seq = min(ring.persisted_seq, event.seq - 1)
        for sub in ring.subscribers:
            if sub._next is not None and sub._next > event.seq:
                sub._pending_reset = ("epoch_changed", event.epoch, event.seq - 1)
        if not ring.events:
            ring.last_seq = event.seq - 1

    def _clear(self, ring: _Ring) -> None:
        ring.events.clear()
        ring.sizes.clear()
        ring.nbytes = 0

    def _trim(self, ring: _Ring) -> None:
        cfg = self.config
        # Events leave the ring only once stored, so a lagging subscriber can always
        # catch up from the database.
        while ring.events and (
            len(ring.events) > cfg.ring_max_events or ring.nbytes > cfg.ring_max_bytes
        ):
            if ring.events[0].seq > ring.persisted_seq:
                break
            ring.events.popleft()
            ring.nbytes -= ring.sizes.popleft()

    def retract(self, session_id: str, epoch: int, from_seq: int) -> None:
        """The database refused ``epoch``'s events from ``from_seq`` on (a superseded holder).

        They were published live before they were refused: drop them from the ring, and
        reset the subscribers that saw any of them to the last event before, so live
        subscribers and a database resume see the same stream.
        """
        ring = self._rings.get(session_id)
        if ring is None or ring.epoch != epoch or ring.last_seq is None:
            return
        if ring.last_seq < from_seq:
            return
        while ring.events and ring.events[-1].seq >= from_seq:
            ring.events.pop()
            ring.nbytes -= ring.sizes.pop()
        ring.last_seq = from_seq - 1
        ring.persisted_seq = min(ring.persisted_seq, from_seq - 1)
        for sub in ring.subscribers:
            # A subscriber that saw none of them simply waits for the next holder's.
            if sub._next is not None and sub._next > from_seq:
                sub._pending_reset = ("epoch_changed", epoch, from_seq - 1)
        ring.wake()

    def note_head(self, session_id: str, epoch: int, last_seq: int) -> None:
        """Tell the hub a session's stored head (the writer's ``begin`` read it anyway)."""
        ring = self._rings.get(session_id)
        if ring is not None and ring.last_seq is None and not ring.events:
            _seed_head(ring, epoch, last_seq)

    def mark_persisted(self, session_id: str, seq: int) -> None:
        """Events of the session up to ``seq`` are stored (or given up): they may leave."""
        ring = self._rings.get(session_id)
        if ring is not None and seq > ring.persisted_seq:
            ring.persisted_seq = seq
            self._trim(ring)

    # -- the subscriber's side ---------------------------------------------------------

    def subscribe(self, session_id: str, after: Position | None = None) -> Subscription:
        """Register a subscriber now and return its async iterator of events and resets.

        ``after=None``: events published from now on. ``after=(epoch, seq)``: every event
        after that one, exactly, or a ``StreamReset`` first if that point cannot be served.
        ``(0, 0)`` means from the start. Close it with ``aclose()`` or ``async with``.
        """
        if after is not None and (
            not isinstance(after, tuple)
            or len(after) != 2
            or not all(type(x) is int and x >= 0 for x in after)
        ):
            raise InvalidArgument(f"after must be (epoch, seq) with ints >= 0, got {after!r}")
        ring: _Ring | None = None
        if self.config.mode is DeliveryMode.MEMORY:
            ring = self._rings.get(session_id)
            if ring is None:
                ring = self._new_ring(session_id)
            else:
                self._rings.move_to_end(session_id)
        sub = Subscription(self, session_id, ring, after)
        if ring is not None:
            ring.subscribers.add(sub)
        self._subscribers += 1
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers -= 1
        ring = sub._ring
        if ring is not None:
            ring.subscribers.discard(sub)
            ring.sinks.pop(sub, None)
            ring.last_used = time.monotonic()

    # -- rings -------------------------------------------------------------------------

    def _new_ring(self, session_id: str) -> _Ring:
        if len(self._rings) >= self.config.max_rings:
            for sid, old in self._rings.items():
                if not old.subscribers and not old.fetching:
                    del self._rings[sid]
                    self._evicted += 1
                    break
        ring = _Ring(session_id)
        self._rings[session_id] = ring
        return ring

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.config.sweep_interval_s)
            self.evict_idle()

    def evict_idle(self) -> int:
        """Drop rings with no subscriber and no publish for ``ring_idle_ttl_s``."""
        horizon = time.monotonic() - self.config.ring_idle_ttl_s
        idle = [
            sid
            for sid, ring in self._rings.items()
            if not ring.subscribers and not ring.fetching and ring.last_used < horizon
        ]
        for sid in idle:
            del self._rings[sid]
        self._evicted += len(idle)
        return len(idle)

    # -- other instances ---------------------------------------------------------------

    async def _listener(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.storage.listen(self.config.channel) as stream:
            task_status.started()
            async for note in stream:
                self._on_notification(note)

    def _on_notification(self, note: Notification) -> None:
        self._notifications += 1
        if note.gap:
            # Some notifications may be lost: every watched ring re-reads to the head.
            for ring in self._rings.values():
                if ring.subscribers:
                    self._want(ring, math.inf, ring.last_seq)
            return
        rings = self._rings

        def stale(session_id: str, epoch: int, first: int, last: int) -> bool:
            # Nobody here reads it, a superseded holder's, or already here (typically this
            # instance's own write): the checks below, made before any event is built.
            ring = rings.get(session_id)
            return (
                ring is None
                or epoch < ring.epoch
                or (epoch == ring.epoch and ring.last_seq is not None and last <= ring.last_seq)
            )

        for item in decode_stream_notes(note.payload, stale):
            found = self._rings.get(item.session_id)
            if found is None:
                continue  # nobody here reads it
            if item.epoch < found.epoch:
                continue  # a superseded holder's: never stored after the newer epoch's
            newer = item.epoch > found.epoch
            if found.last_seq is not None and item.last <= found.last_seq and not newer:
                continue  # already here: typically this instance's own write
            if not found.subscribers:
                del self._rings[item.session_id]  # its contents are stale now; rebuild on demand
                self._evicted += 1
                continue
            if item.events is not None and self._take_inline(found, item.events):
                continue
            # A newer epoch may replace seqs the ring holds: read from its first event.
            self._want(found, item.last, item.first - 1, from_start=newer)

    def _take_inline(self, ring: _Ring, events: tuple[StreamEvent, ...]) -> bool:
        """Publish events a notification carried, if they continue the ring exactly.

        They are stored already (the writer announces only what it persisted), so they
        enter the ring as persisted. Taken when the first one new to the ring follows its
        head: ``last_seq + 1`` in the ring's epoch or a newer one; or, in a newer epoch,
        a seq the ring holds, which ``_publish`` turns into the same superseding reset a
        fetch from that seq would; or any seq when this instance does not know the head
        (exactly what a fetch from just before them would publish: live subscribers start
        at the first, a resume waiter finds its point in the ring or reads the database).
        Anything else (a jump over seqs this ring missed, an older epoch, a read already
        in flight that orders what arrives) returns False: the caller fetches.
        """
        if ring.fetching:
            return False
        head = ring.last_seq
        first = events[0]
        if head is not None:
            if first.epoch < ring.epoch or first.seq > head + 1:
                return False
            if first.epoch == ring.epoch:
                events = events[head + 1 - first.seq :]  # the ring has the ones before
        for event in events:
            self._publish(ring, event, len(orjson.dumps(event.payload)), True)
        self._inline += len(events)
        return True

    def _want(
        self, ring: _Ring, target: float, start: int | None, from_start: bool = False
    ) -> None:
        ring.fetch_target = max(ring.fetch_target, int(min(target, 2**62)))
        if start is not None and (ring.last_seq is None or from_start):
            ring.fetch_from = start if ring.fetch_from is None else min(ring.fetch_from, start)
        if ring.fetching:
            ring.refetch = True  # the running fetch reads once more before it stops
        elif self._tg is not None:
            ring.fetching = True
            self._tg.start_soon(self._fetch, ring)

    async def _fetch(self, ring: _Ring) -> None:
        """Read another instance's events once for every local subscriber of the session."""
        page = self.config.page_size
        try:
            while True:
                after = ring.fetch_from if ring.fetch_from is not None else ring.last_seq
                ring.fetch_from = None
                if after is None or after >= ring.fetch_target:
                    return
                ring.refetch = False
                rows = await self.storage.load_stream_events(
                    ring.session_id, after_seq=after, limit=page
                )
                self._count(self._reads, "fan_in")
                taken = 0
                for row in rows:
                    taken += self._publish(ring, row, len(orjson.dumps(row.payload)), True)
                if rows and not taken:
                    # Nothing here continues the ring (rows of a superseded epoch, or seqs
                    # it holds): reading again would bring the same rows forever.
                    self._count(self._dropped, "fetch_untaken")
                    return
                if not rows and not ring.refetch:
                    # Nothing more is stored yet. A notification that arrived during the
                    # read set ``refetch``: its rows may have committed after the read.
                    return
        except Exception:
            self._fetch_errors += 1
            log.exception("fetching events of session %r failed", ring.session_id)
        finally:
            ring.fetching = False
            ring.fetch_from = None
            ring.fetch_target = 0

    # -- bookkeeping -----------------------------------------------------------------

    @staticmethod
    def _count(counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            mode=self.config.mode.value,
            rings=len(self._rings),
            subscribers=self._subscribers,
            published=self._published,
            delivered=self._delivered,
            db_reads=MappingProxyType(dict(self._reads)),
            resets=MappingProxyType(dict(self._resets)),
            dropped=MappingProxyType(dict(self._dropped)),
            rings_evicted=self._evicted,
            lagged_disconnects=self._lagged,
            fetch_errors=self._fetch_errors,
            notifications=self._notifications,
            inline_events=self._inline,
        )


class Subscription:
    """One subscriber's cursor over a session's stream; an async iterator.

    Yields ``StreamEvent`` in seq order, each exactly once, and ``StreamReset`` where the
    view cannot be continued exactly. Iteration ends when the subscription or the hub
    closes. Cancelling a wait loses nothing: the next ``__anext__`` continues.
    """

    def __init__(
        self,
        hub: BroadcastHub,
        session_id: str,
        ring: _Ring | None,
        after: Position | None,
    ) -> None:
        self._hub = hub
        self.session_id = session_id
        self._ring = ring
        self._buffer: deque[StreamEvent | StreamReset] = deque()
        self._resume: Position | None = after
        self._resume_deadline: float | None = None
        self._next: int | None = None
        if after is None and ring is not None and ring.last_seq is not None:
            self._next = ring.last_seq + 1
        self._pending_reset: tuple[str, int, int] | None = None
        # A bare future rather than an anyio.Event per wait: this is the fan-out hot path
        # (one wake per subscriber per event), and the drivers tie us to asyncio anyway.
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._released = False
        self._interrupted = False
        self._interrupt_scope: anyio.CancelScope | None = None

    @property
    def position(self) -> Position | None:
        """The resume point after the last event yielded (None before any)."""
        return self._last

    _last: Position | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unregister; iteration ends. Safe to call twice."""
        self._closed = True
        if not self._released:
            self._released = True
            self._hub._unsubscribe(self)
        self._signal()

    def _signal(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent | StreamReset:
        item = await self._advance(False)
        assert item is not None  # only an interruptible wait returns None
        return item

    async def next_within(self, timeout_s: float | None) -> StreamEvent | StreamReset | None:
        """The next item, or None once ``timeout_s`` passed (None: no limit) or
        ``interrupt()`` was called (an interrupt while not waiting ends the next wait).

        ``__anext__`` under a cancel scope does the same; this is the cheaper way for a
        caller that waits once per item (no scope per wait). Nothing is lost either way:
        the next call continues where this one stopped.
        """
        if self._ring is None:
            # Legacy poll mode: its reads and sleeps are cancelled, as a scope would.
            limit = math.inf if timeout_s is None else timeout_s
            with anyio.move_on_after(limit) as scope:
                self._interrupt_scope = scope
                try:
                    if not self._interrupted:
                        return await self._advance(True)
                finally:
                    self._interrupt_scope = None
            self._interrupted = False
            return None
        if timeout_s is None:
            return await self._advance(True)
        handle = asyncio.get_running_loop().call_later(timeout_s, self.interrupt)
        try:
            return await self._advance(True)
        finally:
            handle.cancel()

    def interrupt(self) -> None:
        """End the current (or next) ``next_within`` wait with None."""
        self._interrupted = True
        if self._interrupt_scope is not None:
            self._interrupt_scope.cancel()
        self._signal()

    def take_ready(self, limit: int) -> list[StreamEvent | StreamReset]:
        """Up to ``limit`` items that are ready now, in the order iteration would yield
        them, without waiting or reading the database (a batch for one write)."""
        hub = self._hub
        out: list[StreamEvent | StreamReset] = []
        buffer = self._buffer
        while len(out) < limit:
            if not buffer:
                ring, nxt = self._ring, self._next
                if (
                    ring is None
                    or nxt is None
                    or not ring.events
                    or self._closed
                    or hub._closing
                    or self._pending_reset is not None
                    or self._resume is not None
                ):
                    break
                first = ring.events[0].seq
                if not first <= nxt <= ring.events[-1].seq:
                    break
                take = min(ring.events[-1].seq - nxt + 1, hub.config.page_size)
                buffer.extend(_span(ring.events, nxt - first, nxt - first + take))
                self._next = nxt + take
            item = buffer.popleft()
            if type(item) is StreamEvent:
                self._last = (item.epoch, item.seq)
                hub._delivered += 1
            out.append(item)
        return out

    def set_sink(self, sink: Callable[[], None] | None) -> None:
        """Have ``sink()`` called synchronously by whoever publishes to the session or wakes
        its subscribers (memory mode), until ``set_sink(None)`` or ``aclose()``.

        For a fan-out that writes what :meth:`take_live` gives straight to a connection
        from the publisher's task, rather than waking a task per subscriber per event.
        ``sink`` must not raise or block. Without a ring (poll mode) it is never called.
        """
        ring = self._ring
        if ring is None:
            return
        if sink is None:
            ring.sinks.pop(self, None)
        elif not self._released:
            ring.sinks[self] = sink

    def take_live(self, limit: int) -> list[StreamEvent | StreamReset] | None:
        """:meth:`take_ready` for a subscriber at the live head: the items ready now (none
        when it has them all), or None when the next one needs iteration (``next_within``):
        a reset, a resume, a catch-up from the database, an interrupt, the end."""
        if self._buffer:
            return self.take_ready(limit)
        ring = self._ring
        if (
            ring is None
            or self._closed
            or self._hub._closing
            or self._interrupted
            or self._pending_reset is not None
            or self._resume is not None
        ):
            return None
        nxt = self._next
        if nxt is None:
            return []  # the head is not known yet: the first publish tells
        events = ring.events
        if events:
            newest = events[-1]
            if newest.seq == nxt and limit > 0:
                # The usual case: one event was published and this subscriber is at the head.
                self._next = nxt + 1
                self._last = (newest.epoch, nxt)
                self._hub._delivered += 1
                return [newest]
            if nxt < events[0].seq:
                return None  # fell behind the ring
            if nxt > newest.seq:
                return []
            return self.take_ready(limit)
        if ring.last_seq is not None and nxt <= ring.last_seq:
            return None
        return []

    def lagged(self) -> SubscriberLagged | None:
        """Under the ``disconnect`` policy, for a subscriber that fell behind the ring while
        busy elsewhere (a send blocked on a slow client): close it, count the lagged
        disconnect, and return the error iteration would raise. Otherwise None."""
        hub, ring, nxt = self._hub, self._ring, self._next
        if (
            hub.config.slow_subscriber is not SlowSubscriberPolicy.DISCONNECT
            or ring is None
            or nxt is None
            or self._closed
            or not ring.events
            or nxt >= ring.events[0].seq
        ):
            return None
        hub._lagged += 1
        self._closed = True
        return SubscriberLagged(
            f"subscriber of session {self.session_id!r} fell behind the ring while sending "
            f"(wanted seq {nxt}); reconnect with its last position to resume"
        )

    async def _advance(self, interruptible: bool) -> StreamEvent | StreamReset | None:
        hub = self._hub
        while True:
            if self._buffer:
                item = self._buffer.popleft()
                if type(item) is StreamEvent:
                    self._last = (item.epoch, item.seq)
                    hub._delivered += 1
                return item
            if interruptible and self._interrupted:
                self._interrupted = False
                return None
            if self._closed or hub._closing:
                await self.aclose()
                raise StopAsyncIteration
            if self._pending_reset is not None:
                reason, epoch, seq = self._pending_reset
                self._pending_reset = None
                self._reset(reason, epoch, seq)
                continue
            if self._resume is not None:
                await self._check_resume(self._resume)
                continue
            if self._ring is None:
                await self._poll()
            else:
                await self._from_ring(self._ring)

    # -- memory mode -----------------------------------------------------------------

    async def _from_ring(self, ring: _Ring) -> None:
        if self._next is None:
            if ring.events:
                self._next = ring.events[0].seq
            elif ring.last_seq is not None:
                self._next = ring.last_seq + 1
            else:
                await self._wait(ring)
                return
        nxt = self._next
        if ring.events:
            first = ring.events[0].seq
            last = ring.events[-1].seq
            if first <= nxt <= last:
                take = min(last - nxt + 1, self._hub.config.page_size)
                start = nxt - first
                self._buffer.extend(_span(ring.events, start, start + take))
                self._next = nxt + take
                return
            if nxt < first:
                await self._lagging()
                return
        elif ring.last_seq is not None and nxt <= ring.last_seq:
            await self._lagging()
            return
        await self._wait(ring)

    async def _lagging(self) -> None:
        hub = self._hub
        if hub.config.slow_subscriber is SlowSubscriberPolicy.DISCONNECT:
            hub._lagged += 1
            await self.aclose()
            raise SubscriberLagged(
                f"subscriber of session {self.session_id!r} fell behind the ring "
                f"(wanted seq {self._next}); reconnect with its last position to resume"
            )
        await self._read_db("catch_up")

    async def _wait(self, ring: _Ring) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        ring.waiters.append(self)
        try:
            if self._resume_deadline is None:
                await waiter
            else:
                with anyio.move_on_after(self._resume_deadline - time.monotonic()):
                    await waiter
        finally:
            self._waiter = None
            if not waiter.done() or waiter.cancelled():  # cancelled or timed out: registered
                waiter.cancel()
                if self in ring.waiters:
                    ring.waiters.remove(self)

    # -- database reads ----------------------------------------------------------------

    async def _read_db(self, cause: str) -> list[StreamEvent]:
        """Read the events from ``_next`` on; queue them, or a reset if one is missing."""
        hub = self._hub
        nxt = self._next if self._next is not None else 1
        rows = await hub.storage.load_stream_events(
            self.session_id, after_seq=nxt - 1, limit=hub.config.page_size
        )
        hub._count(hub._reads, cause)
        taken: list[StreamEvent] = []
        for row in rows:
            if row.seq != nxt:
                break
            taken.append(row)
            nxt += 1
        if not taken and (rows or cause == "catch_up"):
            # The next event is not stored (purged, or never persisted): say so.
            await self._reset_to_head("gap")
            return taken
        self._buffer.extend(taken)
        self._next = nxt
        ring = self._ring
        short = len(rows) < hub.config.page_size
        if ring is not None and taken and ring.last_seq is None and short:
            # Caught up with the database: this instance now knows the head.
            _seed_head(ring, taken[-1].epoch, taken[-1].seq)
        return taken

    async def _check_resume(self, after: Position) -> None:
        epoch, seq = after
        if seq == 0:
            self._resume = None
            self._next = 1
            if self._ring is None or not self._ring.events or self._ring.events[0].seq > 1:
                await self._read_db("resume")
            return
        ring = self._ring
        held = ring.get(seq) if ring is not None else None
        if ring is not None and held is not None:
            self._resume = None
            self._resume_deadline = None
            if held.epoch != epoch:
                self._reset("epoch_changed", ring.epoch, ring.last_seq or seq)
            else:
                self._next = seq + 1
            return
        hub = self._hub
        rows = await hub.storage.load_stream_events(
            self.session_id, after_seq=seq - 1, limit=hub.config.page_size
        )
        hub._count(hub._reads, "resume")
        if rows and rows[0].seq == seq:
            self._resume = None
            self._resume_deadline = None
            if rows[0].epoch != epoch:
                await self._reset_to_head("epoch_changed")
                return
            self._next = seq + 1
            taken = []
            for row in rows[1:]:
                if row.seq != self._next:
                    break
                taken.append(row)
                self._next += 1
            self._buffer.extend(taken)
            if ring is not None and ring.last_seq is None and len(rows) < hub.config.page_size:
                _seed_head(ring, rows[len(taken)].epoch, rows[len(taken)].seq)
            return
        if rows:
            self._resume = None
            await self._reset_to_head("gap")  # the resume point itself is gone (purged)
            return
        # Not stored (yet): it may be in flight from another instance. Wait for it a while.
        now = time.monotonic()
        if self._resume_deadline is None and ring is not None:
            self._resume_deadline = now + hub.config.resume_wait_s
        if ring is not None and self._resume_deadline is not None and now < self._resume_deadline:
            # Registered already, so the notification of its flush fills the ring. A
            # notification that carried it during the read above may have filled it already.
            if ring.get(seq) is None:
                await self._wait(ring)
            return
        self._resume = None
        self._resume_deadline = None
        await self._reset_to_head("unknown_resume_point")

    async def _reset_to_head(self, reason: str) -> None:
        ring = self._ring
        if ring is not None and ring.last_seq is not None:
            self._reset(reason, ring.epoch, ring.last_seq)
            return
        hub = self._hub
        head = await hub.storage.last_stream_seq(self.session_id)
        hub._count(hub._reads, "head")
        epoch = ring.epoch if ring is not None else 0
        self._reset(reason, epoch, head)

    def _reset(self, reason: str, epoch: int, seq: int) -> None:
        self._hub._count(self._hub._resets, reason)
        self._buffer.append(StreamReset(self.session_id, reason, epoch, seq))
        self._next = seq + 1
        self._resume_deadline = None

    # -- legacy poll mode ----------------------------------------------------------------

    async def _poll(self) -> None:
        if self._next is None:
            head = await self._hub.storage.last_stream_seq(self.session_id)
            self._hub._count(self._hub._reads, "poll")
            self._next = head + 1
        if not await self._read_db("poll") and not self._buffer:
            await anyio.sleep(self._hub.config.poll_interval_s)


@asynccontextmanager
async def open_broadcast_hub(
    storage: AsyncStorageBackend, config: HubConfig | None = None
) -> AsyncIterator[BroadcastHub]:
    """Run a ``BroadcastHub`` (its listener and sweeper) while the block runs.

    Leaving the block ends its subscriptions. ``async with BroadcastHub(...)`` does the same.
    """
    async with BroadcastHub(storage, config) as hub:
        yield hub
