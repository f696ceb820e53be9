"""One session's ring of recent events in the broadcast hub, and who reads it.

``_Ring`` holds the contiguous recent events of a session with their sizes, the head this
instance knows, what is stored (events leave only once persisted), the waiting
subscribers and the fan-out sinks; helpers read a span of it from the nearer end and
adopt a head that became known. Used by ``broadcast.BroadcastHub`` and ``Subscription``.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from asyncstore.storage import StreamEvent

if TYPE_CHECKING:
    from asyncstore.orchestrator.broadcast_subscription import Subscription


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

    def __init__(self, session_id: str, now: float) -> None:
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
        self.last_used = now  # on the hub's clock
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
        if self.waiters:  # none on the fan-out path: no new list per publish then
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
