"""A tiny write coalescer for the queue and the outbox relay (stand-in for BatchWriter).

It owns one background task that hands everything put since the last write to an async
sink in one call, so N finished tasks cost one statement per tick, not N. It relies only on
anyio; when ``orchestrator.batching.BatchWriter`` lands, ``open_outcome_writer`` is the one
place to swap (same shape: ``put_nowait`` / ``flush`` / ``statistics`` in an ``async with``).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

from storage import StorageClosed, StorageError

T = TypeVar("T")
log = logging.getLogger("asyncstore.coalesce")

_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class CoalescerStatistics:
    pending: int
    written: int
    batches: int
    failed_batches: int
    undelivered: int


class OutcomeWriter(Generic[T]):
    """Collects items and writes them through ``sink`` in batches of at most ``max_batch``.

    A sink that raises ``StorageError`` gets the same batch again after a short jittered
    backoff; items are never dropped while the writer is open.
    """

    def __init__(self, sink: Callable[[list[T]], Awaitable[None]], max_batch: int) -> None:
        self._sink = sink
        self._max = max_batch
        self._items: collections.deque[T] = collections.deque()
        self._ready = anyio.Event()
        self._progress = anyio.Event()
        self._put = 0
        self._done = 0
        self._batches = 0
        self._failed = 0
        self._undelivered = 0

    @property
    def pending(self) -> int:
        return self._put - self._done

    def statistics(self) -> CoalescerStatistics:
        return CoalescerStatistics(
            self.pending, self._done, self._batches, self._failed, self._undelivered
        )

    def put_nowait(self, item: T) -> None:
        """Queue one item for the next write; never blocks."""
        self._items.append(item)
        self._put += 1
        self._ready.set()

    async def flush(self) -> None:
        """Wait until every item put before this call has been written.

        Cancelling the wait leaves the items queued; they are still written.
        """
        target = self._put
        while self._done < target:
            self._progress = self._progress if not self._progress.is_set() else anyio.Event()
            await self._progress.wait()

    async def _write_some(self) -> None:
        batch = [self._items.popleft() for _ in range(min(self._max, len(self._items)))]
        try:
            # Shielded: a write in flight completes, so each outcome is recorded once even
            # when the owner is cancelled mid-write (the driver's command timeout bounds it).
            with anyio.CancelScope(shield=True):
                await self._sink(batch)
        except BaseException:
            self._items.extendleft(reversed(batch))
            raise
        self._done += len(batch)
        self._batches += 1
        self._progress.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._items:
                self._ready = anyio.Event()
                await self._ready.wait()
            try:
                await self._write_some()
                failures = 0
            except StorageClosed:
                raise
            except StorageError as exc:
                self._failed += 1
                failures += 1
                log.warning("batched write failed (%d pending): %s", self.pending, exc)
                await anyio.sleep(min(0.05 * 2**failures, 2.0) * (0.5 + random.random()))

    async def _close(self) -> None:
        with anyio.move_on_after(_CLOSE_TIMEOUT_S):
            while self._items:
                try:
                    await self._write_some()
                except StorageError as exc:
                    self._failed += 1
                    log.warning("final write failed (%d pending): %s", self.pending, exc)
                    if isinstance(exc, StorageClosed):
                        break
                    await anyio.sleep(0.1)
        self._undelivered += len(self._items)
        self._items.clear()
        self._done = self._put
        self._progress.set()


@asynccontextmanager
async def open_outcome_writer(
    sink: Callable[[list[T]], Awaitable[None]], max_batch: int
) -> AsyncIterator[OutcomeWriter[T]]:
    """Run a coalescing writer for the ``async with`` body; leaving it writes what is left.

    The final write is shielded from cancellation and bounded by a timeout; items it could
    not write are counted as ``undelivered`` (their leases expire and they run again).
    """
    writer: OutcomeWriter[T] = OutcomeWriter(sink, max_batch)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer._run)
            try:
                yield writer
            finally:
                tg.cancel_scope.cancel()
    finally:
        # Shielded: outcomes of finished work must reach storage even if our owner is
        # cancelled.
        with anyio.CancelScope(shield=True):
            await writer._close()
