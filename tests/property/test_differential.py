"""Differential test: the same random calls on SQLite and Postgres give the same answers.

Hypothesis draws a sequence of contract calls (valid and hostile arguments: empty, overlong
and NUL ids, bad types, negative and huge ints, unknown ids, wrong tokens, ...) covering
chat, stream events, leases and slots, tasks, outbox, cancel state, login attempts and
notify validation. Each call runs on a SQLite handle and on a Postgres handle; the results
(generated ids and fencing tokens renumbered in order of appearance, timestamps dropped,
numbers compared with their type) and the error types must be equal call by call, and
every error must be a ``StorageError``. Every example uses fresh names (sessions, queues,
channels, keys), so one pair of databases serves a whole test.

The inputs issue 14 made identical (lone surrogates, channel names by bytes, numbers jsonb
would change) have their own tests at the end.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncstore.storage import (
    AsyncStorageBackend,
    Claim,
    Failure,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    StorageError,
    open_storage,
)
from asyncstore.storage.base import LoginPolicy

pytestmark = pytest.mark.postgres

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
POLICY = LoginPolicy(3, 60.0, 30.0, 2.0, 600.0, 3600.0)

# -- arguments -------------------------------------------------------------------------------
# A reference ("S", 0) is the example's first session name, ("T", 1) the second claimed
# task, ... resolved at run time on each backend; anything else is passed as it is.

HOSTILE_IDS = st.sampled_from(["", "x" * 256, "a\x00b", 7, None, b"bytes", 1.5])
HOSTILE_INTS = st.sampled_from([-1, 0, 2**63, -(2**63) - 1, 10**30, 1.5, True, "3", None])
HOSTILE_SECONDS = st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e308, "1", None])


def ref(kind: str, n: int = 3) -> st.SearchStrategy[tuple[str, int]]:
    return st.tuples(st.just(kind), st.integers(0, n - 1))


def either(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    # One argument in ten hostile: a call has several, and state must build up.
    return st.integers(0, 9).flatmap(lambda n: hostile if n == 0 else valid)


SESSION = either(ref("S"), HOSTILE_IDS)
NAME = either(ref("N"), st.sampled_from(["", "n" * 65, 5, None]))
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(-1e15, 1e15, allow_nan=False).filter(lambda f: f == 0 or abs(f) >= 1e-300),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8),
)
PAYLOAD = either(
    st.recursive(
        JSON_LEAF,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.text("abc", max_size=3), inner, max_size=3),
        ),
        max_leaves=6,
    ),
    st.sampled_from([math.nan, math.inf, {1: "int key"}, {"s": {1, 2}}, b"raw", object()]),
)
SECONDS = either(st.sampled_from([0.5, 5.0, 60.0]), HOSTILE_SECONDS)
TOKEN = either(ref("L"), st.sampled_from([0, -1, 10**12, 2**63]))
TASK_REF = either(ref("T"), st.sampled_from([0, -1, 10**12, "1", None]))
OUTBOX_REF = either(ref("O"), st.sampled_from([0, -1, 10**12, "1", None]))
WHEN = st.one_of(
    st.none(),
    st.sampled_from(["past", "future"]),
    st.sampled_from([datetime(2020, 1, 1), "2020-01-01", 5]),  # naive, str, int
)


def op(name: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(st.just(name), *args)


CALLS = st.one_of(
    op("append_messages", SESSION, st.lists(st.tuples(NAME, PAYLOAD), max_size=3),
       st.one_of(st.none(), TOKEN)),
    op("load_messages", SESSION, either(st.integers(0, 3), HOSTILE_INTS),
       either(st.integers(1, 5), HOSTILE_INTS)),
    op("delete_session", SESSION),
    op("append_stream_events",
       st.lists(st.tuples(SESSION, either(ref("L"), HOSTILE_INTS),
                          either(st.integers(1, 4), HOSTILE_INTS), NAME, PAYLOAD), max_size=3)),
    op("load_stream_events", SESSION, either(st.integers(0, 3), HOSTILE_INTS)),
    op("last_stream_seq", SESSION),
    op("acquire_lease", SESSION, either(ref("N"), HOSTILE_IDS), SECONDS),
    op("renew_lease", SESSION, TOKEN, SECONDS),
    op("release_lease", SESSION, TOKEN),
    op("get_lease", SESSION),
    op("ensure_lease_slots", NAME, either(st.integers(1, 3), HOSTILE_INTS)),
    op("acquire_lease_slot", SESSION, either(ref("N"), HOSTILE_IDS), SECONDS,
       st.one_of(st.none(), NAME), either(st.integers(0, 3), HOSTILE_INTS)),
    op("renew_lease_slot", SESSION, TOKEN, SECONDS, st.one_of(st.none(), NAME)),
    op("release_lease_slot", SESSION, TOKEN, NAME, st.one_of(st.none(), NAME)),
    op("enqueue_tasks",
       st.lists(st.tuples(NAME, PAYLOAD, either(st.integers(-2, 2), HOSTILE_INTS), WHEN,
                          st.one_of(st.none(), SESSION),
                          either(st.integers(1, 3), HOSTILE_INTS)), max_size=3)),
    op("claim_tasks", NAME, either(ref("N"), HOSTILE_IDS), either(st.integers(1, 3), HOSTILE_INTS),
       SECONDS),
    op("heartbeat_tasks", st.lists(st.tuples(TASK_REF, TOKEN), max_size=2), SECONDS),
    op("complete_tasks", st.lists(st.tuples(TASK_REF, TOKEN), max_size=2)),
    op("fail_tasks", st.lists(st.tuples(TASK_REF, TOKEN, st.sampled_from(["e", "", 5]), WHEN),
                              max_size=2)),
    op("release_tasks", st.lists(st.tuples(TASK_REF, TOKEN), max_size=2)),
    op("dead_letter_tasks",
       st.lists(st.tuples(TASK_REF, TOKEN, st.sampled_from(["e", 5]), st.none()), max_size=2)),
    op("get_task", TASK_REF),
    op("next_task_due_s", NAME),
    op("enqueue_outbox", st.lists(st.tuples(NAME, NAME, PAYLOAD,
                                            either(st.integers(1, 3), HOSTILE_INTS)), max_size=3)),
    op("claim_outbox", either(ref("N"), HOSTILE_IDS), either(st.integers(1, 3), HOSTILE_INTS),
       SECONDS, st.lists(NAME, min_size=1, max_size=2)),
    op("mark_outbox_sent", st.lists(st.tuples(OUTBOX_REF, TOKEN), max_size=2)),
    op("fail_outbox", st.lists(st.tuples(OUTBOX_REF, TOKEN, st.sampled_from(["e", 5]), WHEN),
                               max_size=2)),
    op("release_outbox", st.lists(st.tuples(OUTBOX_REF, TOKEN), max_size=2)),
    op("dead_letter_outbox",
       st.lists(st.tuples(OUTBOX_REF, TOKEN, st.sampled_from(["e"]), st.none()), max_size=2)),
    op("redrive_outbox", st.lists(OUTBOX_REF, max_size=2)),
    op("get_outbox", OUTBOX_REF),
    op("request_cancel", SESSION, either(st.sampled_from(["stop", "r" * 1200]), HOSTILE_IDS),
       st.one_of(st.none(), NAME)),
    op("get_cancel", SESSION),
    op("clear_cancel", SESSION),
    op("reserve_login_attempt", st.sampled_from(["account", "address", "nope", 1]), SESSION),
    op("finish_login_attempt", st.sampled_from(["account", "address"]), SESSION,
       st.sampled_from(["slot", 0.0, math.nan, "x"]),
       st.sampled_from(["failure", "success", "release", "other"])),
    op("notify", NAME, st.sampled_from(["", "p", "x" * 7900, "x" * 8000, "a\x00b", 5, None])),
)  # fmt: skip


# -- running calls -------------------------------------------------------------------------


@dataclass
class Run:
    """One backend's view of an example: its names and the ids and tokens it produced."""

    storage: AsyncStorageBackend
    prefix: str
    tasks: list[int] = field(default_factory=list)
    outbox: list[int] = field(default_factory=list)
    # (source, value): a lease token and a claim token from different sequences may have
    # the same value on one driver and not on the other, so each keeps its own entry.
    tokens: list[tuple[str, int]] = field(default_factory=list)
    slots: dict[str, float] = field(default_factory=dict)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] in "SNLTO":
            kind, n = value
            if kind in "SN":
                return f"{self.prefix}{kind.lower()}{n}"
            pool = {"L": [v for _, v in self.tokens], "T": self.tasks, "O": self.outbox}[kind]
            # An id or token the backend never produced: the same unknown value on both.
            return pool[n] if n < len(pool) else 10**9 + n
        return value

    def when(self, value: Any) -> Any:
        if value == "past":
            return datetime.now(UTC) - timedelta(hours=1)
        if value == "future":
            return datetime.now(UTC) + timedelta(hours=1)
        return value


