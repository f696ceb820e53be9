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

import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import Self

import anyio
import anyio.abc
import orjson

from asyncstore.orchestrator.broadcast_config import (
    MAX_NOTIFY_BYTES,
    DeliveryMode,
    HubConfig,
    HubStatistics,
    Position,
    SlowSubscriberPolicy,
    StreamReset,
)
from asyncstore.orchestrator.broadcast_notes import (
    NoteSegment,
    StreamNote,
    decode_advance,
    decode_stream_notes,
    encode_advances,
    encode_stream_notes,
)
from asyncstore.orchestrator.broadcast_ring import _adopt_head, _Ring, _seed_head
from asyncstore.orchestrator.broadcast_subscription import Subscription
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import AsyncStorageBackend, Notification, StreamEvent
from asyncstore.storage.errors import InvalidArgument

__all__ = [
    "MAX_NOTIFY_BYTES",
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


class BroadcastHub:
    """Per-session rings with subscribe-with-resume; use as ``async with`` to run it.

    ``publish`` / ``mark_persisted`` are called by the stream writer (no await, constant
    time); ``subscribe`` registers at once and returns the subscriber's async iterator.
    Running the hub starts the cross-instance listener and the idle-ring sweeper.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        config: HubConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.storage = storage
        self.config = config or HubConfig()
        # What the timing logic reads: idle rings (last use, eviction, the sweeper's
        # period) and a resume point's wait for an event in flight from another instance.
        self.clock = clock
        self._monotonic = clock.monotonic
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
        ring.last_used = self._monotonic()
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

        ``after=None``: events published from now on (poll mode: stored after the head it
        reads, at ``await sub.anchor()`` or else at the first iteration).
        ``after=(epoch, seq)``: every event after that one, exactly, or a ``StreamReset``
        first if that point cannot be served. ``(0, 0)`` means from the start. Close it
        with ``aclose()`` or ``async with``.
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

    def subscriber_counts(self) -> dict[str, int]:
        """Live subscribers per session in this process (sessions with none are left out).

        Memory mode only: a polling hub (``stream_delivery`` legacy) keeps no per-session
        state, so it answers an empty mapping; ``statistics().subscribers`` has its total.
        """
        return {sid: n for sid, ring in self._rings.items() if (n := len(ring.subscribers))}

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers -= 1
        ring = sub._ring
        if ring is not None:
            ring.subscribers.discard(sub)
            ring.sinks.pop(sub, None)
            ring.last_used = self._monotonic()

    # -- rings -------------------------------------------------------------------------

    def _new_ring(self, session_id: str) -> _Ring:
        if len(self._rings) >= self.config.max_rings:
            for sid, old in self._rings.items():
                if not old.subscribers and not old.fetching:
                    del self._rings[sid]
                    self._evicted += 1
                    break
        ring = _Ring(session_id, self._monotonic())
        self._rings[session_id] = ring
        return ring

    async def _sweeper(self) -> None:
        while True:
            await self.clock.sleep(self.config.sweep_interval_s)
            self.evict_idle()

    def evict_idle(self) -> int:
        """Drop rings with no subscriber and no publish for ``ring_idle_ttl_s``."""
        horizon = self._monotonic() - self.config.ring_idle_ttl_s
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
                    # it holds: a start hint set while the head was unknown can lag behind
                    # what the previous read published). Reading from the same point again
                    # would bring the same rows forever; but a notification that arrived
                    # during the read (``refetch``) announced rows past them: read on from
                    # the ring's head, or that notification is lost.
                    self._count(self._dropped, "fetch_untaken")
                    if not ring.refetch:
                        return
                    continue
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


@asynccontextmanager
async def open_broadcast_hub(
    storage: AsyncStorageBackend,
    config: HubConfig | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[BroadcastHub]:
    """Run a ``BroadcastHub`` (its listener and sweeper) while the block runs.

    Leaving the block ends its subscriptions. ``async with BroadcastHub(...)`` does the same.
    """
    async with BroadcastHub(storage, config, clock=clock) as hub:
        yield hub
