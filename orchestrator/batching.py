"""BatchWriter: the one batching primitive behind every write queue of the orchestrator.

Items are buffered in memory and handed to an async *sink* in batches, flushed when any
threshold is reached: item count, encoded bytes, or the age of the oldest unflushed item.
It owns the backpressure policy (block with a timeout, drop the oldest or the newest item;
critical items are never dropped), retries a failing sink with capped exponential backoff
and jitter, for a number of attempts and/or a time budget that lets a database sink ride
out an outage while the items keep counting against capacity, and hands what it finally
cannot write to a dead-letter callback (counted by reason). ``health()`` and
``statistics()`` say when the sink is failing, for how long, and what waits. It relies on
anyio (and names a ``StorageUnavailable`` outage as such); the stream writer, the queue's
and outbox's outcome writers and the webhook batcher are built on it.

Its settings live in ``batching_config``, what it hands out (batches, dead letters, drain
report, health, statistics) in ``batching_records``; every public name is re-exported here.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import Final, Generic, Self, TypeAlias, TypeVar

import anyio
import anyio.abc

from asyncstore.orchestrator.batching_config import (
    HEALTH_MIN_AGE_S,
    OUTCOME_RETRY_BUDGET_S,
    BatchConfig,
    OverflowPolicy,
    outcome_batches,
)
from asyncstore.orchestrator.batching_records import (
    DEAD_LETTER_REASONS,
    DROP_REASONS,
    Batch,
    BatchWriterStatistics,
    DeadLetter,
    DrainReport,
    Health,
)
from asyncstore.orchestrator.errors import Dropped, WriterClosed, WriterOverloaded
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage.errors import InvalidArgument, StorageUnavailable, UsageError

__all__ = [
    "DEAD_LETTER_REASONS",
    "DROP_REASONS",
    "HEALTH_MIN_AGE_S",
    "OUTCOME_RETRY_BUDGET_S",
    "Batch",
    "BatchConfig",
    "BatchWriter",
    "BatchWriterStatistics",
    "DeadLetter",
    "DrainReport",
    "Health",
    "OverflowPolicy",
    "open_batch_writer",
    "outcome_batches",
]

log = logging.getLogger("asyncstore.batching")

T = TypeVar("T")


# One buffered item: (item, nbytes, critical, arrival number for flush barriers, monotonic
# arrival time). A plain tuple: made once per put on the hot path, where a slotted object's
# __init__ cost five times as much.
_Entry: TypeAlias = tuple[T, int, bool, int, float]
_ITEM: Final = 0
_NBYTES: Final = 1
_CRITICAL: Final = 2
_NUMBER: Final = 3
_T: Final = 4


Sink = Callable[[Batch[T]], Awaitable[None]]
DeadLetterCallback = Callable[[DeadLetter[T]], Awaitable[None] | None]


class BatchWriter(Generic[T]):
    """Buffers items and flushes them to ``sink`` in batches; use as ``async with``.

    ``key`` groups items (e.g. by session) so the sink gets per-key buckets in arrival
    order; ``size_of`` gives an item's size in bytes for the byte thresholds (callers on a
    hot path can pass ``nbytes=`` to ``put_nowait`` instead). Batches are sent one at a
    time, so the sink sees items in arrival order, retries included. ``retry_if`` decides
    which sink errors are worth retrying (default: all); the others dead-letter at once.

    Riding out an outage: while the sink fails, the batch in flight is retried (capped
    exponential backoff with jitter) and new items keep buffering up to ``capacity``, past
    which the overflow policy applies (drops counted). A batch is given up when it used
    ``max_retries``, or when the outage (measured from the first failure since the sink last
    succeeded, so batches queued behind a failing one get no fresh budget) has lasted
    ``retry_budget_s``; after that each later batch gets one attempt until one succeeds.
    """

    def __init__(
        self,
        sink: Sink[T],
        config: BatchConfig | None = None,
        *,
        key: Callable[[T], Hashable] | None = None,
        size_of: Callable[[T], int] | None = None,
        on_dead_letter: DeadLetterCallback[T] | None = None,
        retry_if: Callable[[Exception], bool] | None = None,
        name: str = "batch",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config or BatchConfig()
        self.name = name
        self._clock = clock
        # The clock's reading, bound once (time.monotonic itself for the system clock).
        self._monotonic = time.monotonic if clock is SYSTEM_CLOCK else clock.monotonic
        self._backoff = self.config.backoff
        self._sink = sink
        self._key = key
        self._size_of = size_of
        self._on_dead_letter = on_dead_letter
        self._retry_if = retry_if
        self._pending: deque[_Entry[T]] = deque()
        self._in_flight: list[_Entry[T]] = []
        self._bytes = 0
        self._pending_bytes = 0
        self._numbered = 0
        self._flush_upto = 0  # flush everything numbered <= this at once
        self._wake = anyio.Event()
        self._room = anyio.Event()
        self._settled = anyio.Event()
        self._blocked = 0
        self._closing = False
        self._closed = False
        self._started = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._flusher_done = anyio.Event()
        self._flusher_scope: anyio.CancelScope | None = None
        self._flushed = 0
        self._batches = 0
        self._retries = 0
        self._dead = 0
        self._dead_by_reason: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._last_latency = 0.0
        self._failures = 0  # consecutive failed sink calls
        self._failing_since = 0.0  # monotonic time of the first of them
        self._failing_since_wall = 0.0
        self._last_error = ""
        self._unavailable_error = False

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise UsageError(f"writer {self.name!r} was already started")
        self._started = True
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._flusher)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            # Draining must finish even when the owner is being cancelled: buffered items
            # would otherwise be lost without a trace. drain_timeout_s bounds it.
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                await tg.__aexit__(exc_type, exc, tb)
        return None

    async def aclose(self) -> DrainReport:
        """Stop intake, flush everything buffered, and report what could not be written.

        Waits at most ``drain_timeout_s``, retrying a failing sink meanwhile as usual; items
        still unwritten then are dead-lettered with reason ``shutdown``. Safe to call twice.
        If cancelled, the writer stays closing and the flusher keeps draining until the
        owning ``async with`` exits.
        """
        self._closing = True
        self._wake.set()
        self._room.set()
        if self._started and not self._closed:
            with self._clock.move_on_after(self.config.drain_timeout_s):
                await self._flusher_done.wait()
            if not self._flusher_done.is_set():
                if self._flusher_scope is not None:
                    self._flusher_scope.cancel()
                await self._flusher_done.wait()
            self._closed = True
        leftovers = [e[_ITEM] for e in self._in_flight] + [e[_ITEM] for e in self._pending]
        if leftovers:
            self._in_flight = []
            self._pending.clear()
            self._bytes = self._pending_bytes = 0
            await self._dead_letter(leftovers, "shutdown", None)
        self._closed = True
        return DrainReport(
            self._flushed,
            self._dead,
            MappingProxyType(dict(self._dropped)),
            MappingProxyType(dict(self._dead_by_reason)),
        )

    # -- intake --------------------------------------------------------------------

    def put_nowait(self, item: T, *, critical: bool = False, nbytes: int | None = None) -> None:
        """Buffer ``item`` without waiting; returns once it is buffered, else raises.

        The ``*_nowait`` rule (``orchestrator.errors``): when the writer is full,
        ``drop_oldest`` evicts the oldest waiting non-critical items to make room (each
        counted in ``dropped`` as ``overflow_oldest``: an accepted outcome, this item is
        buffered); ``drop_newest`` drops this item, counts it (``overflow_newest``) and
        raises ``Dropped``, an ``anyio.WouldBlock``; ``block``, or a critical item under
        any policy (never dropped), raises plain ``anyio.WouldBlock``: ``put()`` is the
        waiting variant. ``WriterClosed`` once closing.
        """
        if self._closing:
            raise WriterClosed(f"writer {self.name!r} is closed")
        size = nbytes if nbytes is not None else (self._size_of(item) if self._size_of else 0)
        cfg = self.config
        limit = cfg.capacity_bytes
        if len(self._pending) + len(self._in_flight) >= cfg.capacity or (
            limit is not None and self._bytes + size > limit
        ):  # not self._has_room(size), inline: this is the hot path
            self._check_fits(size)
            policy = self.config.overflow
            if policy is OverflowPolicy.DROP_OLDEST and not critical and self._evict_oldest(size):
                pass
            elif policy is OverflowPolicy.BLOCK or critical:
                raise anyio.WouldBlock
            else:
                newest = policy is OverflowPolicy.DROP_NEWEST
                reason = "overflow_newest" if newest else "overflow"
                self._drop(reason)
                raise Dropped(f"writer {self.name!r} is full: item dropped", reason=reason)
        self._accept(item, size, critical)

    async def put(self, item: T, *, critical: bool = False, nbytes: int | None = None) -> bool:
        """Buffer ``item``, waiting for room where the policy (or ``critical``) says so.

        True once buffered; False if the policy dropped it (counted; where ``put_nowait``
        raises ``Dropped``). A wait longer than ``block_timeout_s`` raises
        ``WriterOverloaded``. If cancelled while waiting, the item is not buffered.
        """
        size = nbytes if nbytes is not None else (self._size_of(item) if self._size_of else 0)
        try:
            self.put_nowait(item, critical=critical, nbytes=size)
            return True
        except Dropped:
            return False
        except anyio.WouldBlock:
            pass
        await self.wait_for_room(size)
        self._accept(item, size, critical)
        return True

    async def wait_for_room(self, nbytes: int = 0) -> None:
        """Wait until an item of ``nbytes`` fits; ``WriterOverloaded`` after the timeout.

        Callers that must take a decision atomically with the put (the stream writer
        assigns sequence numbers) wait here, then ``put_nowait`` without awaiting in between.
        """
        self._check_fits(nbytes)
        self._blocked += 1
        try:
            with self._clock.move_on_after(self.config.block_timeout_s):
                while not self._has_room(nbytes):
                    if self._closing:
                        raise WriterClosed(f"writer {self.name!r} is closed")
                    if self._room.is_set():
                        self._room = anyio.Event()
                    await self._room.wait()
                return
        finally:
            self._blocked -= 1
        raise WriterOverloaded(
            f"writer {self.name!r} stayed full ({self.config.capacity} items) for "
            f"{self.config.block_timeout_s} s; the sink is slower than the producers or failing"
        )

    def _has_room(self, nbytes: int) -> bool:
        if len(self._pending) + len(self._in_flight) >= self.config.capacity:
            return False
        limit = self.config.capacity_bytes
        return limit is None or self._bytes + nbytes <= limit

    def _check_fits(self, nbytes: int) -> None:
        limit = self.config.capacity_bytes
        if limit is not None and nbytes > limit:
            raise InvalidArgument(f"an item of {nbytes} bytes can never fit in {limit} bytes")

    def _accept(self, item: T, nbytes: int, critical: bool) -> None:
        if self._closing:
            raise WriterClosed(f"writer {self.name!r} is closed")
        if not self._started:
            # Without its flusher nothing would ever be written: refuse rather than hoard.
            raise WriterClosed(f"writer {self.name!r} is not running: use `async with` first")
        self._numbered += 1
        now = self._monotonic()
        self._pending.append((item, nbytes, critical, self._numbered, now))
        self._bytes += nbytes
        self._pending_bytes += nbytes
        pending = len(self._pending)
        max_bytes = self.config.max_batch_bytes
        if (
            pending == 1
            or pending >= self.config.max_batch
            or (max_bytes is not None and self._pending_bytes >= max_bytes)
        ):
            # Arms the timer for a first item, or wakes the flusher for a full batch.
            self._wake.set()

    def _evict_oldest(self, nbytes: int) -> bool:
        """Drop waiting non-critical items, oldest first, until ``nbytes`` fits."""
        evicted = False
        i = 0
        while i < len(self._pending) and not self._has_room(nbytes):
            entry = self._pending[i]
            if entry[_CRITICAL]:
                i += 1
                continue
            del self._pending[i]
            self._bytes -= entry[_NBYTES]
            self._pending_bytes -= entry[_NBYTES]
            self._drop("overflow_oldest")
            evicted = True
        if evicted:
            self._notify_settled()
        return self._has_room(nbytes)

    def _drop(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    # -- flushing ------------------------------------------------------------------

    def request_flush(self) -> None:
        """Ask for everything buffered now to be sent at once, without waiting for it."""
        self._flush_upto = self._numbered
        self._wake.set()

    async def flush(self) -> None:
        """A barrier: returns once every item put before the call is settled.

        Settled means confirmed by the sink, or (retries or budget spent) dead-lettered, or
        evicted by ``drop_oldest``. If cancelled, stops waiting; the flush still happens.
        """
        target = self._numbered
        self._flush_upto = max(self._flush_upto, target)
        self._wake.set()
        while self._oldest_unsettled() <= target:
            if not self._started or self._closed:
                break
            if self._settled.is_set():
                self._settled = anyio.Event()
            await self._settled.wait()

    def _oldest_unsettled(self) -> int:
        if self._in_flight:
            return self._in_flight[0][_NUMBER]
        if self._pending:
            return self._pending[0][_NUMBER]
        return self._numbered + 1

    def _notify_settled(self) -> None:
        self._settled.set()
        self._room.set()

    async def _flusher(self) -> None:
        try:
            # Shielded: cancelling the owner must not kill a drain in progress; aclose()
            # cancels this scope itself once drain_timeout_s has passed.
            with anyio.CancelScope(shield=True) as scope:
                self._flusher_scope = scope
                await self._flush_loop()
        finally:
            self._flusher_done.set()
            self._notify_settled()

    async def _flush_loop(self) -> None:
        cfg = self.config
        while True:
            if not self._pending:
                if self._closing:
                    return
                if self._wake.is_set():
                    self._wake = anyio.Event()
                    continue
                await self._wake.wait()
                continue
            if not self._due():
                if self._wake.is_set():
                    self._wake = anyio.Event()
                    if self._due():
                        await self._send_batch()
                    continue
                delay = self._pending[0][_T] + cfg.flush_interval_s - self._clock.monotonic()
                with self._clock.move_on_after(max(delay, 0.0)):
                    await self._wake.wait()
                continue
            await self._send_batch()

    def _due(self) -> bool:
        cfg = self.config
        if cfg.eager or self._closing or self._pending[0][_NUMBER] <= self._flush_upto:
            return True
        if len(self._pending) >= cfg.max_batch:
            return True
        if cfg.max_batch_bytes is not None and self._pending_bytes >= cfg.max_batch_bytes:
            return True
        return self._clock.monotonic() - self._pending[0][_T] >= cfg.flush_interval_s

    async def _send_batch(self) -> None:
        cfg = self.config
        pending = self._pending
        limit = cfg.max_batch_bytes
        batch: list[_Entry[T]] = []
        size = 0
        if limit is None or self._pending_bytes <= limit:
            # Everything waiting fits the byte threshold: take up to max_batch at once.
            popleft = pending.popleft
            batch = [popleft() for _ in range(min(len(pending), cfg.max_batch))]
            size = sum([e[_NBYTES] for e in batch]) if pending else self._pending_bytes
        else:
            while pending and len(batch) < cfg.max_batch:
                entry = pending[0]
                if batch and size + entry[_NBYTES] > limit:
                    break
                pending.popleft()
                batch.append(entry)
                size += entry[_NBYTES]
        self._pending_bytes -= size
        self._in_flight = batch
        items = [e[_ITEM] for e in batch]
        groups: dict[Hashable, list[T]] = {}
        if self._key is not None:
            for item in items:
                groups.setdefault(self._key(item), []).append(item)
        else:
            groups[None] = items
        attempt = 0
        while True:
            started = self._clock.monotonic()
            try:
                await self._sink(Batch(items, MappingProxyType(groups), size, attempt))
            except Exception as exc:
                error: Exception = exc
                reason = self._failed(exc, attempt, len(items))
            else:
                self._last_latency = self._clock.monotonic() - started
                self._flushed += len(items)
                self._batches += 1
                self._failures = 0
                self._last_error = ""
                break
            if reason is not None:
                await self._dead_letter(items, reason, error)
                break
            attempt += 1
            self._retries += 1
            await self._clock.sleep(self._retry_delay(attempt))
        self._in_flight = []
        self._bytes -= size
        self._notify_settled()

    def _failed(self, exc: Exception, attempt: int, n: int) -> str | None:
        """Record a failed sink call; the dead-letter reason if the batch is given up."""
        now = self._clock.monotonic()
        if self._failures == 0:
            self._failing_since = now
            self._failing_since_wall = self._clock.time()
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._unavailable_error = isinstance(exc, StorageUnavailable)
        # An outage retried for a minute would log a line a second: say it first, then now
        # and then (health() and statistics() carry the live state).
        log.log(
            logging.WARNING if self._failures == 1 or self._failures % 50 == 0 else logging.DEBUG,
            "writer %r: sink failed (%d in a row) on attempt %d for %d items: %r",
            self.name,
            self._failures,
            attempt + 1,
            n,
            exc,
        )
        cfg = self.config
        if self._retry_if is not None and not self._retry_if(exc):
            return "not_retryable"
        if cfg.max_retries is not None and attempt >= cfg.max_retries:
            return "retries_exhausted"
        if cfg.retry_budget_s is not None and now - self._failing_since >= cfg.retry_budget_s:
            return "retry_budget_exhausted"
        return None

    def _retry_delay(self, attempt: int) -> float:
        delay = self._backoff.delay(attempt)
        budget = self.config.retry_budget_s
        if budget is not None:
            # The last attempt lands when the budget ends, not a whole step after it.
            delay = min(delay, max(self._failing_since + budget - self._clock.monotonic(), 0.0))
        return delay

    async def _dead_letter(self, items: list[T], reason: str, error: BaseException | None) -> None:
        self._dead += len(items)
        self._dead_by_reason[reason] = self._dead_by_reason.get(reason, 0) + len(items)
        log.error("writer %r: dead-lettering %d items (%s)", self.name, len(items), reason)
        if self._on_dead_letter is None:
            return
        try:
            result = self._on_dead_letter(DeadLetter(items, reason, error))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("writer %r: dead-letter callback failed", self.name)

    # -- observation -----------------------------------------------------------------

    def statistics(self) -> BatchWriterStatistics:
        now = self._clock.monotonic()
        oldest = (
            self._in_flight[0][_T]
            if self._in_flight
            else (self._pending[0][_T] if self._pending else None)
        )
        failing = self._failures > 0
        return BatchWriterStatistics(
            name=self.name,
            pending=len(self._pending),
            in_flight=len(self._in_flight),
            buffered_bytes=self._bytes,
            accepted=self._numbered,
            flushed=self._flushed,
            batches=self._batches,
            dropped=MappingProxyType(dict(self._dropped)),
            retries=self._retries,
            dead_lettered=self._dead,
            blocked_puts=self._blocked,
            oldest_pending_age_s=0.0 if oldest is None else now - oldest,
            last_flush_latency_s=self._last_latency,
            dead_letters=MappingProxyType(dict(self._dead_by_reason)),
            consecutive_failures=self._failures,
            failing_for_s=now - self._failing_since if failing else 0.0,
            failing_since=self._failing_since_wall if failing else None,
            last_error=self._last_error,
        )

    def health(self) -> Health:
        """Unhealthy while the sink fails, or when the oldest item waited over twice the
        interval (at least ``HEALTH_MIN_AGE_S``).

        A failing sink reads like ``storage unavailable for 4.2 s: 123 items buffered, oldest
        4.3 s (7 failed attempts; last error: ...)`` ("sink failing" when the error is not
        ``StorageUnavailable``); healthy again after the next successful write.
        """
        s = self.statistics()
        if s.sink_unavailable:
            what = "storage unavailable" if self._unavailable_error else "sink failing"
            return Health(
                False,
                f"{what} for {s.failing_for_s:.1f} s: {s.unsettled} items buffered, oldest "
                f"{s.oldest_pending_age_s:.1f} s ({s.consecutive_failures} failed attempts; "
                f"last error: {s.last_error})",
            )
        age = s.oldest_pending_age_s
        # A floor: with a millisecond flush interval an ordinary write under load would
        # otherwise read as unhealthy.
        limit = max(2 * self.config.flush_interval_s, HEALTH_MIN_AGE_S)
        if age > limit:
            return Health(False, f"oldest buffered item is {age:.3f} s old (limit {limit:.3f} s)")
        if self._closed:
            return Health(False, "writer is closed")
        return Health(True)


def describe_failure(exc: BaseException) -> str:
    """The text stored as a task's or message's last error: ``Type: message``.

    Text that cannot be stored as UTF-8 (a lone surrogate, e.g. a file name decoded with
    ``surrogateescape``) is escaped, so a handler's odd exception never fails the outcome
    write that records it.
    """
    text = str(exc)
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


@asynccontextmanager
async def open_batch_writer(
    sink: Sink[T],
    config: BatchConfig | None = None,
    *,
    key: Callable[[T], Hashable] | None = None,
    size_of: Callable[[T], int] | None = None,
    on_dead_letter: DeadLetterCallback[T] | None = None,
    retry_if: Callable[[Exception], bool] | None = None,
    name: str = "batch",
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[BatchWriter[T]]:
    """Run a ``BatchWriter`` (arguments as its constructor's) while the block runs.

    Leaving the block drains it (``aclose()``, shielded, bounded by ``drain_timeout_s``).
    ``async with BatchWriter(...)`` does the same.
    """
    writer = BatchWriter(
        sink,
        config,
        key=key,
        size_of=size_of,
        on_dead_letter=on_dead_letter,
        retry_if=retry_if,
        name=name,
        clock=clock,
    )
    async with writer:
        yield writer
