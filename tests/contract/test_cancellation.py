"""Cancel tokens on both drivers: same instance, across instances, before start, legacy poll."""

from __future__ import annotations

import time

import anyio

from orchestrator.cancellation import CancellationConfig, open_cancellation
from storage import AsyncStorageBackend, open_storage

# No poll in notify mode: a token that fires within this bound fired on the event.
NOTIFY_BOUND_S = 5.0


async def test_cancel_fires_a_token_on_the_same_instance(storage: AsyncStorageBackend) -> None:
    async with open_cancellation(storage) as registry, registry.open_token("s") as token:
        assert not token.cancelled
        await registry.request_cancel("s", "user pressed stop")
        assert token.cancelled  # fired before request_cancel returned
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert await token.wait() == "user pressed stop"
        assert registry.statistics().polls == 0


async def test_token_scope_stops_the_work_at_once(storage: AsyncStorageBackend) -> None:
    async with open_cancellation(storage) as registry, registry.open_token("s") as token:
        started = anyio.Event()
        outcome: list[str] = []

        async def turn() -> None:
            with token.scope() as scope:
                started.set()
                await anyio.sleep(60)  # an LLM call that would take a minute
                outcome.append("finished")
            outcome.append("stopped" if scope.cancelled_caught else "?")

        with anyio.fail_after(NOTIFY_BOUND_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(turn)
                await started.wait()
                await registry.request_cancel("s", "stop")
        assert outcome == ["stopped"]
        with token.scope() as late:  # an already cancelled token cancels a new scope at once
            await anyio.sleep(60)
        assert late.cancelled_caught


async def test_cancel_reaches_another_instance_by_notification(storage_url: str) -> None:
    async with (
        open_storage(storage_url) as a,
        open_storage(storage_url) as b,
        open_cancellation(a) as here,
        open_cancellation(b) as there,
        there.open_token("s") as remote,
    ):
        started = time.monotonic()
        await here.request_cancel("s", "from a")
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert await remote.wait() == "from a"
        assert time.monotonic() - started < NOTIFY_BOUND_S
        assert there.statistics().notifications == 1 and there.statistics().polls == 0


async def test_cancel_requested_before_the_session_starts_is_seen(
    storage: AsyncStorageBackend,
) -> None:
    async with open_cancellation(storage) as registry:
        await registry.request_cancel("s", "early")
        async with registry.open_token("s") as token:
            assert token.cancelled and token.reason == "early"
        assert await registry.clear("s")
        async with registry.open_token("s") as token:
            assert not token.cancelled


async def test_tokens_are_shared_and_evicted_when_the_session_ends(
    storage: AsyncStorageBackend,
) -> None:
    async with open_cancellation(storage) as registry:
        async with registry.open_token("s") as first, registry.open_token("s") as second:
            assert first is second
            assert registry.statistics().tokens == 1 and registry.statistics().users == 2
        assert registry.statistics().tokens == 0
        assert registry.get_token("s") is None
        # A cancel for a session with no live token is kept for later, not held in memory.
        await registry.request_cancel("gone", "x")
        assert registry.statistics().tokens == 0


async def test_fire_local_cancels_this_process_only(storage_url: str) -> None:
    async with (
        open_storage(storage_url) as a,
        open_storage(storage_url) as b,
        open_cancellation(a) as here,
        open_cancellation(b) as there,
        here.open_token("s") as local,
        there.open_token("s") as remote,
    ):
        assert here.fire_local("s", "lease lost")
        assert local.cancelled and not remote.cancelled
        assert await a.get_cancel("s") is None


async def test_poll_mode_catches_persisted_requests(storage: AsyncStorageBackend) -> None:
    config = CancellationConfig(mode="poll", poll_interval_s=0.05)
    async with open_cancellation(storage, config) as registry, registry.open_token("s") as token:
        # Persisted by a peer without a notification: only the poll can see it.
        await storage.request_cancel("s", "persisted only")
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert await token.wait() == "persisted only"


async def test_listener_gap_makes_the_registry_catch_up(postgres_dsn: str) -> None:
    from storage.postgres import PostgresBackend

    async with open_storage(postgres_dsn) as backend, open_cancellation(backend) as registry:
        assert isinstance(backend, PostgresBackend)
        async with registry.open_token("gap-session") as token:
            # A request whose notification is lost while the listener is down.
            await backend.request_cancel("gap-session", "missed")
            await backend.terminate_listener_for_tests()
            with anyio.fail_after(15):
                assert await token.wait() == "missed"
        assert registry.statistics().catch_up_reads >= 1
        await backend.clear_cancel("gap-session")


async def test_legacy_poll_mode_fires_within_a_few_polls(storage: AsyncStorageBackend) -> None:
    config = CancellationConfig(mode="poll", poll_interval_s=0.2)
    async with open_cancellation(storage, config) as registry, registry.open_token("s") as token:
        started = time.monotonic()
        await registry.request_cancel("s", "legacy")
        assert not token.cancelled  # the legacy path waits for the next poll
        with anyio.fail_after(NOTIFY_BOUND_S):
            await token.wait()
        assert time.monotonic() - started < 1.0
        before = storage.statistics().statements.get("get_cancel", 0)
    assert registry.statistics().polls >= 1 and before >= 2
