"""AgentQueue and its worker on both drivers: cap, claims, retries, wakeup, shutdown, legacy."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel
import pytest

from asyncstore.orchestrator.queue import (
    AgentQueue,
    PermanentFailure,
    QueueConfig,
    RetryTask,
    open_worker,
)
from asyncstore.storage import AsyncStorageBackend, Task, TaskStatus

FAST = QueueConfig(
    lease_s=5.0,
    backoff_base_s=0.05,
    backoff_jitter=0.0,
    fallback_poll_s=30.0,  # long: these tests prove wakeups happen without the fallback poll
    shutdown_grace_s=5.0,
)


class Recorder:
    """Counts handler runs per payload and signals when a target count is reached."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.runs: Counter[int] = Counter()
        self.done = anyio.Event()

    def record(self, task: Task) -> None:
        self.runs[task.payload] += 1
        if sum(self.runs.values()) >= self.target:
            self.done.set()


async def test_cap_holds_exactly_under_a_burst(storage: AsyncStorageBackend) -> None:
    cap = 10
    queue = AgentQueue(storage, "burst", FAST)
    rec = Recorder(1000)
    running = peak = 0
    cap_reached = anyio.Event()

    async def handler(task: Task) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == cap:
            cap_reached.set()
        # The first handlers hold their permits until the cap is full, so it is reached.
        await cap_reached.wait()
        await anyio.lowlevel.checkpoint()
        running -= 1
        rec.record(task)

    await queue.enqueue_many(list(range(1000)))
    async with open_worker(queue, handler, max_workers=cap) as worker:
        with anyio.fail_after(60):
            await rec.done.wait()
    stats = worker.statistics()
    assert peak == cap
    assert stats.peak_running == cap
    assert rec.runs == Counter(range(1000))
    assert stats.claimed == 1000 and stats.succeeded == 1000 and stats.stale_writes == 0
    assert stats.held_leases == 0 and stats.pending_writes == 0
    # Completions are batched: far fewer statements than tasks.
    assert storage.statistics().statements["complete_tasks"] < 1000


async def test_claim_batch_caps_each_claim_and_the_cap_holds(
    storage: AsyncStorageBackend,
) -> None:
    cfg = FAST.model_copy(update={"max_workers": 8, "claim_batch": 3})
    queue = AgentQueue(storage, "batched", cfg)
    rec = Recorder(60)
    running = peak = 0

    async def handler(task: Task) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.lowlevel.checkpoint()
        running -= 1
        rec.record(task)

    await queue.enqueue_many(list(range(60)))
    async with open_worker(queue, handler) as worker:
        with anyio.fail_after(60):
            await rec.done.wait()
    stats = worker.statistics()
    assert rec.runs == Counter(range(60)) and stats.succeeded == 60
    assert stats.claim_statements >= 20  # no claim took more than 3 tasks
    assert peak <= 8 and stats.peak_running <= 8


async def test_completed_tasks_are_marked_succeeded(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "q", FAST)
    rec = Recorder(20)

    async def handler(task: Task) -> None:
        rec.record(task)

    tasks = await queue.enqueue_many(list(range(20)))
    async with open_worker(queue, handler, max_workers=4):
        with anyio.fail_after(20):
            await rec.done.wait()
    for task in tasks:
        row = await queue.get(task.id)
        assert row is not None and row.status is TaskStatus.SUCCEEDED and row.attempts == 1


async def test_enqueue_wakes_an_idle_worker_with_one_notification_per_call(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "wake", FAST)
    first = Recorder(1)
    rec = Recorder(50)

    async def handler(task: Task) -> None:
        (first if task.payload == -1 else rec).record(task)

    async with open_worker(queue, handler, max_workers=8) as worker:
        # One task first: once it ran, the claim came back short and the worker is idle on
        # its 30 s fallback timer.
        await queue.enqueue(-1)
        with anyio.fail_after(10):
            await first.done.wait()
        before = storage.statistics().statements.get("notify", 0)
        await queue.enqueue_many(list(range(50)))
        assert storage.statistics().statements.get("notify", 0) == before + 1
        with anyio.fail_after(10):
            await rec.done.wait()
    assert worker.statistics().fallback_polls == 0


async def test_delayed_task_runs_when_due_not_at_fallback_poll(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "later", FAST)
    ran_at: list[float] = []
    done = anyio.Event()

    async def handler(task: Task) -> None:
        ran_at.append(time.time())
        done.set()

    async with open_worker(queue, handler, max_workers=2):
        start = time.time()
        await queue.enqueue("x", run_after=datetime.now(UTC) + timedelta(seconds=0.4))
        with anyio.fail_after(10):
            await done.wait()
    assert ran_at[0] - start >= 0.35


