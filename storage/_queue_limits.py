"""Coordinated task queues: ordering groups and fleet-wide limits, for both drivers.

This module owns what migration 0010 adds to the agent queue: the records
(``QueueLimits``, ``LimitedClaim``), the checks of their input, the start-rate window
arithmetic, and the SQL sequences the two drivers run for the coordinated claim
(``claim_limited_tasks``), the limits row (``set_queue_limits`` / ``get_queue_limits``)
and the finish wakeup (``wake_task_queue``). The drivers' ``_sql_*`` hooks call the
``pg_*`` / ``lite_*`` functions below; the contract methods in ``storage.base`` validate
first.

A queue is coordinated once it has a ``task_queues`` row: declared with
``set_queue_limits`` (a worker's ``QueueConfig`` does it at start) or created by the
first enqueue of a grouped task. Its claims lock that row, so they run one at a time per
queue across the fleet, each reading the queue after the previous one committed:

- ``max_running``: tasks of the queue running under a live lease, fleet-wide. A task
  whose lease expired holds no slot (a killed worker's slot comes back at its lease
  expiry).
- ``max_per_second``: starts (claims, by the database clock under the lock) in any
  window of ``capacity / max_per_second`` seconds, where ``capacity`` is
  ``max(1, floor(max_per_second))``: 20/s allows 20 starts in any 1 s window, 0.5/s one
  start in any 2 s window. The log of the window's claims (time, tasks started) is kept
  in the row, one entry per claim.
- ``max_per_group``: a grouped task's group has at most this many in flight, and its
  tasks start in id order (the outbox's group rule, with N in flight instead of one).

Group rules (the outbox's, tests/contract/test_task_groups.py): a task waiting for its
retry (``fail_tasks`` with attempts left) holds back the later tasks of its group until it
runs; a dead task (attempts exhausted, ``dead_letter_tasks``, or its lease expired on the
last attempt) holds nothing back, the rest of the group goes on; a redriven task goes back
to its place (its id): it waits while N of its group are in flight, then goes before the
later ones; a released task (shutdown) is due at once at its place; a task whose worker
died is claimable again at its lease expiry, at its place. Ungrouped tasks of a
coordinated queue are claimed by priority, then run_after, then id, as before.

Ungrouped tasks of a queue without a row use the unchanged one-statement claim.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from asyncstore.storage.errors import InvalidInput

__all__ = [
    "MAX_RATE",
    "TASK_QUEUE_CHANNEL_PREFIX",
    "LimitedClaim",
    "QueueLimits",
    "check_queue_limits",
    "rate_window",
    "retry_after_s",
    "task_queue_channel",
]

TASK_QUEUE_CHANNEL_PREFIX = "asyncstore.queue."
"""A task queue's notification channel is this prefix and its name: enqueues announce new
tasks there, and finishes (a completion, a cancel) announce freed slots of a coordinated
queue there (``wake_task_queue``)."""


def task_queue_channel(queue: str) -> str:
    """The notification channel of task queue ``queue`` (its workers listen there)."""
    return TASK_QUEUE_CHANNEL_PREFIX + queue


MAX_RATE = 10_000.0
"""The highest ``max_per_second``: the start log holds one entry per start in the window."""

MAX_PER_GROUP = 10_000


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """A task queue's fleet-wide limits (None: no cap) and its per-group concurrency."""

    queue: str
    max_running: int | None = None
    max_per_second: float | None = None
    max_per_group: int = 1

    @classmethod
    def from_row(cls, row: Any) -> QueueLimits:
        rate = row["max_per_second"]
        return cls(
            row["queue"],
            row["max_running"],
            None if rate is None else float(rate),
            int(row["max_per_group"]),
        )


@dataclass(frozen=True, slots=True)
class LimitedClaim:
    """What a coordinated claim returns: the tasks it started, and whether a limit or a
    group held back due tasks below the requested count (``refused``). Then
    ``retry_after_s`` is when the limits can allow a start again without any task
    finishing (the rate window moving on, or the earliest lease expiry); a finish sooner
    than that is announced on the queue's channel (``wake_task_queue``)."""

    tasks: list[Any]
    refused: bool
    retry_after_s: float | None


