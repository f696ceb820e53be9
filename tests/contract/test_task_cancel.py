"""cancel_task on both drivers: queued, running (another handle), idempotent, finished, raced.

A cancelled task ends ``cancelled`` (not retried, not dead-lettered); a running one has its
handler cancelled on the worker that runs it by the notification the cancel sends (the
tests give the worker a lease renewal far longer than their bounds, so only the
notification can be what stopped it). A cancel and an outcome write that commit at once
leave exactly one terminal state, and the cancel's answer names it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from asyncstore.orchestrator.metrics import Metrics
from asyncstore.orchestrator.queue import AgentQueue, QueueConfig, open_worker
from asyncstore.storage import (
    TASKS,
    AsyncStorageBackend,
    Claim,
    Failure,
    InvalidInput,
    NewTask,
    Task,
    TaskStatus,
    open_storage,
)
from asyncstore.storage.task_cancel import (
    TASK_CANCEL_CHANNEL,
    TaskCancellation,
    TaskCancelOutcome,
    decode_task_cancel,
    encode_task_cancel,
)
from tests.conftest import truncate
from tests.waiting import wait_for

# Lease renewal every 20 s: within these tests' bounds only a notification stops a handler.
SLOW_RENEWAL = QueueConfig(lease_s=60.0, fallback_poll_s=30.0, shutdown_grace_s=5.0)


class Handler:
    """A handler that blocks until cancelled and records what it saw."""

    def __init__(self, *, swallow: bool = False) -> None:
        self.swallow = swallow
        self.started: dict[int, anyio.Event] = {}
        self.observed: dict[int, anyio.Event] = {}
        self.runs: list[int] = []

    def event(self, book: dict[int, anyio.Event], task_id: int) -> anyio.Event:
        return book.setdefault(task_id, anyio.Event())

    async def __call__(self, task: Task) -> None:
        self.runs.append(task.id)
        if task.payload == "quick":
            return
        self.event(self.started, task.id).set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.event(self.observed, task.id).set()
            if not self.swallow:
                raise


async def test_cancelling_a_queued_task_means_it_never_starts(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    doomed = await queue.enqueue("doomed")
    answer = await queue.cancel(doomed.id, "not needed")
    assert answer == TaskCancellation(doomed.id, TaskCancelOutcome.CANCELLED, TaskStatus.QUEUED)
    assert not answer.was_running
    handler = Handler()
    async with open_worker(queue, handler) as worker:
        after = await queue.enqueue("quick")
        await wait_for(lambda: worker.statistics().succeeded == 1, what="the later task ran")
    assert handler.runs == [after.id]
    row = await queue.get(doomed.id)
    assert row is not None and row.status is TaskStatus.CANCELLED
    assert row.attempts == 0 and row.last_error == "not needed"
    # A cancelled task is no longer claimable, due, or waiting in the backlog.
    assert await storage.claim_jobs(TASKS, "w", limit=10, lease_s=5, queues=["q"]) == []
    assert await storage.next_task_due_s("q") is None


async def test_a_running_task_is_cancelled_on_its_worker_by_notification(
    storage_url: str,
) -> None:
    handler = Handler()
    async with open_storage(storage_url) as mine, open_storage(storage_url) as elsewhere:
        queue = AgentQueue(mine, "q", SLOW_RENEWAL)
        async with open_worker(queue, handler) as worker:
            task = await queue.enqueue("slow")
            with anyio.fail_after(30):
                await handler.event(handler.started, task.id).wait()
            # Another handle (another process on Postgres) cancels it.
            answer = await AgentQueue(elsewhere, "q").cancel(task.id)
            assert answer.outcome is TaskCancelOutcome.CANCELLED and answer.was_running
            assert answer.worker_id == worker.worker_id
            with anyio.fail_after(10):  # the renewal (20 s) cannot be what stops it
                await handler.event(handler.observed, task.id).wait()
            await wait_for(lambda: worker.statistics().cancelled == 1, what="counted")
            await worker.flush()
            stats = worker.statistics()
        row = await mine.get_task(task.id)
    assert row is not None and row.status is TaskStatus.CANCELLED and row.attempts == 1
    assert (stats.succeeded, stats.retried, stats.dead, stats.released) == (0, 0, 0, 0)
    assert stats.cancel_notifications == 1 and stats.lease_lost == 0
    assert stats.held_leases == 0 and stats.running == 0
    assert handler.runs == [task.id]  # never re-run


async def test_a_handler_that_swallows_the_cancellation_is_still_recorded_cancelled(
    storage: AsyncStorageBackend,
) -> None:
    handler = Handler(swallow=True)
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    async with open_worker(queue, handler) as worker:
        task = await queue.enqueue("slow")
        with anyio.fail_after(30):
            await handler.event(handler.started, task.id).wait()
        await queue.cancel(task.id)
        with anyio.fail_after(10):
            await handler.event(handler.observed, task.id).wait()
        await wait_for(lambda: worker.statistics().cancelled == 1, what="counted")
        quick = await queue.enqueue("quick")  # the slot is free again
        await wait_for(lambda: worker.statistics().succeeded == 1, what="the next task ran")
        await worker.flush()
        stats = worker.statistics()
    row = await storage.get_task(task.id)
    assert row is not None and row.status is TaskStatus.CANCELLED
    assert stats.succeeded == 1 and stats.stale_writes == 0
    assert handler.runs == [task.id, quick.id]


async def test_cancel_is_idempotent_and_reports_finished_tasks(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    first = await queue.cancel((await queue.enqueue("x")).id, "first")
    again = await queue.cancel(first.task_id, "second")
    assert first.outcome is TaskCancelOutcome.CANCELLED
    assert again == TaskCancellation(
        first.task_id, TaskCancelOutcome.ALREADY_CANCELLED, TaskStatus.CANCELLED
    )
    kept = await queue.get(first.task_id)
    assert kept is not None and kept.last_error == "first"  # the first cancel's reason stays

    done, dead = await queue.enqueue_many(["done", "dead"])
    claimed = await storage.claim_jobs(TASKS, "w", limit=2, lease_s=30, queues=["q"])
    by_id = {t.id: t for t in claimed}
    assert await storage.complete_jobs(TASKS, [by_id[done.id].claim]) == [done.id]
    failure = Failure(dead.id, by_id[dead.id].claim.token, "boom")
    assert await storage.dead_letter_jobs(TASKS, [failure]) == [dead.id]
    for task, status in ((done, TaskStatus.SUCCEEDED), (dead, TaskStatus.DEAD)):
        answer = await queue.cancel(task.id)
        assert answer.outcome is TaskCancelOutcome.ALREADY_FINISHED
        assert answer.status is status and answer.worker_id == "w"
        row = await queue.get(task.id)
        assert row is not None and row.status is status  # unchanged

    missing = await storage.cancel_task(10**9)
    assert missing == TaskCancellation(10**9, TaskCancelOutcome.NOT_FOUND, None)


async def test_a_cancelled_tasks_idempotency_key_is_free_again(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q")
    first = await queue.enqueue("x", idempotency_key="k")
    await queue.cancel(first.id)
    second = await queue.enqueue("x", idempotency_key="k")
    assert second.id != first.id and second.status is TaskStatus.QUEUED


async def test_refused_arguments_write_and_notify_nothing(storage: AsyncStorageBackend) -> None:
    queue = AgentQueue(storage, "q")
    task = await queue.enqueue("x")
    async with storage.listen(TASK_CANCEL_CHANNEL) as stream:
        for bad in ("1", 0, -3, True, 1.5):
            with pytest.raises(InvalidInput, match="task_id"):
                await storage.cancel_task(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="NUL"):
            await storage.cancel_task(task.id, "bad\x00reason")
        with pytest.raises(InvalidInput):
            await storage.cancel_task(task.id, notify_channel="")
        with anyio.move_on_after(0.2):
            note = await stream.receive()
            pytest.fail(f"a refused cancel notified {note}")
    row = await queue.get(task.id)
    assert row is not None and row.status is TaskStatus.QUEUED


async def test_cancel_notifies_only_for_a_running_task_in_one_statement(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q")
    older, queued = await queue.enqueue_many(["a", "b"])
    (running,) = await storage.claim_jobs(TASKS, "w1", limit=1, lease_s=30, queues=["q"])
    assert running.id == older.id
    async with storage.listen(TASK_CANCEL_CHANNEL) as stream:
        before = storage.statistics().statements.get("cancel_task", 0)
        await storage.cancel_task(queued.id)
        await storage.cancel_task(running.id)
        with anyio.fail_after(10):
            note = await stream.receive()
        assert storage.statistics().statements.get("cancel_task", 0) - before == 2
        assert decode_task_cancel(note.payload) == (running.id, "w1")
        assert note.payload == encode_task_cancel(running.id, "w1")  # one format, both drivers
        with anyio.move_on_after(0.2):
            extra = await stream.receive()
            pytest.fail(f"the queued task's cancel notified {extra}")
    # Without a channel: written, not announced.
    third = await queue.enqueue("c")
    await storage.claim_jobs(TASKS, "w2", limit=1, lease_s=30, queues=["q"])
    async with storage.listen(TASK_CANCEL_CHANNEL) as stream:
        answer = await storage.cancel_task(third.id, notify_channel=None)
        assert answer.was_running
        with anyio.move_on_after(0.2):
            extra = await stream.receive()
            pytest.fail(f"a cancel without a channel notified {extra}")


class _RowLock:
    """Postgres: another connection holds the task row's lock, so the racing statements
    queue behind it; ``waiting(n)`` is true once n other backends wait for a lock."""

    def __init__(self, dsn: str, task_id: int) -> None:
        self.dsn = dsn
        self.task_id = task_id

    async def __aenter__(self) -> _RowLock:
        self.conn = await asyncpg.connect(self.dsn)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute("SELECT 1 FROM agent_tasks WHERE id = $1 FOR UPDATE", self.task_id)
        return self

    async def waiting(self, n: int) -> bool:
        count = await self.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return bool(count >= n)

    async def release(self) -> None:
        if not self.conn.is_closed():
            await self.tx.rollback()
            await self.conn.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


@pytest.mark.parametrize("first", ["complete", "cancel"])
async def test_cancel_and_completion_committing_at_once_end_in_one_state(
    storage_url: str, storage: AsyncStorageBackend, first: str
) -> None:
    """Both statements are started together; the one that gets the row first wins, the
    other finds it finished. On Postgres both wait on a third connection's row lock and
    are released together (queued in the order of ``first``); SQLite's one writer runs
    them back to back in that order."""
    queue = AgentQueue(storage, "race")
    rounds = 5
    for _ in range(rounds):
        task = await queue.enqueue("x")
        (claimed,) = await storage.claim_jobs(TASKS, "w", limit=1, lease_s=30, queues=["race"])
        results: dict[str, object] = {}

        async def complete(claim: Claim = claimed.claim, out: dict[str, object] = results) -> None:
            out["complete"] = await storage.complete_jobs(TASKS, [claim])

        async def cancel(task_id: int = task.id, out: dict[str, object] = results) -> None:
            out["cancel"] = await storage.cancel_task(task_id)

        calls: dict[str, Callable[[], Awaitable[None]]] = {"complete": complete, "cancel": cancel}
        order = [first, "cancel" if first == "complete" else "complete"]
        if storage.dialect == "postgres":
            async with _RowLock(storage_url, task.id) as lock, anyio.create_task_group() as tg:
                for n, name in enumerate(order, start=1):
                    tg.start_soon(calls[name])
                    await wait_for(lambda n=n: lock.waiting(n), what=f"{name} waits")
                await lock.release()
        else:
            async with anyio.create_task_group() as tg:
                for name in order:
                    tg.start_soon(calls[name])
        row = await storage.get_task(task.id)
        assert row is not None
        answer = results["cancel"]
        assert isinstance(answer, TaskCancellation)
        if first == "complete":
            assert results["complete"] == [task.id]
            assert answer.outcome is TaskCancelOutcome.ALREADY_FINISHED
            assert answer.status is TaskStatus.SUCCEEDED and row.status is TaskStatus.SUCCEEDED
        else:
            assert results["complete"] == []  # stale: the row is no longer running
            assert answer.outcome is TaskCancelOutcome.CANCELLED and answer.was_running
            assert row.status is TaskStatus.CANCELLED


async def test_without_the_listener_the_lease_renewal_stops_the_handler(
    storage: AsyncStorageBackend,
) -> None:
    """``cancel_listen=False`` (no cancel listener): the next renewal finds the row no
    longer running and stops the handler, counted as a lost lease; the row stays
    cancelled."""
    cfg = QueueConfig(
        lease_s=1.0, heartbeat_interval_s=0.1, fallback_poll_s=30.0, cancel_listen=False
    )
    handler = Handler()
    queue = AgentQueue(storage, "q", cfg)
    async with open_worker(queue, handler) as worker:
        task = await queue.enqueue("slow")
        with anyio.fail_after(30):
            await handler.event(handler.started, task.id).wait()
        await queue.cancel(task.id)
        with anyio.fail_after(30):
            await handler.event(handler.observed, task.id).wait()
        stats = worker.statistics()
    assert stats.lease_lost == 1 and stats.cancel_notifications == 0
    row = await storage.get_task(task.id)
    assert row is not None and row.status is TaskStatus.CANCELLED


async def test_cancelled_counts_in_the_worker_metrics(storage: AsyncStorageBackend) -> None:
    handler = Handler()
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    metrics = Metrics()
    async with open_worker(queue, handler) as worker:
        metrics.add_source("queue", worker)
        task = await queue.enqueue("slow")
        with anyio.fail_after(30):
            await handler.event(handler.started, task.id).wait()
        await queue.cancel(task.id)
        await wait_for(lambda: worker.statistics().cancelled == 1, what="counted")
        text = metrics.render()[0].decode()
    assert 'asyncstore_queue_tasks_finished_total{outcome="cancelled",source="queue"} 1.0' in text
    assert 'asyncstore_queue_cancel_notifications_total{source="queue"} 1.0' in text


async def test_purge_removes_old_cancelled_tasks_and_keeps_dead_ones(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q")
    cancelled, dead = await queue.enqueue_many(["c", "d"])
    await queue.cancel(cancelled.id)
    claimed = await storage.claim_jobs(TASKS, "w", limit=5, lease_s=30, queues=["q"])
    (dying,) = [t for t in claimed if t.id == dead.id]
    await storage.dead_letter_jobs(TASKS, [Failure(dead.id, dying.claim.token, "x")])
    assert await storage.purge_tasks(older_than_s=3600) == 0  # too recent
    purged = 0

    async def purge() -> bool:  # the cutoff is a time: the rows age past it
        nonlocal purged
        purged += await storage.purge_tasks(older_than_s=0.001)
        return purged > 0

    await wait_for(purge, what="the cancelled task purged")
    assert purged == 1
    assert await storage.get_task(cancelled.id) is None
    assert await storage.get_task(dead.id) is not None


async def test_a_future_task_cancelled_before_it_is_due_never_runs(
    storage: AsyncStorageBackend,
) -> None:
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    later = await storage.enqueue_jobs(TASKS, [NewTask("q", "later", run_after=soon)])
    await queue.cancel(later[0].id)
    handler = Handler()
    async with open_worker(queue, handler) as worker:
        sentinel = await queue.enqueue("quick", run_after=soon + timedelta(seconds=0.2))
        await wait_for(lambda: worker.statistics().succeeded == 1, what="the sentinel ran")
    assert handler.runs == [sentinel.id]


async def test_the_runtime_cancels_a_task_running_on_another_runtimes_worker(
    storage_url: str,
) -> None:
    """``Runtime.cancel_task`` on one runtime; the other runtime's worker runs the task."""
    from asyncstore.orchestrator.config import load_settings
    from asyncstore.orchestrator.runtime import open_runtime

    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        queue={"lease_s": 60.0, "fallback_poll_s": 30.0},
    )
    handler = Handler()
    async with (
        open_runtime(settings, queue_handler=handler) as running,
        open_runtime(settings) as caller,
    ):
        task = await caller.queue.enqueue("slow")
        with anyio.fail_after(30):
            await handler.event(handler.started, task.id).wait()
        answer = await caller.cancel_task(task.id, "operator")
        assert answer.was_running
        with anyio.fail_after(10):
            await handler.event(handler.observed, task.id).wait()
        assert running.worker is not None
        await wait_for(lambda: running.worker.statistics().cancelled == 1, what="counted")
        again = await running.cancel_task(task.id)
    assert again.outcome is TaskCancelOutcome.ALREADY_CANCELLED


