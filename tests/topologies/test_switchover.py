"""Through a primary switchover (issue 17): a primary with a synchronous streaming standby
built on this machine, the library on the multi-host DSN (``target_session_attrs=read-write``);
the primary is stopped while a writer process streams events, queue workers claim tasks and
leases are held, then the standby is promoted.

Pass: calls fail only with retryable ``StorageError``s and succeed again on the new primary
within a bounded time; the stream writer stores every event it acknowledged exactly once;
listeners re-LISTEN and the subscriber gets a gap marker and catches up; claims continue and
the only tasks claimed twice are the ones in flight at the switchover (counted); lease tokens
never go backwards.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from asyncstore.orchestrator.broadcast import BroadcastHub
from asyncstore.storage import (
    Claim,
    NewTask,
    StorageError,
    StorageUnavailable,
    TaskStatus,
    encode_payload,
    open_storage,
)
from asyncstore.storage.errors import is_retryable
from tests.faults.cluster import ClusterUnavailable, find_bindir
from tests.faults.procs import (
    check_stored_stream,
    check_view,
    collect,
    listening,
    load_stream,
    spawn_agent,
)
from tests.topologies.replication import Node, multi_host_url, primary_options
from tests.waiting import wait_for

pytestmark = pytest.mark.postgres

DATABASE = "asyncstore_switchover"
SESSION = "switchover-stream"
DOWN_S = 4.0  # between the primary's stop and the promotion: longer than a blip
TASKS = 400
WORKERS = 4
TASK_LEASE_S = 2.0  # a claim lost in the switchover is claimable again this soon
LEASED = [f"leased-{i}" for i in range(5)]


@pytest.fixture
def pair() -> Iterator[tuple[Node, Node]]:
    try:
        bindir = find_bindir()
        primary = Node(bindir, extra_options=primary_options())
        standby = Node(bindir)
    except ClusterUnavailable as exc:
        if os.environ.get("ASYNCSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"Postgres is required (ASYNCSTORE_REQUIRE_POSTGRES=1): {exc}")
        pytest.skip(f"the switchover test needs the Postgres server binaries: {exc}")
    try:
        primary.init()
        primary.start()

        async def create() -> None:
            # Until the standby streams, a synchronous commit on the primary would wait.
            conn = await asyncpg.connect(primary.url(), timeout=10)
            try:
                await conn.execute("SET synchronous_commit = local")
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await conn.close()

        asyncio.run(create())
        standby.clone_from(primary)
        standby.start()

        async def synchronous() -> None:
            conn = await asyncpg.connect(primary.url(), timeout=10)

            async def one_sync_standby() -> bool:
                # The server's own view; it announces no event when a standby turns sync.
                synced = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                )
                return bool(synced == 1)

            try:
                await wait_for(one_sync_standby, 60, what="a synchronous standby")
            finally:
                await conn.close()

        asyncio.run(synchronous())
        yield primary, standby
    finally:
        try:
            standby.remove()
        finally:
            primary.remove()


class _Workers:
    """Queue workers claiming and completing tasks; what they claimed, and what failed."""

    def __init__(self) -> None:
        self.claims: Counter[int] = Counter()  # task id -> times claimed
        self.completed: set[int] = set()
        self.in_flight_lost: set[int] = set()  # claimed, completion not confirmed
        self.errors: Counter[str] = Counter()
        self.leaked: list[BaseException] = []
        self.changed = anyio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def _failed(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
        if not (isinstance(exc, StorageError) and is_retryable(exc)):
            self.leaked.append(exc)

    async def run(self, storage: object, worker: str) -> None:
        from asyncstore.storage import AsyncStorageBackend

        assert isinstance(storage, AsyncStorageBackend)
        while len(self.completed) < TASKS:
            try:
                tasks = await storage.claim_tasks("switch", worker, limit=5, lease_s=TASK_LEASE_S)
            except Exception as exc:
                self._failed(exc)
                self._note()
                await anyio.sleep(0.05)  # a retry pace while the database is away
                continue
            for task in tasks:
                self.claims[task.id] += 1
            if not tasks:
                await anyio.sleep(0.02)  # nothing claimable yet: a claim loop's poll
                continue
            claims = [Claim(t.id, t.lease_token or 0) for t in tasks]
            try:
                done = await storage.complete_tasks(claims)
            except Exception as exc:
                self._failed(exc)
                self.in_flight_lost.update(t.id for t in tasks)
            else:
                self.completed.update(done)
                self.in_flight_lost.update(t.id for t in tasks if t.id not in done)
            self._note()
            await anyio.sleep(0.005)  # a steady trickle, not a drain in a few milliseconds

    async def until(self, predicate: object, what: str, limit_s: float = 90) -> None:
        assert callable(predicate)
        try:
            with anyio.fail_after(limit_s):
                while not predicate():
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{what}: not within {limit_s} s ({len(self.completed)} done, {self.errors})"
            ) from None


async def _every_task_finished(storage: object, queue: str, limit_s: float = 90) -> None:
    """Wait until the database holds no unfinished task of ``queue``.

    The database decides, not the workers' tally: a completion that committed (and was
    replicated) just as the primary stopped is done although its worker never got the
    reply, so no worker will ever count it.
    """
    from asyncstore.storage import AsyncStorageBackend

    assert isinstance(storage, AsyncStorageBackend)

    async def drained() -> bool:
        try:
            queues, _ = await storage.backlog_depths()
        except StorageUnavailable:
            return False  # the database is switching over: read again
        depth = next((q for q in queues if q.name == queue), None)
        return depth is None or (depth.waiting, depth.delayed, depth.in_flight) == (0, 0, 0)

    await wait_for(drained, limit_s, what=f"every task of {queue!r} finished")


def _progress(count: int) -> object:
    return lambda m: m.get("event") == "progress" and m["count"] >= count


async def test_switchover_to_a_promoted_standby(pair: tuple[Node, Node]) -> None:
    primary, standby = pair
    url = multi_host_url(primary, standby, DATABASE)
    workers = _Workers()
    async with open_storage(url, migrate=True) as setup:
        await setup.enqueue_tasks(
            [NewTask("switch", encode_payload({"n": i})) for i in range(TASKS)]
        )
        leases_before: dict[str, int] = {}
        for session in LEASED:
            lease = await setup.acquire_lease(session, "holder-before", 60)
            assert lease is not None
            leases_before[session] = lease.token

    async with (
        open_storage(url) as storage,
        BroadcastHub(storage) as hub,
        listening(storage, hub.config.channel) as notes,
        collect(hub.subscribe(SESSION, after=(0, 0))) as seen,
        spawn_agent("writer", url) as writer,
        anyio.create_task_group() as tg,
    ):
        token = (await writer.call("hold", session=SESSION))["token"]
        await writer.call("begin", session=SESSION)
        await writer.call("run", session=SESSION, every_s=0.005, report_every=20)
        await seen.wait_until(lambda c: c.last_seq() >= 100, what="100 events before the stop")
        for i in range(WORKERS):
            tg.start_soon(workers.run, storage, f"w{i}")
        await workers.until(lambda: len(workers.completed) >= 40, "claims before the stop")

        await anyio.to_thread.run_sync(primary.stop)
        stopped_at = time.monotonic()
        errors_at_stop = workers.errors.total()
        await writer.wait_for(_progress(0), start=len(writer.messages))
        await workers.until(
            lambda: workers.errors.total() > errors_at_stop, "a failed claim while down"
        )
        await anyio.sleep(DOWN_S)  # the outage itself, not a wait for a result
        during = [m for m in writer.messages if m.get("event") == "progress"][-1]
        down = (await writer.call("stats"))["writer"]
        await anyio.to_thread.run_sync(standby.promote)
        promoted_at = time.monotonic()

        # The library finds the new primary on its own through the multi-host DSN.
        reconnect_s = float("nan")
        with anyio.fail_after(60):
            while True:
                try:
                    await storage.ping()
                    reconnect_s = time.monotonic() - promoted_at
                    break
                except StorageUnavailable:
                    await anyio.sleep(0.05)  # retry pace of a caller during the outage
        done_at_promotion = len(workers.completed)
        await _every_task_finished(storage, "switch")
        head = during["seq"]
        await seen.wait_until(
            lambda c: c.last_seq() >= head, limit_s=90, what="catch-up after the promotion"
        )
        caught_up_s = time.monotonic() - promoted_at
        await notes.wait_gap(limit_s=60)
        gap_s = (notes.first_gap_at or float("nan")) - promoted_at
        await writer.wait_for(_progress(during["count"] + 100), start=len(writer.messages))
        halted = await writer.call("halt")
        assert halted["error"] is None, halted
        final = halted["last"]
        await writer.call("flush")
        await seen.wait_until(lambda c: c.last_seq() >= final, limit_s=60, what="the last event")
        after = await writer.call("stats")
        closed = await writer.close()
        rows = await load_stream(storage, SESSION)
        local_reconnects = storage.statistics().listener_reconnects
        leases_after = {s: await storage.get_lease(s) for s in LEASED}
        renewed: dict[str, int] = {}
        for session in LEASED:
            await storage.release_lease(session, leases_before[session])
            lease = await storage.acquire_lease(session, "holder-after", 60)
            assert lease is not None
            renewed[session] = lease.token
        statuses: Counter[TaskStatus] = Counter()
        for task_id in workers.claims:
            task = await storage.get_task(task_id)
            assert task is not None
            statuses[task.status] += 1
        tg.cancel_scope.cancel()

    duplicates = {t for t, n in workers.claims.items() if n > 1}
    print(
        f"switchover: primary stopped, standby promoted {DOWN_S} s later; first call on the "
        f"new primary {reconnect_s:.2f} s after promotion; gap marker {gap_s:.2f} s and "
        f"subscriber caught up {caught_up_s:.2f} s after it; {final} events stored once; "
        f"{len(duplicates)} tasks claimed twice, all in flight ({len(workers.in_flight_lost)} "
        f"in flight); worker errors {dict(workers.errors)}; tasks done at promotion "
        f"{done_at_promotion}/{TASKS}; down {time.monotonic() - stopped_at:.1f} s in all"
    )
    # Callers saw only retryable storage errors, never a driver exception.
    assert not workers.leaked, workers.leaked[:3]
    assert reconnect_s < 30  # generous: the promotion itself takes well under a second
    # The writer buffered through the outage and stored everything it acknowledged, once.
    assert down["lost"] == 0, down
    stats = closed["writer"]
    assert stats["lost"] == 0 and stats["dropped"] == {}, stats
    assert stats["emitted"] == stats["persisted"] == final, stats
    check_stored_stream(rows)
    assert len(rows) == final and {row.epoch for row in rows} == {token}
    assert after["leases_lost"] == 0, after
    # Listeners re-LISTENed on the new primary; the subscriber got a gap, caught up, in order.
    assert local_reconnects >= 1 and closed["listener_reconnects"] >= 1
    assert notes.gaps() >= 1
    assert seen.resets == [], seen.resets
    assert [e.seq for e in seen.events] == list(range(1, final + 1))
    check_view(seen.items, rows)
    # Claims went on; every task finished; duplicates only of tasks in flight at the stop.
    assert statuses == Counter({TaskStatus.SUCCEEDED: TASKS}), statuses
    assert duplicates <= workers.in_flight_lost, duplicates - workers.in_flight_lost
    # Fencing: the tokens held before are still there, and new ones are larger.
    for session in LEASED:
        lease = leases_after[session]
        assert lease is not None and lease.token == leases_before[session]
        assert renewed[session] > leases_before[session]
