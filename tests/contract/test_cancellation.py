"""Cancel tokens on both drivers: same instance, across instances, before start, legacy poll."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from typing import Any

import anyio
import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from asyncstore.orchestrator.cancellation import CancellationConfig, open_cancellation
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import (
    AsyncStorageBackend,
    CancelState,
    InvalidInput,
    StorageError,
    StorageSettings,
    open_storage,
)
from tests.conftest import direct_dsn

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
    from asyncstore.storage.postgres import PostgresBackend

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
    clock = ManualClock()
    async with (
        open_cancellation(storage, config, clock=clock) as registry,
        registry.open_token("s") as token,
    ):
        await registry.request_cancel("s", "legacy")
        await clock.wait_sleepers(1)  # the poller waits for its next turn
        assert not token.cancelled  # the legacy path waits for the next poll
        clock.advance(config.poll_interval_s)  # one poll interval of the registry's time
        with anyio.fail_after(NOTIFY_BOUND_S):
            await token.wait()
        before = storage.statistics().statements.get("get_cancel", 0)
    assert registry.statistics().polls == 1 and before >= 2


# -- one round trip: the persisted request and its notification together ---------------

CHANNEL = "cancel.contract"


def _payload(session_id: str, reason: str) -> str:
    """What today's instances send and ``_decode`` reads: orjson's ``[id, reason[:200]]``."""
    return orjson.dumps([session_id, reason[:200]]).decode()


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_request_cancel_notifies_the_kept_reason_in_one_statement(
    storage_url: str,
) -> None:
    long_reason = 'stop\n\t"quoted" \\ é😀\x01 ' + "x" * 400
    async with (
        open_storage(storage_url) as a,
        open_storage(storage_url) as b,
        b.listen(CHANNEL) as notes,
    ):
        before = a.statistics().statements
        state = await a.request_cancel("s", "first", notify_channel=CHANNEL)
        assert _delta(before, a.statistics().statements) == {"request_cancel": 1}
        assert state.reason == "first"
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert (await notes.receive()).payload == _payload("s", "first")
        # A later request keeps the first reason, and so does its notification.
        again = await a.request_cancel("s", "second", notify_channel=CHANNEL)
        assert again.reason == "first" and again.requested_at == state.requested_at
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert (await notes.receive()).payload == _payload("s", "first")
        # The payload is orjson's text, byte for byte, with the reason cut to 200 characters.
        kept = await a.request_cancel("long", long_reason, notify_channel=CHANNEL)
        assert kept.reason == long_reason
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert (await notes.receive()).payload == _payload("long", long_reason)


async def test_request_cancel_without_a_channel_notifies_nothing(
    storage: AsyncStorageBackend,
) -> None:
    async with storage.listen(CHANNEL) as notes:
        before = storage.statistics().statements
        await storage.request_cancel("s", "quiet")
        assert _delta(before, storage.statistics().statements) == {"request_cancel": 1}
        # Notifications arrive in order: the marker comes first only if nothing came before.
        await storage.notify(CHANNEL, "marker")
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert (await notes.receive()).payload == "marker"
    assert (await storage.get_cancel("s")) is not None


@pytest.mark.parametrize(
    ("session_id", "reason", "channel"),
    [
        ("s", "stop", "bad channel!"),
        ("s", "stop", ""),
        ("s", "stop", "c" * 65),
        ("s", "stop", 5),
        ("s", "nul \x00 in reason", CHANNEL),
        ("s", 5, CHANNEL),
        ("", "stop", CHANNEL),
        ("s\x00", "stop", CHANNEL),
    ],
)
async def test_a_refused_request_cancel_writes_and_notifies_nothing(
    storage: AsyncStorageBackend, session_id: Any, reason: Any, channel: Any
) -> None:
    async with storage.listen(CHANNEL) as notes:
        with pytest.raises(InvalidInput):
            await storage.request_cancel(session_id, reason, notify_channel=channel)
        await storage.notify(CHANNEL, "marker")
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert (await notes.receive()).payload == "marker"
    assert await storage.get_cancel("s") is None
    assert storage.statistics().statements.get("request_cancel", 0) == 0


async def test_registry_request_is_one_statement_in_both_modes(storage_url: str) -> None:
    async with open_storage(storage_url) as storage:
        for mode in ("notify", "poll"):
            config = CancellationConfig(mode=mode, poll_interval_s=60)
            async with open_cancellation(storage, config) as registry:
                before = storage.statistics().statements
                await registry.request_cancel(f"one-{mode}", "stop")
                assert _delta(before, storage.statistics().statements) == {"request_cancel": 1}


class CancelRowHold:
    """Another connection's uncommitted cancel request for one session: a real lock.

    Postgres: the uncommitted row holds back every other insert of that session id (its
    unique key) until this transaction ends. SQLite: the open write transaction holds the
    database's write lock. ``end(commit=...)`` lets the held-back writes go on.
    """

    def __init__(self, url: str, session_id: str, reason: str) -> None:
        self._url, self._session_id, self._reason = url, session_id, reason
        self._pg: asyncpg.Connection | None = None
        self._lite: sqlite3.Connection | None = None

    async def __aenter__(self) -> CancelRowHold:
        if self._url.startswith("postgres"):
            self._pg = await asyncpg.connect(direct_dsn(self._url))
            await self._pg.execute("BEGIN")
            await self._pg.execute(
                "INSERT INTO cancel_requests (session_id, reason) VALUES ($1, $2)",
                self._session_id,
                self._reason,
            )
        else:
            self._lite = sqlite3.connect(self._url.removeprefix("sqlite:///"), isolation_level=None)
            self._lite.execute("BEGIN IMMEDIATE")
            self._lite.execute(
                "INSERT INTO cancel_requests (session_id, reason, requested_at) VALUES (?, ?, ?)",
                (self._session_id, self._reason, time.time()),
            )
        return self

    async def end(self, *, commit: bool) -> None:
        verb = "COMMIT" if commit else "ROLLBACK"
        if self._pg is not None:
            await self._pg.execute(verb)
            await self._pg.close()
            self._pg = None
        if self._lite is not None:
            self._lite.execute(verb)
            self._lite.close()
            self._lite = None

    async def __aexit__(self, *exc: object) -> None:
        await self.end(commit=False)


@pytest.mark.parametrize("first_commits", [False, True])
async def test_local_token_fires_while_the_write_is_held_back(
    storage_url: str, first_commits: bool
) -> None:
    async with (
        open_storage(storage_url) as a,
        open_storage(storage_url) as b,
        open_cancellation(a) as here,
        open_cancellation(b) as there,
        here.open_token("s") as local,
        there.open_token("s") as remote,
        CancelRowHold(storage_url, "s", "raced first") as hold,
        anyio.create_task_group() as tg,
    ):
        results: list[CancelState] = []

        async def request() -> None:
            results.append(await here.request_cancel("s", "stop"))

        tg.start_soon(request)
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert await local.wait() == "stop"
        # The write cannot have completed: the other transaction still holds its lock.
        assert results == [] and not remote.cancelled
        await hold.end(commit=first_commits)
        # The remote token gets the kept reason: the request that committed first wins.
        kept = "raced first" if first_commits else "stop"
        with anyio.fail_after(NOTIFY_BOUND_S):
            assert await remote.wait() == kept
    assert [r.reason for r in results] == [kept]
    assert local.reason == "stop"  # this process fired on its own request, before the write


async def test_a_failing_write_still_raises_after_the_local_token_fired(storage_url: str) -> None:
    # Short timeouts so the held-back write fails instead of waiting.
    settings = StorageSettings(
        url=SecretStr(storage_url), command_timeout_s=0.5, sqlite_busy_timeout_s=0.2
    )
    async with (
        open_storage(settings) as storage,
        open_cancellation(storage) as registry,
        registry.open_token("s") as token,
    ):
        async with CancelRowHold(storage_url, "s", "never committed"):
            with anyio.fail_after(NOTIFY_BOUND_S), pytest.raises(StorageError):
                await registry.request_cancel("s", "stop")
            assert token.cancelled and token.reason == "stop"
        assert await storage.get_cancel("s") is None  # nothing persisted
        # A refused input raises too, and fires nothing.
        async with registry.open_token("other") as other:
            with pytest.raises(InvalidInput):
                await registry.request_cancel("other", "nul \x00")
            assert not other.cancelled
        assert await storage.get_cancel("other") is None


async def _wait_until_no_request_cancel_runs(dsn: str) -> None:
    """Return once no statement writing cancel_requests is still running.

    A SHARE lock conflicts with the ROW EXCLUSIVE lock a running INSERT holds until its
    transaction ends, so taking one waits for exactly that.
    """
    conn = await asyncpg.connect(direct_dsn(dsn))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE cancel_requests IN SHARE MODE")
    finally:
        await conn.close()


async def test_a_cancelled_request_is_written_and_announced_together_or_not_at_all(
    postgres_dsn: str,
) -> None:
    # Postgres only: SQLite shields its write transactions, so a cancelled request there
    # completes (and is announced) before the cancellation takes effect.
    async with (
        open_storage(postgres_dsn) as a,
        open_storage(postgres_dsn) as b,
        b.listen(CHANNEL) as notes,
        CancelRowHold(postgres_dsn, "cancelled", "held") as hold,
    ):
        with anyio.move_on_after(0.2) as scope:  # cancelled while the write is held back
            await a.request_cancel("cancelled", "stop", notify_channel=CHANNEL)
        assert scope.cancelled_caught
        # The server may still run the statement (the cancel request races the lock's
        # release): then the row and its notification both exist, else neither.
        await hold.end(commit=False)
        await _wait_until_no_request_cancel_runs(postgres_dsn)
        await a.notify(CHANNEL, "marker")  # committed after it, so delivered after it
        with anyio.fail_after(NOTIFY_BOUND_S):
            first = (await notes.receive()).payload
        if await a.get_cancel("cancelled") is None:
            assert first == "marker"
        else:
            assert first == _payload("cancelled", "stop")