def _call(run: Run, name: str, args: tuple[Any, ...]) -> Any:
    s, r = run.storage, run.resolve
    if name == "append_messages":
        session, msgs, token = args
        return s.append_messages(
            r(session), [NewMessage(r(role), body) for role, body in msgs],
            lease_token=None if token is None else r(token),
        )  # fmt: skip
    if name == "load_messages":
        return s.load_messages(r(args[0]), after_seq=args[1], limit=args[2])
    if name == "append_stream_events":
        return s.append_stream_events(
            [NewStreamEvent(r(a), r(e), q, r(k), p) for a, e, q, k, p in args[0]]
        )
    if name == "load_stream_events":
        return s.load_stream_events(r(args[0]), after_seq=args[1])
    if name in ("delete_session", "last_stream_seq", "get_lease", "get_cancel", "clear_cancel"):
        return getattr(s, name)(r(args[0]))
    if name == "acquire_lease":
        return s.acquire_lease(r(args[0]), r(args[1]), args[2])
    if name == "renew_lease":
        return s.renew_lease(r(args[0]), r(args[1]), args[2])
    if name == "release_lease":
        return s.release_lease(r(args[0]), r(args[1]))
    if name == "ensure_lease_slots":
        return s.ensure_lease_slots(r(args[0]), args[1])
    if name == "acquire_lease_slot":
        session, holder, ttl, pool, slots = args
        return s.acquire_lease_slot(r(session), r(holder), ttl, pool=r(pool), slots=slots)
    if name == "renew_lease_slot":
        return s.renew_lease_slot(r(args[0]), r(args[1]), args[2], pool=r(args[3]))
    if name == "release_lease_slot":
        return s.release_lease_slot(r(args[0]), r(args[1]), channel=r(args[2]), pool=r(args[3]))
    if name == "enqueue_tasks":
        return s.enqueue_tasks(
            [
                NewTask(r(q), p, prio, run.when(w), None if k is None else r(k), m)
                for q, p, prio, w, k, m in args[0]
            ]
        )
    if name == "claim_tasks":
        return s.claim_tasks(r(args[0]), r(args[1]), limit=args[2], lease_s=args[3])
    if name in ("heartbeat_tasks",):
        return s.heartbeat_tasks([Claim(r(i), r(t)) for i, t in args[0]], args[1])
    if name in ("complete_tasks", "release_tasks", "mark_outbox_sent", "release_outbox"):
        return getattr(s, name)([Claim(r(i), r(t)) for i, t in args[0]])
    if name in ("fail_tasks", "dead_letter_tasks", "fail_outbox", "dead_letter_outbox"):
        return getattr(s, name)([Failure(r(i), r(t), e, run.when(w)) for i, t, e, w in args[0]])
    if name == "get_task" or name == "get_outbox":
        return getattr(s, name)(r(args[0]))
    if name == "next_task_due_s":
        return s.next_task_due_s(r(args[0]))
    if name == "enqueue_outbox":
        return s.enqueue_outbox([NewOutboxMessage(r(c), r(a), p, m) for c, a, p, m in args[0]])
    if name == "claim_outbox":
        worker, limit, lease, channels = args
        names = [r(c) for c in channels]
        return s.claim_outbox(r(worker), limit=limit, lease_s=lease, channels=names)
    if name == "redrive_outbox":
        return s.redrive_outbox([r(i) for i in args[0]])
    if name == "request_cancel":
        return s.request_cancel(r(args[0]), args[1], notify_channel=r(args[2]))
    if name == "reserve_login_attempt":
        return s.reserve_login_attempt(args[0], r(args[1]), POLICY)
    if name == "finish_login_attempt":
        scope, key, start, outcome = args
        start = run.slots.get(f"{scope}/{r(key)}", 0.0) if start == "slot" else start
        return s.finish_login_attempt(scope, r(key), start, outcome, POLICY)
    if name == "notify":
        return s.notify(r(args[0]), args[1])
    raise AssertionError(f"unknown call {name}")


