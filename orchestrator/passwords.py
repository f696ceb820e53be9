"""Password hashing off the event loop (argon2id), and the auth error tree.

``PasswordHasher`` wraps argon2-cffi. Hash and verify run on worker threads bounded by the
hasher's own ``anyio.CapacityLimiter``: argon2's C core runs through CFFI, which releases
the GIL for the call, so the event loop keeps serving while up to ``max_concurrent`` hashes
use other cores; a process pool would add pickling and process management for nothing. The
dedicated limiter (not anyio's shared default) bounds CPU and memory (``memory_cost`` KiB per
running hash) and keeps hashing from starving other ``to_thread`` users. ``off_loop=False``
is the legacy path that hashes on the loop, kept for rollback and the benchmark. Login
throttling and ``check_login`` build on it in ``orchestrator.auth``, which re-exports
everything here and the errors below.

    AuthError (OrchestratorError; defined in ``orchestrator.errors``)
    ├── InvalidHash          the stored hash is not an argon2 hash this library can read
    ├── PasswordTooLong      the password exceeds ``max_password_bytes``
    ├── HashingOverloaded    ``max_waiting`` callers already wait for a hashing slot
    └── LoginLocked          the account or the address is locked out (``retry_after_s``)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import anyio
import anyio.to_thread
import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.errors import HashingOverloaded, InvalidHash, PasswordTooLong
from asyncstore.storage.families import Family, MetricSink

__all__ = ["HasherStatistics", "PasswordHasher", "PasswordHashingConfig", "VerifyResult"]

T = TypeVar("T")


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
