"""Password hashing off the event loop, and a login attempt limiter that answers first.

``PasswordHasher`` wraps argon2-cffi. Hash and verify run on worker threads bounded by the
hasher's own ``anyio.CapacityLimiter``: argon2's C core runs through CFFI, which releases
the GIL for the call, so the event loop keeps serving while up to ``max_concurrent`` hashes
use other cores; a process pool would add pickling and process management for nothing. The
dedicated limiter (not anyio's shared default) bounds CPU and memory (``memory_cost`` KiB per
running hash) and keeps hashing from starving other ``to_thread`` users. ``off_loop=False``
is the legacy path that hashes on the loop, kept for rollback and the benchmark.
``LoginAttemptLimiter`` counts failures per account and per client address in a sliding
window and locks a key out for an exponentially growing time; it needs no hashing to say no.

    AuthError (OrchestratorError)
    ├── InvalidHash          the stored hash is not an argon2 hash this library can read
    ├── PasswordTooLong      the password exceeds ``max_password_bytes``
    ├── HashingOverloaded    ``max_waiting`` callers already wait for a hashing slot
    └── LoginLocked          the account or the address is locked out (``retry_after_s``)
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

import anyio
import anyio.to_thread
import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import OrchestratorError

__all__ = [
    "AttemptLimiterConfig",
    "AttemptLimiterStatistics",
    "AuthError",
    "HasherStatistics",
    "HashingOverloaded",
    "InvalidHash",
    "LoginAttemptLimiter",
    "LoginLocked",
    "PasswordHasher",
    "PasswordHashingConfig",
    "PasswordTooLong",
    "VerifyResult",
    "check_login",
]

T = TypeVar("T")
Scope = Literal["account", "address"]


class AuthError(OrchestratorError):
    """Base class of the errors raised by ``orchestrator.auth``."""


class InvalidHash(AuthError):
    """The stored hash cannot be parsed or verified (corrupt, or not argon2)."""


class PasswordTooLong(AuthError):
    """The password is longer than ``max_password_bytes``; nothing was hashed."""


class HashingOverloaded(AuthError):
    """Too many callers already wait for a hashing slot; nothing was hashed. Retry later."""


class LoginLocked(AuthError):
    """The account or the client address is locked out; no hashing was done."""

    def __init__(self, scope: Scope, retry_after_s: float) -> None:
        super().__init__(f"too many failed logins for this {scope}; retry in {retry_after_s:.0f} s")
        self.scope: Scope = scope
        self.retry_after_s = retry_after_s


def _default_concurrency() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class PasswordHashingConfig(BaseModel):
    """Argon2id parameters and the hashing pool's bounds (``auth.*`` in the settings tree).

    The defaults are RFC 9106's second recommendation (t=3, m=64 MiB, p=4). Changing them
    makes ``verify`` return a new hash for every stored hash made with the old ones.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_cost: int = Field(default=3, ge=1)
    memory_cost: int = Field(default=65536, ge=8, description="KiB per hash")
    parallelism: int = Field(default=4, ge=1, le=255)
    hash_len: int = Field(default=32, ge=16)
    salt_len: int = Field(default=16, ge=8)
    max_concurrent: int = Field(default_factory=_default_concurrency, ge=1)
    max_waiting: int = Field(default=1000, ge=0)
    max_password_bytes: int = Field(default=4096, ge=1)
    off_loop: bool = Field(default=True, description="False hashes on the event loop (legacy)")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of a verification. ``new_hash`` is set when the password matched but the
    stored hash used other parameters: store it in place of the old one."""

    ok: bool
    new_hash: str | None = None

    @property
    def needs_rehash(self) -> bool:
        return self.new_hash is not None

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class HasherStatistics:
    hashes: int
    verified: int  # matched
    mismatched: int
    rehashed: int
    invalid: int
    overloaded: int  # refused because max_waiting callers waited
    running: int  # hashing right now
    waiting: int  # waiting for a slot
    max_concurrent: int
    busy_s: float  # total time spent hashing, over all slots


class PasswordHasher:
    """Argon2id hashing and verification on a bounded pool of worker threads.

    Safe to share by every task of one event loop. Build one per process from settings.
    """

    def __init__(self, config: PasswordHashingConfig | None = None) -> None:
        self._config = cfg = config or PasswordHashingConfig()
        self._argon2 = argon2.PasswordHasher(
            time_cost=cfg.time_cost,
            memory_cost=cfg.memory_cost,
            parallelism=cfg.parallelism,
            hash_len=cfg.hash_len,
            salt_len=cfg.salt_len,
            type=argon2.Type.ID,
        )
        self._limiter = anyio.CapacityLimiter(cfg.max_concurrent)
        self._dummy_hash: str | None = None
        self._hashes = self._verified = self._mismatched = self._rehashed = 0
        self._invalid = self._overloaded = 0
        self._busy_s = 0.0

    @property
    def config(self) -> PasswordHashingConfig:
        return self._config

    async def hash(self, password: str | bytes) -> str:
        """Hash a password with the configured parameters (a fresh random salt each time).

        Raises ``PasswordTooLong`` or ``HashingOverloaded`` before any work. If cancelled
        while waiting for a slot, nothing runs; once a hash has started on its thread, the
        cancellation takes effect when that hash ends (tens of milliseconds).
        """
        self._check_length(password)
        result = await self._run(self._argon2.hash, password)
        self._hashes += 1
        return result

    async def verify(self, stored_hash: str, password: str | bytes) -> VerifyResult:
        """Check ``password`` against ``stored_hash``; a mismatch is ``ok=False``, not an error.

        When the password matches and ``stored_hash`` was made with other parameters, the
        result carries ``new_hash`` (computed in the same pool slot) for the caller to store.
        Raises ``InvalidHash`` for a stored value that is not a readable argon2 hash,
        ``PasswordTooLong`` or ``HashingOverloaded`` before any work. Cancellation behaves
        as for ``hash``.
        """
        self._check_length(password)
        try:
            result = await self._run(self._verify_sync, stored_hash, password)
        except InvalidHash:
            self._invalid += 1
            raise
        if not result.ok:
            self._mismatched += 1
        else:
            self._verified += 1
            self._rehashed += result.needs_rehash
        return result

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` used parameters other than the configured ones (cheap)."""
        try:
            return self._argon2.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError) as exc:
            raise InvalidHash("stored hash is not a readable argon2 hash") from exc

    async def verify_unknown_account(self, password: str | bytes) -> VerifyResult:
        """Spend the time of one verification and fail: for logins of accounts that do not
        exist, so response times do not reveal which accounts do. Cancellation as ``hash``."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(b"asyncstore: no such account")
        await self.verify(self._dummy_hash, password)
        return VerifyResult(False)

    def statistics(self) -> HasherStatistics:
        return HasherStatistics(
            hashes=self._hashes,
            verified=self._verified,
            mismatched=self._mismatched,
            rehashed=self._rehashed,
            invalid=self._invalid,
            overloaded=self._overloaded,
            running=int(self._limiter.borrowed_tokens),
            waiting=self._limiter.statistics().tasks_waiting,
            max_concurrent=self._config.max_concurrent,
            busy_s=self._busy_s,
        )

    def _check_length(self, password: str | bytes) -> None:
        size = len(password.encode() if isinstance(password, str) else password)
        if size > self._config.max_password_bytes:
            raise PasswordTooLong(
                f"password is {size} bytes; the limit is {self._config.max_password_bytes}"
            )

    def _verify_sync(self, stored_hash: str, password: str | bytes) -> VerifyResult:
        try:
            self._argon2.verify(stored_hash, password)
        except VerifyMismatchError:
            return VerifyResult(False)
        except (InvalidHashError, VerificationError, ValueError) as exc:
            raise InvalidHash("stored hash is not a readable argon2 hash") from exc
        if self._argon2.check_needs_rehash(stored_hash):
            return VerifyResult(True, self._argon2.hash(password))
        return VerifyResult(True)

    async def _run(self, func: Callable[..., T], *args: str | bytes) -> T:
        start = time.perf_counter()
        if not self._config.off_loop:
            try:
                return func(*args)
            finally:
                self._busy_s += time.perf_counter() - start
        waiting = self._limiter.statistics().tasks_waiting
        if (
            self._limiter.borrowed_tokens >= self._limiter.total_tokens
            and waiting >= self._config.max_waiting
        ):
            self._overloaded += 1
            raise HashingOverloaded(
                f"{waiting} callers already wait for one of "
                f"{self._config.max_concurrent} hashing slots"
            )
        elapsed = 0.0

        def timed() -> T:
            nonlocal elapsed
            begun = time.perf_counter()
            try:
                return func(*args)
            finally:
                elapsed = time.perf_counter() - begun

        try:
            return await anyio.to_thread.run_sync(timed, limiter=self._limiter)
        finally:
            self._busy_s += elapsed


class AttemptLimiterConfig(BaseModel):
    """Login throttling (``auth.limiter.*``): sliding window, exponential lockout.

    ``max_failures`` failures of one key within ``window_s`` lock it for ``lockout_base_s``;
    each further lockout of that key doubles the time (``lockout_factor``) up to
    ``lockout_max_s``. A key's lockout level is forgotten after ``forget_after_s`` without a
    failure; a successful login resets its account (not its address: one good account must
    not launder an address that sprays others). ``max_keys`` bounds memory per scope; the
    least recently failed keys go first.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    window_s: float = Field(default=300.0, gt=0)
    max_failures_per_account: int = Field(default=5, ge=1)
    max_failures_per_address: int = Field(default=20, ge=1)
    lockout_base_s: float = Field(default=30.0, gt=0)
    lockout_factor: float = Field(default=2.0, ge=1)
    lockout_max_s: float = Field(default=3600.0, gt=0)
    forget_after_s: float = Field(default=86400.0, gt=0)
    max_keys: int = Field(default=100_000, ge=1)


