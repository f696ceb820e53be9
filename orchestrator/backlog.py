"""BacklogMonitor: how many tasks and outbox messages wait, and for how long, for the metrics.

Seed 003 section 5 asks for queue length and time queued. The metrics are read
synchronously at scrape time, so this monitor reads ``storage.backlog_depths()`` (one
small read of each table's unfinished rows) every ``interval_s`` in its own task and keeps
the last answer for ``statistics()``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

import anyio
from anyio.abc import TaskStatus

from asyncstore.storage import AsyncStorageBackend, InvalidInput, QueueDepth, StorageError
from asyncstore.storage.families import Family, MetricSink

__all__ = ["BacklogMonitor", "BacklogStatistics", "open_backlog_monitor"]

log = logging.getLogger("asyncstore.backlog")

_DEPTH_DOC = "Unfinished rows: waiting (claimable now), delayed, in_flight (leased)."
_AGE_DOC = "Seconds the longest-waiting claimable row has waited."


@dataclass(frozen=True, slots=True)
class BacklogStatistics:
    """The last backlog reading: one ``QueueDepth`` per task queue with unfinished tasks and
    one for the outbox (None before the first successful read)."""

    queues: tuple[QueueDepth, ...]
    outbox: QueueDepth | None
    staleness_s: float  # seconds since the last successful read; inf before the first
    reads: int
    errors: int

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family(
            "queue_depth",
            "gauge",
            _DEPTH_DOC,
            ("queue", "state"),
            where="per task queue with unfinished tasks",
        ),
        Family(
            "queue_oldest_wait_seconds",
            "gauge",
            _AGE_DOC,
            ("queue",),
            where="per task queue with unfinished tasks",
        ),
        Family("outbox_depth", "gauge", _DEPTH_DOC, ("state",), where="after the first reading"),
        Family("outbox_oldest_wait_seconds", "gauge", _AGE_DOC, where="after the first reading"),
        Family("backlog_read_age_seconds", "gauge", "Age of the backlog reading; -1: none."),
        Family("backlog_read_errors", "counter", "Failed backlog reads."),
    )

    def export(self, out: MetricSink) -> None:
        for q in self.queues:
            for state, n in _states(q):
                out.sample("queue_depth", {"queue": q.name, "state": state}, n)
            out.sample("queue_oldest_wait_seconds", {"queue": q.name}, q.oldest_wait_s)
        if self.outbox is not None:
            for state, n in _states(self.outbox):
                out.sample("outbox_depth", {"state": state}, n)
            out.sample("outbox_oldest_wait_seconds", {}, self.outbox.oldest_wait_s)
        staleness = self.staleness_s if self.staleness_s != float("inf") else -1.0
        out.sample("backlog_read_age_seconds", {}, staleness)
        out.sample("backlog_read_errors", {}, self.errors)


def _states(depth: QueueDepth) -> tuple[tuple[str, int], ...]:
    return (("waiting", depth.waiting), ("delayed", depth.delayed), ("in_flight", depth.in_flight))


class BacklogMonitor:
    """Keeps the latest ``backlog_depths()`` reading; build it with ``open_backlog_monitor``."""

    def __init__(self, storage: AsyncStorageBackend, interval_s: float) -> None:
        if not isinstance(interval_s, int | float) or not math.isfinite(interval_s):
            raise InvalidInput("interval_s must be a finite number of seconds")
        if interval_s <= 0:
            raise InvalidInput("interval_s must be > 0")
        self.storage = storage
        self.interval_s = float(interval_s)
        self._queues: tuple[QueueDepth, ...] = ()
        self._outbox: QueueDepth | None = None
        self._read_at: float | None = None
        self._reads = 0
        self._errors = 0

    def statistics(self) -> BacklogStatistics:
        """A frozen snapshot of the last reading."""
        age = math.inf if self._read_at is None else time.monotonic() - self._read_at
        return BacklogStatistics(self._queues, self._outbox, age, self._reads, self._errors)

    async def refresh(self) -> None:
        """Read the backlog now. A storage error is logged and counted; the last reading stays.

        If cancelled, the last reading stays as it was.
        """
        try:
            queues, outbox = await self.storage.backlog_depths()
        except StorageError as exc:
            self._errors += 1
            log.warning("backlog read failed: %s", exc)
            return
        self._queues, self._outbox = tuple(queues), outbox
        self._read_at = time.monotonic()
        self._reads += 1

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.refresh()
        task_status.started()
        while True:
            await anyio.sleep(self.interval_s)
            await self.refresh()


@asynccontextmanager
async def open_backlog_monitor(
    storage: AsyncStorageBackend, *, interval_s: float = 5.0
) -> AsyncIterator[BacklogMonitor]:
    """Read the backlog once, then every ``interval_s`` while the block runs.

    Leaving the block (or cancelling it) stops the refresh task; nothing is written.
    """
    monitor = BacklogMonitor(storage, interval_s)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor._run)
        try:
            yield monitor
        finally:
            tg.cancel_scope.cancel()