def _positive_int(value: object, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidInput(f"{name} must be an int in 1..{maximum}, got {value!r}")
    return value


def check_queue_limits(
    max_running: object, max_per_second: object, max_per_group: object
) -> tuple[int | None, float | None, int]:
    """Checked limits: ints at least 1 (or None), a finite rate in (0, ``MAX_RATE``]."""
    running = None if max_running is None else _positive_int(max_running, "max_running", 2**31 - 1)
    rate: float | None = None
    if max_per_second is not None:
        if isinstance(max_per_second, bool) or not isinstance(max_per_second, int | float):
            raise InvalidInput(f"max_per_second must be a number, got {max_per_second!r}")
        rate = float(max_per_second)
        if not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
            raise InvalidInput(f"max_per_second must be in (0, {MAX_RATE:g}], got {rate!r}")
    group = _positive_int(max_per_group, "max_per_group", MAX_PER_GROUP)
    return running, rate, group


def rate_window(max_per_second: float | None) -> tuple[int | None, float]:
    """(starts allowed per window, the window in seconds); (None, 1.0) without a rate."""
    if max_per_second is None:
        return None, 1.0
    capacity = max(1, math.floor(max_per_second))
    return capacity, capacity / max_per_second


def retry_after_s(
    refused: bool,
    clock_s: float,
    starts: list[tuple[float, int]],
    capacity: int | None,
    window_s: float,
    first_expiry_s: float | None,
    lease_s: float,
    next_due_s: float | None = None,
) -> float | None:
    """When a refused claimer should try again without a wakeup; None if not refused.

    A full rate window: when its oldest counted start leaves it. Otherwise (running cap or
    group): the earliest live lease expiry of the queue or the next retry falling due
    (a task waiting for its retry holds its group back), at most ``lease_s`` away.
    """
    if not refused:
        return None
    total = sum(n for _, n in starts)
    if capacity is not None and total >= capacity:
        for started_at, n in sorted(starts):  # the oldest claims leave the window first
            total -= n
            if total < capacity:
                return max(0.0, started_at + window_s - clock_s)
    wait = lease_s
    for at in (first_expiry_s, next_due_s):
        if at is not None:
            wait = min(wait, at - clock_s)
    return max(0.0, wait)


# ---------------------------------------------------------------- Postgres


async def pg_enqueue_grouped_tasks(
    backend: Any, rows: list[Any], groups: list[str | None], notify: str | None
) -> list[Any]:
    """The Postgres task enqueue with each row's group (``enqueue_grouped_tasks``)."""
    from asyncstore.storage import _validate as v
    from asyncstore.storage.base import Task

    seen: set[tuple[str, str]] = set()
    send: list[Any] = []
    send_groups: list[str | None] = []
    for row, group in zip(rows, groups, strict=True):
        if row[4] is not None:  # the same key twice in one call: sent once, as enqueue_tasks
            if (row[0], row[4]) in seen:
                continue
            seen.add((row[0], row[4]))
        send.append(row)
        send_groups.append(group)
    columns = [list(c) for c in zip(*send, strict=True)]
    result = await backend._fetch("enqueue_grouped_tasks", *columns, notify, send_groups)
    if result and result[0]["notified"]:
        backend._count("notify")
    return v.match_enqueued(rows, [Task.from_row(r) for r in result])


async def pg_set_queue_limits(
    backend: Any, queue: str, running: int | None, rate: float | None, group: int
) -> QueueLimits:
    rows = await backend._fetch("set_queue_limits", queue, running, rate, group)
    return QueueLimits.from_row(rows[0])


async def pg_get_queue_limits(backend: Any, queue: str) -> QueueLimits | None:
    rows = await backend._fetch("get_queue_limits", queue)
    return QueueLimits.from_row(rows[0]) if rows else None


async def pg_claim_limited_tasks(
    backend: Any, record: Any, worker_id: str, limit: int, queue: str, lease_s: float
) -> LimitedClaim | None:
    """Lock the queue's row, then claim in a second statement (a snapshot taken after the
    lock). None: the queue has no row (not coordinated)."""
    async with backend._transaction() as conn:
        backend._count("_lock_task_queue")
        row = await conn.fetchrow(backend._q["_lock_task_queue"], queue)
        if row is None:
            return None
        rate = None if row["max_per_second"] is None else float(row["max_per_second"])
        capacity, window = rate_window(rate)
        backend._count("claim_limited_tasks")
        rows = await conn.fetch(
            backend._q["claim_limited_tasks"],
            worker_id,
            limit,
            queue,
            lease_s,
            row["max_running"],
            capacity,
            window,
            row["max_per_group"],
        )
    head = rows[0]
    tasks = [record(r) for r in rows if r["id"] is not None]
    retry = retry_after_s(
        bool(head["refused"]),
        float(head["clock_s"]),
        list(zip(head["window_times"] or [], head["window_counts"] or [], strict=True)),
        capacity,
        window,
        head["first_expiry_s"],
        lease_s,
        head["next_due_s"],
    )
    return LimitedClaim(tasks, bool(head["refused"]), retry)


async def pg_wake_task_queue(backend: Any, queue: str, channel: str) -> bool:
    rows = await backend._fetch("wake_task_queue", queue, channel)
    woke = bool(rows and rows[0]["woke"])
    if woke:
        backend._count("notify")
    return woke


async def pg_wake_after_cancel(backend: Any, row: Any) -> None:
    """After a committed ``cancel_task`` that ended a task of a coordinated queue: the
    finish wakeup (its slot and its group are free), run to its end even if the caller is
    cancelled meanwhile (a lost wakeup would leave refused workers waiting a lease)."""
    from asyncstore.storage._shield import complete

    if row["changed"] and row["coordinated"]:
        queue = row["queue"]
        await complete(pg_wake_task_queue(backend, queue, task_queue_channel(queue)))


# ---------------------------------------------------------------- SQLite


async def lite_set_queue_limits(
    backend: Any, queue: str, running: int | None, rate: float | None, group: int
) -> QueueLimits:
    params = {
        "queue": queue,
        "max_running": running,
        "max_per_second": rate,
        "max_per_group": group,
        "now": time.time(),
    }
    rows = await backend._write("set_queue_limits", params)
    return QueueLimits.from_row(rows[0])


async def lite_get_queue_limits(backend: Any, queue: str) -> QueueLimits | None:
    rows = await backend._read("get_queue_limits", {"queue": queue})
    return QueueLimits.from_row(rows[0]) if rows else None


async def lite_claim_limited_tasks(
    backend: Any, record: Any, worker_id: str, limit: int, queue: str, lease_s: float
) -> LimitedClaim | None:
    import orjson

    async with backend._transaction() as tx:
        state = await tx.fetch("_lock_task_queue", {"queue": queue})
        if not state:
            return None
        row = state[0]
        now = time.time()
        rate = None if row["max_per_second"] is None else float(row["max_per_second"])
        capacity, window = rate_window(rate)
        starts = [(t, n) for t, n in orjson.loads(row["recent_starts"]) if t > now - window]
        running = (await tx.fetch("_running_tasks", {"queue": queue, "now": now}))[0]
        budget = limit
        if row["max_running"] is not None:
            budget = min(budget, row["max_running"] - int(running["n"]))
        if capacity is not None:
            budget = min(budget, capacity - sum(n for _, n in starts))
        claimed: list[dict[str, Any]] = []
        if budget > 0:
            token = await tx.next_token("claim_tokens")
            params = {
                "queue": queue,
                "worker_id": worker_id,
                "token": token,
                "now": now,
                "lease_until": now + lease_s,
                "budget": budget,
                "per_group": int(row["max_per_group"]),
            }
            claimed = await tx.fetch("claim_limited_tasks", params)
        started = [r for r in claimed if r["status"] == "running"]
        left = (await tx.fetch("_due_tasks_left", {"queue": queue, "now": now}))[0]
        refused = len(started) < limit and bool(left["left_over"])
        next_due = None
        if refused:
            params = {"queue": queue, "now": now}
            next_due = (await tx.fetch("_next_retry_due", params))[0]["next_due"]
        if capacity is not None and started:
            starts.append((now, len(started)))
        log = {
            "queue": queue,
            "starts": orjson.dumps(starts if capacity is not None else []).decode(),
            "refused": refused,
            "now": now,
        }
        await tx.execute("_log_task_queue", log)
    tasks = sorted((record(r) for r in started), key=lambda t: (-t.priority, t.id))
    first = running["first_expiry"]
    retry = retry_after_s(refused, now, starts, capacity, window, first, lease_s, next_due)
    return LimitedClaim(tasks, refused, retry)


async def lite_wake_task_queue(backend: Any, queue: str, channel: str) -> bool:
    async with backend._transaction() as tx:
        return await lite_wake_in(tx, queue, channel)


async def lite_wake_in(tx: Any, queue: str, channel: str) -> bool:
    """The finish wakeup inside a write transaction ``tx`` (sent if it commits)."""
    rows = await tx.fetch("wake_task_queue", {"queue": queue})
    if rows:
        tx.notify_on_commit(channel, "0")
    return bool(rows)
