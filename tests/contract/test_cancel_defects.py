"""Named cancellation and failed-commit defects of issue 14, each on the drivers it concerns.

Every test here failed before the fix: a cancelled write left the SQLite writer inside a
transaction, a cancelled reader left a waiter asleep, a failed COMMIT kept the transaction
open, ``listen()`` on a closed handle waited forever, and an out-of-range ``run_after``
poisoned its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.storage import (
    AsyncStorageBackend,
    Failure,
    InvalidInput,
    NewMessage,
    NewOutboxMessage,
    NewTask,
    StorageClosed,
    StorageError,
    StorageSettings,
    WebhookAttempt,
    open_storage,
)
from tests.waiting import wait_for

# A correctness bound, not a speed target: a woken waiter gets its reader well within it.
BOUND_S = 10.0


async def _cancel_after(coro_fn: object, iterations: int) -> bool:
    """Run ``coro_fn()`` in a task, cancel it after ``iterations`` loop turns.

    Returns True if the call finished before the cancellation reached it.
    """
    task = asyncio.ensure_future(coro_fn())  # type: ignore[operator]
    for _ in range(iterations):
        if task.done():
            break
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


async def _assert_gap_free(storage: AsyncStorageBackend, session_id: str, batch: int) -> int:
    msgs = await storage.load_messages(session_id, limit=10_000)
    seqs = [m.seq for m in msgs]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) % batch == 0, "a multi-row batch was half written"
    return len(seqs)


async def test_wait_for_timeout_in_append_messages_leaves_the_writer_usable(
    storage: AsyncStorageBackend,
) -> None:
    batch = [NewMessage("user", {"i": i}) for i in range(3)]
    finished = 0
    for k in range(0, 2000, 3):
        if await _cancel_after(lambda: storage.append_messages("s", batch), k):
            finished += 1
        # The handle still writes and reads after every cancellation point.
        await storage.append_messages("probe", [NewMessage("user", k)])
        await _assert_gap_free(storage, "s", len(batch))
        if finished >= 2:
            break
    assert finished >= 2
    for timeout in (0.0, 1e-6, 1e-5, 1e-4, 1e-3):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(storage.append_messages("s", batch), timeout)
        await storage.append_messages("probe", [NewMessage("user", "after wait_for")])
    await _assert_gap_free(storage, "s", len(batch))


async def test_cancelled_reader_hands_its_connection_to_a_waiter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    settings = StorageSettings(url=SecretStr(url), sqlite_readers=1)
    async with open_storage(settings, migrate=True) as storage:
        holding = anyio.Event()
        read = anyio.Event()
        holder_scope = anyio.CancelScope()

        async def hold() -> None:
            with holder_scope:
                async with storage._reader():  # type: ignore[attr-defined]
                    holding.set()
                    await anyio.sleep_forever()

        async def wait_for_reader() -> None:
            assert await storage.load_messages("s") == []
            read.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()  # the only reader is in use
            tg.start_soon(wait_for_reader)
            await anyio.wait_all_tasks_blocked()
            assert not read.is_set()
            holder_scope.cancel()  # the holder is cancelled by its scope, not by asyncio
            with anyio.fail_after(BOUND_S):
                await read.wait()


async def test_cancelled_reader_waiter_passes_its_wakeup_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    settings = StorageSettings(url=SecretStr(url), sqlite_readers=1)
    async with open_storage(settings, migrate=True) as storage:
        holder = storage._reader()  # type: ignore[attr-defined]
        await holder.__aenter__()
        first = asyncio.ensure_future(storage.load_messages("s"))
        second = asyncio.ensure_future(storage.load_messages("s"))
        for _ in range(5):
            await asyncio.sleep(0)
        await holder.__aexit__(None, None, None)  # wakes ``first`` ...
        first.cancel()  # ... which is cancelled before it runs
        with anyio.fail_after(BOUND_S):
            assert await second == []
        with pytest.raises(asyncio.CancelledError):
            await first


def _poison_commit_sqlite(path: Path) -> None:
    """A deferred foreign key that fails at COMMIT when a message has role 'poison'."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE probe_parent (id TEXT PRIMARY KEY);
        CREATE TABLE probe_child (
            parent TEXT REFERENCES probe_parent (id) DEFERRABLE INITIALLY DEFERRED);
        CREATE TRIGGER probe_poison AFTER INSERT ON chat_messages WHEN NEW.role = 'poison'
        BEGIN INSERT INTO probe_child VALUES ('missing'); END;
        """
    )
    conn.close()


async def _poison_commit_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            CREATE OR REPLACE FUNCTION probe_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.role = 'poison' THEN
                    RAISE EXCEPTION 'poisoned commit' USING ERRCODE = '23514';
                END IF;
                RETURN NULL;
            END $$;
            DROP TRIGGER IF EXISTS probe_poison ON chat_messages;
            CREATE CONSTRAINT TRIGGER probe_poison AFTER INSERT ON chat_messages
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_poison();
            """
        )
    finally:
        await conn.close()


