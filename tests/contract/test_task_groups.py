"""Ordering groups and fleet-wide limits of agent tasks, on both drivers (migration 0010).

A grouped task's queue is coordinated: ``claim_limited_tasks`` takes a group's tasks in id
order with at most the queue's ``max_per_group`` in flight, under the outbox's rules:

- a task waiting for its retry holds back the later tasks of its group;
- a dead task holds nothing back; a redriven one goes back to its place (its id);
- a released task (shutdown) is due at once, at its place;
- a task whose lease expired is claimable again, at its place.

``max_running`` caps the queue's tasks running under a live lease; ``max_per_second``
caps starts per window (``storage._queue_limits.rate_window``). A claim held back by a
limit or a group says so (``refused``) and when to try again (``retry_after_s``).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    InvalidInput,
    NewTask,
    QueueLimits,
    Task,
    TaskStatus,
)
from asyncstore.storage._queue_limits import rate_window, retry_after_s
from asyncstore.storage.base import TASKS
from tests.waiting import wait_for


def _grouped(queue: str, group: str | None, n: int, start: int = 0) -> list[NewTask]:
    return [NewTask(queue, f"{group}{i}", group=group) for i in range(start, start + n)]


async def _claim(storage: AsyncStorageBackend, queue: str = "q", limit: int = 10) -> list[Task]:
    return (await storage.claim_limited_tasks(queue, "w", limit=limit, lease_s=30)).tasks


def _payloads(tasks: list[Task]) -> list[object]:
    return [t.payload for t in tasks]


async def test_grouped_enqueue_makes_the_queue_coordinated_with_one_in_flight_per_group(
    storage: AsyncStorageBackend,
) -> None:
    assert await storage.get_queue_limits("q") is None
    tasks = await storage.enqueue_tasks(_grouped("q", "g", 3) + _grouped("q", "h", 1))
    assert [t.group for t in tasks] == ["g", "g", "g", "h"]
    assert await storage.get_queue_limits("q") == QueueLimits("q", None, None, 1)
    first = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    assert _payloads(first.tasks) == ["g0", "h0"]
    assert first.refused  # g1, g2 are due and held back by their group
    assert first.retry_after_s is not None and 0 < first.retry_after_s <= 30
    assert await _claim(storage) == []
    await storage.complete_tasks([first.tasks[0].claim])
    assert _payloads(await _claim(storage)) == ["g1"]


async def test_max_per_group_lets_n_of_a_group_run_in_id_order(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_per_group=2)
    await storage.enqueue_tasks(_grouped("q", "g", 5))
    a = await _claim(storage, limit=1)
    b = await _claim(storage)
    assert _payloads(a) + _payloads(b) == ["g0", "g1"]
    await storage.complete_tasks([b[0].claim])  # g1 done first: g0 still in flight
    assert _payloads(await _claim(storage)) == ["g2"]
    assert await _claim(storage) == []


async def test_a_retry_holds_back_its_group_and_a_dead_task_holds_nothing(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_tasks(_grouped("q", "g", 3))
    (g0,) = await _claim(storage)
    later = datetime.now(UTC) + timedelta(hours=1)
    await storage.fail_tasks([Failure(g0.id, g0.claim.token, "boom", later)])
    assert await _claim(storage) == []  # g0 waits for its retry: g1, g2 wait behind it
    await storage.set_queue_limits("q", max_per_group=3)
    assert await _claim(storage) == []  # still held back, whatever the concurrency
    redone = (await storage.enqueue_tasks([NewTask("q", "solo", max_attempts=1, group="s")]))[0]
    (solo,) = await _claim(storage)
    assert solo.id == redone.id
    await storage.fail_tasks([Failure(solo.id, solo.claim.token, "fatal")])
    assert (await storage.get_task(solo.id)).status is TaskStatus.DEAD  # type: ignore[union-attr]
    await storage.enqueue_tasks([NewTask("q", "s1", group="s")])
    assert _payloads(await _claim(storage)) == ["s1"]  # the dead s0 holds nothing back


async def test_a_claim_held_back_by_a_retry_says_when_the_retry_falls_due(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_tasks(_grouped("q", "g", 2))
    (g0,) = await _claim(storage, limit=1)
    later = datetime.now(UTC) + timedelta(seconds=5)
    await storage.fail_tasks([Failure(g0.id, g0.claim.token, "again", later)])
    held = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    assert held.tasks == [] and held.refused  # g1 is due, held back by g0's retry
    assert held.retry_after_s is not None and 3 < held.retry_after_s <= 5


async def test_a_redriven_task_goes_back_to_its_place_in_its_group(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_tasks(_grouped("q", "g", 3))
    (g0,) = await _claim(storage)
    await storage.dead_letter_tasks([Failure(g0.id, g0.claim.token, "permanent")])
    (g1,) = await _claim(storage)
    assert g1.payload == "g1"
    assert await storage.redrive_jobs(TASKS, [g0.id]) == [g0.id]
    assert await _claim(storage) == []  # g0 waits while g1 is in flight
    await storage.complete_tasks([g1.claim])
    assert _payloads(await _claim(storage)) == ["g0"]  # before g2, at its place


async def test_a_released_or_expired_task_keeps_its_place(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_tasks(_grouped("q", "g", 2))
    (g0,) = await _claim(storage)
    await storage.release_tasks([g0.claim])
    again = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=0.2)
    assert _payloads(again.tasks) == ["g0"]

    async def rerun() -> bool:
        return _payloads(await _claim(storage)) == ["g0"]

    await wait_for(rerun, what="g0 re-claimed after its lease expired, before g1")


async def test_ungrouped_tasks_of_a_coordinated_queue_are_claimed_by_priority(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q")
    await storage.enqueue_tasks(
        [NewTask("q", "low"), NewTask("q", "high", priority=5), NewTask("q", "g0", group="g")]
    )
    claim = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    assert _payloads(claim.tasks) == ["high", "low", "g0"]
    assert not claim.refused and claim.retry_after_s is None


async def test_a_budget_cut_never_starts_a_later_task_of_a_group_first(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_per_group=2)
    await storage.enqueue_tasks(_grouped("q", "g", 2))
    (g0,) = await _claim(storage, limit=1)
    later = datetime.now(UTC) + timedelta(milliseconds=300)
    await storage.fail_tasks([Failure(g0.id, g0.claim.token, "again", later)])

    async def g0_due() -> bool:
        got = await _claim(storage, limit=1)
        assert _payloads(got) in ([], ["g0"])  # g1 sorts first (older run_after) but waits
        return bool(got)

    await wait_for(g0_due, what="g0's retry claimed before g1")


async def test_max_running_caps_the_queue_and_frees_on_finish(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_running=2)
    await storage.enqueue_tasks([NewTask("q", i) for i in range(5)])
    first = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    assert _payloads(first.tasks) == [0, 1] and first.refused
    assert first.retry_after_s is not None and 29 <= first.retry_after_s <= 30
    assert await _claim(storage) == []
    await storage.complete_tasks([first.tasks[0].claim])
    assert _payloads(await _claim(storage)) == [2]
    assert await _claim(storage) == []


async def test_a_running_slot_comes_back_when_its_lease_expires(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_running=1)
    await storage.enqueue_tasks([NewTask("q", "a"), NewTask("q", "b")])
    held = await storage.claim_limited_tasks("q", "dead-worker", limit=5, lease_s=0.3)
    assert _payloads(held.tasks) == ["a"]

    async def slot_back() -> bool:
        return bool(await _claim(storage, limit=1))

    await wait_for(slot_back, what="the expired lease's slot")


async def test_max_per_second_allows_capacity_starts_per_window(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_per_second=3)
    await storage.enqueue_tasks([NewTask("q", i) for i in range(10)])
    first = await storage.claim_limited_tasks("q", "w", limit=10, lease_s=30)
    assert _payloads(first.tasks) == [0, 1, 2] and first.refused
    assert first.retry_after_s is not None and 0 < first.retry_after_s <= 1.0
    assert await _claim(storage) == []
    started = [t.updated_at for t in first.tasks]

    async def next_window() -> bool:
        return bool(await _claim(storage, limit=10))

    await wait_for(next_window, what="the next rate window")
    later = [t for t in await _all(storage) if t.status is TaskStatus.RUNNING]
    newest = max(t.updated_at for t in later)
    assert (newest - min(started)).total_seconds() >= 1.0 - 1e-3


async def _all(storage: AsyncStorageBackend) -> list[Task]:
    out = []
    for i in range(1, 11):
        task = await storage.get_task(i)
        if task is not None:
            out.append(task)
    return out


async def test_limits_are_declared_per_queue_and_read_back(storage: AsyncStorageBackend) -> None:
    got = await storage.set_queue_limits("q", max_running=3, max_per_second=2.5, max_per_group=4)
    assert got == QueueLimits("q", 3, 2.5, 4)
    assert await storage.get_queue_limits("q") == got
    assert await storage.set_queue_limits("q") == QueueLimits("q", None, None, 1)
    assert await storage.get_queue_limits("other") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_running": 0},
        {"max_running": 1.5},
        {"max_running": True},
        {"max_per_second": 0},
        {"max_per_second": math.inf},
        {"max_per_second": math.nan},
        {"max_per_second": "5"},
        {"max_per_second": 10_001},
        {"max_per_group": 0},
    ],
)
async def test_bad_limits_are_refused_and_nothing_is_written(
    storage: AsyncStorageBackend, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidInput):
        await storage.set_queue_limits("q", **kwargs)  # type: ignore[arg-type]
    assert await storage.get_queue_limits("q") is None


@pytest.mark.parametrize("group", ["", "x" * 256, 5, "a\x00b"])
async def test_a_bad_group_is_refused_and_nothing_is_written(
    storage: AsyncStorageBackend, group: object
) -> None:
    with pytest.raises(InvalidInput):
        await storage.enqueue_tasks([NewTask("q", "ok"), NewTask("q", "bad", group=group)])  # type: ignore[arg-type]
    assert await storage.get_task(1) is None
    assert await storage.get_queue_limits("q") is None


async def test_a_refused_claim_marks_the_queue_and_the_next_finish_notifies_once(
    storage: AsyncStorageBackend,
) -> None:
    await storage.set_queue_limits("q", max_running=1)
    await storage.enqueue_tasks([NewTask("q", "a"), NewTask("q", "b")])
    async with storage.listen("asyncstore.queue.q") as notes:
        assert not await storage.wake_task_queue("q", "asyncstore.queue.q")  # nobody refused
        (a,) = await _claim(storage)
        assert await _claim(storage) == []  # refused: marks the row
        await storage.complete_tasks([a.claim])
        assert await storage.wake_task_queue("q", "asyncstore.queue.q")
        assert not await storage.wake_task_queue("q", "asyncstore.queue.q")  # once
        with anyio.fail_after(10):
            note = await notes.receive()
        assert note.payload == "0"


async def test_a_claim_on_a_queue_without_a_row_is_the_plain_claim(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_tasks([NewTask("plain", i) for i in range(3)])
    claim = await storage.claim_limited_tasks("plain", "w", limit=2, lease_s=30)
    assert _payloads(claim.tasks) == [0, 1] and not claim.refused
    assert await storage.get_queue_limits("plain") is None


def test_rate_window_and_retry_arithmetic() -> None:
    assert rate_window(None) == (None, 1.0)
    assert rate_window(20) == (20, 1.0)
    assert rate_window(0.5) == (1, 2.0)
    assert rate_window(2.5) == (2, 0.8)
    assert retry_after_s(False, 10.0, [], 3, 1.0, None, 30) is None
    full = [(9.2, 1), (9.5, 1), (9.9, 1)]
    assert retry_after_s(True, 10.0, full, 3, 1.0, None, 30) == pytest.approx(0.2)
    batched = [(9.5, 2), (9.2, 3)]  # 5 starts in two claims, capacity 4: the older leaves
    assert retry_after_s(True, 10.0, batched, 4, 1.0, None, 30) == pytest.approx(0.2)
    assert retry_after_s(True, 10.0, batched, 2, 1.0, None, 30) == pytest.approx(0.5)
    assert retry_after_s(True, 10.0, [(9.5, 1)], 3, 1.0, 12.5, 30) == pytest.approx(2.5)
    assert retry_after_s(True, 10.0, [], None, 1.0, None, 30) == 30
    assert retry_after_s(True, 10.0, [], None, 1.0, 15.0, 30, 10.5) == pytest.approx(0.5)
