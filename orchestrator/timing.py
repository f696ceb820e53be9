"""Time for every component: one ``Backoff`` policy and one injectable ``Clock``.

``Backoff`` is a pure delay function: ``delay(attempt)`` is the same formula whether the
caller sleeps in process (a writer retrying its sink, a listener reconnecting) or stores a
``retry_at`` in the database (a task's next attempt). One jitter convention: a fraction
``jitter`` of each step is random, so ``jitter=0`` is the bare exponential, ``0.5`` is
"equal jitter" (never less than half the step) and ``1`` is "full jitter". It is defined in
``storage._backoff`` (the drivers retry too, and ``storage`` never imports the
orchestrator); this module is its public home.

``jittered(seconds, spread)`` is the other randomisation, for schedules rather than retries:
a period spread symmetrically around its nominal value (a sweeper's next round).

``Clock`` is what timing logic reads instead of ``time``, ``anyio.sleep`` and
``anyio.move_on_after`` (and ``fail_after(clock, s)`` instead of ``anyio.fail_after``):
``SYSTEM_CLOCK`` in production, ``ManualClock`` in tests, which moves only when the test
calls ``advance`` and wakes exactly the sleepers (and times out exactly the
``move_on_after`` scopes) whose deadline it passed, so tests drive time instead of sleeping
past it. Database time (lease expiry, ``retry_at`` compared in SQL) is the
database's own ``now()`` and is not driven by a ``Clock``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio

from asyncstore.storage._backoff import Backoff
from asyncstore.storage.errors import InvalidArgument

__all__ = [
    "SYSTEM_CLOCK",
    "Backoff",
    "Clock",
    "ManualClock",
    "SystemClock",
    "fail_after",
    "jittered",
]


def jittered(seconds: float, spread: float, rng: random.Random | None = None) -> float:
    """``seconds`` × uniform(1 - ``spread``, 1 + ``spread``): a schedule's period, spread so
    that instances started together do not run in step. Not a backoff: it does not grow."""
    if not 0 <= spread < 1:
        raise InvalidArgument(f"spread must be in [0, 1), not {spread!r}")
    return seconds * (rng or random).uniform(1 - spread, 1 + spread)


@runtime_checkable
class Clock(Protocol):
    """What timing logic reads: a monotonic clock, the wall clock, a sleep and a timeout.

    ``move_on_after(s)`` is ``anyio.move_on_after`` on this clock's time: a cancel scope
    that cancels its block once ``s`` seconds of this clock have passed.
    """

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def move_on_after(self, seconds: float) -> AbstractContextManager[anyio.CancelScope]: ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and ``anyio.sleep``."""

    # The C functions themselves, not a method calling them: the hot paths read this
    # clock per event (a ring's last use, a batch item's arrival).
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def move_on_after(self, seconds: float) -> AbstractContextManager[anyio.CancelScope]:
        return anyio.move_on_after(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


@contextmanager
def fail_after(clock: Clock, seconds: float) -> Iterator[anyio.CancelScope]:
    """``anyio.fail_after`` on ``clock``'s time: raise ``TimeoutError`` if the block is
    still running once ``seconds`` of ``clock`` passed (it is cancelled then).

    A function rather than a ``Clock`` method, so that a clock written against the
    protocol keeps working: it is ``move_on_after`` that raises when its own deadline
    ended the block (an outer cancellation propagates as it would).
    """
    with clock.move_on_after(seconds) as scope:
        yield scope
    if scope.cancelled_caught:
        raise TimeoutError


class _Timer:
    """One deadline on a ManualClock: a sleeper's wake-up or a scope's timeout."""

    __slots__ = ("done", "fire")

    def __init__(self, fire: Callable[[], None]) -> None:
        self.fire = fire
        self.done = False


@dataclass(eq=False)
class ManualClock:
    """A clock that moves only when told: ``advance(s)`` wakes the sleepers it passes.

    ``sleep(0)`` and negative sleeps yield once and return, like ``anyio.sleep``.
    ``move_on_after(s)`` cancels its block when ``advance`` passes its deadline (at once
    for ``s <= 0``, never for an infinite ``s``). ``sleepers`` is how many tasks wait on
    this clock right now (asleep, or inside a finite ``move_on_after``);
    ``wait_sleepers(n)`` lets a test wait (on an event, not a timer) until the code under
    test has gone to sleep.
    """

    now: float = 1_000.0
    wall_offset: float = 1_700_000_000.0
    _heap: list[tuple[float, int, _Timer]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _changed: anyio.Event | None = None

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall_offset + self.now

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, timer in self._heap if not timer.done)

    def _arm(self, seconds: float, fire: Callable[[], None]) -> _Timer:
        timer = _Timer(fire)
        heapq.heappush(self._heap, (self.now + seconds, next(self._order), timer))
        self._poke()
        return timer

    def _disarm(self, timer: _Timer) -> None:
        if not timer.done:
            timer.done = True
            self._heap = [entry for entry in self._heap if entry[2] is not timer]
            heapq.heapify(self._heap)
            self._poke()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        timer = self._arm(seconds, event.set)
        try:
            await event.wait()
        finally:
            self._disarm(timer)  # cancelled: no longer a sleeper

    def move_on_after(self, seconds: float) -> AbstractContextManager[anyio.CancelScope]:
        return self._scope(seconds)

    @contextmanager
    def _scope(self, seconds: float) -> Iterator[anyio.CancelScope]:
        with anyio.CancelScope() as scope:
            if seconds <= 0:
                scope.cancel()
            if seconds <= 0 or math.isinf(seconds):
                yield scope
                return
            timer = self._arm(seconds, scope.cancel)
            try:
                yield scope
            finally:
                self._disarm(timer)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``; wake every sleeper whose deadline passed."""
        if seconds < 0:
            raise InvalidArgument("a clock does not go backwards")
        self.now += seconds
        while self._heap and self._heap[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.done:
                timer.done = True
                timer.fire()
        self._poke()

    async def wait_sleepers(self, count: int = 1) -> None:
        """Return once at least ``count`` tasks are asleep on this clock."""
        while self.sleepers < count:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
