"""PasswordHasher (off-loop argon2, rehash on verify, bounds) and LoginAttemptLimiter."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from asyncstore.orchestrator.auth import (
    AttemptLimiterConfig,
    HashingOverloaded,
    InvalidHash,
    LoginAttemptLimiter,
    LoginLocked,
    PasswordHasher,
    PasswordHashingConfig,
    PasswordTooLong,
    check_login,
)
from asyncstore.orchestrator.metrics import Metrics, open_loop_lag_monitor
from tests.waiting import wait_for

FAST = PasswordHashingConfig(time_cost=1, memory_cost=64, parallelism=1, max_concurrent=2)
# Heavy enough (~25 ms per verify) that running it on the loop is plainly visible.
MEASURED = PasswordHashingConfig(time_cost=2, memory_cost=16384, parallelism=1, max_concurrent=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_verify_accepts_the_password_and_rejects_others() -> None:
    hasher = PasswordHasher(FAST)
    stored = await hasher.hash("correct horse")
    assert stored.startswith("$argon2id$")
    assert (await hasher.verify(stored, "correct horse")).ok
    wrong = await hasher.verify(stored, "wrong")
    assert not wrong.ok and not wrong.needs_rehash
    stats = hasher.statistics()
    assert (stats.hashes, stats.verified, stats.mismatched) == (1, 1, 1)
    assert stats.busy_s > 0


async def test_corrupt_hash_and_long_password_are_named_errors() -> None:
    hasher = PasswordHasher(FAST.model_copy(update={"max_password_bytes": 8}))
    with pytest.raises(InvalidHash):
        await hasher.verify("$2b$12$notargon", "pw")
    with pytest.raises(PasswordTooLong):
        await hasher.hash("x" * 9)
    assert hasher.statistics().invalid == 1


async def test_verify_returns_a_new_hash_when_parameters_changed() -> None:
    old = PasswordHasher(FAST)
    stored = await old.hash("pw")
    new = PasswordHasher(FAST.model_copy(update={"time_cost": 2}))
    assert new.needs_rehash(stored) and not old.needs_rehash(stored)

    result = await new.verify(stored, "pw")
    assert result.ok and result.needs_rehash and result.new_hash is not None
    assert "t=2" in result.new_hash
    again = await new.verify(result.new_hash, "pw")
    assert again.ok and not again.needs_rehash
    assert not (await new.verify(stored, "other")).needs_rehash  # no rehash on a mismatch
    assert new.statistics().rehashed == 1


async def test_hashing_refuses_when_the_queue_is_full() -> None:
    hasher = PasswordHasher(FAST.model_copy(update={"max_concurrent": 1, "max_waiting": 0}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(hasher.hash, "first")
        with anyio.fail_after(5):
            while hasher.statistics().running == 0:
                await anyio.lowlevel.checkpoint()
        # The slot cannot be released before this synchronous prefix yields to the loop.
        with pytest.raises(HashingOverloaded):
            await hasher.hash("second")
    assert hasher.statistics().overloaded == 1


async def _lag_during_verifies(config: PasswordHashingConfig, n: int = 50) -> float:
    hasher = PasswordHasher(config)
    stored = await hasher.hash("pw")
    async with open_loop_lag_monitor(Metrics(), interval_s=0.005) as monitor:
        await wait_for(lambda: monitor.statistics().samples >= 2, what="the monitor running")
        monitor.reset()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(hasher.verify, stored, "pw")
        # The monitor's next wake-up records how long the loop was held.
        taken = monitor.statistics().samples
        await wait_for(lambda: monitor.statistics().samples > taken, what="a sample after")
        assert hasher.statistics().verified == n
        return monitor.statistics().max_s


async def test_hashing_off_loop_keeps_the_event_loop_responsive() -> None:
    off_loop = await _lag_during_verifies(MEASURED)
    inline = await _lag_during_verifies(MEASURED.model_copy(update={"off_loop": False}))
    # Generous bound: one verify takes ~25 ms; inline, 50 of them block the loop in a row.
    assert off_loop < 0.1, off_loop
    assert inline > 0.3, inline
    assert inline > 4 * off_loop


def _limiter(clock: FakeClock, **overrides: float) -> LoginAttemptLimiter:
    cfg = AttemptLimiterConfig(
        max_failures_per_account=3,
        max_failures_per_address=5,
        window_s=60,
        lockout_base_s=10,
        lockout_max_s=35,
        **overrides,  # type: ignore[arg-type]
    )
    return LoginAttemptLimiter(cfg, clock=clock)


def test_limiter_locks_out_and_grows_the_lockout_exponentially() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    lockouts = []
    for _ in range(4):
        for _ in range(3):
            limiter.check("alice", f"10.0.0.{clock.now}")
            limiter.record_failure("alice", f"10.0.0.{clock.now}")
        with pytest.raises(LoginLocked) as locked:
            limiter.check("alice", "10.9.9.9")
        assert locked.value.scope == "account"
        lockouts.append(locked.value.retry_after_s)
        clock.now += locked.value.retry_after_s - 0.5
        with pytest.raises(LoginLocked):
            limiter.check("alice", "10.9.9.9")
        clock.now += 0.5  # recovers exactly when the lockout ends
        limiter.check("alice", "10.9.9.9")
    assert lockouts == [10, 20, 35, 35]  # doubling, capped at lockout_max_s
    stats = limiter.statistics()
    assert stats.lockouts["account"] == 4 and stats.rejected["account"] == 8


def test_limiter_window_slides_and_success_resets_the_account() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    limiter.record_failure("bob", "a1")
    limiter.record_failure("bob", "a1")
    clock.now += 61  # those two fell out of the window
    limiter.record_failure("bob", "a1")
    limiter.record_failure("bob", "a1")
    limiter.check("bob", "a1")
    limiter.record_success("bob", "a1")
    limiter.record_failure("bob", "a1")
    limiter.record_failure("eve", "a1")
    limiter.record_failure("eve", "a1")  # the fifth for the address within its window
    with pytest.raises(LoginLocked) as locked:
        limiter.check("carol", "a1")
    assert locked.value.scope == "address"  # the address kept its count across the success
    limiter.check("bob", "a2")  # but bob's own count restarted


def test_limiter_forgets_idle_keys_and_bounds_memory() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, max_keys=100, forget_after_s=120)
    for i in range(500):
        limiter.record_failure(f"user{i}", "spray")
    assert limiter.statistics().accounts_tracked <= 100
    clock.now += 121
    limiter.record_failure("late", "elsewhere")
    assert limiter.statistics().accounts_tracked == 1


async def test_locked_login_is_refused_before_any_hashing() -> None:
    clock = FakeClock()
    hasher = PasswordHasher(FAST)
    limiter = _limiter(clock)
    stored = await hasher.hash("secret")
    for _ in range(3):
        result = await check_login(
            hasher, limiter, account="dave", address="ip", stored_hash=stored, password="no"
        )
        assert not result.ok
    before = hasher.statistics()
    with pytest.raises(LoginLocked):
        await check_login(
            hasher, limiter, account="dave", address="ip", stored_hash=stored, password="secret"
        )
    after = hasher.statistics()
    assert (after.verified, after.mismatched) == (before.verified, before.mismatched)
    clock.now += 10
    ok = await check_login(
        hasher, limiter, account="dave", address="ip", stored_hash=stored, password="secret"
    )
    assert ok.ok


async def test_unknown_account_costs_a_verification_and_fails() -> None:
    hasher = PasswordHasher(FAST)
    limiter = LoginAttemptLimiter(clock=FakeClock())
    result = await check_login(
        hasher, limiter, account="ghost", address="ip", stored_hash=None, password="pw"
    )
    assert not result.ok
    assert hasher.statistics().mismatched == 1
    assert limiter.statistics().failures == 1


# Slow enough (~1 ms per verify) that verifications overlap; 50 guesses in flight at once.
BURST = PasswordHashingConfig(time_cost=1, memory_cost=1024, parallelism=1, max_concurrent=2)


async def _burst(
    hasher: PasswordHasher,
    limiter: LoginAttemptLimiter,
    stored: str | None,
    logins: list[tuple[str, str]],
) -> int:
    """Fire every (account, address) login at once with a wrong password; count refusals."""
    refused = 0

    async def attempt(account: str, address: str) -> None:
        nonlocal refused
        try:
            result = await check_login(
                hasher, limiter, account=account, address=address, stored_hash=stored, password="x"
            )
        except LoginLocked:
            refused += 1
        else:
            assert not result.ok

    async with anyio.create_task_group() as tg:
        for account, address in logins:
            tg.start_soon(attempt, account, address)
    return refused


async def test_concurrent_wrong_passwords_cost_at_most_the_limit_in_verifications() -> None:
    hasher = PasswordHasher(BURST)
    limiter = LoginAttemptLimiter(AttemptLimiterConfig(max_failures_per_account=5))
    stored = await hasher.hash("secret")
    refused = await _burst(hasher, limiter, stored, [("alice", f"10.0.0.{i}") for i in range(50)])
    verified = hasher.statistics().mismatched
    assert verified <= 5, verified  # before the fix: 50 verifications, none refused
    assert refused == 50 - verified
    stats = limiter.statistics()
    assert stats.in_flight == 0 and stats.failures == verified


async def test_concurrent_wrong_passwords_from_one_address_are_limited_per_address() -> None:
    hasher = PasswordHasher(BURST)
    limiter = LoginAttemptLimiter(AttemptLimiterConfig(max_failures_per_address=5))
    logins = [(f"user{i}", "203.0.113.7") for i in range(50)]
    refused = await _burst(hasher, limiter, None, logins)  # unknown accounts: dummy verifies
    assert hasher.statistics().mismatched <= 5
    assert refused >= 45
    with pytest.raises(LoginLocked) as locked:
        await check_login(
            hasher, limiter, account="new", address="203.0.113.7", stored_hash=None, password="x"
        )
    assert locked.value.scope == "address"
    ok = await check_login(  # the accounts themselves are not locked, from elsewhere
        hasher, limiter, account="user1", address="198.51.100.1", stored_hash=None, password="x"
    )
    assert not ok.ok


async def test_cancelled_or_failed_verification_releases_its_attempt() -> None:
    hasher = PasswordHasher(FAST)
    limiter = LoginAttemptLimiter(AttemptLimiterConfig(max_failures_per_account=2))
    stored = await hasher.hash("secret")
    for _ in range(5):
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled at the verification's first checkpoint
            await check_login(
                hasher, limiter, account="gus", address="ip", stored_hash=stored, password="x"
            )
        with pytest.raises(InvalidHash):
            await check_login(
                hasher, limiter, account="gus", address="ip", stored_hash="$bad", password="x"
            )
    stats = limiter.statistics()
    assert stats.in_flight == 0 and stats.failures == 0
    # Nothing was counted: the account still has both of its attempts.
    for _ in range(2):
        result = await check_login(
            hasher, limiter, account="gus", address="ip", stored_hash=stored, password="x"
        )
        assert not result.ok
    with pytest.raises(LoginLocked):
        await check_login(
            hasher, limiter, account="gus", address="ip", stored_hash=stored, password="secret"
        )


async def test_dummy_hash_is_made_when_the_hasher_starts() -> None:
    hasher = PasswordHasher(FAST)
    # Before any login: the dummy hash exists and uses the configured parameters, so an
    # unknown account's first login costs one verification like every other login.
    assert hasher.dummy_hash.startswith("$argon2id$")
    assert not hasher.needs_rehash(hasher.dummy_hash)
    await hasher.verify_unknown_account("pw")
    stats = hasher.statistics()
    assert (stats.hashes, stats.mismatched) == (0, 1)  # no hash on the login path


def test_attempts_mode_is_a_setting_with_memory_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncstore.orchestrator.config import load_settings

    assert load_settings().auth.attempts.mode == "memory"
    monkeypatch.setenv("ASYNCSTORE_AUTH__ATTEMPTS__MODE", "storage")
    assert load_settings().auth.attempts.mode == "storage"
    monkeypatch.setenv("ASYNCSTORE_AUTH__ATTEMPTS__MODE", "redis")
    with pytest.raises(ValueError, match="mode"):
        load_settings()


def test_the_auth_module_still_names_the_hashing_objects_that_moved() -> None:
    from asyncstore.orchestrator import auth, errors, passwords

    for name in passwords.__all__:
        assert getattr(auth, name) is getattr(passwords, name), name
        assert name in auth.__all__, name
    for name in ("AuthError", "InvalidHash", "PasswordTooLong", "HashingOverloaded", "LoginLocked"):
        assert getattr(auth, name) is getattr(errors, name), name
        assert name in auth.__all__, name
