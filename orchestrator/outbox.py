"""OutboxRelay: deliver outbox rows to channel senders, grouped, bounded and in order.

This module owns the producer side (``Outbox``: enqueue, or append chat messages and their
deliveries in one transaction, with one notification) and the relay's sending side
(``open_outbox_relay``): one in-order lane per (channel, account) under an overall and a
per-channel concurrency bound, and each send's result (sent, a retry at its
``RetryTemplate`` delay, dead, released). Claiming in batches (kind ``OUTBOX`` of the
storage job engine), the idle wait on notifications and writing the results in batches,
each effective only under the current claim, are the shared consumer loop's
(``orchestrator.jobs.JobConsumer``), the same one the agent queue's worker runs.

Order, for any number of relays: a (channel, account) group is delivered in id (enqueue)
order with at most one message in flight. The claim enforces it (see ``claim_jobs``):
nothing of a group is claimed while one of its messages is in flight, and a message waiting
for its retry holds back the later ones; a relay then sends a group's claimed messages one
at a time. A dead-lettered message lets the rest of its group pass (a poison message does
not block a conversation); ``Outbox.redrive`` puts it back at its place in the group: it is
sent once nothing of its group is in flight, before the group's later pending messages.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.batching import describe_failure
from asyncstore.orchestrator.jobs import ConsumerSpec, JobConsumer, Outcome, OutcomeKind
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Backoff, Clock, fail_after
from asyncstore.storage import (
    AsyncStorageBackend,
    ChatMessage,
    InvalidInput,
    NewMessage,
    NewOutboxMessage,
    OutboxMessage,
)
from asyncstore.storage.base import OUTBOX
from asyncstore.storage.families import Family, MetricSink

__all__ = [
    "Outbox",
    "OutboxConfig",
    "OutboxRelay",
    "OutboxRelayStatistics",
    "RetryTemplate",
    "SendError",
    "Sender",
    "open_outbox_relay",
]

OUTBOX_CHANNEL = "asyncstore.outbox"

Sender = Callable[[OutboxMessage], Awaitable[None]]
"""Delivers one message to its provider; raises (ideally ``SendError``) when it could not."""


class SendError(Exception):
    """A failed delivery, as the provider reported it.

    ``retryable`` (None: decided by the template from ``status``) and ``retry_after_s``
    (the provider's Retry-After, honoured within the template's bounds) steer the retry.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class RetryTemplate(BaseModel):
    """How one provider (channel type) is retried.

    Attempt ``n`` that fails is retried after ``delays_s[n-1]`` (the last delay repeats),
    jittered by up to ``jitter`` of it, or after the provider's Retry-After clamped to
    ``[retry_after_min_s, retry_after_max_s]``. A row is dead-lettered once it has had
    ``max_attempts`` (or its own, smaller ``max_attempts``), or at once on an error that is
    not retryable: a ``SendError`` whose status is not in ``retryable_statuses`` (or that
    says so), or any other exception when ``retry_unknown_errors`` is off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    delays_s: tuple[float, ...] = Field(default=(1.0, 5.0, 30.0, 120.0, 600.0), min_length=1)
    max_attempts: int = Field(default=5, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)
    retryable_statuses: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
    retry_unknown_errors: bool = True
    honour_retry_after: bool = True
    retry_after_min_s: float = Field(default=0.0, ge=0)
    retry_after_max_s: float = Field(default=3600.0, ge=0)

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, SendError):
            if exc.retryable is not None:
                return exc.retryable
            return exc.status is None or exc.status in self.retryable_statuses
        if isinstance(exc, TimeoutError):
            return True
        return self.retry_unknown_errors

    def delay_s(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        after = exc.retry_after_s if isinstance(exc, SendError) else None
        if after is not None and self.honour_retry_after:
            return min(max(after, self.retry_after_min_s), self.retry_after_max_s)
        return self.backoff(attempt).delay(1)

    def backoff(self, attempt: int) -> Backoff:
        """The ``Backoff`` of failed attempt ``attempt``: its ``delays_s`` step (the last one
        repeats), a share ``jitter`` of it random."""
        step = self.delays_s[min(max(attempt, 1), len(self.delays_s)) - 1]
        return Backoff(base_s=step, max_s=step, jitter=self.jitter)


class OutboxConfig(BaseModel):
    """Settings of the outbox relay (``outbox.*`` in the settings tree).

    ``mode`` is the outbox feature flag: ``grouped`` (default: batched claims, one in-order
    lane per (channel, account), bounded concurrency) or ``serial`` (the legacy loop: one
    message at a time, kept for rollback and benchmarks).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["grouped", "serial"] = "grouped"
    batch_size: int = Field(default=200, ge=1, le=10_000, description="rows claimed at most")
    max_in_flight: int = Field(default=64, ge=1, description="concurrent sends, all channels")
    max_per_channel: int | None = Field(
        default=None, ge=1, description="concurrent sends per channel type (provider)"
    )
    lease_s: float = Field(default=120.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)
    fallback_poll_s: float = Field(default=10.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    max_write_batch: int = Field(default=1000, ge=1, le=10_000)


@dataclass(frozen=True, slots=True)
class OutboxRelayStatistics:
    """A snapshot of one relay's counters."""

    relay_id: str
    mode: str
    claimed: int
    claim_statements: int
    in_flight: int
    peak_in_flight: int
    lanes: int
    peak_lanes: int
    sent: int
    retried: int
    dead: int
    released: int
    stale_writes: int
    send_errors: int
    pending_writes: int
    undelivered_writes: int  # outcomes given up at shutdown: their leases expire
    notifications: int
    fallback_polls: int
    storage_errors: int

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("outbox_in_flight", "gauge", "Messages being sent."),
        Family("outbox_lanes", "gauge", "Channels with a send lane."),
        Family("outbox_pending_writes", "gauge", "Outcomes not yet stored."),
        Family("outbox_claimed", "counter", "Messages claimed."),
        Family("outbox_messages_finished", "counter", "Message outcomes.", ("outcome",)),
        Family("outbox_send_errors", "counter", "Failed sends."),
        Family("outbox_fallback_polls", "counter", "Fallback polls."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("outbox_in_flight", {}, self.in_flight)
        out.sample("outbox_lanes", {}, self.lanes)
        out.sample("outbox_pending_writes", {}, self.pending_writes)
        out.sample("outbox_claimed", {}, self.claimed)
        outcomes = {
            "sent": self.sent,
            "retried": self.retried,
            "dead": self.dead,
            "released": self.released,
        }
        out.samples("outbox_messages_finished", {}, outcomes)
        out.sample("outbox_send_errors", {}, self.send_errors)
        out.sample("outbox_fallback_polls", {}, self.fallback_polls)


class Outbox:
    """The producer side: write outbox rows (alone or with chat messages), then notify once."""

    def __init__(self, storage: AsyncStorageBackend, *, notify_in_enqueue: bool = True) -> None:
        self.storage = storage
        self.notify_in_enqueue = notify_in_enqueue

    async def enqueue(self, messages: Sequence[NewOutboxMessage]) -> list[OutboxMessage]:
        """Enqueue messages in one transaction and wake the relays with one notification.

        The rows and the notification are one statement (``notify_in_enqueue``, the
        default) or, the legacy way, a notification after the commit. If cancelled, the
        rows were either committed (announced; the legacy way maybe not, and the relays'
        fallback poll finds them) or not written.
        """
        if self.notify_in_enqueue:
            return await self.storage.enqueue_jobs(OUTBOX, messages, notify=OUTBOX_CHANNEL)
        rows = await self.storage.enqueue_jobs(OUTBOX, messages)  # legacy: a second round trip
        if rows:
            await self._notify()
        return rows

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        deliveries: Sequence[NewOutboxMessage],
        lease_token: int | None = None,
    ) -> list[ChatMessage]:
        """Append chat messages and their outbox rows in one transaction, then notify.

        A message and its delivery are committed together or not at all (see
        ``AsyncStorageBackend.append_messages``); cancellation behaves as for ``enqueue``.
        """
        stored = await self.storage.append_messages(
            session_id, messages, outbox=deliveries, lease_token=lease_token
        )
        if deliveries:
            await self._notify()
        return stored

    async def redrive(self, ids: Sequence[int]) -> list[int]:
        """Put dead-lettered messages back to pending with a fresh attempt budget; notify.

        Each goes back to its place in its group: it is sent once nothing of its group is in
        flight, before the group's later messages still pending (messages of its group sent
        while it was dead stay sent: a dead message lets its group pass). If cancelled, the
        messages were either moved (the relays' fallback poll finds them if the notification
        was not sent) or not.
        """
        moved = await self.storage.redrive_jobs(OUTBOX, ids)
        if moved:
            await self._notify()
        return moved

    async def get(self, message_id: int) -> OutboxMessage | None:
        return await self.storage.get_job(OUTBOX, message_id)

    async def _notify(self) -> None:
        await self.storage.notify(OUTBOX_CHANNEL, "")


class _Lane:
    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: collections.deque[tuple[OutboxMessage, float]] = collections.deque()


class OutboxRelay(JobConsumer[OutboxMessage]):
    """Claims and delivers outbox rows. Build it with ``open_outbox_relay``.

    The claim loop, idle wait and result writes are the shared ``JobConsumer``'s; this
    class runs one in-order lane per (channel, account) group under the concurrency bounds.
    """

    def __init__(
        self,
        storage: AsyncStorageBackend,
        senders: Mapping[str, Sender],
        templates: Mapping[str, RetryTemplate],
        config: OutboxConfig,
        relay_id: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not senders:
            raise InvalidInput("an outbox relay needs at least one sender")
        spec = ConsumerSpec(
            kind=OUTBOX,
            name="outbox",
            writer_name="outbox-outcomes",
            queues=sorted(senders),
            channel=OUTBOX_CHANNEL,
            lease_s=config.lease_s,
            fallback_poll_s=config.fallback_poll_s,
            max_write_batch=config.max_write_batch,
            wake_on_finish=True,
        )
        super().__init__(storage, spec, relay_id, clock=clock)
        self.config = config
        self.relay_id = relay_id
        self._senders = dict(senders)
        self._templates = dict(templates)
        self._default_template = RetryTemplate()
        self._in_flight = anyio.Semaphore(config.max_in_flight)
        self._per_channel: dict[str, anyio.Semaphore] = {}
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._pending = 0  # claimed and not yet finished
        self._lanes_idle = anyio.Event()
        self._lanes_idle.set()
        self._sending = self._peak = self._peak_lanes = self._send_errors = 0

    def statistics(self) -> OutboxRelayStatistics:
        """A frozen snapshot of this relay's counters."""
        return OutboxRelayStatistics(
            relay_id=self.relay_id,
            mode=self.config.mode,
            claimed=self._claimed,
            claim_statements=self._claims,
            in_flight=self._sending,
            peak_in_flight=self._peak,
            lanes=len(self._lanes),
            peak_lanes=self._peak_lanes,
            sent=self._counts[OutcomeKind.DONE],
            retried=self._counts[OutcomeKind.RETRY],
            dead=self._counts[OutcomeKind.DEAD],
            released=self._counts[OutcomeKind.RELEASE],
            stale_writes=self._stale,
            send_errors=self._send_errors,
            pending_writes=self._writer.statistics().unsettled if self._writer else 0,
            undelivered_writes=self._undelivered,
            notifications=self._notifications,
            fallback_polls=self._polls,
            storage_errors=self._errors,
        )

    async def flush(self) -> None:
        """Wait until every delivery result so far is written. Cancelling loses nothing."""
        await super().flush()

    # -- the consumer's part ---------------------------------------------------

    def _room(self) -> int:
        limit_to = 1 if self.config.mode == "serial" else self.config.batch_size
        room = limit_to - self._pending
        if room <= 0 or (self._pending and room < limit_to // 2):
            return 0  # claim again when half a batch has finished: fewer, fuller claims
        return room

    async def _drain(self) -> None:
        with self._clock.move_on_after(self.config.shutdown_grace_s):
            await self._lanes_idle.wait()
        # Cancelling the task group next cancels the lanes; each releases what it holds.

    def _dispatch(self, jobs: Sequence[OutboxMessage]) -> None:
        if self._tasks is None:
            raise RuntimeError("relay is not running")
        now = self._clock.monotonic()
        for msg in jobs:  # id order: each lane receives its group's rows in order
            key = (msg.channel, msg.account)
            lane = self._lanes.get(key)
            self._pending += 1
            if lane is None:
                lane = self._lanes[key] = _Lane()
                lane.messages.append((msg, now))
                self._lanes_idle = anyio.Event() if self._lanes_idle.is_set() else self._lanes_idle
                self._tasks.start_soon(self._run_lane, key, lane)
            else:
                lane.messages.append((msg, now))
        self._peak_lanes = max(self._peak_lanes, len(self._lanes))

    # -- sending ---------------------------------------------------------------

    async def _run_lane(self, key: tuple[str, str], lane: _Lane) -> None:
        """Send one group's messages in order; after a failure give the rest back.

        Cancelled (shutdown), the message being sent and the ones behind it are released.
        """
        queue = lane.messages
        try:
            while queue:
                msg, claimed_at = queue[0]
                if self._too_old(claimed_at):
                    break  # the claim may run out mid-send: give the rest back, re-claim later
                result = await self._send(msg, claimed_at)
                queue.popleft()
                self._finish(result)
                if result.kind is not OutcomeKind.DONE:
                    break
        finally:
            # Runs on cancellation too: every message still in the lane gets a final state.
            while queue:
                msg, _ = queue.popleft()
                self._finish(Outcome(OutcomeKind.RELEASE, msg.claim))
            del self._lanes[key]
            if not self._lanes:
                self._lanes_idle.set()

    def _too_old(self, claimed_at: float) -> bool:
        """The claim may run out before a send started now could time out."""
        age = self._clock.monotonic() - claimed_at
        return age > self.config.lease_s - self.config.send_timeout_s

    def _finish(self, result: Outcome) -> None:
        self._pending -= 1
        self._progress.set()
        self._record(result)

    async def _send(self, msg: OutboxMessage, claimed_at: float) -> Outcome:
        sender = self._senders[msg.channel]
        channel_limit = self._channel_semaphore(msg.channel)
        async with self._in_flight, channel_limit:
            if self._too_old(claimed_at):
                # Waiting for a send slot took so long that the claim could run out mid-send
                # (another relay may take the message): give it back instead.
                return Outcome(OutcomeKind.RELEASE, msg.claim)
            self._sending += 1
            self._peak = max(self._peak, self._sending)
            try:
                with fail_after(self._clock, self.config.send_timeout_s):
                    await sender(msg)
            except Exception as exc:
                self._send_errors += 1
                return self._failure(msg, exc)
            finally:
                self._sending -= 1
        return Outcome(OutcomeKind.DONE, msg.claim)

    def _channel_semaphore(self, channel: str) -> anyio.Semaphore | contextlib.nullcontext[None]:
        if self.config.max_per_channel is None:
            return contextlib.nullcontext()
        sem = self._per_channel.get(channel)
        if sem is None:
            sem = self._per_channel[channel] = anyio.Semaphore(self.config.max_per_channel)
        return sem

    def _failure(self, msg: OutboxMessage, exc: Exception) -> Outcome:
        template = self._templates.get(msg.channel, self._default_template)
        error = describe_failure(exc)
        budget = min(msg.max_attempts, template.max_attempts)
        if not template.is_retryable(exc) or msg.attempts >= budget:
            return Outcome(OutcomeKind.DEAD, msg.claim, error)
        at = datetime.fromtimestamp(time.time() + template.delay_s(msg.attempts, exc), UTC)
        return Outcome(OutcomeKind.RETRY, msg.claim, error, at)


def _default_relay_id() -> str:
    return f"relay:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@asynccontextmanager
async def open_outbox_relay(
    storage: AsyncStorageBackend,
    senders: Mapping[str, Sender],
    *,
    templates: Mapping[str, RetryTemplate] | None = None,
    config: OutboxConfig | None = None,
    relay_id: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[OutboxRelay]:
    """Run a relay for the channels in ``senders`` while the ``async with`` body runs.

    ``senders`` maps a channel type to its async sender; ``templates`` maps a channel type
    to its ``RetryTemplate`` (default: ``RetryTemplate()``). Leaving the block stops
    claiming, lets in-flight sends finish for up to ``shutdown_grace_s``, then cancels them;
    every message not delivered is released (pending again, attempt not counted) and every
    result is written before returning. If the block raises or is cancelled, sends are
    cancelled at once and the releases are still written (shielded, bounded by a timeout).
    ``clock`` is what the relay's timing reads (idle waits, the fallback poll, a claim's
    age, each send's ``send_timeout_s`` and the ``shutdown_grace_s``); a stored
    ``retry_at`` stays database (wall) time.
    """
    relay = OutboxRelay(
        storage,
        senders,
        templates or {},
        config or OutboxConfig(),
        relay_id or _default_relay_id(),
        clock=clock,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(relay._serve)
        try:
            yield relay
        finally:
            relay.stop()
