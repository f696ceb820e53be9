"""What the leased-job consumer loop is configured with and what it records.

This module owns the vocabulary shared by the consumer loop (``orchestrator.jobs``) and the
consumers built on it (the agent queue's worker, the outbox relay): ``ConsumerSpec`` (how a
consumer uses the loop), ``Outcome`` / ``OutcomeKind`` (what became of a claimed job),
``Claimed`` (a claimed row of any kind), the loop's two retry policies and ``first_of``.
Everything here is re-exported by ``orchestrator.jobs``, its historical home.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import anyio

from asyncstore.orchestrator.timing import Backoff
from asyncstore.storage import Claim
from asyncstore.storage.base import JobKind

__all__ = [
    "BUSY_RETRY",
    "STORAGE_RETRY",
    "Claimed",
    "ConsumerSpec",
    "Outcome",
    "OutcomeKind",
    "first_of",
]


class Claimed(Protocol):
    """A claimed row of any kind (``Task``, ``OutboxMessage``)."""

    @property
    def claim(self) -> Claim: ...


STORAGE_RETRY = Backoff(base_s=1.5, max_s=1.5, jitter=2 / 3)
"""The pause after a failed claim or next-due read: uniformly 0.5 to 1.5 s."""

BUSY_RETRY = Backoff(base_s=0.01, max_s=1.0, factor=2.0, jitter=0.0)
"""Idle entries in a row that found due rows being claimed by another consumer's
uncommitted statement: 10 ms, 20 ms, ... up to 1 s, instead of spinning."""


class OutcomeKind(enum.Enum):
    """What became of a claimed job; also the order the writer stores a batch in."""

    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"
    RELEASE = "release"


class Outcome(NamedTuple):
    kind: OutcomeKind
    claim: Claim
    error: str = ""
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """How one consumer uses the shared loop.

    ``queues`` is the claim's filter (``claim_jobs``); ``channel`` the notification channel
    that wakes it (None: no listener, the legacy polling loops). ``heartbeat_s`` renews the
    held leases that often (None: no renewal, the lease must outlast the work).
    ``next_due`` reads when the next row becomes claimable (a due time or another
    consumer's lease expiry), so an idle consumer wakes then; None: only notifications,
    known due times and the fallback poll wake it. ``wake_on_finish``: a finished row lets
    the rows behind it be claimed (an ordering group), so writing it wakes the claim loop.
    ``notify_on_release``: released rows are due now, one notification lets other
    consumers take them. ``write_each``: one statement per outcome (the legacy loops).
    """

    kind: JobKind[Any, Any, Any]
    name: str  # in log messages
    writer_name: str  # the outcome BatchWriter's name (its statistics and logs)
    queues: Sequence[str] | None
    channel: str | None
    lease_s: float
    fallback_poll_s: float
    max_write_batch: int
    heartbeat_s: float | None = None
    next_due: Callable[[], Awaitable[float | None]] | None = None
    wake_on_finish: bool = False
    notify_on_release: bool = False
    write_each: bool = False


async def first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    if any(e.is_set() for e in events):
        return
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)
