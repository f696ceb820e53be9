"""Two coordinated claims of one grouped queue committing at once (Postgres).

The coordinated claim is two statements in one transaction: lock the queue's
``task_queues`` row, then claim. The second statement's snapshot is taken after the lock
is granted, so it sees a claim that committed while it waited. Here the interleaving is
forced on two raw connections: claim A holds the lock with g0 claimed and uncommitted;
claim B is sent and blocks on the lock; A commits; B must not take g1 (g0 is in flight).
Then many claimers on two separate storage handles race for a grouped backlog, and the
group rule is checked on every claim.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from asyncstore.storage import AsyncStorageBackend, NewTask, open_storage
from asyncstore.storage._queue_limits import rate_window
from asyncstore.storage._sql import load_queries
from tests.conftest import truncate
from tests.waiting import wait_for

Q = load_queries("postgres")


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


async def _claim_in(conn: asyncpg.Connection, worker: str) -> list[str]:
    limits = await conn.fetchrow(Q["_lock_task_queue"], "q")
    capacity, window = rate_window(limits["max_per_second"])
    rows = await conn.fetch(
        Q["claim_limited_tasks"],
        worker,
        10,
        "q",
        30.0,
        limits["max_running"],
        capacity,
        window,
        limits["max_per_group"],
    )
    return [r["payload"] for r in rows if r["id"] is not None]


async def test_a_claim_that_waited_for_the_lock_sees_the_claim_committed_before_it(
    dsn: str,
) -> None:
    async with open_storage(dsn) as storage:
        await storage.enqueue_tasks([NewTask("q", f"g{i}", group="g") for i in range(3)])
    a = await asyncpg.connect(dsn)
    b = await asyncpg.connect(dsn)
    try:
        tx_a = a.transaction()
        await tx_a.start()
        assert await _claim_in(a, "A") == ['"g0"']
        b_result: list[list[str]] = []

        async def claim_b() -> None:
            async with b.transaction():
                b_result.append(await _claim_in(b, "B"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim_b)
            await _wait_blocked(dsn, b)
            await tx_a.commit()
        assert b_result == [[]]  # g0 is in flight: g1 waits, though B's claim began before
    finally:
        await a.close()
        await b.close()


async def _wait_blocked(dsn: str, conn: asyncpg.Connection) -> None:
    """Until ``conn``'s backend waits for a lock (pg_stat_activity), bounded."""
    pid = conn.get_server_pid()
    probe = await asyncpg.connect(dsn)

    async def blocked() -> bool:
        state = await probe.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
        )
        return bool(state == "Lock")

    try:
        await wait_for(blocked, what="claim B waiting for the queue's row lock")
    finally:
        await probe.close()


async def test_racing_claimers_on_two_handles_keep_the_group_rule(dsn: str) -> None:
    groups, per_group, depth = 6, 2, 8
    async with open_storage(dsn) as one, open_storage(dsn) as two:
        await one.set_queue_limits("q", max_per_group=per_group)
        await one.enqueue_tasks(
            [NewTask("q", [g, i], group=f"g{g}") for i in range(depth) for g in range(groups)]
        )
        started: dict[int, list[int]] = {g: [] for g in range(groups)}
        in_flight: dict[int, int] = dict.fromkeys(range(groups), 0)
        peak = 0
        done = 0

        async def claimer(storage: AsyncStorageBackend, name: str) -> None:
            nonlocal peak, done
            while done < groups * depth:
                claim = await storage.claim_limited_tasks("q", name, limit=3, lease_s=30)
                for task in claim.tasks:
                    g, i = task.payload  # type: ignore[misc]
                    started[g].append(i)
                    in_flight[g] += 1
                    peak = max(peak, in_flight[g])
                for task in claim.tasks:
                    g, _ = task.payload  # type: ignore[misc]
                    in_flight[g] -= 1  # before the complete commits: never a false overlap
                    await storage.complete_tasks([task.claim])
                    done += 1
                if not claim.tasks:
                    await anyio.lowlevel.checkpoint()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for k in range(4):
                    tg.start_soon(claimer, one if k % 2 else two, f"c{k}")
    assert peak <= per_group
    for g in range(groups):
        assert sorted(started[g]) == list(range(depth))  # each once
        # At most per_group in flight, started in order within the window of in-flight ones.
        for pos, i in enumerate(started[g]):
            assert i < pos + per_group


async def test_a_finish_racing_a_refusing_claim_still_notifies(dsn: str) -> None:
    """The refusing claim holds the row with its mark uncommitted while the finish's wake
    runs: the wake must wait for it and notify (judging the mark on its own snapshot, it
    would see no refusal, and the refused worker would sleep until a lease expiry)."""
    async with open_storage(dsn) as storage:
        await storage.set_queue_limits("q", max_running=1)
        await storage.enqueue_tasks([NewTask("q", "a"), NewTask("q", "b")])
        (a_task,) = (await storage.claim_limited_tasks("q", "w", limit=1, lease_s=30)).tasks
    claimer = await asyncpg.connect(dsn)
    waker = await asyncpg.connect(dsn)
    try:
        tx = claimer.transaction()
        await tx.start()
        assert await _claim_in(claimer, "C") == []  # refused: "a" holds the one slot
        async with open_storage(dsn) as storage:
            await storage.complete_tasks([a_task.claim])  # the finish commits meanwhile
        woken: list[bool] = []

        async def wake() -> None:
            row = await waker.fetchrow(Q["wake_task_queue"], "q", "asyncstore.queue.q")
            woken.append(bool(row and row["woke"]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wake)
            await _wait_blocked(dsn, waker)
            await tx.commit()
        assert woken == [True]
    finally:
        await claimer.close()
        await waker.close()
