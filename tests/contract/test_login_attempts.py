"""Login attempt counts in storage: atomic reservation, lockout growth, release, purge."""

from __future__ import annotations

import anyio
import pytest

from asyncstore.storage import AsyncStorageBackend, InvalidInput
from asyncstore.storage.base import LoginPolicy, LoginSlot

POLICY = LoginPolicy(
    limit=3,
    window_s=300.0,
    lockout_base_s=10.0,
    lockout_factor=2.0,
    lockout_max_s=35.0,
    forget_after_s=86_400.0,
)


async def test_concurrent_reservations_never_exceed_the_limit(
    storage: AsyncStorageBackend,
) -> None:
    granted: list[float] = []

    async def reserve() -> None:
        slot = await storage.reserve_login_attempt("account", "alice", POLICY)
        if slot.granted:
            granted.append(slot.window_start)
        else:
            assert not slot.locked and 0 < slot.retry_after_s <= 1.0

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(reserve)
    assert len(granted) == POLICY.limit  # in-flight attempts count
    assert len(set(granted)) == 1
    # Released attempts give their place back; other keys and scopes are separate.
    await storage.finish_login_attempt("account", "alice", granted[0], "release", POLICY)
    again = await storage.reserve_login_attempt("account", "alice", POLICY)
    assert again.granted and again.window_start == granted[0]
    assert (await storage.reserve_login_attempt("address", "alice", POLICY)).granted
    assert (await storage.reserve_login_attempt("account", "bob", POLICY)).granted


async def test_failures_lock_out_and_the_lockout_grows_to_its_cap(
    storage: AsyncStorageBackend,
) -> None:
    tripped = []
    for _ in range(POLICY.limit):
        slot = await storage.reserve_login_attempt("account", "carol", POLICY)
        assert slot.granted
        tripped.append(
            await storage.finish_login_attempt(
                "account", "carol", slot.window_start, "failure", POLICY
            )
        )
    assert tripped == [False, False, True]
    refused = await storage.reserve_login_attempt("account", "carol", POLICY)
    assert not refused.granted and refused.locked
    assert 9.0 < refused.retry_after_s <= 10.0
    # The next lockout grows by the factor, up to the cap: a short first lockout (waited
    # out), then 0.05 x 100 = 5 s capped at 3 s.
    quick = POLICY._replace(lockout_base_s=0.05, lockout_factor=100.0, lockout_max_s=3.0)
    for _ in range(2):
        for _ in range(quick.limit):
            slot = await _reserve_when_open(storage, "dave", quick)
            start = slot.window_start
            await storage.finish_login_attempt("account", "dave", start, "failure", quick)
    second = await storage.reserve_login_attempt("account", "dave", quick)
    assert second.locked and 2.0 < second.retry_after_s <= 3.0


async def test_success_forgets_the_account_and_keeps_others_in_flight(
    storage: AsyncStorageBackend,
) -> None:
    first = await storage.reserve_login_attempt("account", "erin", POLICY)
    await storage.finish_login_attempt("account", "erin", first.window_start, "failure", POLICY)
    second = await storage.reserve_login_attempt("account", "erin", POLICY)
    pending = await storage.reserve_login_attempt("account", "erin", POLICY)
    assert second.granted and pending.granted
    assert not (await storage.reserve_login_attempt("account", "erin", POLICY)).granted
    await storage.finish_login_attempt("account", "erin", second.window_start, "success", POLICY)
    # The failure is forgotten; the attempt still in flight keeps its place.
    grants = [await storage.reserve_login_attempt("account", "erin", POLICY) for _ in range(3)]
    assert [g.granted for g in grants] == [True, True, False]


async def test_purge_deletes_idle_unlocked_counts(storage: AsyncStorageBackend) -> None:
    for _ in range(POLICY.limit - 1):
        s = await storage.reserve_login_attempt("address", "10.0.0.1", POLICY)
        await storage.finish_login_attempt("address", "10.0.0.1", s.window_start, "failure", POLICY)
    for _ in range(POLICY.limit):
        s = await storage.reserve_login_attempt("account", "frank", POLICY)
        await storage.finish_login_attempt("account", "frank", s.window_start, "failure", POLICY)
    assert await storage.purge_login_attempts(3600) == 0
    assert await storage.purge_login_attempts(0) >= 1
    assert not (await storage.reserve_login_attempt("account", "frank", POLICY)).granted  # kept
    # The address's two failures were purged: it has its whole limit again.
    grants = [await storage.reserve_login_attempt("address", "10.0.0.1", POLICY) for _ in range(3)]
    assert all(g.granted for g in grants)


async def test_login_attempts_refuse_bad_input(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput):
        await storage.reserve_login_attempt("user", "alice", POLICY)
    with pytest.raises(InvalidInput):
        await storage.reserve_login_attempt("account", "", POLICY)
    with pytest.raises(InvalidInput):
        await storage.reserve_login_attempt("account", "a", POLICY._replace(limit=0))
    with pytest.raises(InvalidInput):
        await storage.reserve_login_attempt("account", "a", POLICY._replace(window_s=-1.0))
    with pytest.raises(InvalidInput):
        await storage.finish_login_attempt("account", "a", 0.0, "maybe", POLICY)
    with pytest.raises(InvalidInput):
        await storage.finish_login_attempt("account", "a", float("nan"), "release", POLICY)
    with pytest.raises(InvalidInput):
        await storage.purge_login_attempts(-1)
    # Nothing was written by the refused calls: "a" has its whole limit.
    grants = [await storage.reserve_login_attempt("account", "a", POLICY) for _ in range(3)]
    assert all(g.granted for g in grants)


async def _reserve_when_open(
    storage: AsyncStorageBackend, key: str, policy: LoginPolicy
) -> LoginSlot:
    with anyio.fail_after(10):
        while True:
            slot = await storage.reserve_login_attempt("account", key, policy)
            if slot.granted:
                return slot
            await anyio.sleep(slot.retry_after_s)  # waits for the lockout's own end (50 ms)


async def test_maintenance_sweep_purges_idle_login_attempts(storage: AsyncStorageBackend) -> None:
    from asyncstore.orchestrator.maintenance import MaintenanceConfig, open_maintenance

    key = "idle-grace"
    slot = await storage.reserve_login_attempt("account", key, POLICY)
    await storage.finish_login_attempt("account", key, slot.window_start, "failure", POLICY)
    config = MaintenanceConfig(
        enabled=False,
        stream_ttl_s=None,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=0,
    )
    async with open_maintenance(storage, config) as sweeper:
        assert await sweeper.run_once()
        assert sweeper.statistics().purged["login_attempts"] >= 1
    # The failure was forgotten with its row: the whole limit is available again.
    grants = [await storage.reserve_login_attempt("account", key, POLICY) for _ in range(3)]
    assert all(g.granted for g in grants)