def _token_source(name: str, key: str) -> str:
    """Which sequence a token in a result comes from: a lease, or a claim of one job kind."""
    if key != "lease_token":
        return "lease"
    return "claim:outbox" if "outbox" in name else "claim:task"


def _record(run: Run, name: str, args: tuple[Any, ...], result: Any) -> None:
    """Remember the ids and tokens a call produced, so later calls can refer to them."""
    items = result if isinstance(result, list) else [result]
    for item in items:
        for attr in ("token", "lease_token"):
            value = getattr(item, attr, None)
            if isinstance(value, int) and (_token_source(name, attr), value) not in run.tokens:
                run.tokens.append((_token_source(name, attr), value))
        lease = getattr(item, "lease", None)
        if lease is not None and ("lease", lease.token) not in run.tokens:
            run.tokens.append(("lease", lease.token))
        if name in ("enqueue_tasks", "claim_tasks") and item.id not in run.tasks:
            run.tasks.append(item.id)
        if name in ("enqueue_outbox", "claim_outbox") and item.id not in run.outbox:
            run.outbox.append(item.id)
    if name == "reserve_login_attempt" and result.granted:
        run.slots[f"{args[0]}/{run.resolve(args[1])}"] = result.window_start


class _Renumber:
    """Replaces generated ids and tokens by their index among the run's, for comparison."""

    def __init__(self, run: Run, name: str = "") -> None:
        self.run = run
        self.name = name

    def __call__(self, value: Any, key: str = "") -> Any:
        if isinstance(value, datetime):
            return "<time>"
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, float):
            if key in ("window_start", "retry_after_s", "next_due"):
                return "<seconds>"
            return ("float", repr(value))
        if isinstance(value, int):
            # Both tables number from 1 on a fresh SQLite file: an id is looked up first
            # among the ids of the table the call is about (an outbox id may equal a task's).
            pools = [(self.run.tasks, "task"), (self.run.outbox, "outbox")]
            if "outbox" in self.name or key == "outbox_id":
                pools.reverse()
            for pool, tag in pools:
                if key in ("id", "ids", "outbox_id") and value in pool:
                    return f"{tag}#{pool.index(value)}"
            if key in ("token", "lease_token", "epoch"):
                entry = (_token_source(self.name, key), value)
                if entry in self.run.tokens:
                    return f"token#{self.run.tokens.index(entry)}"
                values = [v for _, v in self.run.tokens]
                if value in values:  # produced by another source: first occurrence
                    return f"token#{values.index(value)}"
            return value
        if isinstance(value, dict):
            return (
                {self(k, key or "ids"): self(v, key) for k, v in value.items()}
                if key in ("ids",)
                else {k: self(v, k) for k, v in value.items()}
            )
        if hasattr(value, "_asdict"):
            return {k: self(v, k) for k, v in value._asdict().items()}
        if isinstance(value, list | tuple | frozenset | set):
            items = [self(v, key) for v in value]
            return sorted(items, key=repr) if isinstance(value, frozenset | set) else items
        slots = getattr(type(value), "__slots__", None)
        if slots:
            return {k: self(getattr(value, k), k) for k in slots}
        return repr(value)


