"""Probes that feed the metrics' direct histograms: event-loop lag and pool acquire wait.

``open_loop_lag_monitor`` sleeps in a loop and records how late the event loop woke it
(into ``asyncstore_event_loop_lag_seconds``), sampling anyio's worker-thread limiter on the
way; ``open_pool_probe`` borrows a pooled connection now and then and records the wait
(``asyncstore_storage_pool_acquire_wait_seconds``). Each runs a task for the length of an
``async with`` block. They rely only on a ``Metrics`` object's histograms and config; the
bucket bounds live here because the probes' timeouts follow them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from asyncstore.orchestrator.metrics import Metrics

__all__ = [
    "LAG_BUCKETS_S",
    "WAIT_BUCKETS_S",
    "LoopLagMonitor",
    "LoopLagStatistics",
    "open_loop_lag_monitor",
    "open_pool_probe",
]

log = logging.getLogger(__name__)

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


@dataclass(frozen=True, slots=True)
class LoopLagStatistics:
    """Lag samples: ``max_s`` since the start, percentiles over the last ``window`` samples."""

    samples: int
    window: int
    last_s: float
    max_s: float
    p50_s: float
    p99_s: float


class LoopLagMonitor:
    """Sleeps ``interval_s`` in a loop and records how late it woke (``open_loop_lag_monitor``)."""

    def __init__(self, metrics: Metrics, interval_s: float, window: int = 1000) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._recent: deque[float] = deque(maxlen=window)
        self._samples = 0
        self._last = self._max = 0.0

    def reset(self) -> None:
        """Forget the recent samples and the maximum (the histogram keeps counting)."""
        self._recent.clear()
        self._last = self._max = 0.0

    def statistics(self) -> LoopLagStatistics:
        ordered = sorted(self._recent)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        return LoopLagStatistics(
            samples=self._samples,
            window=len(ordered),
            last_s=self._last,
            max_s=self._max,
            p50_s=pct(0.50),
            p99_s=pct(0.99),
        )

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            start = anyio.current_time()
            await anyio.sleep(self.interval_s)
            lag = max(0.0, anyio.current_time() - start - self.interval_s)
            self._samples += 1
            self._last = lag
            self._max = max(self._max, lag)
            self._recent.append(lag)
            self.metrics.loop_lag.observe(lag)
            # The thread limiter is per event loop: sample it here, on the loop.
            limiter = anyio.to_thread.current_default_thread_limiter()
            self.metrics.set_thread_pool(
                limiter.borrowed_tokens, limiter.total_tokens, limiter.statistics().tasks_waiting
            )


@asynccontextmanager
async def open_loop_lag_monitor(
    metrics: Metrics, *, interval_s: float | None = None
) -> AsyncIterator[LoopLagMonitor]:
    """Measure event-loop lag into ``asyncstore_event_loop_lag_seconds`` within the block.

    Also samples anyio's default worker-thread limiter (``asyncstore_worker_threads_*``).
    Leaving or cancelling the block stops the monitor task.
    """
    monitor = LoopLagMonitor(metrics, interval_s or metrics.config.loop_lag_interval_s)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor._run)
        try:
            yield monitor
        finally:
            tg.cancel_scope.cancel()


def _pool_of(source: object) -> Any:
    try:
        # Only the Postgres driver has a pool; a closed one raises, which means no pool.
        pool = getattr(source, "pool", None)
    except Exception:
        return None
    if pool is None or not callable(getattr(pool, "get_size", None)):
        return None
    return pool


@asynccontextmanager
async def open_pool_probe(
    metrics: Metrics, storage: object, *, source: str = "storage", interval_s: float | None = None
) -> AsyncIterator[None]:
    """Sample the storage pool's acquire wait into ``..._storage_pool_acquire_wait_seconds``.

    Every ``interval_s`` a probe borrows a connection and returns it at once, timing the
    borrow: the wait a request would have seen at that moment. Without a pool (SQLite) the
    block runs with no probe. Leaving or cancelling the block stops the probe.
    """
    pool = _pool_of(storage)
    if pool is None:
        yield
        return
    every = interval_s or metrics.config.pool_probe_interval_s
    observe = metrics.pool_acquire_wait.labels(source=source).observe

    async def probe() -> None:
        while True:
            start = time.perf_counter()
            try:
                with anyio.move_on_after(WAIT_BUCKETS_S[-1]):
                    async with pool.acquire():
                        pass
            except Exception as exc:
                log.warning("metrics: pool probe failed: %s", exc)
            else:
                observe(time.perf_counter() - start)
            await anyio.sleep(every)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
