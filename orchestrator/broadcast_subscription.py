"""``Subscription``: one subscriber's cursor over a session's stream in the broadcast hub.

Owns how a subscriber reads: from the ring at the live head (``take_live`` /
``take_ready`` for the endpoints' fan-out, ``next_within`` / iteration otherwise), from the
database to resume or catch up, the resets where its view cannot continue exactly, and the
slow-subscriber policy. Relies on ``broadcast_ring`` and on its hub (``broadcast``) for
storage, configuration and counters.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

import anyio
import anyio.abc

from asyncstore.orchestrator.broadcast_config import (
    Position,
    SlowSubscriberPolicy,
    StreamReset,
)
from asyncstore.orchestrator.broadcast_ring import _Ring, _seed_head, _span
from asyncstore.orchestrator.errors import SubscriberLagged
from asyncstore.storage import StreamEvent

if TYPE_CHECKING:
    from asyncstore.orchestrator.broadcast import BroadcastHub


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
                clock = self._hub.clock
                with clock.move_on_after(self._resume_deadline - clock.monotonic()):
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
        now = hub.clock.monotonic()
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

    async def anchor(self) -> None:
        """Fix where a live subscription (``after=None``) starts, before saying it is live.

        Memory mode fixed it at ``subscribe`` (the ring): nothing to do, no wait. Poll mode
        knows no head but the stored one: this reads it, and the subscription yields every
        event stored after that read. Without this call the first iteration reads it, so
        events stored between ``subscribe`` and that read would be skipped without a reset
        (the endpoints call this before their ``ready``). A resume point needs nothing. If
        cancelled, nothing changed (the next call or iteration reads again).
        """
        if self._ring is not None or self._next is not None or self._resume is not None:
            return
        head = await self._hub.storage.last_stream_seq(self.session_id)
        self._hub._count(self._hub._reads, "poll")
        if self._next is None:
            self._next = head + 1

    async def _poll(self) -> None:
        if self._next is None:
            await self.anchor()
        if not await self._read_db("poll") and not self._buffer:
            await self._hub.clock.sleep(self._hub.config.poll_interval_s)
