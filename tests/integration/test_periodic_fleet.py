"""Periodic runners in separate OS processes on one Postgres database: one task per tick.

Each process (``tests/integration/periodic_agent.py``) runs the same one-second interval
schedule with the real clock. The database is the judge: the tick tasks of the schedule
(their idempotency keys carry the tick) must be unique and one second apart with no gap,
and ``periodic_ticks`` must hold exactly one row per task. Faults: two processes started
at once, a runner SIGKILLed just before its tick write and one SIGKILLed inside the tick's
transaction (its task insert held on a table lock the test takes), a leader SIGKILLed.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from tests.conftest import truncate
from tests.faults.procs import ROOT, Agent, spawn_agent
from tests.waiting import wait_for

AGENT = "tests.integration.periodic_agent"
SECOND = timedelta(seconds=1)


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


async def _ticks(dsn: str, name: str) -> list[datetime]:
    """The ticks of ``name`` that have a task, from the tasks' keys; checks the tick rows."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            keys = await conn.fetch(
                "SELECT id, idempotency_key FROM agent_tasks WHERE idempotency_key LIKE $1",
                f"periodic:{name}@%",
            )
            rows = await conn.fetch(
                "SELECT tick_at, task_id FROM periodic_ticks WHERE schedule = $1", name
            )
    finally:
        await conn.close()
    ticks = [datetime.fromisoformat(r["idempotency_key"].rpartition("@")[2]) for r in keys]
    assert len(ticks) == len(set(ticks)), "a tick was enqueued twice"
    assert sorted((r["tick_at"], r["task_id"]) for r in rows) == sorted(
        zip(ticks, [r["id"] for r in keys], strict=True)
    ), "periodic_ticks and the tasks disagree"
    return sorted(ticks)


def _assert_contiguous(ticks: list[datetime]) -> None:
    gaps = [(a, b) for a, b in itertools.pairwise(ticks) if b - a != SECOND]
    assert not gaps, f"ticks missing or doubled between {gaps}"


async def _wait_ticks_through(dsn: str, name: str, last: datetime) -> None:
    async def reached() -> bool:
        ticks = await _ticks(dsn, name)
        return bool(ticks) and ticks[-1] >= last

    await wait_for(reached, 60, what=f"ticks through {last}")


def _options(name: str, **extra: object) -> dict[str, object]:
    return {"schedule": name, "every_s": 1.0, "grace_s": 30.0, **extra}