async def test_failures_retry_with_backoff_then_dead_letter(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "retry", FAST.model_copy(update={"max_attempts": 3}))
    attempts: list[float] = []
    third = anyio.Event()

    async def handler(task: Task) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 3:
            third.set()
        raise ValueError(f"boom {task.attempts}")

    task = await queue.enqueue("x")
    async with open_worker(queue, handler, max_workers=2) as worker:
        with anyio.fail_after(20):
            await third.wait()
    row = await queue.get(task.id)
    assert row is not None
    assert row.status is TaskStatus.DEAD and row.attempts == 3
    assert row.last_error == "ValueError: boom 3"
    # Exponential backoff: 0.05 s then 0.1 s (no jitter configured); generous lower bounds.
    assert attempts[1] - attempts[0] >= 0.04
    assert attempts[2] - attempts[1] >= 0.09
    stats = worker.statistics()
    assert (stats.retried, stats.dead) == (2, 1)


async def test_handler_can_ask_for_a_retry_at_a_given_time(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "ask", FAST)
    seen: list[tuple[int, float]] = []
    second = anyio.Event()

    async def handler(task: Task) -> None:
        seen.append((task.attempts, time.time()))
        if task.attempts == 1:
            raise RetryTask("rate limited", at=datetime.now(UTC) + timedelta(seconds=0.3))
        second.set()

    task = await queue.enqueue("x")
    async with open_worker(queue, handler, max_workers=1):
        with anyio.fail_after(10):
            await second.wait()
    assert [a for a, _ in seen] == [1, 2]
    assert seen[1][1] - seen[0][1] >= 0.25
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.SUCCEEDED


async def test_permanent_failure_dead_letters_at_once(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "perm", FAST)
    ran = anyio.Event()

    async def handler(task: Task) -> None:
        ran.set()
        raise PermanentFailure("bad input")

    task = await queue.enqueue("x")
    async with open_worker(queue, handler, max_workers=1):
        with anyio.fail_after(10):
            await ran.wait()
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.DEAD and row.attempts == 1
    assert row.last_error == "PermanentFailure: bad input"


async def test_idempotency_key_enqueues_once_while_unfinished(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "idem", FAST)
    first = await queue.enqueue("a", idempotency_key="k")
    again = await queue.enqueue("b", idempotency_key="k")
    batch = await queue.enqueue_many(["c", "d", "e"], idempotency_keys=["k", "m", "m"])
    assert again.id == first.id and again.payload == "a"
    assert batch[0].id == first.id and batch[1].id == batch[2].id != first.id
    rec = Recorder(2)

    async def handler(task: Task) -> None:
        rec.record(task)  # type: ignore[arg-type]

    async with open_worker(queue, handler, max_workers=2):
        with anyio.fail_after(10):
            await rec.done.wait()
    assert sorted(rec.runs) == ["a", "d"]  # type: ignore[type-var]
    # Once finished, the key is free again.
    fresh = await queue.enqueue("f", idempotency_key="k")
    assert fresh.id != first.id and fresh.status is TaskStatus.QUEUED


async def test_shutdown_lets_running_tasks_finish_within_grace(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "grace", FAST)
    started = anyio.Event()
    count = 0

    async def handler(task: Task) -> None:
        nonlocal count
        count += 1
        if count == 3:
            started.set()
        await anyio.sleep(0.2)

    tasks = await queue.enqueue_many([1, 2, 3])
    async with open_worker(queue, handler, max_workers=3):
        with anyio.fail_after(10):
            await started.wait()
    for task in tasks:
        row = await queue.get(task.id)
        assert row is not None and row.status is TaskStatus.SUCCEEDED


async def test_shutdown_cancels_after_grace_and_releases_leases(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "stop", FAST.model_copy(update={"shutdown_grace_s": 0.1}))
    started = anyio.Event()
    count = 0

    async def stuck(task: Task) -> None:
        nonlocal count
        count += 1
        if count == 4:
            started.set()
        await anyio.sleep_forever()

    tasks = await queue.enqueue_many(list(range(6)))
    async with open_worker(queue, stuck, max_workers=4) as worker:
        with anyio.fail_after(10):
            await started.wait()
    assert worker.statistics().released == 4
    rows = [await queue.get(t.id) for t in tasks]
    assert all(r is not None and r.status is TaskStatus.QUEUED for r in rows)
    assert all(r is not None and r.attempts == 0 for r in rows)  # released attempts not counted
    # Another worker takes all of them at once: no lease expiry to wait for.
    rec = Recorder(6)

    async def handler(task: Task) -> None:
        rec.record(task)

    async with open_worker(queue, handler, max_workers=8):
        with anyio.fail_after(10):
            await rec.done.wait()
    assert rec.runs == Counter(range(6))


async def test_cancelled_body_still_releases_in_flight_tasks(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "cancelled", FAST)
    started = anyio.Event()

    async def stuck(task: Task) -> None:
        started.set()
        await anyio.sleep_forever()

    task = await queue.enqueue("x")
    with anyio.CancelScope() as outer:
        async with open_worker(queue, stuck, max_workers=1):
            with anyio.fail_after(10):
                await started.wait()
            outer.cancel()
            await anyio.sleep_forever()
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.QUEUED and row.attempts == 0