async def test_a_listener_gap_makes_the_worker_read_back_its_tasks(postgres_dsn: str) -> None:
    """A cancel whose notification is lost (sent nowhere here) while the listener is down:
    the gap reported on reconnect makes the worker read its held tasks back and stop the
    cancelled one, well before its lease renewal (every 20 s) would."""
    from asyncstore.storage.postgres import PostgresBackend

    await truncate(postgres_dsn)
    handler = Handler()
    async with open_storage(postgres_dsn) as backend:
        assert isinstance(backend, PostgresBackend)
        queue = AgentQueue(backend, "gap", SLOW_RENEWAL)
        async with open_worker(queue, handler) as worker:
            task = await queue.enqueue("slow")
            with anyio.fail_after(30):
                await handler.event(handler.started, task.id).wait()
            answer = await backend.cancel_task(task.id, notify_channel=None)
            assert answer.was_running
            await backend.terminate_listener_for_tests()
            with anyio.fail_after(15):
                await handler.event(handler.observed, task.id).wait()
            await wait_for(lambda: worker.statistics().cancelled == 1, what="counted")
            stats = worker.statistics()
    assert stats.cancel_notifications == 0 and stats.lease_lost == 0


async def test_a_cancel_notice_that_overtakes_the_claims_answer_still_stops_the_task(
    storage: AsyncStorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim commits, then the task is cancelled and its notice reaches the worker
    before the claim's answer does (the answer is held back here): the worker remembers
    the notice and never starts the task."""
    real_claim = storage.claim_jobs
    claimed: list[Task] = []
    answered = anyio.Event()
    release = anyio.Event()

    async def slow_answer(*args: object, **kwargs: object) -> list[Task]:
        rows: list[Task] = await real_claim(*args, **kwargs)  # type: ignore[arg-type]
        if rows and not release.is_set():
            claimed.extend(rows)
            answered.set()
            await release.wait()
        return rows

    monkeypatch.setattr(storage, "claim_jobs", slow_answer)
    handler = Handler()
    queue = AgentQueue(storage, "q", SLOW_RENEWAL)
    async with open_worker(queue, handler) as worker:
        task = await queue.enqueue("slow")
        with anyio.fail_after(30):
            await answered.wait()
        assert [t.id for t in claimed] == [task.id]
        assert (await queue.cancel(task.id)).was_running
        await wait_for(lambda: worker.statistics().cancel_notifications == 1, what="notice")
        release.set()
        await wait_for(lambda: worker.statistics().cancelled == 1, what="counted")
        quick = await queue.enqueue("quick")
        await wait_for(lambda: worker.statistics().succeeded == 1, what="the next task ran")
        stats = worker.statistics()
    assert handler.runs == [quick.id]
    assert stats.held_leases == 0 and stats.running == 0