@dataclass(frozen=True, slots=True)
class AttemptLimiterStatistics:
    accounts_tracked: int
    addresses_tracked: int
    allowed: int
    rejected: Mapping[str, int]  # by scope: account, address
    failures: int
    successes: int
    lockouts: Mapping[str, int]  # by scope
    evicted: int


class _Key:
    __slots__ = ("failures", "last_failure", "level", "locked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.locked_until = 0.0
        self.level = 0
        self.last_failure = 0.0


class LoginAttemptLimiter:
    """Failed-login throttling per account and per client address, in memory, per process.

    Call ``check`` before hashing (it raises ``LoginLocked`` without doing any work), then
    ``record_failure`` or ``record_success``; ``check_login`` does all three around a
    ``PasswordHasher``. ``clock`` is a monotonic clock in seconds (injectable for tests).
    Keys are whatever identifies the account and the client (e.g. a normalized user name and
    an IP address or /64 prefix); they are never exported as metric labels.
    """

    def __init__(
        self,
        config: AttemptLimiterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or AttemptLimiterConfig()
        self._clock = clock
        self._keys: dict[Scope, OrderedDict[str, _Key]] = {
            "account": OrderedDict(),
            "address": OrderedDict(),
        }
        self._allowed = self._failures = self._successes = self._evicted = 0
        self._rejected: dict[str, int] = {"account": 0, "address": 0}
        self._lockouts: dict[str, int] = {"account": 0, "address": 0}

    @property
    def config(self) -> AttemptLimiterConfig:
        return self._config

    def retry_after(self, account: str, address: str) -> tuple[Scope, float] | None:
        """The locked scope and the seconds until it opens, or None when a login may proceed."""
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

    def check(self, account: str, address: str) -> None:
        """Raise ``LoginLocked`` if the account or the address is locked out; else return.

        Costs a dictionary lookup per scope, so refusing an attacker costs no hashing.
        """
        locked = self.retry_after(account, address)
        if locked is not None:
            self._rejected[locked[0]] += 1
            raise LoginLocked(locked[0], locked[1])
        self._allowed += 1

    def record_failure(self, account: str, address: str) -> None:
        """Count a failed login against both keys, locking out a key that reached its limit."""
        if not self._config.enabled:
            return
        self._failures += 1
        cfg = self._config
        self._fail("account", account, cfg.max_failures_per_account)
        self._fail("address", address, cfg.max_failures_per_address)

    def record_success(self, account: str, address: str) -> None:
        """Forget the account's failures and lockout level (the address keeps its own)."""
        self._successes += 1
        self._keys["account"].pop(account, None)

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
        )

    def _fail(self, scope: Scope, key: str, limit: int) -> None:
        cfg = self._config
        now = self._clock()
        keys = self._keys[scope]
        self._evict(keys, now)
        state = keys.get(key)
        if state is None:
            state = keys[key] = _Key()
        keys.move_to_end(key)
        if state.level and now - state.last_failure > cfg.forget_after_s:
            state.level = 0
        state.last_failure = now
        if state.locked_until > now:
            return  # a failure that slipped through while locked does not stack lockouts
        window_start = now - cfg.window_s
        while state.failures and state.failures[0] <= window_start:
            state.failures.popleft()
        state.failures.append(now)
        if len(state.failures) >= limit:
            state.failures.clear()
            lockout = cfg.lockout_base_s * math.pow(cfg.lockout_factor, state.level)
            state.locked_until = now + min(cfg.lockout_max_s, lockout)
            state.level += 1
            self._lockouts[scope] += 1

    def _evict(self, keys: OrderedDict[str, _Key], now: float) -> None:
        # Oldest failure first: drop keys that can no longer matter, then any over the cap.
        idle = max(self._config.window_s, self._config.forget_after_s)
        while keys:
            state = next(iter(keys.values()))
            stale = state.locked_until <= now and now - state.last_failure > idle
            if not stale and len(keys) < self._config.max_keys:
                return
            keys.popitem(last=False)
            self._evicted += 1


async def check_login(
    hasher: PasswordHasher,
    limiter: LoginAttemptLimiter,
    *,
    account: str,
    address: str,
    stored_hash: str | None,
    password: str | bytes,
) -> VerifyResult:
    """One login: throttle check, verification (a dummy one for unknown accounts), bookkeeping.

    Raises ``LoginLocked`` before any hashing when the account or the address is locked out.
    ``stored_hash=None`` means no such account: the same work is done and the result fails.
    A result with ``new_hash`` asks the caller to store the rehashed password. If cancelled
    during the verification, nothing is recorded against the keys.
    """
    limiter.check(account, address)
    if stored_hash is None:
        result = await hasher.verify_unknown_account(password)
    else:
        result = await hasher.verify(stored_hash, password)
    if result.ok:
        limiter.record_success(account, address)
    else:
        limiter.record_failure(account, address)
    return result
