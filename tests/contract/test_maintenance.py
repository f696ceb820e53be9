"""Contract: the maintenance sweeper on both drivers (purges, eviction, one leader, failures)."""

from __future__ import annotations

import anyio
import pytest
from pydantic import ValidationError

from asyncstore.orchestrator.maintenance import (
    MaintenanceConfig,
    MaintenanceSweeper,
    open_maintenance,
)
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import (
    AsyncStorageBackend,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    open_storage,
)
from tests.waiting import wait_for

FAST = MaintenanceConfig(interval_s=0.03, leader_ttl_s=10.0)
ONLY_EVENTS = FAST.model_copy(
    update={"task_retention_s": None, "outbox_retention_s": None, "lease_grace_s": None}
)


def _events(session_id: str, count: int) -> list[NewStreamEvent]:
    return [NewStreamEvent(session_id, 1, seq, "delta", seq) for seq in range(1, count + 1)]


async def _rounds(sweeper: MaintenanceSweeper, more: int) -> None:
    with anyio.fail_after(10):
        await sweeper.wait_rounds(sweeper.statistics().rounds + more)


async def test_sweep_purges_expired_events_in_bounded_batches(
    storage: AsyncStorageBackend,
) -> None:
    await storage.append_stream_events(_events("old-a", 6) + _events("old-b", 4))
    await anyio.sleep(1.2)  # database time: these rows age past the 1 s TTL below
    await storage.append_stream_events(_events("fresh", 3))
    config = ONLY_EVENTS.model_copy(  # the batched DELETE on either layout
        update={
            "enabled": False,
            "stream_ttl_s": 1.0,
            "purge_batch_size": 4,
            "stream_drop_partitions": False,
        }
    )
    async with open_maintenance(storage, config) as sweeper:
        before = storage.statistics().statements.get("purge_stream_events_batch", 0)
        assert await sweeper.run_once()
        stats = sweeper.statistics()
    statements = storage.statistics().statements.get("purge_stream_events_batch", 0) - before
    assert statements == stats.stream_batches == 3  # 4 + 4 + 2: stops below a full batch
    assert stats.purged["stream_events"] == 10
    assert stats.sweeps_run == 1 and stats.rounds == 1 and stats.errors == 0
    assert stats.last_sweep_duration_s is not None and stats.last_sweep_duration_s >= 0
    assert await storage.load_stream_events("old-a") == []
    assert [e.seq for e in await storage.load_stream_events("fresh")] == [1, 2, 3]


async def test_sweep_caps_batches_per_round(storage: AsyncStorageBackend) -> None:
    await storage.append_stream_events(_events("old", 10))
    await anyio.sleep(0.3)
    config = ONLY_EVENTS.model_copy(
        update={
            "enabled": False,
            "stream_ttl_s": 0.1,
            "purge_batch_size": 2,
            "purge_max_batches": 3,
            "stream_drop_partitions": False,
        }
    )
    async with open_maintenance(storage, config) as sweeper:
        await sweeper.run_once()
        assert sweeper.statistics().purged["stream_events"] == 6
        await sweeper.run_once()
        assert sweeper.statistics().purged["stream_events"] == 10


async def test_sweep_expires_leases_and_purges_finished_tasks_and_sent_outbox(
    storage: AsyncStorageBackend,
) -> None:
    assert await storage.acquire_lease("gone", "crashed", 0.05) is not None
    assert await storage.acquire_lease("live", "worker", 60) is not None
    await storage.enqueue_tasks([NewTask("q", 1)])
    (task,) = await storage.claim_tasks("q", "w", limit=1, lease_s=30)
    await storage.complete_task(task.claim)
    await storage.enqueue_outbox([NewOutboxMessage("slack", "a", 1)])
    (message,) = await storage.claim_outbox("w", limit=1, lease_s=30)
    await storage.mark_outbox_sent([message.claim])
    await anyio.sleep(0.4)
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=None,
        task_retention_s=0.2,
        outbox_retention_s=0.2,
        lease_grace_s=0.2,
    )
    async with open_maintenance(storage, config) as sweeper:
        assert await sweeper.run_once()
        stats = sweeper.statistics()
    assert dict(stats.purged) == {
        "stream_events": 0,
        "tasks": 1,
        "outbox": 1,
        "leases": 1,
        "login_attempts": 0,
        "periodic_ticks": 0,
        "presence": 0,
    }
    assert stats.stream_batches == 0
    assert await storage.get_task(task.id) is None
    assert await storage.get_outbox(message.id) is None
    assert await storage.get_lease("live") is not None


