"""Login throttling that answers before any hashing, and ``check_login`` joining it to hashing.

``LoginAttemptLimiter`` counts failures per account and per client address and locks a key
out for an exponentially growing time; it needs no hashing to say no. A login reserves its
attempt before hashing (``reserve``), so attempts in flight count against the limit and a
burst of concurrent guesses gets at most the limit in verifications. Its ``memory`` mode
counts in this process (sliding window); its ``storage`` mode counts in the database
(``login_attempts``, fixed windows, one atomic statement per reservation), so a fleet
sharing one Postgres (or the processes of one host sharing one SQLite file) share one count.
Password hashing (``PasswordHasher``, off the event loop) lives in ``orchestrator.passwords``
and the errors in ``orchestrator.errors``; both are re-exported here, the auth module's
public surface. The limiter's settings, statistics and ``LoginAttempt`` live in
``orchestrator.login_types``, re-exported here too.

    AuthError (OrchestratorError; defined in ``orchestrator.errors``)
    ├── InvalidHash          the stored hash is not an argon2 hash this library can read
    ├── PasswordTooLong      the password exceeds ``max_password_bytes``
    ├── HashingOverloaded    ``max_waiting`` callers already wait for a hashing slot
    └── LoginLocked          the account or the address is locked out (``retry_after_s``)
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from types import MappingProxyType

import anyio

from asyncstore.orchestrator.errors import (
    AuthError,
    HashingOverloaded,
    InvalidHash,
    LoginLocked,
    PasswordTooLong,
)
from asyncstore.orchestrator.login_types import (  # re-exported: their historical home
    AttemptLimiterConfig,
    AttemptLimiterStatistics,
    LoginAttempt,
    Outcome,
    Scope,
    _Key,
)
from asyncstore.orchestrator.passwords import (
    HasherStatistics,
    PasswordHasher,
    PasswordHashingConfig,
    VerifyResult,
)
from asyncstore.storage.base import AsyncStorageBackend

__all__ = [
    "AttemptLimiterConfig",
    "AttemptLimiterStatistics",
    "AuthError",
    "HasherStatistics",
    "HashingOverloaded",
    "InvalidHash",
    "LoginAttempt",
    "LoginAttemptLimiter",
    "LoginLocked",
    "PasswordHasher",
    "PasswordHashingConfig",
    "PasswordTooLong",
    "VerifyResult",
    "check_login",
]

_BUSY_RETRY_S = 1.0  # attempts in flight end within one verification


class LoginAttemptLimiter:
    """Failed-login throttling per account and per client address.

    ``check_login`` is the way to use it: ``reserve`` before hashing (it raises
    ``LoginLocked`` without doing any work, and counts the attempt as in flight), then
    ``finish`` with the outcome. The synchronous ``check`` / ``record_failure`` /
    ``record_success`` remain for callers that count by hand (memory mode only; they do not
    count attempts in flight). ``clock`` is a monotonic clock in seconds for memory mode
    (injectable for tests); storage mode uses the database's clock. Keys are whatever
    identifies the account and the client (e.g. a normalized user name and an IP address or
    /64 prefix); they are never exported as metric labels.
    """

    def __init__(
        self,
        config: AttemptLimiterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        storage: AsyncStorageBackend | None = None,
    ) -> None:
        self._config = config or AttemptLimiterConfig()
        if self._config.mode == "storage" and storage is None:
            raise AuthError("auth.attempts.mode is 'storage' but no storage backend was given")
        self._storage = storage if self._config.mode == "storage" else None
        self._clock = clock
        self._keys: dict[Scope, OrderedDict[str, _Key]] = {
            "account": OrderedDict(),
            "address": OrderedDict(),
        }
        self._allowed = self._failures = self._successes = self._evicted = 0
        self._in_flight = 0
        self._rejected: dict[str, int] = {"account": 0, "address": 0}
        self._lockouts: dict[str, int] = {"account": 0, "address": 0}

    @property
    def config(self) -> AttemptLimiterConfig:
        return self._config

    def retry_after(self, account: str, address: str) -> tuple[Scope, float] | None:
        """Memory mode: the locked scope and the seconds until it opens, or None."""
        if not self._config.enabled:
            return None
        now = self._clock()
        worst: tuple[Scope, float] | None = None
        keys: tuple[tuple[Scope, str], ...] = (("account", account), ("address", address))
        for scope, key in keys:
            state = self._keys[scope].get(key)
            if state is not None and state.locked_until > now:
                wait = state.locked_until - now
                if worst is None or wait > worst[1]:
                    worst = (scope, wait)
        return worst

    async def reserve(self, account: str, address: str) -> LoginAttempt:
        """Take one attempt for the account and the address, or raise ``LoginLocked``.

        Refused when either key is locked out or when its failures plus the attempts in
        flight reach its limit (``retry_after_s`` is then about one verification). Memory
        mode never awaits. Storage mode runs one statement per scope, shielded from
        cancellation so that an attempt is never left counted without its owner knowing;
        a cancellation takes effect at the caller's next checkpoint, and the caller then
        finishes the attempt with ``release`` (``check_login`` does). Storage errors
        propagate (fail closed) and leave nothing reserved.
        """
        if not self._config.enabled:
            self._allowed += 1
            return LoginAttempt(account, address)
        if self._storage is not None:
            with anyio.CancelScope(shield=True):  # see the docstring: no orphan reservations
                attempt = await self._reserve_stored(self._storage, account, address)
        else:
            attempt = self._reserve_memory(account, address)
        self._allowed += 1
        self._in_flight += 1
        return attempt

    async def finish(self, attempt: LoginAttempt, outcome: Outcome) -> None:
        """End a reserved attempt: ``failure`` (a wrong password), ``success`` or ``release``.

        ``release`` gives the attempt back uncounted: for a verification that was cancelled
        or raised (overload, corrupt stored hash), which says nothing about the password. A
        second call for the same attempt does nothing. Storage mode runs one statement per
        scope and raises the first storage error after trying both (a scope whose statement
        failed keeps the attempt in flight until its window ends); if cancelled, the
        statement in progress completes or not, so call it shielded (``check_login`` does).
        """
        if attempt._finished:
            return
        attempt._finished = True
        if outcome == "failure":
            self._failures += 1
        elif outcome == "success":
            self._successes += 1
        if not self._config.enabled:
            return
        self._in_flight -= 1
        if self._storage is not None and attempt._windows is not None:
            await self._finish_stored(self._storage, attempt, attempt._windows, outcome)
        elif attempt._states is not None:
            self._finish_memory(attempt, attempt._states, outcome)

    def check(self, account: str, address: str) -> None:
        """Memory mode: raise ``LoginLocked`` if the account or the address is locked out.

        Costs a dictionary lookup per scope, so refusing an attacker costs no hashing. It
        does not count attempts in flight: use ``reserve`` (or ``check_login``) for that.
        """
        locked = self.retry_after(account, address)
        if locked is not None:
            self._rejected[locked[0]] += 1
            raise LoginLocked(locked[0], locked[1])
        self._allowed += 1

    def record_failure(self, account: str, address: str) -> None:
        """Memory mode: count a failed login against both keys, locking out at the limit."""
        if not self._config.enabled:
            return
        self._failures += 1
        cfg = self._config
        self._fail("account", account, cfg.max_failures_per_account)
        self._fail("address", address, cfg.max_failures_per_address)

    def record_success(self, account: str, address: str) -> None:
        """Memory mode: forget the account's failures and lockout (the address keeps its own)."""
        self._successes += 1
        self._forget_account(account)

    def statistics(self) -> AttemptLimiterStatistics:
        return AttemptLimiterStatistics(
            accounts_tracked=len(self._keys["account"]),
            addresses_tracked=len(self._keys["address"]),
            allowed=self._allowed,
            rejected=MappingProxyType(dict(self._rejected)),
            failures=self._failures,
            successes=self._successes,
            lockouts=MappingProxyType(dict(self._lockouts)),
            evicted=self._evicted,
            in_flight=self._in_flight,
        )

    # -- memory mode -------------------------------------------------------------

    def _reserve_memory(self, account: str, address: str) -> LoginAttempt:
        locked = self.retry_after(account, address)
        if locked is not None:
            self._rejected[locked[0]] += 1
            raise LoginLocked(locked[0], locked[1])
        cfg = self._config
        now = self._clock()
        wanted: tuple[tuple[Scope, str, int], ...] = (
            ("account", account, cfg.max_failures_per_account),
            ("address", address, cfg.max_failures_per_address),
        )
        # Check both scopes before taking either: nothing is awaited, so no other login
        # can run between the check and the take.
        for scope, key, limit in wanted:
            state = self._keys[scope].get(key)
            if state is None:
                continue
            self._expire(state, now)
            if len(state.failures) + state.in_flight >= limit:
                self._rejected[scope] += 1
                raise LoginLocked(scope, _BUSY_RETRY_S)
        states = (self._state("account", account, now), self._state("address", address, now))
        for state in states:
            state.in_flight += 1
        return LoginAttempt(account, address, states=states)

    def _finish_memory(
        self, attempt: LoginAttempt, states: tuple[_Key, _Key], outcome: Outcome
    ) -> None:
        for state in states:
            state.in_flight = max(0, state.in_flight - 1)
        if outcome == "failure":
            cfg = self._config
            self._fail("account", attempt.account, cfg.max_failures_per_account)
            self._fail("address", attempt.address, cfg.max_failures_per_address)
        elif outcome == "success":
            self._forget_account(attempt.account)

    def _state(self, scope: Scope, key: str, now: float) -> _Key:
        keys = self._keys[scope]
        state = keys.get(key)
        if state is None:
            self._evict(keys, now)
            state = keys[key] = _Key()
        keys.move_to_end(key)
        return state

    def _forget_account(self, account: str) -> None:
        keys = self._keys["account"]
        state = keys.get(account)
        if state is None:
            return
        if state.in_flight == 0:
            del keys[account]
            return
        # Other attempts of this account are still in flight: keep their count.
        state.failures.clear()
        state.locked_until = 0.0
        state.level = 0

    def _expire(self, state: _Key, now: float) -> None:
        window_start = now - self._config.window_s
        while state.failures and state.failures[0] <= window_start:
            state.failures.popleft()

    def _fail(self, scope: Scope, key: str, limit: int) -> None:
        cfg = self._config
        now = self._clock()
        state = self._state(scope, key, now)
        if state.level and now - state.last_failure > cfg.forget_after_s:
            state.level = 0
        state.last_failure = now
        if state.locked_until > now:
            return  # a failure that slipped through while locked does not stack lockouts
        self._expire(state, now)
        state.failures.append(now)
        if len(state.failures) >= limit:
            state.failures.clear()
            lockout = cfg.lockout_base_s * math.pow(cfg.lockout_factor, state.level)
            state.locked_until = now + min(cfg.lockout_max_s, lockout)
            state.level += 1
            self._lockouts[scope] += 1

    def _evict(self, keys: OrderedDict[str, _Key], now: float) -> None:
        # Least recently used first: drop keys that can no longer matter, then any over the
        # cap (a key over the cap goes even with attempts in flight: memory is bounded first).
        idle = max(self._config.window_s, self._config.forget_after_s)
        while keys:
            state = next(iter(keys.values()))
            stale = (
                state.in_flight == 0
                and state.locked_until <= now
                and now - state.last_failure > idle
            )
            if not stale and len(keys) < self._config.max_keys:
                return
            keys.popitem(last=False)
            self._evicted += 1

    # -- storage mode ------------------------------------------------------------

    async def _reserve_stored(
        self, storage: AsyncStorageBackend, account: str, address: str
    ) -> LoginAttempt:
        cfg = self._config
        first = await storage.reserve_login_attempt("account", account, cfg.policy("account"))
        if not first.granted:
            self._rejected["account"] += 1
            raise LoginLocked("account", first.retry_after_s)
        try:
            second = await storage.reserve_login_attempt("address", address, cfg.policy("address"))
        except BaseException:
            await storage.finish_login_attempt(
                "account", account, first.window_start, "release", cfg.policy("account")
            )
            raise
        if not second.granted:
            await storage.finish_login_attempt(
                "account", account, first.window_start, "release", cfg.policy("account")
            )
            self._rejected["address"] += 1
            raise LoginLocked("address", second.retry_after_s)
        return LoginAttempt(account, address, windows=(first.window_start, second.window_start))

    async def _finish_stored(
        self,
        storage: AsyncStorageBackend,
        attempt: LoginAttempt,
        windows: tuple[float, float],
        outcome: Outcome,
    ) -> None:
        cfg = self._config
        # A success forgets the account's failures but only releases the address.
        address_outcome: Outcome = "release" if outcome == "success" else outcome
        steps: tuple[tuple[Scope, str, float, Outcome], ...] = (
            ("account", attempt.account, windows[0], outcome),
            ("address", attempt.address, windows[1], address_outcome),
        )
        error: Exception | None = None
        for scope, key, window_start, result in steps:
            # Both scopes are tried even if one fails, so one storage error leaves at most
            # one attempt counted as in flight (until its window ends), not two.
            try:
                tripped = await storage.finish_login_attempt(
                    scope, key, window_start, result, cfg.policy(scope)
                )
            except Exception as exc:
                error = error or exc
                continue
            self._lockouts[scope] += tripped
        if error is not None:
            raise error


