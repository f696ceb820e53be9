"""Contract: session leases with fencing, agent tasks with leased claims, on both drivers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Claim,
    Failure,
    InvalidInput,
    LeaseLost,
    NewTask,
    Task,
    TaskStatus,
)
from tests.waiting import wait_for


async def test_lease_is_exclusive_and_tokens_grow(storage: AsyncStorageBackend) -> None:
    first = await storage.acquire_lease("s", "a", 30)
    assert first is not None and first.holder == "a"
    assert await storage.acquire_lease("s", "b", 30) is None
    assert await storage.acquire_lease("s", "a", 30) is None  # not re-entrant
    assert (await storage.get_lease("s")) == first
    other = await storage.acquire_lease("t", "a", 30)
    assert other is not None and other.token > first.token
    assert await storage.release_lease("s", first.token)
    assert await storage.get_lease("s") is None
    second = await storage.acquire_lease("s", "b", 30)
    assert second is not None and second.token > other.token


async def test_expired_lease_is_taken_over_and_stale_token_is_fenced(
    storage: AsyncStorageBackend,
) -> None:
    crashed = await storage.acquire_lease("s", "crashed", 0.2)
    assert crashed is not None
    await anyio.sleep(0.3)
    assert await storage.get_lease("s") is None
    taker = await storage.acquire_lease("s", "taker", 30)
    assert taker is not None and taker.token > crashed.token
    with pytest.raises(LeaseLost):
        await storage.renew_lease("s", crashed.token, 30)
    assert not await storage.release_lease("s", crashed.token)
    assert (await storage.get_lease("s")) == taker
    renewed = await storage.renew_lease("s", taker.token, 60)
    assert renewed.token == taker.token and renewed.expires_at > taker.expires_at


async def test_renewing_an_expired_lease_fails(storage: AsyncStorageBackend) -> None:
    lease = await storage.acquire_lease("s", "a", 0.1)
    assert lease is not None
    await anyio.sleep(0.2)
    with pytest.raises(LeaseLost):
        await storage.renew_lease("s", lease.token, 30)


async def test_expire_sweep_removes_only_long_expired(storage: AsyncStorageBackend) -> None:
    assert await storage.acquire_lease("old", "a", 0.05) is not None
    assert await storage.acquire_lease("live", "a", 30) is not None
    await anyio.sleep(0.15)
    assert await storage.expire_leases(3600) == 0
    assert await storage.expire_leases(0.05) == 1
    assert await storage.get_lease("live") is not None


async def test_concurrent_acquirers_get_one_winner(storage: AsyncStorageBackend) -> None:
    winners: list[int] = []

    async def contend(i: int) -> None:
        lease = await storage.acquire_lease("contended", f"h{i}", 30)
        if lease is not None:
            winners.append(lease.token)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(contend, i)
    assert len(winners) == 1


async def test_lease_input_is_validated(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput, match="ttl_s"):
        await storage.acquire_lease("s", "a", 0)
    with pytest.raises(InvalidInput, match="ttl_s"):
        await storage.acquire_lease("s", "a", float("inf"))
    with pytest.raises(InvalidInput, match="holder"):
        await storage.acquire_lease("s", "", 1)
    with pytest.raises(InvalidInput, match="token"):
        await storage.renew_lease("s", 0, 1)


# ---------------------------------------------------------------- agent tasks


async def test_enqueue_returns_rows_in_input_order(storage: AsyncStorageBackend) -> None:
    tasks = await storage.enqueue_tasks([NewTask("q", {"n": i}) for i in range(5)])
    assert [t.payload for t in tasks] == [{"n": i} for i in range(5)]
    assert [t.status for t in tasks] == [TaskStatus.QUEUED] * 5
    assert len({t.id for t in tasks}) == 5
    assert await storage.get_task(tasks[0].id) == tasks[0]
    assert await storage.get_task(10**9) is None


async def test_idempotency_key_dedupes_until_finished(storage: AsyncStorageBackend) -> None:
    a, b, c = await storage.enqueue_tasks(
        [
            NewTask("q", 1, idempotency_key="k"),
            NewTask("q", 2),
            NewTask("q", 3, idempotency_key="k"),
        ]
    )
    assert a.id == c.id and a.payload == 1 and b.id != a.id
    again = await storage.enqueue_task(NewTask("q", 4, idempotency_key="k"))
    assert again.id == a.id
    other_queue = await storage.enqueue_task(NewTask("q2", 5, idempotency_key="k"))
    assert other_queue.id != a.id
    claimed = await storage.claim_tasks("q", "w", limit=10, lease_s=30)
    running = await storage.enqueue_task(NewTask("q", 6, idempotency_key="k"))
    assert running.id == a.id  # still unfinished while running
    await storage.complete_tasks([t.claim for t in claimed])
    fresh = await storage.enqueue_task(NewTask("q", 7, idempotency_key="k"))
    assert fresh.id != a.id and fresh.payload == 7


async def test_claim_order_priority_and_run_after(storage: AsyncStorageBackend) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    await storage.enqueue_tasks(
        [
            NewTask("q", "low", priority=0),
            NewTask("q", "high", priority=10),
            NewTask("q", "future", priority=99, run_after=later),
            NewTask("other", "elsewhere", priority=50),
        ]
    )
    claimed = await storage.claim_tasks("q", "w", limit=10, lease_s=30)
    assert [t.payload for t in claimed] == ["high", "low"]
    assert all(t.status is TaskStatus.RUNNING and t.attempts == 1 for t in claimed)
    assert all(t.worker_id == "w" and t.lease_token for t in claimed)
    assert await storage.claim_tasks("q", "w", limit=10, lease_s=30) == []


async def test_claim_takes_at_most_limit(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_tasks([NewTask("q", i) for i in range(7)])
    assert len(await storage.claim_tasks("q", "w", limit=3, lease_s=30)) == 3
    assert len(await storage.claim_tasks("q", "w", limit=3, lease_s=30)) == 3
    assert len(await storage.claim_tasks("q", "w", limit=3, lease_s=30)) == 1


async def test_eight_concurrent_claimers_take_each_row_once(storage: AsyncStorageBackend) -> None:
    for start in range(0, 1000, 250):
        await storage.enqueue_tasks([NewTask("q", i) for i in range(start, start + 250)])
    seen: list[int] = []

    async def claimer(n: int) -> None:
        while batch := await storage.claim_tasks("q", f"w{n}", limit=16, lease_s=60):
            seen.extend(t.payload for t in batch)
            await storage.complete_tasks([t.claim for t in batch])

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(claimer, n)
    assert sorted(seen) == list(range(1000))


async def test_expired_claim_is_reclaimed_and_stale_claim_is_fenced(
    storage: AsyncStorageBackend,
) -> None:
    await storage.enqueue_task(NewTask("q", "x", max_attempts=5))
    # A lease long enough that a stalled event loop cannot expire it before the next line.
    (first,) = await storage.claim_tasks("q", "dead-worker", limit=1, lease_s=1.0)
    assert await storage.claim_tasks("q", "w2", limit=1, lease_s=30) == []
    (second,) = await _claim_when_due(storage, "q", "w2")
    assert second.id == first.id and second.attempts == 2
    assert second.lease_token is not None and first.lease_token is not None
    assert second.lease_token > first.lease_token
    stale = first.claim
    assert await storage.complete_tasks([stale]) == []
    assert await storage.heartbeat_tasks([stale], 30) == []
    assert await storage.fail_tasks([Failure(stale.id, stale.token, "late")]) == {}
    assert await storage.release_tasks([stale]) == []
    with pytest.raises(LeaseLost):
        await storage.complete_task(stale)
    with pytest.raises(LeaseLost):
        await storage.fail_task(Failure(stale.id, stale.token, "late"))
    await storage.complete_task(second.claim)
    done = await storage.get_task(second.id)
    assert done is not None and done.status is TaskStatus.SUCCEEDED


async def test_heartbeat_keeps_the_claim(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_task(NewTask("q", "x"))
    (task,) = await storage.claim_tasks("q", "w", limit=1, lease_s=1.0)
    for _ in range(3):
        assert await storage.heartbeat_tasks([task.claim], 30) == [task.id]
    await anyio.sleep(1.1)  # database time: the claim's own 1 s lease runs out
    assert await storage.claim_tasks("q", "thief", limit=1, lease_s=30) == []


async def test_failures_retry_then_dead_letter(storage: AsyncStorageBackend) -> None:
    task = await storage.enqueue_task(NewTask("q", "x", max_attempts=2))
    (c1,) = await storage.claim_tasks("q", "w", limit=1, lease_s=30)
    retry_at = datetime.now(UTC) + timedelta(seconds=1)  # not due before the next line
    assert await storage.fail_tasks([Failure(c1.id, c1.lease_token or 0, "boom 1", retry_at)]) == {
        task.id: TaskStatus.QUEUED
    }
    assert await storage.claim_tasks("q", "w", limit=1, lease_s=30) == []
    (c2,) = await _claim_when_due(storage, "q", "w")
    assert c2.attempts == 2 and c2.last_error == "boom 1"
    assert await storage.fail_task(Failure(c2.id, c2.lease_token or 0, "boom 2")) is TaskStatus.DEAD
    dead = await storage.get_task(task.id)
    assert dead is not None and dead.status is TaskStatus.DEAD and dead.last_error == "boom 2"
    assert await storage.claim_tasks("q", "w", limit=1, lease_s=30) == []


async def test_lease_expiring_on_last_attempt_dead_letters(storage: AsyncStorageBackend) -> None:
    task = await storage.enqueue_task(NewTask("q", "x", max_attempts=1))
    await storage.claim_tasks("q", "crashing", limit=1, lease_s=0.1)
    await anyio.sleep(0.2)
    assert await storage.claim_tasks("q", "w", limit=5, lease_s=30) == []
    dead = await storage.get_task(task.id)
    assert dead is not None and dead.status is TaskStatus.DEAD
    assert dead.last_error == "lease expired on the last attempt"


async def test_release_gives_tasks_back_without_counting(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_tasks([NewTask("q", 1), NewTask("q", 2)])
    claimed = await storage.claim_tasks("q", "w", limit=2, lease_s=30)
    assert await storage.release_tasks([t.claim for t in claimed]) == sorted(t.id for t in claimed)
    again = await storage.claim_tasks("q", "w2", limit=2, lease_s=30)
    assert sorted(t.id for t in again) == sorted(t.id for t in claimed)
    assert all(t.attempts == 1 for t in again)


async def test_purge_tasks_removes_old_succeeded_only(storage: AsyncStorageBackend) -> None:
    await storage.enqueue_tasks([NewTask("q", 1), NewTask("q", 2, max_attempts=1)])
    done, failing = await storage.claim_tasks("q", "w", limit=2, lease_s=30)
    await storage.complete_task(done.claim)
    await storage.fail_task(Failure(failing.id, failing.lease_token or 0, "x"))
    await anyio.sleep(0.05)
    assert await storage.purge_tasks(3600) == 0
    assert await storage.purge_tasks(0.01) == 1
    assert await storage.get_task(done.id) is None
    assert await storage.get_task(failing.id) is not None  # dead letters are kept


async def test_task_input_is_validated(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput, match="run_after"):
        await storage.enqueue_task(NewTask("q", 1, run_after=datetime.now()))
    with pytest.raises(InvalidInput, match="max_attempts"):
        await storage.enqueue_task(NewTask("q", 1, max_attempts=0))
    with pytest.raises(InvalidInput, match="payload"):
        await storage.enqueue_tasks([NewTask("q", 1), NewTask("q", {1, 2})])
    assert await storage.claim_tasks("q", "w", limit=10, lease_s=30) == []
    with pytest.raises(InvalidInput, match="limit"):
        await storage.claim_tasks("q", "w", limit=0, lease_s=30)
    with pytest.raises(InvalidInput, match="twice"):
        await storage.complete_tasks([Claim(1, 1), Claim(1, 1)])


async def _claim_when_due(storage: AsyncStorageBackend, queue: str, worker: str) -> list[Task]:
    """Claim from ``queue`` as soon as the database's clock makes a task claimable."""
    claimed: list[Task] = []

    async def due() -> bool:
        claimed.extend(await storage.claim_tasks(queue, worker, limit=1, lease_s=30))
        return bool(claimed)

    await wait_for(due, what=f"a claimable task in {queue}")
    return claimed
