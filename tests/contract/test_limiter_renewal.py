"""Lease renewal that hangs or fails: the holder is told before its lease can expire (so two
live holders never coexist), and failures are retried at a pace, not in a tight loop.

The database is real; only the renewal call is wrapped to hang or fail, standing in for a
stalled pool or a database that went away."""

from __future__ import annotations

import time
from typing import Any

import anyio

from asyncstore.orchestrator.locks import LimiterConfig, open_session_limiter
from asyncstore.storage import AsyncStorageBackend, Lease, StorageUnavailable


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
    config = LimiterConfig(lease_ttl_s=0.9, sweep_interval_s=100)
    async with (
        open_session_limiter(stalled, config) as limiter,  # type: ignore[arg-type]
        limiter.hold("s") as held,
    ):
        stalled.mode = "hang"
        started = time.monotonic()
        with anyio.fail_after(5):
            await held.wait_lost()
        # Told no later than the lease's own expiry (generous bound for a slow machine).
        assert time.monotonic() - started < 0.9 + 0.5
        stalled.mode = None


async def test_failing_renewals_are_retried_at_a_pace(storage: AsyncStorageBackend) -> None:
    stalled = StalledRenewals(storage)
    config = LimiterConfig(lease_ttl_s=0.9, sweep_interval_s=100)
    async with (
        open_session_limiter(stalled, config) as limiter,  # type: ignore[arg-type]
        limiter.hold("t") as held,
    ):
        stalled.calls = 0
        stalled.mode = "fail"
        with anyio.fail_after(5):
            await held.wait_lost()
        assert stalled.calls < 20  # not thousands of attempts in a tight loop
        stalled.mode = None
