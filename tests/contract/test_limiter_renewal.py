"""Lease renewal that hangs or fails: the holder is told before its lease can expire (so two
live holders never coexist), and failures are retried at a pace, not in a tight loop.

The database is real; only the renewal call is wrapped to hang or fail, standing in for a
stalled pool or a database that went away. The limiter's clock is a ``ManualClock`` the test
moves in small steps, so "before its lease can expire" is checked on the limiter's own
time, whatever the machine's load."""

from __future__ import annotations

from typing import Any

import anyio

from asyncstore.orchestrator.locks import HeldLease, LimiterConfig, open_session_limiter
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import AsyncStorageBackend, Lease, StorageUnavailable
from tests.waiting import wait_for

STEP_S = 0.05


async def _drive_until_lost(clock: ManualClock, held: HeldLease) -> None:
    """Move the clock ``STEP_S`` at a time, each once the renewal loop waits, until lost."""
    while True:
        await wait_for(lambda: held.lost or clock.sleepers >= 1, what="the renewal loop")
        if held.lost:
            return
        clock.advance(STEP_S)


class StalledRenewals:
    """A storage handle whose lease-slot renewals can be made to hang or fail."""

    def __init__(self, inner: AsyncStorageBackend) -> None:
        self.inner = inner
        self.mode: str | None = None
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew_lease_slot(self, *args: Any, **kwargs: Any) -> Lease:
        self.calls += 1
        if self.mode == "hang":
            await anyio.sleep(3600)
        if self.mode == "fail":
            raise StorageUnavailable("database went away")
        return await self.inner.renew_lease_slot(*args, **kwargs)


async def test_a_hanging_renewal_loses_the_lease_before_it_expires(
    storage: AsyncStorageBackend,
) -> None:
    stalled = StalledRenewals(storage)
    config = LimiterConfig(lease_ttl_s=0.9, sweep_leases=False)
    clock = ManualClock()
    acquired_at = clock.monotonic()
    async with (
        open_session_limiter(stalled, config, clock=clock) as limiter,  # type: ignore[arg-type]
        limiter.hold("s") as held,
    ):
        stalled.mode = "hang"
        await _drive_until_lost(clock, held)
        # Told before the lease's own expiry, on the limiter's clock.
        assert clock.monotonic() - acquired_at < config.lease_ttl_s
        assert stalled.calls >= 1  # a renewal was attempted and hung
        stalled.mode = None


async def test_failing_renewals_are_retried_at_a_pace(storage: AsyncStorageBackend) -> None:
    stalled = StalledRenewals(storage)
    config = LimiterConfig(lease_ttl_s=0.9, sweep_leases=False)
    clock = ManualClock()
    async with (
        open_session_limiter(stalled, config, clock=clock) as limiter,  # type: ignore[arg-type]
        limiter.hold("t") as held,
    ):
        stalled.calls = 0
        stalled.mode = "fail"
        await _drive_until_lost(clock, held)
        # 0.9 s of limiter time: a tight loop would retry thousands of times; at a pace
        # (every min(renew interval, 0.5 s)) it is a handful.
        assert 1 <= stalled.calls < 20
        assert stalled.calls <= 4
        stalled.mode = None
