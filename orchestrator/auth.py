"""Password hashing off the event loop, and a login attempt limiter that answers first.

``PasswordHasher`` wraps argon2-cffi. Hash and verify run on worker threads bounded by the
hasher's own ``anyio.CapacityLimiter``: argon2's C core runs through CFFI, which releases
the GIL for the call, so the event loop keeps serving while up to ``max_concurrent`` hashes
use other cores; a process pool would add pickling and process management for nothing. The
dedicated limiter (not anyio's shared default) bounds CPU and memory (``memory_cost`` KiB per
running hash) and keeps hashing from starving other ``to_thread`` users. ``off_loop=False``
is the legacy path that hashes on the loop, kept for rollback and the benchmark.
``LoginAttemptLimiter`` counts failures per account and per client address and locks a key
out for an exponentially growing time; it needs no hashing to say no. A login reserves its
attempt before hashing (``reserve``), so attempts in flight count against the limit and a
burst of concurrent guesses gets at most the limit in verifications. Its ``memory`` mode
counts in this process (sliding window); its ``storage`` mode counts in the database
(``login_attempts``, fixed windows, one atomic statement per reservation), so a fleet
sharing one Postgres (or the processes of one host sharing one SQLite file) share one count.

    AuthError (OrchestratorError; defined in ``orchestrator.errors``)
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
from typing import ClassVar, Literal, TypeVar

import anyio
import anyio.to_thread
import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.errors import (
    AuthError,
    HashingOverloaded,
    InvalidHash,
    LoginLocked,
    PasswordTooLong,
)
from asyncstore.storage.base import AsyncStorageBackend, LoginPolicy
from asyncstore.storage.families import Family, MetricSink

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

T = TypeVar("T")
Scope = Literal["account", "address"]
Outcome = Literal["failure", "success", "release"]
_BUSY_RETRY_S = 1.0  # attempts in flight end within one verification


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

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("auth_hashing_running", "gauge", "Hashes running."),
        Family("auth_hashing_waiting", "gauge", "Hashes waiting for a slot."),
        Family("auth_hashing_slots", "gauge", "Hashing pool size."),
        Family("auth_hashes", "counter", "Passwords hashed."),
        Family("auth_verifications", "counter", "Verifications.", ("result",)),
        Family("auth_rehashes", "counter", "Rehashes on verify."),
        Family("auth_hashing_busy_seconds", "counter", "Time spent hashing."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("auth_hashing_running", {}, self.running)
        out.sample("auth_hashing_waiting", {}, self.waiting)
        out.sample("auth_hashing_slots", {}, self.max_concurrent)
        out.sample("auth_hashes", {}, self.hashes)
        results = {
            "ok": self.verified,
            "mismatch": self.mismatched,
            "invalid_hash": self.invalid,
            "overloaded": self.overloaded,
        }
        out.samples("auth_verifications", {}, results)
        out.sample("auth_rehashes", {}, self.rehashed)
        out.sample("auth_hashing_busy_seconds", {}, self.busy_s)


class PasswordHasher:
    """Argon2id hashing and verification on a bounded pool of worker threads.

    Safe to share by every task of one event loop. Build one per process from settings.
    Construction computes one hash on the calling thread (the dummy hash that unknown
    accounts are verified against), so build it at startup, not on a request path.
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
        # Made now, not on the first unknown-account login: building it there made that one
        # login several times slower than any other, a one-time "no such account" signal.
        self._dummy_hash = self._argon2.hash(b"asyncstore: no such account")
        self._hashes = self._verified = self._mismatched = self._rehashed = 0
        self._invalid = self._overloaded = 0
        self._busy_s = 0.0

    @property
    def config(self) -> PasswordHashingConfig:
        return self._config

    @property
    def dummy_hash(self) -> str:
        """The hash that ``verify_unknown_account`` verifies against (made at construction)."""
        return self._dummy_hash

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
        exist, so response times do not reveal which accounts do. Cancellation as ``hash``.

        The dummy hash was made with the hasher, so the first such login costs what every
        later one does."""
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
    """Login throttling (``auth.attempts.*``): counting window, exponential lockout.

    ``max_failures_per_account`` failures plus attempts in flight of one key within
    ``window_s`` refuse further attempts, and the failure that reaches the limit locks the key
    for ``lockout_base_s``; each further lockout of that key multiplies the time by
    ``lockout_factor`` up to ``lockout_max_s``. A key's lockout growth is forgotten after
    ``forget_after_s`` without a failure; a successful login resets its account (not its
    address: one good account must not launder an address that sprays others).

    ``mode``: ``memory`` (the default) counts in this process, in a sliding window, with at
    most ``max_keys`` keys per scope (the least recently used go first); a fleet of N
    processes then allows N times the attempts. ``storage`` counts in the storage backend's
    ``login_attempts`` table, in fixed windows of ``window_s`` (so up to twice the limit
    across a window boundary), shared by every process on that database: Postgres for a
    fleet, SQLite for the processes of one host. Storage mode costs two short statements
    before and two after each verification, and fails closed: if the database cannot be
    reached, logins fail with the storage error instead of going uncounted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    mode: Literal["memory", "storage"] = "memory"
    window_s: float = Field(default=300.0, gt=0)
    max_failures_per_account: int = Field(default=5, ge=1)
    max_failures_per_address: int = Field(default=20, ge=1)
    lockout_base_s: float = Field(default=30.0, gt=0)
    lockout_factor: float = Field(default=2.0, ge=1)
    lockout_max_s: float = Field(default=3600.0, gt=0)
    forget_after_s: float = Field(default=86400.0, gt=0)
    max_keys: int = Field(default=100_000, ge=1)

    def policy(self, scope: Scope) -> LoginPolicy:
        """The storage-mode limits of one scope."""
        by_scope = {"account": self.max_failures_per_account}
        return LoginPolicy(
            limit=by_scope.get(scope, self.max_failures_per_address),
            window_s=self.window_s,
            lockout_base_s=self.lockout_base_s,
            lockout_factor=self.lockout_factor,
            lockout_max_s=self.lockout_max_s,
            forget_after_s=self.forget_after_s,
        )


