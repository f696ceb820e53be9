"""BatchWriter: thresholds, the timer, overflow policies, retries, dead letters, draining."""

from __future__ import annotations

import time

import anyio
import pytest

from asyncstore.orchestrator.batching import (
    HEALTH_MIN_AGE_S,
    Batch,
    BatchConfig,
    BatchWriter,
    DeadLetter,
    OverflowPolicy,
    open_batch_writer,
)
from asyncstore.orchestrator.errors import Dropped, WriterClosed, WriterOverloaded
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import StorageUnavailable
from tests.waiting import wait_for


class Recorder:
    """A sink that records every batch; can be told to fail or to hold batches."""

    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[Batch[int]] = []
        self.fail_times = fail_times
        self.calls = 0
        self.arrived = anyio.Event()
        self.gate: anyio.Event | None = None

    async def __call__(self, batch: Batch[int]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("sink down")
        self.batches.append(batch)
        self.arrived.set()

    @property
    def items(self) -> list[int]:
        return [i for b in self.batches for i in b.items]


def offer(w: BatchWriter[int], item: int, **kw: bool) -> bool:
    """``put_nowait``'s outcome: True if buffered, False if the policy dropped it (``Dropped``)."""
    try:
        w.put_nowait(item, **kw)
    except Dropped:
        return False
    return True


def cfg(**kw: object) -> BatchConfig:
    base: dict[str, object] = {"max_batch": 100, "flush_interval_s": 0.05, "retry_base_s": 0.001}
    base.update(kw)
    return BatchConfig.model_validate(base)


async def test_timer_flush_delivers_lone_item() -> None:
    sink = Recorder()
    clock = ManualClock()
    async with BatchWriter(sink, cfg(), clock=clock) as w:
        assert offer(w, 7)
        await clock.wait_sleepers(1)  # the flusher waits out the 50 ms interval
        clock.advance(0.049)
        await anyio.wait_all_tasks_blocked()
        assert sink.items == [] and w.statistics().pending == 1  # not before the interval
        clock.advance(0.002)  # past it (float seconds: a step over, not onto, the deadline)
        with anyio.fail_after(5):
            await sink.arrived.wait()
        assert sink.items == [7]
        assert w.statistics().pending == 0


async def test_open_batch_writer_reads_the_clock_it_is_given() -> None:
    """``open_batch_writer(clock=...)``, like the other components' openers: the flush
    timer runs on that clock, so a test drives it instead of sleeping past it."""
    sink = Recorder()
    clock = ManualClock()
    async with open_batch_writer(sink, cfg(flush_interval_s=30.0), clock=clock) as w:
        w.put_nowait(1)
        await clock.wait_sleepers(1)  # the flusher waits out the 30 s interval on the clock
        assert sink.items == [] and w.statistics().pending == 1
        clock.advance(30.001)
        with anyio.fail_after(5):
            await sink.arrived.wait()
        assert sink.items == [1]


async def test_count_threshold_flushes_without_timer() -> None:
    sink = Recorder()
    async with BatchWriter(sink, cfg(max_batch=10, flush_interval_s=60)) as w:
        for i in range(25):
            w.put_nowait(i)
        await wait_for(lambda: len(sink.items) >= 20)
        assert [len(b.items) for b in sink.batches[:2]] == [10, 10]
        assert w.statistics().pending == 5  # the rest waits for the 60 s timer
    assert sink.items == list(range(25))  # and the close drained it


async def test_bytes_threshold_flushes() -> None:
    sink = Recorder()
    config = cfg(max_batch=1000, max_batch_bytes=100, flush_interval_s=60)
    async with BatchWriter(sink, config) as w:
        for i in range(4):
            w.put_nowait(i, nbytes=30)
        with anyio.fail_after(2):
            await sink.arrived.wait()
        # The fourth item reaches 120 bytes; the batch stops before exceeding 100.
        assert sink.batches[0].items == [0, 1, 2]
        assert sink.batches[0].nbytes == 90


async def test_flush_is_a_barrier() -> None:
    sink = Recorder()
    async with BatchWriter(sink, cfg(flush_interval_s=60)) as w:
        for i in range(5):
            w.put_nowait(i)
        with anyio.fail_after(2):
            await w.flush()
        assert sink.items == [0, 1, 2, 3, 4]
        w.put_nowait(5)
        assert w.statistics().pending == 1


async def test_groups_keep_arrival_order_per_key() -> None:
    sink = Recorder()
    async with BatchWriter(sink, cfg(flush_interval_s=60), key=lambda i: i % 3) as w:
        for i in range(9):
            w.put_nowait(i)
        await w.flush()
    groups = sink.batches[0].groups
    assert list(groups) == [0, 1, 2]
    assert groups[0] == [0, 3, 6] and groups[1] == [1, 4, 7] and groups[2] == [2, 5, 8]


async def test_drop_newest_counts_and_keeps_critical() -> None:
    sink = Recorder()
    sink.gate = anyio.Event()  # hold the sink so the writer fills up
    config = cfg(max_batch=2, capacity=4, overflow=OverflowPolicy.DROP_NEWEST)
    async with BatchWriter(sink, config) as w:
        accepted = [offer(w, i) for i in range(6)]
        assert accepted == [True, True, True, True, False, False]
        assert w.statistics().dropped == {"overflow_newest": 2}
        with pytest.raises(anyio.WouldBlock):
            w.put_nowait(99, critical=True)  # never dropped: it must wait instead

        async def put_critical() -> None:
            await w.put(99, critical=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(put_critical)
            await wait_for(lambda: w.statistics().blocked_puts == 1)
            sink.gate.set()
        await w.flush()
    assert sink.items == [0, 1, 2, 3, 99]


async def test_drop_oldest_evicts_waiting_non_critical_only() -> None:
    sink = Recorder()
    sink.gate = anyio.Event()
    config = cfg(max_batch=1, capacity=3, overflow=OverflowPolicy.DROP_OLDEST, flush_interval_s=60)
    async with BatchWriter(sink, config) as w:
        w.put_nowait(0)  # taken in flight (max_batch=1 makes it due at once)
        await wait_for(lambda: w.statistics().in_flight == 1)
        w.put_nowait(1, critical=True)
        w.put_nowait(2)
        assert offer(w, 3)  # evicts 2, the oldest waiting non-critical item
        assert w.statistics().dropped == {"overflow_oldest": 1}
        sink.gate.set()
        await w.flush()
    assert sink.items == [0, 1, 3]


async def test_block_policy_times_out_with_clear_error() -> None:
    sink = Recorder()
    sink.gate = anyio.Event()
    config = cfg(max_batch=1, capacity=2, block_timeout_s=0.05)
    async with BatchWriter(sink, config) as w:
        w.put_nowait(0)
        w.put_nowait(1)
        with pytest.raises(anyio.WouldBlock):
            w.put_nowait(2)
        with pytest.raises(WriterOverloaded, match="stayed full"):
            await w.put(2)
        sink.gate.set()
        assert await w.put(3)
    assert sink.items == [0, 1, 3]


async def test_sink_failures_retry_then_recover_without_loss() -> None:
    sink = Recorder(fail_times=3)
    async with BatchWriter(sink, cfg(max_batch=10, flush_interval_s=0.01)) as w:
        for i in range(30):
            w.put_nowait(i)
        with anyio.fail_after(5):
            await w.flush()
        stats = w.statistics()
    assert sink.items == list(range(30))
    assert stats.retries == 3 and stats.dead_lettered == 0
    assert sink.batches[0].attempt == 3  # the first batch got through on try 4


async def test_retries_exhausted_go_to_dead_letter() -> None:
    sink = Recorder(fail_times=100)
    letters: list[DeadLetter[int]] = []
    config = cfg(max_batch=5, max_retries=2, flush_interval_s=0.01)
    async with BatchWriter(sink, config, on_dead_letter=letters.append) as w:
        for i in range(5):
            w.put_nowait(i)
        with anyio.fail_after(5):
            await w.flush()
        stats = w.statistics()
    assert sink.calls == 3  # first try + 2 retries
    assert stats.dead_lettered == 5 and stats.flushed == 0
    assert letters[0].items == [0, 1, 2, 3, 4]
    assert letters[0].reason == "retries_exhausted"
    assert isinstance(letters[0].error, ConnectionError)


async def test_aclose_drains_and_reports() -> None:
    sink = Recorder()
    w: BatchWriter[int] = BatchWriter(sink, cfg(flush_interval_s=60))
    async with w:
        for i in range(250):
            w.put_nowait(i)
    report = await w.aclose()
    assert sink.items == list(range(250))
    assert report.flushed == 250 and report.complete
    with pytest.raises(WriterClosed):
        w.put_nowait(1)


async def test_aclose_dead_letters_what_cannot_be_written_in_time() -> None:
    sink = Recorder(fail_times=10_000)
    letters: list[DeadLetter[int]] = []
    config = cfg(flush_interval_s=60, max_retries=1000, drain_timeout_s=0.1)
    w = BatchWriter(sink, config, on_dead_letter=letters.append)
    async with w:
        for i in range(10):
            w.put_nowait(i)
    report = await w.aclose()
    assert report.dead_lettered == 10 and not report.complete
    assert sorted(i for d in letters for i in d.items) == list(range(10))
    assert letters[-1].reason == "shutdown"


async def test_cancelled_owner_still_drains() -> None:
    sink = Recorder()
    with anyio.CancelScope() as scope:
        async with BatchWriter(sink, cfg(flush_interval_s=60)) as w:
            for i in range(3):
                w.put_nowait(i)
            scope.cancel()
            await anyio.sleep_forever()  # the owner's cancellation point
    assert sink.items == [0, 1, 2]


async def test_health_fails_when_items_wait_too_long() -> None:
    sink = Recorder()
    sink.gate = anyio.Event()
    clock = ManualClock()
    async with BatchWriter(sink, cfg(flush_interval_s=0.01), clock=clock) as w:
        assert w.health().ok
        w.put_nowait(1)
        await clock.wait_sleepers(1)
        clock.advance(0.06)  # the batch goes out and hangs in the sink
        await wait_for(lambda: w.statistics().in_flight == 1)
        # Twice the interval is 20 ms, but the floor is HEALTH_MIN_AGE_S.
        assert w.statistics().oldest_pending_age_s == pytest.approx(0.06)
        assert w.health().ok
        clock.advance(HEALTH_MIN_AGE_S)
        health = w.health()
        assert not health.ok and "old" in health.reason
        sink.gate.set()
        await w.flush()
        assert w.health().ok


async def test_statistics_track_batches_and_latency() -> None:
    sink = Recorder()
    async with BatchWriter(sink, cfg(max_batch=10, flush_interval_s=60)) as w:
        for i in range(20):
            w.put_nowait(i)
        await w.flush()
        stats = w.statistics()
    assert stats.accepted == 20 and stats.flushed == 20 and stats.batches == 2
    assert stats.last_flush_latency_s >= 0 and stats.oldest_pending_age_s == 0


def test_capacity_must_hold_a_batch() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BatchConfig(max_batch=10, capacity=5)


async def test_eager_writer_sends_at_once_and_groups_what_waited() -> None:
    sink = Recorder()
    sink.gate = anyio.Event()
    async with BatchWriter(sink, cfg(flush_interval_s=60, eager=True)) as w:
        w.put_nowait(1)  # goes at once (eager), and is held in the sink
        await wait_for(lambda: w.statistics().in_flight == 1)
        for i in range(2, 6):
            w.put_nowait(i)  # pile up while the first write is in flight
        sink.gate.set()
        with anyio.fail_after(2):
            await w.flush()  # no 60 s wait: the next batch left as soon as the first returned
    assert [b.items for b in sink.batches] == [[1], [2, 3, 4, 5]]


async def test_errors_not_worth_retrying_dead_letter_at_once() -> None:
    sink = Recorder(fail_times=100)
    letters: list[DeadLetter[int]] = []
    config = cfg(max_retries=50, flush_interval_s=0.01)
    writer = BatchWriter(
        sink, config, on_dead_letter=letters.append, retry_if=lambda e: not isinstance(e, OSError)
    )
    async with writer as w:
        w.put_nowait(1)
        with anyio.fail_after(2):
            await w.flush()
    assert sink.calls == 1  # ConnectionError is an OSError: not retried
    assert letters[0].reason == "not_retryable" and letters[0].items == [1]


# -- riding out an outage ----------------------------------------------------------------


class Outage:
    """A sink that raises ``StorageUnavailable`` until ``recover()``; records what it wrote.

    ``failed`` is set once it has failed ``wait_failures`` times in a row, so tests wait on
    the writer having retried past a point instead of sleeping.
    """

    def __init__(self, wait_failures: int = 1) -> None:
        self.down = True
        self.written: list[int] = []
        self.attempts: list[tuple[int, int]] = []  # (first item, attempt) per call
        self.failures = 0
        self.wait_failures = wait_failures
        self.failed = anyio.Event()

    def recover(self) -> None:
        self.down = False

    async def __call__(self, batch: Batch[int]) -> None:
        self.attempts.append((batch.items[0], batch.attempt))
        if self.down:
            self.failures += 1
            if self.failures >= self.wait_failures:
                self.failed.set()
            raise StorageUnavailable("postgres unreachable: connection refused")
        self.written.extend(batch.items)


def budget(**kw: object) -> BatchConfig:
    base: dict[str, object] = {
        "max_batch": 5,
        "flush_interval_s": 0.01,
        "max_retries": None,
        "retry_budget_s": 60.0,
        "retry_base_s": 0.001,
        "retry_max_s": 0.005,
    }
    base.update(kw)
    return BatchConfig.model_validate(base)


async def test_outage_within_the_budget_loses_nothing_and_keeps_order() -> None:
    sink = Outage(wait_failures=20)  # far past the old default of 5 retries
    letters: list[DeadLetter[int]] = []
    async with BatchWriter(sink, budget(), on_dead_letter=letters.append, name="events") as w:
        for i in range(12):
            w.put_nowait(i)
        with anyio.fail_after(10):
            await sink.failed.wait()
        for i in range(12, 30):
            assert offer(w, i)  # intake goes on while the sink is down
        stats = w.statistics()
        assert stats.sink_unavailable and stats.consecutive_failures >= 20
        assert stats.failing_for_s > 0 and stats.failing_since is not None
        assert "connection refused" in stats.last_error
        assert stats.unsettled == 30 and stats.dead_lettered == 0
        health = w.health()
        assert not health.ok
        assert health.reason.startswith("storage unavailable for ")
        assert "30 items buffered, oldest " in health.reason
        sink.recover()
        with anyio.fail_after(10):
            await w.flush()
        stats = w.statistics()
        assert w.health().ok
    assert sink.written == list(range(30))
    assert letters == [] and stats.dead_lettered == 0 and stats.flushed == 30
    assert not stats.sink_unavailable and stats.failing_for_s == 0 and stats.last_error == ""


async def test_outage_past_the_budget_dead_letters_with_its_own_reason() -> None:
    sink = Outage()
    letters: list[DeadLetter[int]] = []
    config = budget(retry_budget_s=0.2)
    async with BatchWriter(sink, config, on_dead_letter=letters.append) as w:
        for i in range(10):
            w.put_nowait(i)
        with anyio.fail_after(10):
            await w.flush()
        stats = w.statistics()
    assert sink.written == []
    assert [d.reason for d in letters] == ["retry_budget_exhausted"] * 2
    assert [i for d in letters for i in d.items] == list(range(10))
    assert isinstance(letters[0].error, StorageUnavailable)
    assert stats.dead_lettered == 10 and stats.dead_letters == {"retry_budget_exhausted": 10}
    first = [a for item, a in sink.attempts if item == 0]
    assert len(first) > 1  # the first batch was retried through the budget...
    # ...and the one queued behind it got no fresh budget: one try, then given up.
    assert [a for item, a in sink.attempts if item == 5] == [0]


async def test_a_sink_that_recovers_gets_a_fresh_budget() -> None:
    sink = Outage(wait_failures=3)
    letters: list[DeadLetter[int]] = []
    async with BatchWriter(sink, budget(), on_dead_letter=letters.append) as w:
        w.put_nowait(0)
        with anyio.fail_after(10):
            await sink.failed.wait()
        sink.recover()
        with anyio.fail_after(10):
            await w.flush()
        assert w.statistics().consecutive_failures == 0
        recovered = time.monotonic()
        sink.down, sink.failures, sink.failed = True, 0, anyio.Event()
        w.put_nowait(1)
        with anyio.fail_after(10):
            await sink.failed.wait()
        # Measured from this outage's first failure, not the previous outage's.
        assert w.statistics().failing_for_s <= time.monotonic() - recovered
        sink.recover()
    assert sink.written == [0, 1] and letters == []


async def test_outage_beyond_capacity_drops_and_counts_the_overflow() -> None:
    sink = Outage()
    config = budget(capacity=10, overflow=OverflowPolicy.DROP_NEWEST)
    w: BatchWriter[int] = BatchWriter(sink, config)
    async with w:
        accepted = [offer(w, i) for i in range(15)]
        with anyio.fail_after(10):
            await sink.failed.wait()
        assert accepted == [True] * 10 + [False] * 5
        assert w.statistics().dropped == {"overflow_newest": 5}
        with pytest.raises(anyio.WouldBlock):
            w.put_nowait(99, critical=True)  # critical items wait for room, never dropped
        sink.recover()
        with anyio.fail_after(10):
            assert await w.put(99, critical=True)
    report = await w.aclose()
    assert sink.written == [*range(10), 99]
    assert report.complete and report.dropped == {"overflow_newest": 5}


async def test_aclose_during_an_outage_retries_then_reports_what_is_left() -> None:
    sink = Outage(wait_failures=2)
    letters: list[DeadLetter[int]] = []
    config = budget(drain_timeout_s=1.0)
    w = BatchWriter(sink, config, on_dead_letter=letters.append)
    async with w:
        for i in range(7):
            w.put_nowait(i)
        with anyio.fail_after(10):
            await sink.failed.wait()
        failures_at_close = sink.failures
    report = await w.aclose()
    assert sink.failures > failures_at_close  # the drain kept trying until its timeout
    assert not report.complete and report.flushed == 0
    assert report.dead_lettered == 7 and report.dead_letters == {"shutdown": 7}
    assert sorted(i for d in letters for i in d.items) == list(range(7))
    assert not w.health().ok


async def test_a_failing_sink_that_is_not_storage_reads_as_sink_failing() -> None:
    sink = Recorder(fail_times=1_000)
    async with BatchWriter(sink, budget(retry_budget_s=0.05)) as w:
        w.put_nowait(1)
        await wait_for(lambda: w.statistics().sink_unavailable)
        assert w.health().reason.startswith("sink failing for ")
        await w.flush()


def test_a_writer_needs_a_retry_limit_or_a_budget() -> None:
    with pytest.raises(ValueError, match="cannot both be None"):
        BatchConfig(max_retries=None)
    assert BatchConfig(max_retries=None, retry_budget_s=1).max_retries is None


async def test_backoff_is_capped_for_any_attempt() -> None:
    w: BatchWriter[int] = BatchWriter(Recorder(), budget(retry_base_s=0.05, retry_max_s=0.5))
    delays = [w._backoff.delay(attempt) for attempt in (1, 2, 5, 50, 5_000)]
    assert 0.025 <= delays[0] <= 0.05
    assert all(0.25 <= d <= 0.5 for d in delays[3:])


async def test_nowait_signals_a_policy_drop_and_a_full_buffer_as_would_block() -> None:
    """The ``*_nowait`` rule: return only once buffered; ``Dropped`` (a ``WouldBlock``) for an
    item the policy dropped (counted), plain ``WouldBlock`` where waiting would help."""
    sink = Recorder()
    sink.gate = anyio.Event()
    newest = cfg(max_batch=1, capacity=2, overflow=OverflowPolicy.DROP_NEWEST, flush_interval_s=60)
    async with open_batch_writer(sink, newest) as w:
        assert w.put_nowait(0) is None
        await wait_for(lambda: w.statistics().in_flight == 1)
        w.put_nowait(1)
        with pytest.raises(Dropped) as dropped:
            w.put_nowait(2)
        assert isinstance(dropped.value, anyio.WouldBlock)
        assert dropped.value.reason == "overflow_newest"
        assert w.statistics().dropped == {"overflow_newest": 1}
        with pytest.raises(anyio.WouldBlock) as full:
            w.put_nowait(3, critical=True)
        assert not isinstance(full.value, Dropped)  # waiting helps: put() would wait
        assert w.statistics().dropped == {"overflow_newest": 1}  # and it is not counted
        sink.gate.set()
    assert sink.items == [0, 1]

    sink = Recorder()
    sink.gate = anyio.Event()
    oldest = cfg(max_batch=1, capacity=2, overflow=OverflowPolicy.DROP_OLDEST, flush_interval_s=60)
    async with open_batch_writer(sink, oldest, name="oldest") as w:
        w.put_nowait(0)
        await wait_for(lambda: w.statistics().in_flight == 1)
        w.put_nowait(1)
        w.put_nowait(2)  # evicts 1: an accepted outcome, counted, no exception
        assert w.statistics().dropped == {"overflow_oldest": 1}
        sink.gate.set()
    assert sink.items == [0, 2]
