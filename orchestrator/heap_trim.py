"""Give the C heap's free pages back to the operating system now and then (glibc only).

A Postgres-backed process reads every reply through asyncio's 256 KiB socket read buffer
(asyncpg's protocol takes ``data_received``). Once glibc's dynamic mmap threshold has risen
past that size, those buffers come from the heap instead of ``mmap``, and the space they
leave between long-lived objects stays resident: RSS creeps while the memory in use stays
flat (issue 16: +6-8% in a soak of capped rings; ``malloc_trim(0)`` gave it all back).
``HeapTrimmer`` calls ``malloc_trim(0)`` every ``interval_s`` on the runtime's clock; it
frees nothing in use, only pages malloc already holds free. Where there is no glibc (macOS,
musl) it does nothing and says so in ``statistics().available``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage.families import Family, MetricSink

log = logging.getLogger("asyncstore.heap_trim")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    fn: Callable[[int], int] = trim
    return fn


@dataclass(frozen=True, slots=True)
class HeapTrimStatistics:
    available: bool  # malloc_trim found (glibc)
    interval_s: float  # 0: off
    runs: int
    released: int  # runs in which malloc gave memory back
    last_ms: float  # how long the last call held the loop

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("heap_trims", "counter", "malloc_trim(0) calls (runtime.heap_trim_interval_s)."),
        Family("heap_trims_released", "counter", "Trims in which malloc gave memory back."),
        Family("heap_trim_last_seconds", "gauge", "How long the last trim held the loop."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("heap_trims", {}, self.runs)
        out.sample("heap_trims_released", {}, self.released)
        out.sample("heap_trim_last_seconds", {}, self.last_ms / 1000)


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval_s`` seconds of ``clock`` while ``run`` runs."""

    def __init__(self, interval_s: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._trim = _load_malloc_trim() if interval_s > 0 else None
        self._runs = 0
        self._released = 0
        self._last_ms = 0.0

    def trim(self) -> bool:
        """Trim once now; True if malloc returned memory. Synchronous: a few milliseconds
        for a heap of tens of MiB, and malloc's lock would stall other threads anyway."""
        if self._trim is None:
            return False
        started = time.perf_counter()
        released = bool(self._trim(0))
        self._last_ms = (time.perf_counter() - started) * 1000
        self._runs += 1
        self._released += released
        return released

    async def run(self) -> None:
        """Trim every ``interval_s`` until cancelled (a cancellation ends it between trims)."""
        if self._trim is None:
            if self.interval_s > 0:
                log.info("malloc_trim is not available here: heap trimming is off")
            return
        while True:
            await self.clock.sleep(self.interval_s)
            self.trim()

    def statistics(self) -> HeapTrimStatistics:
        return HeapTrimStatistics(
            available=self._trim is not None,
            interval_s=self.interval_s,
            runs=self._runs,
            released=self._released,
            last_ms=self._last_ms,
        )