@dataclass(frozen=True, slots=True)
class AttemptLimiterStatistics:
    accounts_tracked: int  # memory mode; 0 in storage mode (the table holds them)
    addresses_tracked: int
    allowed: int
    rejected: Mapping[str, int]  # by scope: account, address
    failures: int
    successes: int
    lockouts: Mapping[str, int]  # by scope (storage mode: the lockouts this process started)
    evicted: int
    in_flight: int  # attempts this process reserved and has not finished

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("auth_limiter_keys", "gauge", "Tracked keys.", ("scope",)),
        Family(
            "auth_limiter_in_flight",
            "gauge",
            "Login attempts this process reserved and has not finished (verifying now).",
        ),
        Family(
            "auth_logins_allowed", "counter", "Login attempts the limiter let through."
        ),
        Family("auth_logins_rejected", "counter", "Refused: locked out.", ("scope",)),
        Family("auth_lockouts", "counter", "Lockouts started.", ("scope",)),
        Family("auth_login_failures", "counter", "Failed logins."),
        Family("auth_login_successes", "counter", "Successful logins."),
        Family(
            "auth_limiter_evicted",
            "counter",
            "Memory mode: tracked keys forgotten (idle, or beyond max_keys).",
        ),
    )

    def export(self, out: MetricSink) -> None:
        keys = {"account": self.accounts_tracked, "address": self.addresses_tracked}
        out.samples("auth_limiter_keys", {}, keys)
        out.sample("auth_limiter_in_flight", {}, self.in_flight)
        out.sample("auth_logins_allowed", {}, self.allowed)
        out.samples("auth_logins_rejected", {}, self.rejected)
        out.samples("auth_lockouts", {}, self.lockouts)
        out.sample("auth_login_failures", {}, self.failures)
        out.sample("auth_login_successes", {}, self.successes)
        out.sample("auth_limiter_evicted", {}, self.evicted)


class _Key:
    __slots__ = ("failures", "in_flight", "last_failure", "level", "locked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.locked_until = 0.0
        self.level = 0
        self.last_failure = 0.0
        self.in_flight = 0


class LoginAttempt:
    """A reserved login attempt (from ``LoginAttemptLimiter.reserve``); finish it once."""

    __slots__ = ("_finished", "_states", "_windows", "account", "address")

    def __init__(
        self,
        account: str,
        address: str,
        *,
        states: tuple[_Key, _Key] | None = None,
        windows: tuple[float, float] | None = None,
    ) -> None:
        self.account = account
        self.address = address
        self._states = states
        self._windows = windows
        self._finished = False


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
            second = await storage.reserve_login_attempt(
                "address", address, cfg.policy("address")
            )
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
