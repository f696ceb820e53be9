"""Stateful property test: holds, releases, lease expiry and cancels keep one live holder.

Hypothesis drives two limiter instances (two storage handles, each with a cancellation
registry) on both drivers through a blocking portal. Each hold runs as a task that opens the
session's cancel token, enters ``token.scope()`` and holds the session until released. After
every step: for each session at most one hold is live (entered, not exited, lease not lost),
a live hold's token is the session's current lease in storage, and tokens only grow.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from asyncstore.orchestrator.cancellation import CancellationRegistry, open_cancellation
from asyncstore.orchestrator.locks import (
    HeldLease,
    LimiterConfig,
    SessionLimiter,
    open_session_limiter,
)
from asyncstore.storage import AsyncStorageBackend, open_storage

SESSIONS = 3
SETTLE_S = 0.03


@dataclass
class _Hold:
    session: str
    instance: int
    release: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    held: HeldLease | None = None
    future: Future[None] | None = None


class _Harness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stack = AsyncExitStack()
        self.storages: list[AsyncStorageBackend] = []
        self.registries: list[CancellationRegistry] = []
        self.limiters: list[SessionLimiter] = []
        self.prefix = uuid.uuid4().hex[:8]

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Everything opened in one task (the portal runs this context in its own task)."""
        async with self.stack:
            await self._open()
            yield

    async def _open(self) -> None:
        config = LimiterConfig(
            lease_ttl_s=2.0,
            renew_interval_s=0.05,
            backoff_initial_s=0.005,
            backoff_max_s=0.05,
            max_running=2,
            slot_pool=f"pool-{self.prefix}",
        )
        for i in range(2):
            backend = await self.stack.enter_async_context(open_storage(self.url))
            registry = await self.stack.enter_async_context(open_cancellation(backend))
            limiter = await self.stack.enter_async_context(
                open_session_limiter(backend, config, cancellation=registry, instance_id=f"i{i}")
            )
            self.storages.append(backend)
            self.registries.append(registry)
            self.limiters.append(limiter)

    async def run_hold(self, hold: _Hold) -> None:
        registry = self.registries[hold.instance]
        try:
            async with registry.open_token(hold.session) as token:
                with token.scope():
                    async with self.limiters[hold.instance].hold(hold.session) as held:
                        hold.held = held
                        await hold.release.wait()
        finally:
            hold.done.set()


class LimiterMachine(RuleBasedStateMachine):
    portal: BlockingPortal
    url: str

    def __init__(self) -> None:
        super().__init__()
        self.h = _Harness(self.url)
        self._context = self.portal.wrap_async_context_manager(self.h.session())
        self._context.__enter__()
        self.holds: list[_Hold] = []
        self.last_token: dict[str, int] = {}

    def _session(self, i: int) -> str:
        return f"{self.h.prefix}-{i}"

    def _settle(self) -> None:
        self.portal.call(anyio.sleep, SETTLE_S)

    def _live(self) -> list[_Hold]:
        return [
            h for h in self.holds if h.held is not None and not h.done.is_set() and not h.held.lost
        ]

    @rule(session=st.integers(0, SESSIONS - 1), instance=st.integers(0, 1))
    def hold(self, session: int, instance: int) -> None:
        hold = _Hold(self._session(session), instance)
        hold.future = self.portal.start_task_soon(self.h.run_hold, hold)
        self.holds.append(hold)
        self._settle()

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        entered = [h for h in self.holds if h.held is not None and not h.done.is_set()]
        if not entered:
            return
        hold = data.draw(st.sampled_from(entered))
        self.portal.call(hold.release.set)
        self._wait_done([hold])
        self._settle()

    @rule(session=st.integers(0, SESSIONS - 1))
    def expire(self, session: int) -> None:
        """The lease disappears (a crash then a sweep, or an operator): its holder must stop."""
        name = self._session(session)
        victims = [h for h in self._live() if h.session == name]
        self.portal.call(self.h.storages[0].delete_session, name)
        # Lease loss fires the token, whose scope ends the hold's block.
        self._wait_done(victims)
        assert all(h.held is not None and h.held.lost for h in victims)
        self._settle()

    @rule(session=st.integers(0, SESSIONS - 1), instance=st.integers(0, 1))
    def cancel(self, session: int, instance: int) -> None:
        name = self._session(session)
        victims = [h for h in self.holds if h.session == name and not h.done.is_set()]
        self.portal.call(self.h.registries[instance].request_cancel, name, "stop")
        self._wait_done(victims)
        self.portal.call(self.h.registries[instance].clear, name)

    def _wait_done(self, holds: list[_Hold]) -> None:
        async def wait() -> None:
            with anyio.fail_after(10):
                for h in holds:
                    await h.done.wait()

        self.portal.call(wait)

    @invariant()
    def at_most_one_live_holder(self) -> None:
        by_session: dict[str, list[_Hold]] = {}
        for h in self._live():
            by_session.setdefault(h.session, []).append(h)
        for name, live in by_session.items():
            assert len(live) == 1, f"{len(live)} live holders of {name}"
            held = live[0].held
            assert held is not None
            current = self.portal.call(self.h.storages[0].get_lease, name)
            assert current is not None and current.token == held.token
            assert held.token >= self.last_token.get(name, 0)
            self.last_token[name] = held.token
        assert len(self._live()) <= 2  # the global cap (max_running=2)

    def teardown(self) -> None:
        for h in self.holds:
            self.portal.call(h.release.set)
        self._wait_done(self.holds)
        for h in self.holds:
            if h.future is not None:
                h.future.result(timeout=10)
        self._context.__exit__(None, None, None)


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p


def test_limiter_keeps_at_most_one_live_holder(storage_url: str, portal: BlockingPortal) -> None:
    machine = type("Machine", (LimiterMachine,), {"portal": portal, "url": storage_url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=8,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