async def _unpoison_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TRIGGER IF EXISTS probe_poison ON chat_messages;"
            " DROP FUNCTION IF EXISTS probe_poison()"
        )
    finally:
        await conn.close()


async def test_failed_commit_rolls_back_and_the_writer_stays_usable(storage_url: str) -> None:
    sqlite = storage_url.startswith("sqlite")
    if sqlite:
        _poison_commit_sqlite(Path(storage_url.removeprefix("sqlite:///")))
    else:
        await _poison_commit_postgres(storage_url)
    try:
        async with open_storage(storage_url) as storage:
            await storage.append_messages("s", [NewMessage("user", "before")])
            poisoned = [NewMessage("user", "a"), NewMessage("poison", "b")]
            for outbox in ((), [NewOutboxMessage("c", "a", {"x": 1})]):
                with pytest.raises(StorageError):
                    await storage.append_messages("s", poisoned, outbox=outbox)
            # Nothing of the failed batch is visible, and the next writes go through.
            assert [m.content for m in await storage.load_messages("s")] == ["before"]
            await storage.append_messages("s", [NewMessage("user", "after")])
            await storage.enqueue_tasks([NewTask("q", {"x": 1})])
            assert [m.seq for m in await storage.load_messages("s")] == [1, 2]
    finally:
        if not sqlite:
            await _unpoison_postgres(storage_url)


async def test_listen_on_a_closed_handle_raises_storage_closed(storage_url: str) -> None:
    async with open_storage(storage_url) as storage:
        pass
    with anyio.fail_after(BOUND_S), pytest.raises(StorageClosed):
        async with storage.listen("ch") as stream:
            await stream.receive()


async def test_listener_waiting_when_the_handle_closes_raises_storage_closed(
    storage_url: str,
) -> None:
    async with open_storage(storage_url) as storage, storage.listen("ch") as stream:
        await storage.notify("ch", "kept")
        with anyio.fail_after(BOUND_S):
            first = await stream.receive()
        assert first.payload == "kept"
        outcome: list[BaseException] = []
        ended = anyio.Event()

        async def wait() -> None:
            try:
                await stream.receive()
            except BaseException as exc:
                outcome.append(exc)
            finally:
                ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await storage.aclose()
            with anyio.move_on_after(BOUND_S):
                await ended.wait()
            tg.cancel_scope.cancel()
        assert outcome and isinstance(outcome[0], StorageClosed), outcome


_EDGES = [
    datetime(1, 1, 1, 3, tzinfo=timezone(timedelta(hours=5))),  # year 0 in UTC
    datetime(9999, 12, 31, 22, tzinfo=timezone(timedelta(hours=-5))),  # year 10000 in UTC
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # rounds past 9999 as a float
]


@pytest.mark.parametrize("when", _EDGES, ids=["year0", "year10000", "last-microsecond"])
async def test_run_after_outside_years_1_to_9999_is_refused(
    storage: AsyncStorageBackend, when: datetime
) -> None:
    with pytest.raises(InvalidInput, match="run_after"):
        await storage.enqueue_tasks([NewTask("q", {"x": 1}, run_after=when)])
    ok = await storage.enqueue_tasks([NewTask("q", {"x": 2})])
    assert await storage.get_task(ok[0].id) is not None
    claimed = await storage.claim_tasks("q", "w", limit=10, lease_s=30)
    assert [t.id for t in claimed] == [ok[0].id]
    with pytest.raises(InvalidInput, match="retry_at"):
        await storage.fail_tasks([Failure(ok[0].id, claimed[0].claim.token, "e", when)])
    with pytest.raises(InvalidInput, match="attempted_at"):
        attempt = WebhookAttempt("e", "w", None, when, 500, "x", False)
        await storage.record_webhook_attempts([attempt])
    assert (await storage.get_task(ok[0].id)) is not None
    depths, _ = await storage.backlog_depths()
    assert depths