@asynccontextmanager
async def _spawn_together(options: list[dict[str, object]]) -> AsyncIterator[list[Agent]]:
    """Start every process before waiting for any (they start at once); kill them at the end."""
    processes = [
        await anyio.open_process(
            [sys.executable, "-m", AGENT, json.dumps(o)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            cwd=ROOT,
        )
        for o in options
    ]
    agents = [Agent(f"runner{i}", p) for i, p in enumerate(processes)]
    try:
        async with anyio.create_task_group() as tg:
            for agent in agents:
                tg.start_soon(agent._read)
            try:
                for agent in agents:
                    await agent.wait_for(lambda m: m.get("event") == "ready", limit_s=60)
                yield agents
            finally:
                with anyio.CancelScope(shield=True):  # no process may outlive the test
                    for process in processes:
                        if process.returncode is None:
                            process.kill()
                        await process.wait()
    finally:
        for process in processes:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()


def _tick_of(message: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(message["tick"]))


@pytest.mark.parametrize("mode", ["all", "leader"])
async def test_two_runner_processes_started_at_once_enqueue_one_task_per_tick(
    dsn: str, mode: str
) -> None:
    name = f"fleet-{uuid.uuid4().hex[:8]}"
    async with _spawn_together([{"url": dsn, **_options(name, mode=mode)}] * 2) as agents:
        # Either may lead (leader mode): wait for the first write of either.
        await wait_for(
            lambda: any(m.get("event") == "recorded" for a in agents for m in a.messages),
            what="a first tick written",
        )
        first = next(m for a in agents for m in a.messages if m.get("event") == "recorded")
        if mode == "all":  # both running their ticks (a slow start must not pass unseen)
            await wait_for(
                lambda: all(any(m.get("event") == "before" for m in a.messages) for a in agents),
                what="both runners trying ticks",
            )
        await _wait_ticks_through(dsn, name, _tick_of(first) + 5 * SECOND)
        writers = [a for a in agents if any(m.get("event") == "recorded" for m in a.messages)]
        if mode == "leader":
            assert len(writers) == 1  # only the leader writes ticks
            agents.sort(key=lambda a: a in writers)  # close the follower first
        stats = [await agent.close() for agent in agents]
    ticks = await _ticks(dsn, name)
    _assert_contiguous(ticks)
    assert sum(int(s["enqueued"]) for s in stats) == len(ticks)  # type: ignore[call-overload]
    if mode == "all":  # both tried the ticks they saw; only one write of each got through
        # (which process wins a tick is up to the scheduler: one may win every one)
        assert sum(int(s["already_recorded"]) for s in stats) > 0  # type: ignore[call-overload]
    else:
        assert [s["leading"] for s in stats] == [False, True]


async def test_runner_killed_before_its_tick_write_is_caught_up_once_on_restart(
    dsn: str,
) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    async with spawn_agent("hung", dsn, module=AGENT, **_options(name, hang="before")) as a:
        tick = _tick_of(await a.wait_for(lambda m: m.get("event") == "hanging"))
        a.kill()
        await a.process.wait()
    assert tick not in await _ticks(dsn, name)  # it died before writing the tick
    async with spawn_agent("restarted", dsn, module=AGENT, **_options(name)) as b:
        await _wait_ticks_through(dsn, name, tick + 3 * SECOND)
        stats = await b.close()
    ticks = await _ticks(dsn, name)
    assert ticks.count(tick) == 1
    _assert_contiguous(ticks)
    assert int(stats["caught_up"]) >= 1  # type: ignore[call-overload]


async def test_runner_killed_inside_its_tick_transaction_leaves_nothing_and_restart_enqueues_once(
    dsn: str,
) -> None:
    name = f"txkill-{uuid.uuid4().hex[:8]}"
    locker = await asyncpg.connect(dsn)
    try:
        started = datetime.now(UTC)
        async with spawn_agent("victim", dsn, module=AGENT, **_options(name)) as a:
            # Past its catch-up ticks (a new schedule starts 30 s back): the next is live.
            await a.wait_for(lambda m: m.get("event") == "recorded" and _tick_of(m) >= started)
            tx = locker.transaction()
            await tx.start()
            # Task inserts wait on this lock: the victim's next tick transaction stops after
            # its periodic_ticks insert, inside the transaction, at its task insert.
            await locker.execute("LOCK TABLE agent_tasks IN SHARE MODE")

            async def victim_waits() -> bool:
                # pg_locks, not pg_stat_activity's query text: a statement the connection
                # has not prepared yet waits for the lock while it is parsed, before
                # pg_stat_activity shows it.
                waiting = await locker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'agent_tasks'::regclass"
                )
                recorded = {m["tick"] for m in a.messages if m.get("event") == "recorded"}
                pending = [
                    m
                    for m in a.messages
                    if m.get("event") == "before" and m["tick"] not in recorded
                ]
                return bool(waiting) and bool(pending)

            await wait_for(victim_waits, what="the victim's task insert waiting on the lock")
            before = [m for m in a.messages if m.get("event") == "before"]
            recorded = {m["tick"] for m in a.messages if m.get("event") == "recorded"}
            pending = [m for m in before if m["tick"] not in recorded]
            assert len(pending) == 1
            tick = _tick_of(pending[0])
            a.kill()
            await a.process.wait()
            await tx.rollback()
    finally:
        await locker.close()
    async with spawn_agent("restarted", dsn, module=AGENT, **_options(name)) as b:
        await _wait_ticks_through(dsn, name, tick + 3 * SECOND)
        stats = await b.close()
    ticks = await _ticks(dsn, name)
    assert ticks.count(tick) == 1
    _assert_contiguous(ticks)
    assert int(stats["caught_up"]) >= 1  # type: ignore[call-overload]


async def test_runner_killed_after_its_tick_write_is_not_doubled_on_restart(dsn: str) -> None:
    name = f"after-{uuid.uuid4().hex[:8]}"
    async with spawn_agent("hung", dsn, module=AGENT, **_options(name, hang="after")) as a:
        tick = _tick_of(await a.wait_for(lambda m: m.get("event") == "hanging"))
        a.kill()
        await a.process.wait()
    assert tick in await _ticks(dsn, name)  # written, then the process died
    async with spawn_agent("restarted", dsn, module=AGENT, **_options(name)) as b:
        await _wait_ticks_through(dsn, name, tick + 3 * SECOND)
        await b.close()
    ticks = await _ticks(dsn, name)
    assert ticks.count(tick) == 1
    _assert_contiguous(ticks)


async def test_leader_killed_follower_takes_over_without_missed_or_doubled_ticks(
    dsn: str,
) -> None:
    name = f"leader-{uuid.uuid4().hex[:8]}"
    async with _spawn_together([{"url": dsn, **_options(name, mode="leader")}] * 2) as agents:
        await wait_for(
            lambda: any(m.get("event") == "recorded" for a in agents for m in a.messages),
            what="a leader writing ticks",
        )
        leader = next(a for a in agents if any(m.get("event") == "recorded" for m in a.messages))
        follower = next(a for a in agents if a is not leader)
        last = _tick_of([m for m in leader.messages if m.get("event") == "recorded"][-1])
        await _wait_ticks_through(dsn, name, last + 2 * SECOND)
        leader.kill()
        await leader.process.wait()
        killed_at = (await _ticks(dsn, name))[-1]
        await _wait_ticks_through(dsn, name, killed_at + 4 * SECOND)
        stats = await follower.close()
    ticks = await _ticks(dsn, name)
    _assert_contiguous(ticks)
    assert stats["leading"] is True
    assert int(stats["syncs"]) >= 1 and int(stats["enqueued"]) >= 4  # type: ignore[call-overload]
