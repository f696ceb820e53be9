"""Contract: periodic ticks on both drivers (the storage calls, then the runner on a ManualClock).

The clock's wall time starts at ``W + 30`` where ``W`` is a whole minute, so a
``every=60`` schedule ticks at ``W``, ``W + 60``, ... and every test can say which ticks it
expects from the seconds it advances. Tasks are counted by claiming them from the
schedule's queue (the database's view, not the runner's).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from pydantic import ValidationError

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.maintenance import MaintenanceConfig, open_maintenance
from asyncstore.orchestrator.periodic import (
    Periodic,
    PeriodicConfig,
    PeriodicRunner,
    ScheduleSettings,
    open_periodic,
)
from asyncstore.orchestrator.runtime import open_runtime
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import TASKS, AsyncStorageBackend, InvalidInput, NewTask, Task
from asyncstore.storage.errors import InvalidArgument
from tests.waiting import wait_for

W = 1_700_000_040  # a whole minute (W % 60 == 0)
LEADER = PeriodicConfig(mode="leader", leader_ttl_s=600.0)


def _clock() -> ManualClock:
    return ManualClock(now=30.0, wall_offset=float(W))


def _at(offset: float) -> datetime:
    return datetime.fromtimestamp(W + offset, UTC)


def _fresh() -> str:
    return f"q{uuid.uuid4().hex[:10]}"


async def _tasks(storage: AsyncStorageBackend, queue: str) -> list[Task]:
    """Every task of ``queue`` (claimed, so call it once, at the end)."""
    return await storage.claim_jobs(TASKS, "checker", limit=1000, lease_s=60.0, queues=[queue])


def _ticks(tasks: list[Task]) -> list[str]:
    return sorted((t.idempotency_key or "").rpartition("@")[2] for t in tasks)


async def _advance_to(
    clock: ManualClock, runner: PeriodicRunner, offset: float, handled: int
) -> None:
    """Move the clock to wall ``W + offset`` and wait until ``handled`` ticks are handled."""
    clock.advance(W + offset - clock.time())
    with anyio.fail_after(20):
        await runner.wait_handled(handled)
        await clock.wait_sleepers(1)


# -- the storage calls -------------------------------------------------------------------


async def test_a_tick_is_recorded_once_with_its_task(storage: AsyncStorageBackend) -> None:
    queue, name = _fresh(), _fresh()
    task = NewTask(queue, {"report": "daily"}, idempotency_key="periodic:x@1")
    first = await storage.record_periodic_tick(name, _at(0), task)
    again = await storage.record_periodic_tick(name, _at(0), task)
    other = await storage.record_periodic_tick(name, _at(60), NewTask(queue, 2))
    assert first is not None and first.queue == queue and first.payload == {"report": "daily"}
    assert again is None
    assert other is not None and other.id != first.id
    assert await storage.last_periodic_ticks([name, "never-recorded"]) == {name: _at(60)}
    assert sorted(t.id for t in await _tasks(storage, queue)) == sorted([first.id, other.id])


async def test_concurrent_records_of_one_tick_enqueue_one_task(
    storage: AsyncStorageBackend,
) -> None:
    queue, name = _fresh(), _fresh()
    results: list[Task | None] = []

    async def record(i: int) -> None:
        results.append(await storage.record_periodic_tick(name, _at(0), NewTask(queue, i)))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(record, i)
    assert len(results) == 8
    assert sum(r is not None for r in results) == 1
    assert len(await _tasks(storage, queue)) == 1


async def test_bad_tick_input_is_refused_and_nothing_written(
    storage: AsyncStorageBackend,
) -> None:
    queue, name = _fresh(), _fresh()
    with pytest.raises(InvalidInput, match="timezone-aware"):
        await storage.record_periodic_tick(name, datetime(2026, 1, 1), NewTask(queue, 1))
    with pytest.raises(InvalidInput):
        await storage.record_periodic_tick("", _at(0), NewTask(queue, 1))
    with pytest.raises(InvalidInput):
        await storage.record_periodic_tick(name, _at(0), NewTask(queue, float("nan")))
    with pytest.raises(InvalidInput):
        await storage.record_periodic_tick(name, _at(0), NewTask(queue, 1), notify="bad channel")
    assert await storage.last_periodic_ticks([name]) == {}
    assert await _tasks(storage, queue) == []


async def test_purge_keeps_each_schedules_latest_tick(storage: AsyncStorageBackend) -> None:
    queue, name = _fresh(), _fresh()
    for offset in (0, 60, 120):
        assert await storage.record_periodic_tick(name, _at(offset), NewTask(queue, offset))
    purged = 0

    async def purge() -> bool:
        nonlocal purged
        purged += await storage.purge_periodic_ticks(0.001)
        return purged >= 2

    await wait_for(purge, what="the two older ticks purged")
    assert purged == 2
    assert await storage.last_periodic_ticks([name]) == {name: _at(120)}
    # The latest tick is still recorded: it is not enqueued again.
    assert await storage.record_periodic_tick(name, _at(120), NewTask(queue, 0)) is None


# -- the runner on a ManualClock ---------------------------------------------------------


async def test_runner_enqueues_each_tick_once_as_a_task(storage: AsyncStorageBackend) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=timedelta(seconds=60), queue=queue, payload={"x": 1}, grace=45)
    async with open_periodic(storage, [schedule], clock=clock) as runner:
        # Started at W + 30: the tick at W is within its grace of 45 s, so it is caught up.
        with anyio.fail_after(20):
            await runner.wait_handled(1)
            await clock.wait_sleepers(1)
        await _advance_to(clock, runner, 60, 2)
        await _advance_to(clock, runner, 120, 3)
        stats = runner.statistics()
    assert (stats.enqueued, stats.caught_up, stats.already_recorded, stats.skipped) == (3, 1, 0, 0)
    tasks = await _tasks(storage, queue)
    assert _ticks(tasks) == [_at(o).isoformat() for o in (0, 60, 120)]
    assert {t.payload["x"] for t in tasks} == {1}  # type: ignore[index]


async def test_cron_schedule_ticks_on_its_minutes(storage: AsyncStorageBackend) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic("*/2 * * * *", queue=queue, grace=1)
    minute = W // 60
    first = 120 - (minute % 2) * 60  # offset from W of the first even minute after W + 30
    async with open_periodic(storage, [schedule], clock=clock) as runner:
        with anyio.fail_after(20):
            await clock.wait_sleepers(1)
        await _advance_to(clock, runner, first, 1)
        await _advance_to(clock, runner, first + 60, 1)  # an odd minute: nothing
        await _advance_to(clock, runner, first + 120, 2)
        assert runner.statistics().enqueued == 2
    assert _ticks(await _tasks(storage, queue)) == [
        _at(first).isoformat(),
        _at(first + 120).isoformat(),
    ]


async def test_two_runners_started_at_once_enqueue_one_task_per_tick(
    storage: AsyncStorageBackend,
) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=60, queue=queue, grace=45)
    async with (
        open_periodic(storage, [schedule], clock=clock) as a,
        open_periodic(storage, [schedule], clock=clock) as b,
    ):
        for i, offset in enumerate((30, 60, 120, 180, 240), start=1):
            clock.advance(W + offset - clock.time())
            with anyio.fail_after(20):
                await a.wait_handled(i)
                await b.wait_handled(i)
                await clock.wait_sleepers(2)
        sa, sb = a.statistics(), b.statistics()
    assert sa.enqueued + sb.enqueued == 5
    assert sa.already_recorded + sb.already_recorded == 5
    assert _ticks(await _tasks(storage, queue)) == [
        _at(o).isoformat() for o in (0, 60, 120, 180, 240)
    ]


async def test_restart_within_grace_catches_up_and_older_ticks_are_skipped(
    storage: AsyncStorageBackend,
) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=60, queue=queue, grace=90)
    async with open_periodic(storage, [schedule], clock=clock) as runner:
        with anyio.fail_after(20):
            await runner.wait_handled(2)  # W - 60 and W: both within 90 s of W + 30
    clock.advance(170)  # wall W + 200: W + 60 is 140 s old, W + 120 and W + 180 within 90 s
    async with open_periodic(storage, [schedule], clock=clock) as again:
        with anyio.fail_after(20):
            await again.wait_handled(3)
            await clock.wait_sleepers(1)
        stats = again.statistics()
        await _advance_to(clock, again, 240, 4)
    assert (stats.enqueued, stats.caught_up, stats.skipped) == (2, 2, 1)
    assert stats.skipped_by_schedule == {schedule.name: 1}
    assert _ticks(await _tasks(storage, queue)) == [
        _at(o).isoformat() for o in (-60, 0, 120, 180, 240)
    ]


async def test_a_tick_interrupted_before_its_write_is_enqueued_once_by_the_next_runner(
    storage: AsyncStorageBackend,
) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=60, queue=queue, grace=45)
    reached = anyio.Event()

    async def hang(_: Periodic, tick: datetime) -> None:
        if tick == _at(60):
            reached.set()
            await anyio.sleep_forever()

    async with open_periodic(storage, [schedule], clock=clock, before_record=hang) as runner:
        with anyio.fail_after(20):
            await runner.wait_handled(1)
            await clock.wait_sleepers(1)
        clock.advance(30)  # W + 60: the runner reaches the write and hangs there
        with anyio.fail_after(20):
            await reached.wait()
    # The block left mid-tick (the runner cancelled before writing): the next runner,
    # started within the tick's grace, enqueues it once.
    clock.advance(20)
    async with open_periodic(storage, [schedule], clock=clock) as again:
        with anyio.fail_after(20):
            await again.wait_handled(1)
        assert again.statistics().caught_up == 1
    assert _ticks(await _tasks(storage, queue)) == [_at(0).isoformat(), _at(60).isoformat()]


async def test_leader_change_catches_up_the_tick_the_old_leader_left(
    storage: AsyncStorageBackend,
) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=60, queue=queue, grace=80)
    stuck = anyio.Event()

    async def hang(_: Periodic, tick: datetime) -> None:
        if tick == _at(60):
            stuck.set()
            await anyio.sleep_forever()

    leader_done, leader_gone = anyio.Event(), anyio.Event()
    leader: list[PeriodicRunner] = []

    async def run_leader(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with open_periodic(
            storage, [schedule], LEADER, clock=clock, before_record=hang
        ) as runner:
            leader.append(runner)
            with anyio.fail_after(20):
                await runner.wait_handled(1)  # the tick at W, as the leader
            task_status.started()
            await leader_done.wait()
        leader_gone.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run_leader)
        async with open_periodic(storage, [schedule], LEADER, clock=clock) as follower:
            with anyio.fail_after(20):
                await clock.wait_sleepers(2)
            assert leader[0].statistics().leading
            assert not follower.statistics().leading
            clock.advance(30)  # W + 60: the leader hangs before writing; the follower defers
            with anyio.fail_after(20):
                await stuck.wait()
                await clock.wait_sleepers(1)
            leader_done.set()  # the old leader goes away, the tick at W + 60 unwritten
            with anyio.fail_after(20):
                await leader_gone.wait()
            await _advance_to(clock, follower, 120, 2)
            stats = follower.statistics()
    assert stats.leading and stats.syncs == 1
    assert (stats.enqueued, stats.caught_up) == (2, 1)
    assert _ticks(await _tasks(storage, queue)) == [_at(o).isoformat() for o in (0, 60, 120)]


async def test_a_stalled_runner_skips_and_counts_ticks_past_their_grace(
    storage: AsyncStorageBackend,
) -> None:
    clock, queue = _clock(), _fresh()
    schedule = Periodic(every=60, queue=queue, grace=30)
    async with open_periodic(storage, [schedule], clock=clock) as runner:
        with anyio.fail_after(20):
            await runner.wait_handled(1)
            await clock.wait_sleepers(1)
        # The loop sleeps at most 60 s at a time; jump 5 minutes at once (a stall).
        await _advance_to(clock, runner, 330, 6)
        stats = runner.statistics()
    # W + 60 .. W + 240 are more than 30 s old at W + 330; W + 300 is 30 s old: in grace.
    assert (stats.enqueued, stats.skipped) == (2, 4)
    assert _ticks(await _tasks(storage, queue)) == [_at(0).isoformat(), _at(300).isoformat()]


async def test_schedules_from_settings_run_beside_code_ones(storage: AsyncStorageBackend) -> None:
    clock, queue = _clock(), _fresh()
    config = PeriodicConfig(
        default_grace_s=45,
        schedules=(ScheduleSettings(name="from-settings", every_s=60, queue=queue, payload=7),),
    )
    in_code = Periodic(every=60, queue=queue, payload=8, name="in-code", grace=45)
    async with open_periodic(storage, [in_code], config, clock=clock) as runner:
        with anyio.fail_after(20):
            await runner.wait_handled(2)
    assert sorted(t.payload for t in await _tasks(storage, queue)) == [7, 8]  # type: ignore[type-var]


async def test_duplicate_names_and_bad_schedules_are_refused(storage: AsyncStorageBackend) -> None:
    a = Periodic(every=60, name="same")
    with pytest.raises(InvalidArgument, match="unique"):
        async with open_periodic(storage, [a, Periodic(every=120, name="same")]):
            pass
    with pytest.raises(InvalidArgument, match="exactly one"):
        Periodic("* * * * *", every=60)
    with pytest.raises(InvalidArgument, match="exactly one"):
        Periodic()
    with pytest.raises(InvalidArgument, match="at least one second"):
        Periodic(every=0.5)
    with pytest.raises(InvalidArgument, match="grace must be at least one second"):
        Periodic(every=60, grace=0.5)
    with pytest.raises(InvalidArgument, match="unknown timezone"):
        Periodic("* * * * *", timezone="Nowhere/City")
    with pytest.raises(InvalidArgument):
        Periodic("61 * * * *")


async def test_maintenance_purges_old_ticks_but_keeps_each_schedules_latest(
    storage: AsyncStorageBackend,
) -> None:
    queue, name = _fresh(), _fresh()
    for offset in (0, 60, 120):
        assert await storage.record_periodic_tick(name, _at(offset), NewTask(queue, offset))
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=None,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=None,
        periodic_tick_retention_s=0.001,
    )
    async with open_maintenance(storage, config) as sweeper:

        async def purged_two() -> bool:
            await sweeper.run_once()
            return sweeper.statistics().purged["periodic_ticks"] >= 2

        await wait_for(purged_two, what="maintenance purging the two older ticks")
        assert sweeper.statistics().purged["periodic_ticks"] == 2
    assert await storage.last_periodic_ticks([name]) == {name: _at(120)}


def test_settings_declare_schedules_and_refuse_bad_ones() -> None:
    settings = load_settings(
        periodic={
            "mode": "leader",
            "schedules": [
                {"name": "nightly", "cron": "0 3 * * *", "queue": "reports", "payload": {"a": 1}},
                {"every_s": 30, "queue": "pings"},
            ],
        }
    )
    nightly, pings = settings.periodic.periodics()
    assert (
        nightly.name == "nightly"
        and nightly.cron is not None
        and nightly.grace == timedelta(seconds=60)
    )
    assert pings.every == timedelta(seconds=30) and pings.name.startswith("pings:every")
    with pytest.raises(ValidationError, match="exactly one"):
        load_settings(periodic={"schedules": [{"queue": "x"}]})
    with pytest.raises(ValidationError, match="outside 0-59"):
        load_settings(periodic={"schedules": [{"cron": "99 * * * *"}]})


async def test_the_runtime_runs_schedules_from_code_and_settings_through_its_worker(
    storage_url: str,
) -> None:
    seen: list[Task] = []
    done = anyio.Event()

    async def handler(task: Task) -> None:
        seen.append(task)
        if {t.payload for t in seen} >= {"code", "settings"}:
            done.set()

    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        periodic={
            "schedules": [
                {"name": "s", "every_s": 1, "queue": "default", "payload": "settings", "grace_s": 5}
            ]
        },
    )
    in_code = Periodic(every=1, queue="default", payload="code", name="c", grace=5)
    async with open_runtime(settings, queue_handler=handler, periodic=[in_code]) as rt:
        assert rt.periodic is not None
        with anyio.fail_after(30):
            await done.wait()
        stats = rt.periodic.statistics()
        body, _ = rt.metrics.render()
    assert stats.schedules == 2 and stats.enqueued >= 2
    assert all((t.idempotency_key or "").startswith(("periodic:s@", "periodic:c@")) for t in seen)
    assert b'asyncstore_periodic_ticks_total{outcome="enqueued",source="periodic"}' in body


async def test_the_runtime_runs_no_periodic_runner_without_schedules(storage_url: str) -> None:
    settings = load_settings(storage={"url": storage_url}, runtime={"reload_on_sighup": False})
    async with open_runtime(settings) as rt:
        assert rt.periodic is None
        body, _ = rt.metrics.render()
    assert b"asyncstore_periodic_" not in body  # (maintenance may name the ticks table)
