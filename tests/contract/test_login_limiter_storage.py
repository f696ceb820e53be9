"""LoginAttemptLimiter in storage mode, on both drivers: a burst of wrong passwords, shared
by two limiters (two instances) on one database, costs at most the limit in verifications."""

from __future__ import annotations

import secrets

import anyio
import pytest

from asyncstore.orchestrator.auth import (
    AttemptLimiterConfig,
    AuthError,
    InvalidHash,
    LoginAttemptLimiter,
    LoginLocked,
    PasswordHasher,
    PasswordHashingConfig,
    check_login,
)
from asyncstore.storage import AsyncStorageBackend, open_storage

BURST = PasswordHashingConfig(time_cost=1, memory_cost=1024, parallelism=1, max_concurrent=2)
STORED = AttemptLimiterConfig(mode="storage", max_failures_per_account=5)


def _key(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"  # the Postgres database is shared by the run


async def _burst(
    hasher: PasswordHasher,
    limiters: list[LoginAttemptLimiter],
    stored: str | None,
    logins: list[tuple[str, str]],
) -> int:
    refused = 0

    async def attempt(i: int, account: str, address: str) -> None:
        nonlocal refused
        try:
            result = await check_login(
                hasher,
                limiters[i % len(limiters)],
                account=account,
                address=address,
                stored_hash=stored,
                password="wrong",
            )
        except LoginLocked:
            refused += 1
        else:
            assert not result.ok

    async with anyio.create_task_group() as tg:
        for i, (account, address) in enumerate(logins):
            tg.start_soon(attempt, i, account, address)
    return refused


async def test_burst_on_two_instances_costs_at_most_the_limit(
    storage: AsyncStorageBackend, storage_url: str
) -> None:
    hasher = PasswordHasher(BURST)
    stored = await hasher.hash("secret")
    account = _key("alice")
    async with open_storage(storage_url) as other:
        limiters = [
            LoginAttemptLimiter(STORED, storage=storage),
            LoginAttemptLimiter(STORED, storage=other),
        ]
        logins = [(account, f"10.0.0.{i}") for i in range(50)]
        refused = await _burst(hasher, limiters, stored, logins)
    verified = hasher.statistics().mismatched
    assert verified <= 5, verified
    assert refused == 50 - verified
    assert sum(lim.statistics().lockouts["account"] for lim in limiters) <= 1
    assert all(lim.statistics().in_flight == 0 for lim in limiters)


async def test_storage_mode_locks_out_per_address(storage: AsyncStorageBackend) -> None:
    hasher = PasswordHasher(BURST)
    limiter = LoginAttemptLimiter(
        AttemptLimiterConfig(mode="storage", max_failures_per_address=4), storage=storage
    )
    address = _key("203.0.113.7")
    refused = await _burst(hasher, [limiter], None, [(_key("u"), address) for _ in range(30)])
    assert hasher.statistics().mismatched <= 4 and refused >= 26
    with pytest.raises(LoginLocked) as locked:
        await check_login(
            hasher, limiter, account=_key("new"), address=address, stored_hash=None, password="x"
        )
    assert locked.value.scope == "address" and locked.value.retry_after_s > 0


async def test_storage_mode_success_resets_and_errors_release(
    storage: AsyncStorageBackend,
) -> None:
    hasher = PasswordHasher(BURST)
    limiter = LoginAttemptLimiter(
        AttemptLimiterConfig(mode="storage", max_failures_per_account=2), storage=storage
    )
    stored = await hasher.hash("secret")
    account, address = _key("bob"), _key("ip")

    async def login(password: str, stored_hash: str = stored) -> bool:
        result = await check_login(
            hasher,
            limiter,
            account=account,
            address=address,
            stored_hash=stored_hash,
            password=password,
        )
        return result.ok

    assert not await login("x")
    assert await login("secret")  # forgets the failure
    for _ in range(3):
        with pytest.raises(InvalidHash):
            await login("x", "$bad")  # released, not counted
        with anyio.CancelScope() as scope:
            scope.cancel()
            await login("x")  # cancelled before verifying: released
    assert limiter.statistics().in_flight == 0
    assert not await login("x")
    assert not await login("x")
    with pytest.raises(LoginLocked) as locked:
        await login("secret")
    assert locked.value.scope == "account"


def test_storage_mode_needs_a_backend() -> None:
    with pytest.raises(AuthError):
        LoginAttemptLimiter(AttemptLimiterConfig(mode="storage"))


async def test_runtime_builds_the_limiter_from_auth_attempts_mode(storage_url: str) -> None:
    from asyncstore.orchestrator.config import load_settings
    from asyncstore.orchestrator.runtime import open_runtime

    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        auth={
            "hashing": {"time_cost": 1, "memory_cost": 64, "parallelism": 1},
            "attempts": {"mode": "storage", "max_failures_per_account": 1},
        },
    )
    account = _key("rt")
    async with open_runtime(settings) as rt:
        result = await check_login(
            rt.passwords,
            rt.login_attempts,
            account=account,
            address="a",
            stored_hash=None,
            password="x",
        )
        assert not result.ok
    # The count is in the database: a fresh limiter on another handle sees the lockout.
    async with open_storage(storage_url) as other:
        limiter = LoginAttemptLimiter(settings.auth.attempts, storage=other)
        with pytest.raises(LoginLocked):
            await limiter.reserve(account, "b")
