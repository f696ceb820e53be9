"""Contract: lease slots (global cap), release wake-ups and the legacy count, on both drivers.

Slot pools are not truncated between tests, so every test uses its own pool name.
"""

from __future__ import annotations

import uuid

import anyio
import pytest

from asyncstore.storage import AsyncStorageBackend, InvalidInput, LeaseLost, NewMessage

CHANNEL = "asyncstore.lease"


def _pool() -> str:
    return f"pool-{uuid.uuid4().hex[:10]}"


async def test_slot_cap_admits_exactly_the_number_of_slots(storage: AsyncStorageBackend) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 3)
    await storage.ensure_lease_slots(pool, 3)  # idempotent
    got = [await storage.acquire_lease_slot(f"s{i}", "h", 30, pool=pool, slots=3) for i in range(4)]
    assert [a.lease is not None for a in got] == [True, True, True, False]
    assert not got[3].slot_ok
    assert await storage.get_lease("s3") is None
    first = got[0].lease
    assert first is not None
    assert await storage.release_lease_slot("s0", first.token, channel=CHANNEL, pool=pool)
    again = await storage.acquire_lease_slot("s3", "h", 30, pool=pool, slots=3)
    assert again.lease is not None and again.slot_ok


async def test_concurrent_slot_acquirers_never_exceed_the_cap(
    storage: AsyncStorageBackend,
) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 5)
    winners: list[str] = []

    async def contend(i: int) -> None:
        attempt = await storage.acquire_lease_slot(f"c{i}", f"h{i}", 30, pool=pool, slots=5)
        if attempt.lease is not None:
            winners.append(attempt.lease.session_id)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(contend, i)
    assert len(winners) == 5


async def test_busy_session_reports_slot_ok_and_takes_no_slot(
    storage: AsyncStorageBackend,
) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 2)
    held = await storage.acquire_lease_slot("s", "a", 30, pool=pool, slots=2)
    assert held.lease is not None
    busy = await storage.acquire_lease_slot("s", "b", 30, pool=pool, slots=2)
    assert busy.lease is None and busy.slot_ok
    # The busy attempt did not keep a slot: one slot is still free for another session.
    other = await storage.acquire_lease_slot("t", "b", 30, pool=pool, slots=2)
    assert other.lease is not None


async def test_uncapped_acquire_and_release_are_one_statement_each(
    storage: AsyncStorageBackend,
) -> None:
    before = storage.statistics().statements
    attempt = await storage.acquire_lease_slot("s", "h", 30)
    assert attempt.lease is not None and attempt.slot_ok
    assert await storage.release_lease_slot("s", attempt.lease.token, channel=CHANNEL)
    after = storage.statistics().statements
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    # Both dialects: the token is allocated inside the acquiring statement.
    assert delta == {"acquire_lease_slot": 1, "release_lease_slot": 1}


async def test_tokens_grow_across_slot_and_plain_acquires(storage: AsyncStorageBackend) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 2)
    tokens: list[int] = []
    for i in range(3):
        slot = (await storage.acquire_lease_slot(f"a{i}", "h", 30, pool=pool, slots=2)).lease
        plain = await storage.acquire_lease(f"b{i}", "h", 30)
        uncapped = (await storage.acquire_lease_slot(f"c{i}", "h", 30)).lease
        assert slot is not None and plain is not None and uncapped is not None
        tokens += [slot.token, plain.token, uncapped.token]
        assert await storage.release_lease_slot(f"a{i}", slot.token, channel=CHANNEL, pool=pool)
    # A takeover of an expired lease gets a new, larger token too; so does one after a sweep.
    short = (await storage.acquire_lease_slot("t", "h", 0.05)).lease
    assert short is not None
    await anyio.sleep(0.1)
    taken = (await storage.acquire_lease_slot("t", "h2", 30)).lease
    assert taken is not None
    await storage.delete_session("t")
    await storage.expire_leases(0)
    again = (await storage.acquire_lease_slot("t", "h3", 30)).lease
    assert again is not None
    tokens += [short.token, taken.token, again.token]
    assert tokens == sorted(set(tokens)), tokens


async def test_release_notifies_only_when_someone_waited(storage: AsyncStorageBackend) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 1)
    async with storage.listen(CHANNEL) as stream:
        quiet = (await storage.acquire_lease_slot("s", "a", 30, pool=pool, slots=1)).lease
        assert quiet is not None
        assert await storage.release_lease_slot("s", quiet.token, channel=CHANNEL, pool=pool)
        held = (await storage.acquire_lease_slot("s", "a", 30, pool=pool, slots=1)).lease
        assert held is not None
        busy = await storage.acquire_lease_slot("s", "b", 30)  # uncapped: sees the busy lease
        full = await storage.acquire_lease_slot("t", "b", 30, pool=pool, slots=1)
        assert busy.slot_ok and not full.slot_ok
        assert await storage.release_lease_slot("s", held.token, channel=CHANNEL, pool=pool)
        await storage.notify(CHANNEL, "marker")
        with anyio.fail_after(5):
            got = [(await stream.receive()).payload for _ in range(3)]
    assert sorted(got[:2]) == [f"p:{pool}", "s:s"] and got[2] == "marker"


async def test_slot_lease_is_fenced_and_renewed_with_its_slot(
    storage: AsyncStorageBackend,
) -> None:
    pool = _pool()
    await storage.ensure_lease_slots(pool, 1)
    crashed = (await storage.acquire_lease_slot("s", "crashed", 0.2, pool=pool, slots=1)).lease
    assert crashed is not None
    await anyio.sleep(0.3)
    # The slot expired with the lease: another session can take it.
    # Long enough that a stalled loop cannot expire it before the renewal below.
    taker = (await storage.acquire_lease_slot("s", "taker", 1.0, pool=pool, slots=1)).lease
    assert taker is not None and taker.token > crashed.token
    with pytest.raises(LeaseLost):
        await storage.renew_lease_slot("s", crashed.token, 30, pool=pool)
    assert not await storage.release_lease_slot("s", crashed.token, channel=CHANNEL, pool=pool)
    with pytest.raises(LeaseLost):
        await storage.append_messages("s", [NewMessage("user", "x")], lease_token=crashed.token)
    renewed = await storage.renew_lease_slot("s", taker.token, 30, pool=pool)
    assert renewed.expires_at > taker.expires_at
    await anyio.sleep(1.1)  # database time: past the taker's own 1 s lease
    # The renewal extended the slot too: the pool is still full.
    assert not (await storage.acquire_lease_slot("t", "x", 30, pool=pool, slots=1)).slot_ok
    await storage.append_messages("s", [NewMessage("user", "y")], lease_token=taker.token)


async def test_count_leases_counts_live_leases_only(storage: AsyncStorageBackend) -> None:
    assert await storage.count_leases() == 0
    await storage.acquire_lease("a", "h", 30)
    await storage.acquire_lease("b", "h", 0.05)
    await anyio.sleep(0.1)
    assert await storage.count_leases() == 1


async def test_slot_operations_validate_input(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput):
        await storage.ensure_lease_slots("p", 0)
    with pytest.raises(InvalidInput):
        await storage.acquire_lease_slot("s", "h", 30, pool="p", slots=0)
    with pytest.raises(InvalidInput):
        await storage.release_lease_slot("s", 1, channel="bad channel!")
