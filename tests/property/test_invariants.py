"""Property tests: sequence numbers, stream idempotency, lease fencing and task claims.

Every test runs on both drivers through the ``storage`` / ``storage_url`` fixtures. Hypothesis
reuses those function-scoped fixtures for all examples of a test, so every example works on
fresh session ids and queue names (``_fresh``) and never sees another example's rows.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter, defaultdict
from itertools import pairwise
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncstore.storage import (
    AsyncStorageBackend,
    ChatMessage,
    Claim,
    Failure,
    LeaseLost,
    NewMessage,
    NewStreamEvent,
    NewTask,
    Task,
    TaskStatus,
    open_storage,
)

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text that both databases store unchanged (jsonb refuses NUL; lone surrogates are not UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)


def _fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _cut(draw: st.DrawFn, items: list[Any], max_cuts: int = 4) -> list[list[Any]]:
    """Split ``items`` into non-empty consecutive runs at drawn positions."""
    if len(items) < 2:
        return [items] if items else []
    cuts = draw(st.lists(st.integers(1, len(items) - 1), unique=True, max_size=max_cuts))
    bounds = sorted({0, len(items), *cuts})
    return [items[a:b] for a, b in pairwise(bounds)]


# ---------------------------------------------------------------- 1. chat message seqs

# (session 0..2, messages per call 1..4, backend handle 0..1, checkpoints before the call 0..2)
APPEND_OP = st.tuples(st.integers(0, 2), st.integers(1, 4), st.integers(0, 1), st.integers(0, 2))


@st.composite
def append_schedules(draw: st.DrawFn) -> list[list[tuple[int, int, int, int, str]]]:
    """Groups of appends: the calls of a group run concurrently, groups one after another."""
    ops = draw(st.lists(APPEND_OP, min_size=1, max_size=20))
    with_text = [(*op, draw(TEXT)) for op in ops]
    return _cut(draw, with_text)


@PROPERTY
@given(groups=append_schedules())
async def test_message_seqs_stay_gap_free_under_interleaved_appends(
    storage: AsyncStorageBackend,
    storage_url: str,
    groups: list[list[tuple[int, int, int, int, str]]],
) -> None:
    sessions = [_fresh("chat") for _ in range(3)]
    calls: list[tuple[str, list[NewMessage], list[ChatMessage]]] = []
    call_ids = itertools.count()

    # A second handle on the same database: on SQLite a second writer connection that has
    # to win BEGIN IMMEDIATE, on Postgres a second pool.
    async with open_storage(storage_url) as other:
        handles = (storage, other)

        async def append(session: str, n: int, handle: int, pauses: int, text: str) -> None:
            call = next(call_ids)
            messages = [
                NewMessage("user" if k % 2 == 0 else "bot", [call, k, text]) for k in range(n)
            ]
            for _ in range(pauses):
                await anyio.lowlevel.checkpoint()
            rows = await handles[handle].append_messages(session, messages)
            calls.append((session, messages, rows))

        for group in groups:
            async with anyio.create_task_group() as tg:
                for sidx, n, handle, pauses, text in group:
                    tg.start_soon(append, sessions[sidx], n, handle, pauses, text)

    returned_by_seq: dict[tuple[str, int], tuple[str, Any]] = {}
    for session, messages, rows in calls:
        assert len(rows) == len(messages)
        first = rows[0].seq
        # One call's messages are contiguous and keep their input order.
        assert [r.seq for r in rows] == list(range(first, first + len(messages)))
        assert all(r.session_id == session for r in rows)
        assert [(r.role, r.content) for r in rows] == [(m.role, m.content) for m in messages]
        for r in rows:
            assert (session, r.seq) not in returned_by_seq, f"seq {r.seq} handed out twice"
            returned_by_seq[(session, r.seq)] = (r.role, r.content)

    for session in sessions:
        sent = [m for s, messages, _ in calls if s == session for m in messages]
        loaded = await storage.load_messages(session, limit=1000)
        assert [m.seq for m in loaded] == list(range(1, len(sent) + 1))
        assert Counter((m.role, tuple(m.content)) for m in loaded) == Counter(
            (m.role, tuple(m.content)) for m in sent
        )
        for m in loaded:  # what each call was told is what was stored
            assert returned_by_seq[(session, m.seq)] == (m.role, m.content)


# ---------------------------------------------------------------- 2. stream event seqs


@st.composite
def stream_plans(draw: st.DrawFn) -> tuple[dict[int, int], list[list[tuple[int, int]]]]:
    """Per-session totals and batches of (session, seq), including retried chunks.

    Each session's seqs 1..N are permuted and cut into chunks; chunks of all sessions are
    shuffled together; some chunks are sent again later (a retry after a lost reply); then
    consecutive sends are merged into batches, so one batch can mix sessions, new events and
    duplicates (even the same event twice).
    """
    totals: dict[int, int] = {}
    chunks: list[list[tuple[int, int]]] = []
    for sidx in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 12))
        totals[sidx] = n
        perm = draw(st.permutations(range(1, n + 1)))
        chunks += [[(sidx, seq) for seq in chunk] for chunk in _cut(draw, list(perm))]
    sends = list(draw(st.permutations(chunks)))
    for _ in range(draw(st.integers(0, 4))):
        src = draw(st.integers(0, len(sends) - 1))
        dst = draw(st.integers(src + 1, len(sends)))
        sends.insert(dst, sends[src])
    batches = [[ev for send in run for ev in send] for run in _cut(draw, sends, max_cuts=8)]
    return totals, batches


@PROPERTY
@given(plan=stream_plans())
async def test_stream_events_are_idempotent_and_fenced_by_epoch(
    storage: AsyncStorageBackend,
    plan: tuple[dict[int, int], list[list[tuple[int, int]]]],
) -> None:
    """Without lease rows, a session accepts an epoch no older than that of its last stored
    event, and refuses the whole (session, epoch) otherwise; re-sending an event of the same
    epoch changes nothing; an accepted newer epoch replaces the seqs it re-uses."""
    totals, batches = plan
    sessions = {sidx: _fresh("stream") for sidx in totals}
    current: dict[tuple[int, int], NewStreamEvent] = {}
    for b, batch in enumerate(batches):
        epoch = (b * 7) % 3  # epochs that go up and down between batches
        events = [
            NewStreamEvent(sessions[sidx], epoch, seq, f"k{b}", {"batch": b, "pos": pos})
            for pos, (sidx, seq) in enumerate(batch)
        ]
        heads = {
            sidx: current[max(k for k in current if k[0] == sidx)].epoch
            for sidx in {k[0] for k in current}
        }
        refused = {sidx for sidx, _ in batch if heads.get(sidx, 0) > epoch}
        expected = 0
        in_batch: set[tuple[int, int]] = set()
        for key, event in zip(batch, events, strict=True):
            if key in in_batch:
                continue  # a duplicate within one batch: the first one counts
            in_batch.add(key)
            if key[0] in refused:
                continue
            old = current.get(key)
            if old is None or old.epoch < event.epoch:
                current[key] = event
                expected += 1
        result = await storage.append_stream_events(events)
        assert result.stored == expected, f"batch {b}: {result.stored} stored, want {expected}"
        assert result.refused == {(sessions[sidx], epoch) for sidx in refused}

    for sidx in totals:
        loaded = await storage.load_stream_events(sessions[sidx])
        stored_seqs = sorted(k[1] for k in current if k[0] == sidx)
        n = stored_seqs[-1] if stored_seqs else 0
        assert [e.seq for e in loaded] == stored_seqs
        for e in loaded:
            want = current[(sidx, e.seq)]
            assert (e.session_id, e.epoch, e.kind, e.payload) == (
                want.session_id,
                want.epoch,
                want.kind,
                want.payload,
            ), f"seq {e.seq}: not the newest epoch's first write"
        assert await storage.last_stream_seq(sessions[sidx]) == n
        assert [e.seq for e in await storage.load_stream_events(sessions[sidx], after_seq=n)] == []


# ---------------------------------------------------------------- 3. lease fencing

LONG_TTL = 30.0
SHORT_TTL = 0.01  # "expire" steps let a lease lapse: this ttl, then a sleep past it
EXPIRY_SLEEP = 0.04
MAX_EXPIRIES = 2  # per example, to keep the test fast
LEASE_OP = st.tuples(
    st.sampled_from(
        ["acquire"] * 3
        + ["renew"] * 2
        + ["release"] * 2
        + ["sweep"] * 2
        + ["race", "write", "expire", "probe"]
    ),
    st.integers(0, 1),  # session
    st.integers(0, 2),  # holder
)


class LeaseModel:
    """What every holder believes, and which lease storage should consider current."""

    def __init__(self, storage: AsyncStorageBackend) -> None:
        self.storage = storage
        self.sessions = [_fresh("lease") for _ in range(2)]
        self.holders = [_fresh("holder") for _ in range(3)]
        self.current: dict[int, tuple[int, int] | None] = {0: None, 1: None}
        self.believed: dict[tuple[int, int], int] = {}  # (session, holder) -> token
        self.stale: dict[int, set[int]] = defaultdict(set)  # tokens known not current
        self.last_token = 0
        self.writes: dict[int, int] = defaultdict(int)
        self.expiries = 0

    def _won(self, s: int, h: int, token: int) -> None:
        assert token > self.last_token, f"token {token} after {self.last_token}: not increasing"
        self.last_token = token
        old = self.believed.get((s, h))
        if old is not None:
            self.stale[s].add(old)
        self.believed[(s, h)] = token
        self.current[s] = (h, token)

    def _is_current(self, s: int, h: int, token: int | None) -> bool:
        return token is not None and self.current[s] == (h, token)

    def _forget(self, s: int, h: int) -> None:
        token = self.believed.pop((s, h))
        self.stale[s].add(token)

    def _token_of(self, s: int, h: int) -> int:
        # A holder without a token tries one that was never issued.
        return self.believed.get((s, h), self.last_token + 1_000_000)

    async def step(self, op: str, s: int, h: int) -> None:
        st_, sid, holder = self.storage, self.sessions[s], self.holders[h]
        if op == "acquire":
            lease = await st_.acquire_lease(sid, holder, LONG_TTL)
            if self.current[s] is None:
                assert lease is not None, "a free session refused the lease"
                assert (lease.session_id, lease.holder) == (sid, holder)
                self._won(s, h, lease.token)
            else:
                assert lease is None, f"{holder} acquired a lease that is still held"
        elif op == "race":  # every holder tries at once, from its own task
            won: list[tuple[int, int]] = []

            async def contend(i: int) -> None:
                lease = await st_.acquire_lease(sid, self.holders[i], LONG_TTL)
                if lease is not None:
                    assert lease.holder == self.holders[i]
                    won.append((i, lease.token))

            async with anyio.create_task_group() as tg:
                for i in range(len(self.holders)):
                    tg.start_soon(contend, i)
            assert len(won) == (1 if self.current[s] is None else 0), f"race winners: {won}"
            if won:
                self._won(s, *won[0])
        elif op == "renew":
            token = self._token_of(s, h)
            if self._is_current(s, h, token):
                lease = await st_.renew_lease(sid, token, LONG_TTL)
                assert (lease.holder, lease.token) == (holder, token)
            else:
                with pytest.raises(LeaseLost):
                    await st_.renew_lease(sid, token, LONG_TTL)
                if (s, h) in self.believed:
                    self._forget(s, h)
        elif op == "release":
            token = self._token_of(s, h)
            expected = self._is_current(s, h, token)
            assert await st_.release_lease(sid, token) is expected
            if expected:
                self.current[s] = None
            if (s, h) in self.believed:
                self._forget(s, h)
        elif op == "write":  # a fenced append: succeeds only under the current lease
            token = self._token_of(s, h)
            if self._is_current(s, h, token):
                rows = await st_.append_messages(sid, [NewMessage("bot", h)], lease_token=token)
                self.writes[s] += 1
                assert [r.seq for r in rows] == [self.writes[s]]
            else:
                with pytest.raises(LeaseLost):
                    await st_.append_messages(sid, [NewMessage("bot", h)], lease_token=token)
        elif op == "expire":  # the holder stops renewing (e.g. it crashed) and the ttl runs out
            if self.expiries >= MAX_EXPIRIES:
                return
            self.expiries += 1
            current = self.current[s]
            if current is None:
                lease = await st_.acquire_lease(sid, holder, SHORT_TTL)
                assert lease is not None
                self._won(s, h, lease.token)
            else:
                await st_.renew_lease(sid, current[1], SHORT_TTL)
            await anyio.sleep(EXPIRY_SLEEP)
            self.current[s] = None  # the holder still believes its token: now stale
        elif op == "sweep":
            await st_.expire_leases(0.0)
        elif op == "probe":  # a token from the future is never current
            with pytest.raises(LeaseLost):
                await st_.renew_lease(sid, self.last_token + 10_000, LONG_TTL)

    async def check(self) -> None:
        """No two holders are confirmed by storage for one session, and stale tokens fail."""
        for s, sid in enumerate(self.sessions):
            lease = await self.storage.get_lease(sid)
            current = self.current[s]
            if current is None:
                assert lease is None, f"storage reports {lease}, the model no lease"
            else:
                assert lease is not None and (lease.holder, lease.token) == (
                    self.holders[current[0]],
                    current[1],
                )
            confirmed = []
            for h in range(len(self.holders)):
                token = self.believed.get((s, h))
                if token is None:
                    continue
                try:
                    await self.storage.renew_lease(sid, token, LONG_TTL)
                except LeaseLost:
                    assert lease is None or lease.token != token
                else:
                    assert lease is not None and lease.token == token, "stale token renewed"
                    confirmed.append(h)
            assert len(confirmed) <= 1, f"holders {confirmed} all hold a lease on {sid}"
            assert confirmed == ([] if current is None else [current[0]])
            stale = self.stale[s] | {
                t
                for (s2, _), t in self.believed.items()
                if s2 == s and t != (lease and lease.token)
            }
            for token in stale:
                assert not await self.storage.release_lease(sid, token), f"stale {token} released"
                with pytest.raises(LeaseLost):
                    await self.storage.renew_lease(sid, token, LONG_TTL)
            assert len(await self.storage.load_messages(sid, limit=1000)) == self.writes[s]


@PROPERTY
@given(ops=st.lists(LEASE_OP, min_size=1, max_size=20))
async def test_leases_fence_every_stale_holder(
    storage: AsyncStorageBackend, ops: list[tuple[str, int, int]]
) -> None:
    model = LeaseModel(storage)
    for op, s, h in ops:
        await model.step(op, s, h)
        await model.check()


# ---------------------------------------------------------------- 4. agent task claims

CRASH_LEASE = 0.05  # the crashed worker's claims lapse after this long
# Per task: (priority, failed attempts before success, times given back before success).
TASK = st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 1))


@st.composite
def task_plans(draw: st.DrawFn) -> tuple[list[list[tuple[int, int, int]]], list[int], int]:
    """Enqueue batches, the limits of 2-4 concurrent claimers, and what a crashing worker takes."""
    batches = draw(st.lists(st.lists(TASK, min_size=1, max_size=6), min_size=1, max_size=4))
    limits = draw(st.lists(st.integers(1, 3), min_size=2, max_size=4))
    return batches, limits, draw(st.integers(0, 3))


@PROPERTY
@given(plan=task_plans())
async def test_task_claims_are_exclusive_and_every_task_succeeds_once(
    storage: AsyncStorageBackend,
    storage_url: str,
    plan: tuple[list[list[tuple[int, int, int]]], list[int], int],
) -> None:
    batches, limits, crash_limit = plan
    queue = _fresh("queue")
    total = sum(len(b) for b in batches)
    enqueued: dict[int, tuple[int, int, int]] = {}  # task id -> its plan
    first_batch_in, enqueued_all = anyio.Event(), anyio.Event()
    # task id -> (worker, "held" | "returning"): "returning" once its fail/complete/release
    # was sent, after which a new claim by someone else is legitimate (it may have committed).
    live: dict[int, tuple[str, str]] = {}
    crashed: dict[int, tuple[Claim, float]] = {}  # abandoned claim, time before claiming
    last_token: dict[int, int] = defaultdict(int)
    claims: Counter[int] = Counter()
    failures: Counter[int] = Counter()
    releases: Counter[int] = Counter()
    completions: Counter[int] = Counter()

    def took(t: Task, worker: str) -> None:
        holder = live.get(t.id)
        assert holder is None or holder[1] == "returning", (
            f"task {t.id} claimed by {worker} while {holder[0]} holds it"
        )
        assert t.status is TaskStatus.RUNNING and t.worker_id == worker
        assert t.lease_token is not None and t.lease_token > last_token[t.id]
        last_token[t.id] = t.lease_token
        claims[t.id] += 1
        # attempts counts claims, except those given back with release_tasks
        assert t.attempts == claims[t.id] - releases[t.id]

    async with open_storage(storage_url) as other:
        handles = (storage, other)

        async def enqueue() -> None:
            for b, batch in enumerate(batches):
                rows = await storage.enqueue_tasks(
                    [NewTask(queue, [b, i], priority=p) for i, (p, _, _) in enumerate(batch)]
                )
                assert [r.payload for r in rows] == [[b, i] for i in range(len(batch))]
                for row, task_plan in zip(rows, batch, strict=True):
                    assert row.status is TaskStatus.QUEUED and row.id not in enqueued
                    enqueued[row.id] = task_plan
                first_batch_in.set()
                await anyio.lowlevel.checkpoint()
            enqueued_all.set()

        async def crasher() -> None:  # claims some tasks with a short lease and dies
            await first_batch_in.wait()
            if crash_limit == 0:
                return
            before = time.time()
            tasks = await other.claim_tasks(
                queue, "crasher", limit=crash_limit, lease_s=CRASH_LEASE
            )
            for t in tasks:
                took(t, "crasher")
                crashed[t.id] = (t.claim, before)

        async def claimer(n: int, limit: int) -> None:
            worker = f"w{n}"
            backend = handles[n % 2]
            while True:
                tasks = await backend.claim_tasks(queue, worker, limit=limit, lease_s=30)
                assert len(tasks) <= limit
                for t in tasks:
                    took(t, worker)
                    if t.id in crashed:  # only once the crashed worker's lease ran out
                        waited = time.time() - crashed[t.id][1]
                        assert waited >= CRASH_LEASE - 0.005, f"lease stolen after {waited}s"
                    live[t.id] = (worker, "held")
                for t in tasks:
                    await anyio.lowlevel.checkpoint()
                    # The plan comes from the payload: a claimer can see a task before
                    # enqueue() has recorded its row.
                    b, i = t.payload
                    _, fails, gives_back = batches[b][i]
                    if releases[t.id] < gives_back:
                        live[t.id] = (worker, "returning")
                        releases[t.id] += 1
                        assert await backend.release_tasks([t.claim]) == [t.id]
                    elif failures[t.id] < fails:
                        live[t.id] = (worker, "returning")
                        failures[t.id] += 1
                        result = await backend.fail_tasks([Failure(t.id, t.claim.token, "boom")])
                        assert result == {t.id: TaskStatus.QUEUED}
                    else:
                        assert await backend.heartbeat_tasks([t.claim], 30) == [t.id]
                        live[t.id] = (worker, "returning")
                        completions[t.id] += 1
                        assert await backend.complete_tasks([t.claim]) == [t.id]
                    if live.get(t.id) == (worker, "returning"):
                        del live[t.id]
                if not tasks:
                    if enqueued_all.is_set() and sum(completions.values()) >= total:
                        return
                    await anyio.sleep(0.002)

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(enqueue)
                tg.start_soon(crasher)
                for n, limit in enumerate(limits):
                    tg.start_soon(claimer, n, limit)

    assert len(enqueued) == total
    assert completions == Counter(dict.fromkeys(enqueued, 1))
    for task_id, (_, fails, gives_back) in enqueued.items():
        task = await storage.get_task(task_id)
        assert task is not None and task.status is TaskStatus.SUCCEEDED
        crashes = 1 if task_id in crashed else 0
        assert task.attempts == fails + 1 + crashes
        assert claims[task_id] == fails + gives_back + 1 + crashes
    # The crashed worker's claims are stale: nothing it does lands any more.
    stale = [claim for claim, _ in crashed.values()]
    assert await storage.heartbeat_tasks(stale, 30) == []
    assert await storage.complete_tasks(stale) == []
    assert await storage.fail_tasks([Failure(c.id, c.token, "late") for c in stale]) == {}
    assert await storage.release_tasks(stale) == []
    assert await storage.claim_tasks(queue, "late", limit=100, lease_s=30) == []