async def test_evictors_run_every_round_on_the_loop_schedule(storage: AsyncStorageBackend) -> None:
    calls: list[str] = []

    def evict_rings() -> int:
        calls.append("rings")
        return 2

    async def evict_tokens() -> None:
        calls.append("tokens")

    async with open_maintenance(storage, FAST, evictors=[evict_rings]) as sweeper:
        sweeper.add_evictor(evict_tokens)
        await _rounds(sweeper, 3)
        stats = sweeper.statistics()
    assert calls.count("rings") >= 3 and calls.count("tokens") >= 2
    assert stats.evicted == 2 * calls.count("rings")
    assert stats.evictor_runs == len(calls)
    assert stats.sweeps_run == stats.rounds and stats.errors == 0


async def test_rounds_start_on_the_jittered_schedule_of_the_clock(
    storage: AsyncStorageBackend,
) -> None:
    config = FAST.model_copy(update={"interval_s": 60.0, "jitter": 0.2})
    clock = ManualClock()
    async with open_maintenance(storage, config, clock=clock) as sweeper:
        for round_ in range(1, 4):
            await clock.wait_sleepers(1)  # the loop waits for its next round
            clock.advance(60.0 * 0.8 - 0.001)  # short of the earliest jittered start
            await anyio.wait_all_tasks_blocked()
            assert clock.sleepers == 1  # still waiting: no round started
            assert sweeper.statistics().rounds == round_ - 1
            clock.advance(60.0 * 0.4)  # past the latest one
            await _rounds(sweeper, 1 if sweeper.statistics().rounds < round_ else 0)
            assert sweeper.statistics().rounds == round_