async def test_cancelling_a_task_dead_letters_it(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "cancel", FAST)
    started = anyio.Event()

    async def stuck(task: Task) -> None:
        started.set()
        await anyio.sleep_forever()

    task = await queue.enqueue("x")
    async with open_worker(queue, stuck, max_workers=1) as worker:
        with anyio.fail_after(10):
            await started.wait()
        assert worker.cancel(task.id, "user pressed stop")
        assert not worker.cancel(task.id + 1000)
        await worker.flush()
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.DEAD
    assert row.last_error == "cancelled: user pressed stop"
    assert worker.statistics().cancelled == 1


async def test_expired_lease_of_a_dead_worker_is_reclaimed_when_it_expires(
    storage: AsyncStorageBackend,
) -> None:
    # The fallback poll is 30 s: only the idle worker's next-due read can wake it in time.
    queue = AgentQueue(storage, "crash", FAST)
    await queue.enqueue_many([1, 2, 3])
    # A worker that claims and then dies: its leases simply stop being renewed.
    orphaned = await storage.claim_tasks("crash", "dead-worker", limit=2, lease_s=0.3)
    assert len(orphaned) == 2
    rec = Recorder(3)

    async def handler(task: Task) -> None:
        rec.record(task)

    async with open_worker(queue, handler, max_workers=4) as worker:
        with anyio.fail_after(10):
            await rec.done.wait()
    assert rec.runs == Counter({1: 1, 2: 1, 3: 1})
    for task in orphaned:
        row = await queue.get(task.id)
        assert row is not None and row.status is TaskStatus.SUCCEEDED and row.attempts == 2
    stats = worker.statistics()
    assert stats.reruns == 2 and stats.fallback_polls == 0 and stats.expiry_wakeups >= 1


async def test_heartbeat_keeps_a_long_task_leased(storage: AsyncStorageBackend) -> None:
    cfg = FAST.model_copy(update={"lease_s": 0.3, "heartbeat_interval_s": 0.05})
    queue = AgentQueue(storage, "long", cfg)
    started = anyio.Event()
    release = anyio.Event()

    async def slow(task: Task) -> None:
        started.set()
        await release.wait()

    task = await queue.enqueue("x")
    async with open_worker(queue, slow, max_workers=1) as worker:
        with anyio.fail_after(10):
            await started.wait()
        await anyio.sleep(0.8)  # well past the 0.3 s lease: only renewals keep it ours
        assert await storage.claim_tasks("long", "thief", limit=5, lease_s=5) == []
        release.set()
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.SUCCEEDED
    assert worker.statistics().lease_lost == 0


@pytest.mark.parametrize("cap", [2])
async def test_legacy_poll_spawn_spawns_everything_found(
    storage: AsyncStorageBackend, cap: int
) -> None:
    cfg = FAST.model_copy(update={"mode": "poll_spawn", "poll_interval_s": 0.05})
    queue = AgentQueue(storage, "legacy", cfg)
    rec = Recorder(30)
    running = peak = 0
    crowd = anyio.Event()

    async def handler(task: Task) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 10:
            crowd.set()
        with anyio.move_on_after(2):
            await crowd.wait()
        running -= 1
        rec.record(task)

    await queue.enqueue_many(list(range(30)))
    before = storage.statistics().statements.get("complete_tasks", 0)
    async with open_worker(queue, handler, max_workers=cap) as worker:
        with anyio.fail_after(20):
            await rec.done.wait()
    assert rec.runs == Counter(range(30))
    assert peak > cap  # no worker cap in the legacy loop
    # One write per finished task, as the old loop did.
    assert storage.statistics().statements["complete_tasks"] - before == 30
    assert worker.statistics().notifications == 0


async def test_an_error_text_storage_cannot_hold_is_escaped_not_lost(
    storage: AsyncStorageBackend,
) -> None:
    # A file name decoded with surrogateescape makes an exception text no database can
    # store; the outcome write must still record the failure (escaped), not fail itself.
    queue = AgentQueue(storage, "odd", FAST)
    ran = anyio.Event()

    async def handler(task: Task) -> None:
        ran.set()
        raise PermanentFailure(b"no such file: \xff.txt".decode("utf-8", "surrogateescape"))

    task = await queue.enqueue("x")
    async with open_worker(queue, handler, max_workers=1):
        with anyio.fail_after(10):
            await ran.wait()
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.DEAD
    assert row.last_error == "PermanentFailure: no such file: \\udcff.txt"


@pytest.mark.parametrize("name", ["é" * 24, "my queue", "a\ud800"])
def test_a_queue_name_that_makes_no_channel_name_is_refused_at_once(name: str) -> None:
    # The queue's notification channel is "asyncstore.queue.<name>": 63 UTF-8 bytes at most
    # (Postgres truncates identifiers), letters, digits and "_ . : -" only.
    from asyncstore.storage.errors import InvalidInput

    with pytest.raises(InvalidInput, match="does not make a channel name"):
        AgentQueue(None, name)  # type: ignore[arg-type]
    for fits in ("q" * 40, "é" * 23):  # 57 and 63 bytes of channel name
        assert AgentQueue(None, fits).channel.endswith(fits)  # type: ignore[arg-type]