async def test_cancelled_migrate_leaves_no_migration_lock_behind(storage_url: str) -> None:
    async with open_storage(storage_url) as first, open_storage(storage_url) as second:
        for k in range(0, 120, 2):
            done = await _cancel_after(first.migrate, k)
            # Another handle (another pool connection) can still take the migration lock.
            with anyio.fail_after(BOUND_S):
                assert await second.migrate() == []
            if done:
                break
        for timeout in (0.0, 1e-5, 1e-4, 1e-3, 1e-2):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first.migrate(), timeout)
            with anyio.fail_after(BOUND_S):
                assert await second.migrate() == []


async def test_delete_session_racing_an_append_leaves_no_orphan_messages(
    postgres_dsn: str,
) -> None:
    # A cancelled call's statement may still run on the server while the next call starts,
    # so a delete_session and an append of the same session can overlap: here an append's
    # transaction (messages 2-4) commits while delete_session waits for its row lock.
    async with open_storage(postgres_dsn) as storage:
        await storage.delete_session("race")
        await storage.append_messages("race", [NewMessage("user", 1)])
        raw = await asyncpg.connect(postgres_dsn)
        try:
            tx = raw.transaction()
            await tx.start()
            await raw.execute(
                "UPDATE chat_sessions SET last_seq = last_seq + 3 WHERE session_id = 'race'"
            )
            await raw.execute(
                "INSERT INTO chat_messages (session_id, seq, role, content)"
                " SELECT 'race', g, 'user', '0'::jsonb FROM generate_series(2, 4) g"
            )
            deleting = asyncio.ensure_future(storage.delete_session("race"))
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            await wait_for(lambda: raw.fetchval(waiting), BOUND_S, what="the delete waiting")
            with anyio.fail_after(BOUND_S):
                await tx.commit()
                assert await deleting
        finally:
            await raw.close()
        assert await storage.load_messages("race") == []
        again = await storage.append_messages("race", [NewMessage("user", "new")])
        assert [m.seq for m in again] == [1]
        assert [m.seq for m in await storage.load_messages("race")] == [1]


async def test_a_committed_cancel_request_is_announced_even_if_its_caller_is_cancelled(
    storage: AsyncStorageBackend,
) -> None:
    async with storage.listen("cc") as stream:
        # Loop turns, not time: under load a round trip takes more turns, so the cut-off
        # keeps growing until the call finishes before it.
        for k in [*range(200), *range(200, 20_000, 200)]:
            sid = f"s{k}"
            done = await _cancel_after(
                lambda sid=sid: storage.request_cancel(sid, "stop", notify_channel="cc"), k
            )
            if await storage.get_cancel(sid) is not None:
                # Committed (whether or not the caller saw it): the announcement went out.
                with anyio.fail_after(BOUND_S):
                    note = await stream.receive()
                assert sid in note.payload
            if done:
                break
        else:
            pytest.fail("request_cancel never finished before its cancellation")


@pytest.mark.parametrize("mode", ["task", "scope"])
async def test_cancelled_postgres_transaction_returns_a_clean_connection(
    postgres_dsn: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One pooled connection: every call after a cancelled transaction reuses it."""
    settings = StorageSettings(url=SecretStr(postgres_dsn), pool_min_size=1, pool_max_size=1)
    outbox = [NewOutboxMessage("c", "a", {"i": i}) for i in range(3)]
    batch = [NewMessage("user", i) for i in range(3)]
    raw = await asyncpg.connect(postgres_dsn)
    try:
        async with open_storage(settings) as storage:
            await storage.delete_session("tx")
            await raw.execute("DELETE FROM outbox WHERE channel = 'c'")
            for k in range(0, 80, 2):

                def call() -> Any:
                    return storage.append_messages("tx", batch, outbox=outbox)

                if mode == "task":
                    await _cancel_after(call, k)
                else:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(call)
                        for _ in range(k):
                            await anyio.lowlevel.checkpoint()
                        tg.cancel_scope.cancel()
                # The same connection serves the next call, outside any transaction, and the
                # messages and their outbox rows were written together or not at all.
                n = await _assert_gap_free(storage, "tx", len(batch))
                sql = "SELECT count(*) FROM outbox WHERE channel = 'c'"
                assert await raw.fetchval(sql) == n
    finally:
        await raw.close()
    resets = [r for r in caplog.records if "active transaction" in r.getMessage()]
    assert not resets, "a cancelled transaction was left for the pool's reset to roll back"