def _normalise(run: Run, name: str, result: Any) -> Any:
    if name in ("next_task_due_s",):
        return None if result is None else ("due", result == 0.0)
    key = "ids" if name in ("heartbeat_tasks", "complete_tasks", "release_tasks",
                            "dead_letter_tasks", "mark_outbox_sent", "release_outbox",
                            "dead_letter_outbox", "redrive_outbox", "fail_tasks",
                            "fail_outbox") else ""  # fmt: skip
    return _Renumber(run, name)(result, key)


async def _step(run: Run, name: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        result = await _call(run, name, args)
    except StorageError as exc:
        return "error", type(exc).__name__
    except Exception as exc:  # an escape from the error tree is itself a failure
        return "escaped", f"{type(exc).__name__}: {exc}"
    _record(run, name, args, result)
    return "ok", _normalise(run, name, result)


@dataclass
class Pair:
    sqlite_url: str
    postgres_url: str


@pytest.fixture
def pair(postgres_dsn: str, tmp_path: Path) -> Iterator[Pair]:
    url = f"sqlite:///{tmp_path / 'differential.db'}"

    async def migrate() -> None:
        async with open_storage(url, migrate=True):
            pass

    asyncio.run(migrate())
    yield Pair(url, postgres_dsn)


def _differ(pair: Pair, calls: list[tuple[Any, ...]], *, events: bool = True) -> None:
    prefix = f"d{secrets.token_hex(3)}."

    async def run_all() -> None:
        async with (
            open_storage(pair.sqlite_url) as lite,
            open_storage(pair.postgres_url) as pg,
        ):
            runs = Run(lite, prefix), Run(pg, prefix)
            for i, (name, *args) in enumerate(calls):
                got = [await _step(run, name, tuple(args)) for run in runs]
                if events:
                    event(f"{name}: {got[0][0]}")  # --hypothesis-show-statistics: coverage
                for status, detail in got:
                    assert status != "escaped", f"call {i} {name}{tuple(args)!r}: {detail}"
                assert got[0] == got[1], (
                    f"call {i} {name}{tuple(args)!r} differs:\n sqlite:   {got[0]!r}\n"
                    f" postgres: {got[1]!r}"
                )

    asyncio.run(run_all())


@SETTINGS
@given(calls=st.lists(CALLS, min_size=1, max_size=30))
def test_both_drivers_answer_every_call_alike(pair: Pair, calls: list[tuple[Any, ...]]) -> None:
    _differ(pair, calls)


# -- inputs issue 14 made identical ---------------------------------

SURROGATE = st.sampled_from(["\ud800", "a\udfffb", "\udc00" * 3])
ONCE = settings(SETTINGS, max_examples=5)


def _surrogate_calls() -> st.SearchStrategy[list[tuple[Any, ...]]]:
    def in_every(build: Callable[[str], tuple[Any, ...]]) -> st.SearchStrategy[tuple[Any, ...]]:
        return SURROGATE.map(build)

    return st.lists(
        st.one_of(
            in_every(lambda x: ("append_messages", x, [(("N", 0), "body")], None)),
            in_every(lambda x: ("append_messages", ("S", 0), [(x, "body")], None)),
            in_every(lambda x: ("acquire_lease", x, ("N", 0), 5.0)),
            in_every(lambda x: ("request_cancel", ("S", 0), x, None)),
            in_every(lambda x: ("enqueue_outbox", [(("N", 0), x, 1, 3)])),
            in_every(lambda x: ("notify", ("N", 0), x)),
        ),
        min_size=1,
        max_size=3,
    )


@ONCE
@given(calls=_surrogate_calls())
def test_lone_surrogates_are_refused_alike(pair: Pair, calls: list[tuple[Any, ...]]) -> None:
    _differ(pair, calls)


@ONCE
@given(
    channel=st.sampled_from(["c" * 64, "é" * 32, "x" * 62 + "é"]),
    payload=st.just("p"),
)
def test_channel_names_are_limited_by_bytes_alike(pair: Pair, channel: str, payload: str) -> None:
    _differ(pair, [("notify", channel, payload)])


@ONCE
@given(number=st.sampled_from([1e16, 5.942375405004405e16, -0.0, 1e300]))
def test_numbers_round_trip_alike(pair: Pair, number: float) -> None:
    _differ(pair, [("append_messages", ("S", 0), [(("N", 0), {"n": number})], None),
                   ("load_messages", ("S", 0), 0, 5)])  # fmt: skip


def test_huge_durations_are_refused_alike(pair: Pair) -> None:
    # Found by the differential test: SQLite raised a raw OverflowError for a lease whose
    # expiry fell past year 9999, Postgres an InvalidInput.
    _differ(
        pair,
        [
            ("acquire_lease_slot", ("S", 0), ("N", 0), 1e308, None, 0),
            ("acquire_lease", ("S", 1), ("N", 0), 1e12),
            ("claim_tasks", ("N", 0), ("N", 1), 1, 1e11),
            ("acquire_lease", ("S", 2), ("N", 0), 31_536_000.0),  # a year is fine
        ],
        events=False,
    )
