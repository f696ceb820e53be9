"""SessionLimiter on both drivers: exclusivity, caps, fencing, statements on the acquire path.

Two storage handles on one database stand for two instances. Slot pools outlive the
per-test truncation, so every limiter with a cap gets a fresh pool name.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from asyncstore.orchestrator.cancellation import open_cancellation
from asyncstore.orchestrator.locks import LimiterConfig, SessionLimiter, open_session_limiter
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock, ManualClock
from asyncstore.storage import AsyncStorageBackend, LeaseLost, NewMessage, open_storage
from tests.waiting import wait_for

MODES = ["two_level", "db_poll"]
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.1, "poll_interval_s": 0.01}


def _config(**overrides: object) -> LimiterConfig:
    values: dict[str, object] = {**FAST, "slot_pool": f"pool-{uuid.uuid4().hex[:10]}"}
    values.update(overrides)
    return LimiterConfig.model_validate(values)


@asynccontextmanager
async def _instances(
    storage_url: str, config: LimiterConfig, n: int = 2, clocks: list[Clock] | None = None
) -> AsyncIterator[list[SessionLimiter]]:
    async with AsyncExitStack() as stack:
        limiters = []
        for i in range(n):
            backend = await stack.enter_async_context(open_storage(storage_url))
            clock = clocks[i] if clocks else SYSTEM_CLOCK
            limiters.append(
                await stack.enter_async_context(
                    open_session_limiter(backend, config, instance_id=f"inst{i}", clock=clock)
                )
            )
        yield limiters


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> Counter[str]:
    return Counter({k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)})


@pytest.mark.parametrize("mode", MODES)
async def test_never_two_holders_under_contention(storage_url: str, mode: str) -> None:
    holders: Counter[str] = Counter()
    entries: Counter[str] = Counter()
    async with _instances(storage_url, _config(mode=mode)) as limiters:

        async def worker(i: int) -> None:
            limiter = limiters[i % 2]
            for round_ in range(2):
                session = f"s{(i + round_) % 10}"
                async with limiter.hold(session) as held:
                    holders[session] += 1
                    assert holders[session] == 1, f"two holders of {session}"
                    # A fenced write inside the critical section: the token must be current.
                    await limiter._storage.append_messages(
                        session, [NewMessage("user", i)], lease_token=held.token
                    )
                    await anyio.lowlevel.checkpoint()
                    assert holders[session] == 1, f"two holders of {session}"
                    holders[session] -= 1
                    entries[session] += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(worker, i)
        for limiter in limiters:
            stats = limiter.statistics()
            assert stats.holders == 0 and stats.waiters == 0
            assert stats.sessions_tracked == 0  # per-session state is evicted when idle
    assert sum(entries.values()) == 100


async def test_global_cap_holds_exactly_across_instances(storage_url: str) -> None:
    cap = 3
    running = 0
    peak = 0
    full = anyio.Event()
    async with _instances(storage_url, _config(max_running=cap)) as limiters:

        async def worker(i: int) -> None:
            nonlocal running, peak
            async with limiters[i % 2].hold(f"s{i}"):
                running += 1
                peak = max(peak, running)
                if running == cap:
                    full.set()
                # The first holders stay until the cap is reached, so it is reached.
                await full.wait()
                await anyio.sleep(0.005)
                running -= 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(worker, i)
        acquires = sum(limiter.statistics().acquires for limiter in limiters)
    assert peak == cap
    assert acquires == 12


async def test_local_cap_limits_this_process(storage: AsyncStorageBackend) -> None:
    running = 0
    peak = 0
    both_in = anyio.Event()  # the first two holders wait for each other: the cap is reached
    async with open_session_limiter(storage, _config(max_local=2)) as limiter:

        async def worker(i: int) -> None:
            nonlocal running, peak
            async with limiter.hold(f"s{i}"):
                running += 1
                peak = max(peak, running)
                if running == 2:
                    both_in.set()
                await both_in.wait()  # a third holder here would push the peak to 3
                await anyio.lowlevel.checkpoint()
                running -= 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(worker, i)
    assert peak == 2


@pytest.mark.parametrize("mode", MODES)
async def test_crashed_holder_is_taken_over_and_its_token_is_fenced(
    storage: AsyncStorageBackend, mode: str
) -> None:
    # A holder that crashed: it took the lease and never renews or releases it.
    crashed = await storage.acquire_lease("s", "crashed", 0.3)
    assert crashed is not None
    async with open_session_limiter(storage, _config(mode=mode)) as limiter:
        with anyio.fail_after(10):
            async with limiter.hold("s") as held:
                assert held.token > crashed.token
                with pytest.raises(LeaseLost):
                    await storage.renew_lease("s", crashed.token, 30)
                with pytest.raises(LeaseLost):
                    await storage.renew_lease_slot("s", crashed.token, 30)
                assert not await storage.release_lease("s", crashed.token)
                assert not await storage.release_lease_slot(
                    "s", crashed.token, channel=limiter.config.channel
                )
                with pytest.raises(LeaseLost):
                    await storage.append_messages(
                        "s", [NewMessage("user", "stale")], lease_token=crashed.token
                    )
                await storage.append_messages(
                    "s", [NewMessage("user", "fresh")], lease_token=held.token
                )
    assert [m.content for m in await storage.load_messages("s")] == ["fresh"]
    assert await storage.get_lease("s") is None  # released on exit


@pytest.mark.parametrize("capped", [False, True])
async def test_two_level_acquire_path_has_no_count_or_delete(
    storage: AsyncStorageBackend, capped: bool
) -> None:
    config = _config(max_running=5 if capped else None)
    async with open_session_limiter(storage, config) as limiter:
        before = storage.statistics().statements
        async with limiter.hold("s"):
            on_acquire = _delta(before, storage.statistics().statements)
        total = _delta(before, storage.statistics().statements)
    public = {name for name in on_acquire if not name.startswith("_")}
    assert public == {"acquire_lease_slot"} and on_acquire["acquire_lease_slot"] == 1
    forbidden = ("count", "expire", "delete")
    assert not any(word in name for name in on_acquire for word in forbidden), on_acquire
    if not capped or storage.dialect == "postgres":
        # One statement to acquire, one to release (SQLite claims a slot in 3 statements).
        assert total == Counter({"acquire_lease_slot": 1, "release_lease_slot": 1})
    assert limiter.statistics().statements_per_acquire == 1.0


async def test_db_poll_acquire_path_runs_the_legacy_statements(
    storage: AsyncStorageBackend,
) -> None:
    async with open_session_limiter(storage, _config(mode="db_poll")) as limiter:
        before = storage.statistics().statements
        async with limiter.hold("s"):
            on_acquire = _delta(before, storage.statistics().statements)
    public = {name: n for name, n in on_acquire.items() if not name.startswith("_")}
    assert public == {"expire_leases": 1, "count_leases": 1, "acquire_lease": 1}


async def test_local_gate_resolves_same_process_contention_without_database(
    storage: AsyncStorageBackend,
) -> None:
    inside = 0
    async with open_session_limiter(storage, _config()) as limiter:
        before = storage.statistics().statements

        async def worker() -> None:
            nonlocal inside
            async with limiter.hold("hot"):
                inside += 1
                assert inside == 1
                await anyio.lowlevel.checkpoint()
                inside -= 1

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(worker)
        delta = _delta(before, storage.statistics().statements)
        stats = limiter.statistics()
    # Every hold took exactly one acquire and one release: waiting cost no statement.
    assert delta["acquire_lease_slot"] == 20 and delta["release_lease_slot"] == 20
    assert stats.acquire_attempts == 20 and stats.acquires == 20
    assert stats.sessions_tracked == 0


async def test_remote_release_wakes_a_waiter_through_a_notification(storage_url: str) -> None:
    # b's clock never moves: only the release notification can wake its waiter.
    config = _config(backoff_initial_s=30, backoff_max_s=30, sweep_leases=False)
    b_clock = ManualClock()
    async with _instances(storage_url, config, clocks=[SYSTEM_CLOCK, b_clock]) as (a, b):
        release = anyio.Event()
        entered = anyio.Event()

        async def first() -> None:
            async with a.hold("s"):
                entered.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await entered.wait()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as inner:

                    async def second() -> None:
                        async with b.hold("s"):
                            pass

                    inner.start_soon(second)
                    # b's first attempt failed once it waits out its backoff on its clock.
                    await b_clock.wait_sleepers(1)
                    release.set()
        assert b.statistics().acquire_attempts == 2


async def test_lease_loss_fires_the_session_cancel_token(storage: AsyncStorageBackend) -> None:
    config = _config(lease_ttl_s=1.0, renew_interval_s=0.05)
    async with (
        open_cancellation(storage) as registry,
        open_session_limiter(storage, config, cancellation=registry) as limiter,
        registry.open_token("s") as token,
        limiter.hold("s") as held,
    ):
        # Someone removes the lease (an operator, or a sweep after a pause): renewal fails.
        await storage.delete_session("s")
        with anyio.fail_after(5):
            reason = await token.wait()
        assert "lease lost" in reason and held.lost
        with pytest.raises(LeaseLost):
            await storage.append_messages("s", [NewMessage("user", "x")], lease_token=held.token)
    assert limiter.statistics().leases_lost == 1


async def test_cancelling_a_waiter_leaves_nothing_held(storage: AsyncStorageBackend) -> None:
    async with open_session_limiter(storage, _config(max_running=1)) as limiter:
        async with limiter.hold("a"):
            with anyio.move_on_after(0.2) as scope:
                async with limiter.hold("b"):
                    pytest.fail("the cap is 1")
            assert scope.cancelled_caught
            stats = limiter.statistics()
            assert stats.waiters == 0 and stats.cap_waiters == 0 and stats.holders == 1
        async with limiter.hold("b") as held:
            assert held.token > 0
    assert await storage.get_lease("a") is None and await storage.get_lease("b") is None


async def test_held_lease_is_renewed_in_the_background(storage: AsyncStorageBackend) -> None:
    # Each renewal is due when the test moves the limiter's clock (none comes late under
    # load); the database moves the lease's expiry on, from its own time, at each one.
    config = _config(lease_ttl_s=30, renew_interval_s=10, sweep_leases=False)
    clock = ManualClock()
    async with (
        open_session_limiter(storage, config, clock=clock) as limiter,
        limiter.hold("s") as held,
    ):
        expiries = [held.expires_at]
        for _ in range(2):
            await clock.wait_sleepers(1)  # the renewal loop waits for its next turn
            clock.advance(config.effective_renew_interval_s)
            await wait_for(lambda: held.expires_at > expiries[-1], what="a renewal")
            expiries.append(held.expires_at)
        assert not held.lost
        lease = await storage.get_lease("s")
        assert lease is not None and lease.expires_at == held.expires_at
        await storage.append_messages("s", [NewMessage("user", "x")], lease_token=held.token)
    assert limiter.statistics().renewals >= 2


def test_config_refuses_a_renewal_slower_than_the_ttl() -> None:
    with pytest.raises(ValueError, match="renew_interval_s"):
        LimiterConfig(lease_ttl_s=1, renew_interval_s=2)
    assert LimiterConfig(lease_ttl_s=3).effective_renew_interval_s == 1.0


async def test_remote_waiter_asks_once_while_the_holder_holds(storage_url: str) -> None:
    # A fallback far beyond the hold: any retry during the hold would be a poll.
    config = _config(backoff_initial_s=30, backoff_max_s=30, sweep_leases=False)
    b_clock = ManualClock()
    async with _instances(storage_url, config, clocks=[SYSTEM_CLOCK, b_clock]) as (a, b):
        b_storage = b._storage
        entered = anyio.Event()
        release = anyio.Event()
        done = anyio.Event()

        async def holder() -> None:
            async with a.hold("s"):
                entered.set()
                await release.wait()

        async def waiter() -> None:
            async with b.hold("s"):
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await entered.wait()
            before = b_storage.statistics().statements
            tg.start_soon(waiter)
            await b_clock.wait_sleepers(1)  # b asked, and now waits out its fallback
            b_clock.advance(14.0)  # a long turn, short of the jittered fallback (15-30 s)
            await anyio.wait_all_tasks_blocked()
            assert b_clock.sleepers == 1
            during = _delta(before, b_storage.statistics().statements)
            assert during == Counter({"acquire_lease_slot": 1}) or (
                # SQLite marks the busy lease contended in a second statement.
                during == Counter({"acquire_lease_slot": 1, "_lease_contended": 1})
            ), during
            assert b.statistics().waiters == 1
            release.set()
            with anyio.fail_after(10):
                await done.wait()
        after = _delta(before, b_storage.statistics().statements)
    assert after["acquire_lease_slot"] == 2 and after["release_lease_slot"] == 1
    stats = b.statistics()
    assert stats.acquire_attempts == 2 and stats.wakeups == 1 and stats.fallback_retries == 0


async def test_fallback_backoff_bounds_a_missed_wakeup(storage: AsyncStorageBackend) -> None:
    # A holder outside the limiter releases without notifying (plain release_lease): only the
    # fallback backoff can notice, and it must.
    outside = (await storage.acquire_lease_slot("s", "outside", 30)).lease
    assert outside is not None
    clock = ManualClock()
    config = _config(sweep_leases=False)
    async with open_session_limiter(storage, config, clock=clock) as limiter:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    async with limiter.hold("s") as held:
                        assert held.token > outside.token

                tg.start_soon(waiter)
                await clock.wait_sleepers(1)  # its attempt failed: it waits, with no wake-up
                assert await storage.release_lease("s", outside.token)
                clock.advance(config.backoff_max_s)  # the fallback is due
        stats = limiter.statistics()
    assert stats.fallback_retries >= 1 and stats.wakeups == 0


async def test_cap_waiters_wait_for_a_slot_release_without_asking(storage_url: str) -> None:
    config = _config(max_running=1, backoff_initial_s=30, backoff_max_s=30, sweep_leases=False)
    running = 0
    peak = 0
    b_clock = ManualClock()
    async with _instances(storage_url, config, clocks=[SYSTEM_CLOCK, b_clock]) as (a, b):
        b_storage = b._storage
        entered = anyio.Event()
        release = anyio.Event()
        all_done = anyio.Event()
        finished: list[int] = []

        async def holder() -> None:
            async with a.hold("held"):
                entered.set()
                await release.wait()

        async def capped(i: int) -> None:
            nonlocal running, peak
            async with b.hold(f"w{i}"):
                running += 1
                peak = max(peak, running)
                await anyio.lowlevel.checkpoint()
                running -= 1
            finished.append(i)
            if len(finished) == 6:
                all_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await entered.wait()
            before = b_storage.statistics().statements
            for i in range(5):
                tg.start_soon(capped, i)
            # Arriving together, each asks once and finds the pool full.
            await wait_for(lambda: b.statistics().cap_waiters == 5, what="5 cap waiters")
            await b_clock.wait_sleepers(1)  # the first of them waits out its fallback
            assert b.statistics().acquire_attempts == 5
            assert _delta(before, b_storage.statistics().statements)
            quiet = b_storage.statistics().statements
            tg.start_soon(capped, 5)
            await wait_for(lambda: b.statistics().cap_waiters == 6, what="the late arrival")
            b_clock.advance(14.0)  # time passes, short of the jittered fallback (15-30 s)
            await anyio.wait_all_tasks_blocked()
            # While the pool stays full nobody asks again, and a late arrival queues behind
            # the local cap waiters without asking at all.
            assert b.statistics().cap_waiters == 6 and b.statistics().acquire_attempts == 5
            assert not _delta(quiet, b_storage.statistics().statements)
            release.set()
            with anyio.fail_after(20):
                await all_done.wait()
        stats = b.statistics()
    assert peak == 1 and stats.fallback_retries == 0 and stats.cap_waiters == 0
    # After the release each hold asked at most twice: once on its turn (the pool may still
    # be full) and once woken by the release that freed a slot.
    assert stats.acquire_attempts <= 5 + 2 * 6


async def test_capped_db_poll_takes_a_slot_of_the_shared_pool(storage: AsyncStorageBackend) -> None:
    """Both modes count the same thing: a legacy hold fills the slot a two_level one needs."""
    pool = f"pool-{uuid.uuid4().hex[:10]}"
    legacy_config = _config(mode="db_poll", max_running=1, slot_pool=pool)
    optimized_config = _config(
        max_running=1, slot_pool=pool, backoff_initial_s=30, backoff_max_s=30
    )
    async with (
        open_session_limiter(storage, legacy_config, instance_id="legacy") as legacy,
        open_session_limiter(storage, optimized_config, instance_id="new") as optimized,
    ):
        release = anyio.Event()
        held_legacy = anyio.Event()
        order: list[str] = []

        async def old_path() -> None:
            before = storage.statistics().statements
            async with legacy.hold("a"):
                taken = _delta(before, storage.statistics().statements)
                assert taken["acquire_lease_slot"] == 1 and "acquire_lease" not in taken
                order.append("legacy in")
                held_legacy.set()
                await release.wait()
                order.append("legacy out")

        async def new_path() -> None:
            await held_legacy.wait()
            async with optimized.hold("b"):
                order.append("optimized in")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(old_path)
                tg.start_soon(new_path)
                await held_legacy.wait()
                # b's attempt finds the only slot taken (one attempt, then it waits).
                # The limiter has no event for a failed attempt: watch its statistics for
                # the waiter queued after the failed attempt (the attempt counter moves
                # before the statement runs: an attempt still in flight when the release
                # came could take the slot without a wake-up, as seen under load).
                await wait_for(lambda: optimized.statistics().cap_waiters >= 1)
                assert order == ["legacy in"]
                release.set()
        # The legacy release notified the pool's waiter (its backoff is 30 s).
        assert order == ["legacy in", "legacy out", "optimized in"]
        assert optimized.statistics().wakeups >= 1


async def test_an_uncapped_db_poll_release_wakes_a_two_level_waiter(
    storage: AsyncStorageBackend,
) -> None:
    """Mixed rollout, no cap: a session held on the legacy path and wanted on the optimized
    one. The waiter's fallback backoff is 30 s, so only the release's notification can
    hand it the lease within the test's bound."""
    legacy_config = _config(mode="db_poll")
    optimized_config = _config(backoff_initial_s=30, backoff_max_s=30)
    async with (
        open_session_limiter(storage, legacy_config, instance_id="legacy") as legacy,
        open_session_limiter(storage, optimized_config, instance_id="new") as optimized,
    ):
        release = anyio.Event()
        held_legacy = anyio.Event()
        got_it = anyio.Event()

        async def old_path() -> None:
            async with legacy.hold("shared"):
                held_legacy.set()
                await release.wait()

        async def new_path() -> None:
            await held_legacy.wait()
            async with optimized.hold("shared"):
                got_it.set()

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(old_path)
                tg.start_soon(new_path)
                await held_legacy.wait()
                # The waiter's one attempt marks the lease contended, then it waits.
                await wait_for(lambda: optimized.statistics().acquire_attempts >= 1)
                assert not got_it.is_set()
                release.set()
                await got_it.wait()