async def test_only_one_instance_sweeps_when_two_compete(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    evicted = {"a": 0, "b": 0}

    def evictor(name: str) -> int:
        evicted[name] += 1
        return 0

    async with (
        open_storage(storage_url) as other,
        open_maintenance(other, FAST, evictors=[lambda: evictor("b")]) as b,
    ):
        async with open_maintenance(storage, FAST, evictors=[lambda: evictor("a")]) as a:
            await _rounds(a, 8)
            await _rounds(b, 8)
            sa, sb = a.statistics(), b.statistics()
        # Every round of each instance either swept or was skipped, never both or neither.
        for s in (sa, sb):
            assert s.errors == 0 and s.sweeps_run + s.sweeps_skipped == s.rounds
        leader, follower = (sa, sb) if sa.sweeps_run else (sb, sa)
        assert leader.sweeps_run >= 8 and leader.sweeps_skipped == 0 and leader.leading
        assert follower.sweeps_run == 0 and follower.sweeps_skipped >= 8
        assert evicted["a"] >= 8 and evicted["b"] >= 8  # eviction is per process

        # The leader left (a's block ended, or b leads and stays): someone keeps sweeping.
        swept = b.statistics().sweeps_run
        await _rounds(b, 3)
        assert b.statistics().sweeps_run >= swept + 2


async def test_the_sweeper_exports_the_families_it_declares(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    """``MaintenanceStatistics`` declares its metric families next to its counters, like
    the other components: the generic collector exports a sweeper with no special case."""
    from prometheus_client.parser import text_string_to_metric_families

    from asyncstore.orchestrator.metrics import Metrics, MetricsConfig

    manual = FAST.model_copy(update={"enabled": False})
    async with (
        open_storage(storage_url) as other,
        open_maintenance(storage, manual, evictors=[lambda: 2]) as leader,
        open_maintenance(other, manual) as follower,
    ):
        assert await leader.run_once()
        assert not await follower.run_once()
        metrics = Metrics(MetricsConfig(process_metrics=False))
        metrics.add_source("maintenance", leader)
        metrics.add_source("maintenance_b", follower)
        text = metrics.render()[0].decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, source: str, **labels: str) -> float:
        return samples[(f"asyncstore_{name}", tuple(sorted({"source": source, **labels}.items())))]

    assert value("maintenance_rounds_total", "maintenance") == 1
    assert value("maintenance_sweeps_total", "maintenance", outcome="run") == 1
    assert value("maintenance_sweeps_total", "maintenance", outcome="skipped") == 0
    assert value("maintenance_sweeps_total", "maintenance_b", outcome="skipped") == 1
    assert value("maintenance_leading", "maintenance") == 1
    assert value("maintenance_leading", "maintenance_b") == 0
    assert value("maintenance_evicted_total", "maintenance") == 2
    assert value("maintenance_errors_total", "maintenance") == 0
    for kind in ("stream_events", "tasks", "outbox", "leases", "login_attempts"):
        assert value("maintenance_purged_rows_total", "maintenance_b", kind=kind) == 0
    assert value("maintenance_last_sweep_duration_seconds", "maintenance") >= 0
    assert value("maintenance_last_sweep_duration_seconds", "maintenance_b") == -1


async def test_failing_steps_are_counted_and_the_loop_continues(
    storage_url: str,
) -> None:
    failures = iter([RuntimeError("first round breaks")])

    def flaky() -> int:
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return 1

    async with (
        open_storage(storage_url) as doomed,
        open_maintenance(doomed, FAST, evictors=[flaky]) as sweeper,
    ):
        await _rounds(sweeper, 3)
        stats = sweeper.statistics()
        assert stats.errors == 1 and stats.evicted >= 2
        assert stats.sweeps_run == stats.rounds  # the evictor's failure spared the sweep
        # The database goes away under the loop: each round's sweep fails and is counted.
        await doomed.aclose()
        await _rounds(sweeper, 3)
        stats = sweeper.statistics()
        assert stats.errors >= 4 and "StorageClosed" in (stats.last_error or "")
        assert not stats.leading


async def test_cancellation_stops_a_round_in_flight_and_gives_up_leadership(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    blocked = anyio.Event()
    rounds = 0

    async def stuck_after_first_round() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 2:
            blocked.set()
            await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                async with open_maintenance(
                    storage, FAST, evictors=[stuck_after_first_round]
                ) as sweeper:
                    await sweeper.wait_rounds(1)
                    assert sweeper.statistics().leading
                    await anyio.sleep_forever()

            tg.start_soon(run)
            await blocked.wait()
            tg.cancel_scope.cancel()
    async with (
        open_storage(storage_url) as other,
        other.open_leadership(FAST.leadership_name, ttl_s=10) as role,
    ):
        assert await role.try_lead()


async def test_leaving_the_block_does_not_wait_for_the_next_round(
    storage: AsyncStorageBackend,
) -> None:
    with anyio.fail_after(5):
        async with open_maintenance(storage, MaintenanceConfig(interval_s=3600)) as sweeper:
            pass
    assert sweeper.statistics().rounds == 0


def test_config_refuses_a_leader_ttl_shorter_than_a_round() -> None:
    with pytest.raises(ValidationError):
        MaintenanceConfig(interval_s=10, leader_ttl_s=11)
    assert MaintenanceConfig(interval_s=10).effective_leader_ttl_s == pytest.approx(36)
    with pytest.raises(ValidationError):
        MaintenanceConfig(purge_batch_size=0)


async def test_sweep_purges_expired_presence_rows_only(storage: AsyncStorageBackend) -> None:
    # Issue 19: a killed instance never withdraws its presence row; the leader deletes it
    # once it expired (the database's clock), and leaves live rows alone.
    await storage.publish_presence("killed", {"chat-1": 3}, ttl_s=0.05)
    await storage.publish_presence("alive", {"chat-1": 1}, ttl_s=600)

    async def expired() -> bool:
        return [p.instance_id for p in await storage.list_presence()] == ["alive"]

    await wait_for(expired, what="the short row expired")
    async with open_maintenance(storage, ONLY_EVENTS.model_copy(update={"enabled": False})) as s:
        assert await s.run_once()
        assert s.statistics().purged["presence"] == 1
    assert await storage.withdraw_presence("killed") is False  # the row itself is gone
    assert [p.instance_id for p in await storage.list_presence()] == ["alive"]
