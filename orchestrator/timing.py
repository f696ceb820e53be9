"""Time for every component: one ``Backoff`` policy and one injectable ``Clock``.

``Backoff`` is a pure delay function: ``delay(attempt)`` is the same formula whether the
caller sleeps in process (a writer retrying its sink, a listener reconnecting) or stores a
``retry_at`` in the database (a task's next attempt). One jitter convention: a fraction
``jitter`` of each step is random, so ``jitter=0`` is the bare exponential, ``0.5`` is
"equal jitter" (never less than half the step) and ``1`` is "full jitter".

``Clock`` is what timing logic reads instead of ``time`` and ``anyio.sleep``: ``SYSTEM_CLOCK``
in production, ``ManualClock`` in tests, which moves only when the test calls ``advance``
and wakes exactly the sleepers whose deadline it passed, so tests drive time instead of
sleeping past it. Database time (lease expiry, ``retry_at`` compared in SQL) is the
database's own ``now()`` and is not driven by a ``Clock``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio

from asyncstore.storage.errors import InvalidArgument

__all__ = ["SYSTEM_CLOCK", "Backoff", "Clock", "ManualClock", "SystemClock"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff: step ``n`` is ``min(max_s, base_s * factor ** (n - 1))``.

    ``delay(n)`` returns ``step * (1 - jitter) + uniform(0, step * jitter)``; attempts are
    1-based (the delay after the first failure is ``delay(1)``).
    """

    base_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_s) and self.base_s >= 0):
            raise InvalidArgument(f"base_s must be a finite number >= 0, not {self.base_s!r}")
        if not (math.isfinite(self.max_s) and self.max_s >= self.base_s):
            raise InvalidArgument(f"max_s must be finite and >= base_s, not {self.max_s!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise InvalidArgument(f"factor must be finite and >= 1, not {self.factor!r}")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgument(f"jitter must be between 0 and 1, not {self.jitter!r}")

    def step(self, attempt: int) -> float:
        """The un-jittered ceiling of attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise InvalidArgument(f"attempt is 1-based, not {attempt!r}")
        # Cap the exponent before the power so a huge attempt count cannot overflow.
        exponent = min(attempt - 1, 1024)
        try:
            raw = self.base_s * self.factor**exponent
        except OverflowError:
            return self.max_s
        return min(self.max_s, raw)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered delay before retry number ``attempt`` (1-based)."""
        ceiling = self.step(attempt)
        spread = ceiling * self.jitter
        draw = (rng or random).uniform(0.0, spread) if spread else 0.0
        return ceiling - spread + draw


@runtime_checkable
class Clock(Protocol):
    """What timing logic reads: a monotonic clock, the wall clock, and a sleep."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and ``anyio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


@dataclass(eq=False)
class ManualClock:
    """A clock that moves only when told: ``advance(s)`` wakes the sleepers it passes.

    ``sleep(0)`` and negative sleeps yield once and return, like ``anyio.sleep``.
    ``sleepers`` is how many tasks wait right now; ``wait_sleepers(n)`` lets a test wait
    (on an event, not a timer) until the code under test has gone to sleep.
    """

    now: float = 1_000.0
    wall_offset: float = 1_700_000_000.0
    _heap: list[tuple[float, int, anyio.Event]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _changed: anyio.Event | None = None

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall_offset + self.now

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, event in self._heap if not event.is_set())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._heap, (self.now + seconds, next(self._order), event))
        self._poke()
        try:
            await event.wait()
        finally:
            if not event.is_set():
                event.set()  # cancelled: no longer a sleeper
                self._poke()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper whose deadline passed."""
        if seconds < 0:
            raise InvalidArgument("a clock does not go backwards")
        self.now += seconds
        while self._heap and self._heap[0][0] <= self.now:
            _, _, event = heapq.heappop(self._heap)
            event.set()
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