async def check_login(
    hasher: PasswordHasher,
    limiter: LoginAttemptLimiter,
    *,
    account: str,
    address: str,
    stored_hash: str | None,
    password: str | bytes,
) -> VerifyResult:
    """One login: reserve an attempt, verify (a dummy verification for unknown accounts),
    record the outcome.

    Raises ``LoginLocked`` before any hashing when the account or the address is locked out
    or already has its limit of attempts in flight, so N concurrent guesses cost at most the
    limit in verifications. ``stored_hash=None`` means no such account: the same work is
    done and the result fails. A result with ``new_hash`` asks the caller to store the
    rehashed password. A wrong password counts as a failure against both keys; a success
    resets the account. If the verification is cancelled or raises (``HashingOverloaded``,
    ``InvalidHash``, ``PasswordTooLong``), the attempt is released uncounted: the caller
    learned nothing about the password. Once the verification has returned, its outcome is
    recorded even if the caller is cancelled meanwhile.
    """
    attempt = await limiter.reserve(account, address)
    try:
        if stored_hash is None:
            result = await hasher.verify_unknown_account(password)
        else:
            result = await hasher.verify(stored_hash, password)
    except BaseException:
        with anyio.CancelScope(shield=True):  # the reservation must be given back even now
            await limiter.finish(attempt, "release")
        raise
    with anyio.CancelScope(shield=True):  # a cancelled caller must not erase a failed guess
        await limiter.finish(attempt, "success" if result.ok else "failure")
    return result
