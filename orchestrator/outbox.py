"""OutboxRelay: deliver outbox rows to channel senders, grouped, bounded and in order.

This module owns the producer side (``Outbox``: enqueue, or append chat messages and their
deliveries in one transaction, then notify once) and the relay (``open_outbox_relay``): it
claims rows in batches through ``claim_outbox``, runs one in-order lane per (channel,
account) under an overall and a per-channel concurrency bound, and writes the results in
batches (``mark_outbox_sent`` / ``fail_outbox`` / ``dead_letter_outbox`` /
``release_outbox``), each effective only under the current claim. Retries follow a
per-channel ``RetryTemplate``. It relies on the storage contract and its notifications.

Order, for any number of relays: a (channel, account) group is delivered in id (enqueue)
order with at most one message in flight. The claim enforces it (see ``claim_outbox``):
nothing of a group is claimed while one of its messages is in flight, and a message waiting
for its retry holds back the later ones; a relay then sends a group's claimed messages one
at a time. A dead-lettered message lets the rest of its group pass (a poison message does
not block a conversation); ``Outbox.redrive`` puts it back at its place in the group: it is
sent once nothing of its group is in flight, before the group's later pending messages.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal, NamedTuple

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.batching import (
    Batch,
    BatchWriter,
    DeadLetter,
    describe_failure,
    outcome_batches,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    ChatMessage,
    Claim,
    Failure,
    InvalidInput,
    NewMessage,
    NewOutboxMessage,
    OutboxMessage,
    OutboxStatus,
    StorageError,
)
from asyncstore.storage.errors import is_retryable
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

log = logging.getLogger("asyncstore.outbox")

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
        base = self.delays_s[min(max(attempt, 1), len(self.delays_s)) - 1]
        return base * (1.0 - self.jitter * random.random())


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

    def __init__(self, storage: AsyncStorageBackend) -> None:
        self.storage = storage

    async def enqueue(self, messages: Sequence[NewOutboxMessage]) -> list[OutboxMessage]:
        """Enqueue messages in one transaction and wake the relays with one notification.

        If cancelled, the rows were either committed (the relays' fallback poll finds them
        if the notification was not sent) or not written.
        """
        rows = await self.storage.enqueue_outbox(messages)
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
        moved = await self.storage.redrive_outbox(ids)
        if moved:
            await self._notify()
        return moved

    async def get(self, message_id: int) -> OutboxMessage | None:
        return await self.storage.get_outbox(message_id)

    async def _notify(self) -> None:
        await self.storage.notify(OUTBOX_CHANNEL, "")


class _Kind(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    DEAD = "dead"
    RELEASE = "release"


class _Result(NamedTuple):
    kind: _Kind
    claim: Claim
    error: str = ""
    retry_at: datetime | None = None


class _Lane:
    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: collections.deque[tuple[OutboxMessage, float]] = collections.deque()


class OutboxRelay:
    """Claims and delivers outbox rows. Build it with ``open_outbox_relay``."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        senders: Mapping[str, Sender],
        templates: Mapping[str, RetryTemplate],
        config: OutboxConfig,
        relay_id: str,
    ) -> None:
        if not senders:
            raise InvalidInput("an outbox relay needs at least one sender")
        self.config = config
        self.relay_id = relay_id
        self._storage = storage
        self._senders = dict(senders)
        self._templates = dict(templates)
        self._default_template = RetryTemplate()
        self._in_flight = anyio.Semaphore(config.max_in_flight)
        self._per_channel: dict[str, anyio.Semaphore] = {}
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._pending = 0  # claimed and not yet finished
        self._progress = anyio.Event()
        self._wake = anyio.Event()
        self._rearm = anyio.Event()
        self._stopping = anyio.Event()
        self._loop_done = anyio.Event()
        self._lanes_idle = anyio.Event()
        self._lanes_idle.set()
        self._due: list[float] = []
        self._writer: BatchWriter[_Result] | None = None
        self._undelivered = 0
        self._tasks: TaskGroup | None = None
        self._counts = dict.fromkeys(_Kind, 0)
        self._claimed = self._claims = self._sending = self._peak = self._peak_lanes = 0
        self._send_errors = self._stale = self._notifications = self._polls = 0
        self._errors = 0

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
            sent=self._counts[_Kind.SENT],
            retried=self._counts[_Kind.RETRY],
            dead=self._counts[_Kind.DEAD],
            released=self._counts[_Kind.RELEASE],
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
        if self._writer is not None:
            await self._writer.flush()

    # -- lifecycle -------------------------------------------------------------

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with (
            BatchWriter(
                self._write_batch,
                outcome_batches(self.config.max_write_batch),
                retry_if=is_retryable,
                on_dead_letter=self._undeliverable,
                name="outbox-outcomes",
            ) as writer,
            anyio.create_task_group() as tg,
        ):
            self._writer = writer
            self._tasks = tg
            await tg.start(self._listen)
            tg.start_soon(self._claim_loop)
            task_status.started()
            await self._stopping.wait()
            await self._loop_done.wait()
            with anyio.move_on_after(self.config.shutdown_grace_s):
                await self._lanes_idle.wait()
            tg.cancel_scope.cancel()

    # -- claiming --------------------------------------------------------------

    async def _claim_loop(self) -> None:
        cfg = self.config
        limit_to = 1 if cfg.mode == "serial" else cfg.batch_size
        try:
            while not self._stopping.is_set():
                room = limit_to - self._pending
                if room <= 0 or (self._pending and room < limit_to // 2):
                    # Claim again when half a batch has finished: fewer, fuller claims.
                    self._progress = anyio.Event()
                    await _first_of(self._progress, self._stopping)
                    continue
                self._wake = anyio.Event()
                msgs = await self._claim(room)
                if msgs is None:
                    await self._sleep_or_stop(random.uniform(0.5, 1.5))
                    continue
                self._dispatch(msgs)
                if len(msgs) < room and not self._stopping.is_set():
                    await self._idle_wait()
        finally:
            self._loop_done.set()

    async def _claim(self, limit: int) -> list[OutboxMessage] | None:
        self._claims += 1
        try:
            # Shielded: rows a committed claim leased must reach a lane (or be released).
            with anyio.CancelScope(shield=True):
                msgs = await self._storage.claim_outbox(
                    self.relay_id,
                    limit=limit,
                    lease_s=self.config.lease_s,
                    channels=sorted(self._senders),
                )
        except StorageError as exc:
            self._errors += 1
            log.warning("outbox claim failed: %s", exc)
            return None
        return msgs

    def _dispatch(self, msgs: Sequence[OutboxMessage]) -> None:
        if self._tasks is None:
            raise RuntimeError("relay is not running")
        self._claimed += len(msgs)
        if self._stopping.is_set():
            for msg in msgs:
                self._record(_Result(_Kind.RELEASE, msg.claim))
            return
        now = time.monotonic()
        for msg in msgs:  # id order: each lane receives its group's rows in order
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

    async def _idle_wait(self) -> None:
        deadline = time.monotonic() + self.config.fallback_poll_s * random.uniform(0.5, 1.5)
        while True:
            now = time.time()
            if self._due and self._due[0] <= now:
                # A retry written since the last claim is due already: claim it now.
                while self._due and self._due[0] <= now:
                    heapq.heappop(self._due)
                return
            known = self._due[0] - now if self._due else math.inf
            self._rearm = anyio.Event()
            with anyio.move_on_after(min(deadline - time.monotonic(), known)) as scope:
                await _first_of(self._wake, self._stopping, self._rearm)
            if not scope.cancelled_caught and not (self._wake.is_set() or self._stopping.is_set()):
                continue
            if scope.cancelled_caught and time.monotonic() >= deadline:
                self._polls += 1
            return

    async def _sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    async def _listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with self._storage.listen(OUTBOX_CHANNEL) as stream:
            task_status.started()
            async for _ in stream:
                self._notifications += 1
                self._wake.set()

    # -- sending ---------------------------------------------------------------

    async def _run_lane(self, key: tuple[str, str], lane: _Lane) -> None:
        """Send one group's messages in order; after a failure give the rest back.

        Cancelled (shutdown), the message being sent and the ones behind it are released.
        """
        queue = lane.messages
        try:
            while queue:
                msg, claimed_at = queue[0]
                if time.monotonic() - claimed_at > self.config.lease_s - self.config.send_timeout_s:
                    break  # the claim may run out mid-send: give the rest back, re-claim later
                result = await self._send(msg, claimed_at)
                queue.popleft()
                self._finish(result)
                if result.kind is not _Kind.SENT:
                    break
        finally:
            # Runs on cancellation too: every message still in the lane gets a final state.
            while queue:
                msg, _ = queue.popleft()
                self._finish(_Result(_Kind.RELEASE, msg.claim))
            del self._lanes[key]
            if not self._lanes:
                self._lanes_idle.set()

    def _finish(self, result: _Result) -> None:
        self._pending -= 1
        self._progress.set()
        self._record(result)

    async def _send(self, msg: OutboxMessage, claimed_at: float) -> _Result:
        sender = self._senders[msg.channel]
        channel_limit = self._channel_semaphore(msg.channel)
        async with self._in_flight, channel_limit:
            if time.monotonic() - claimed_at > self.config.lease_s - self.config.send_timeout_s:
                # Waiting for a send slot took so long that the claim could run out mid-send
                # (another relay may take the message): give it back instead.
                return _Result(_Kind.RELEASE, msg.claim)
            self._sending += 1
            self._peak = max(self._peak, self._sending)
            try:
                with anyio.fail_after(self.config.send_timeout_s):
                    await sender(msg)
            except Exception as exc:
                self._send_errors += 1
                return self._failure(msg, exc)
            finally:
                self._sending -= 1
        return _Result(_Kind.SENT, msg.claim)

    def _channel_semaphore(self, channel: str) -> anyio.Semaphore | contextlib.nullcontext[None]:
        if self.config.max_per_channel is None:
            return contextlib.nullcontext()
        sem = self._per_channel.get(channel)
        if sem is None:
            sem = self._per_channel[channel] = anyio.Semaphore(self.config.max_per_channel)
        return sem

    def _failure(self, msg: OutboxMessage, exc: Exception) -> _Result:
        template = self._templates.get(msg.channel, self._default_template)
        error = describe_failure(exc)
        budget = min(msg.max_attempts, template.max_attempts)
        if not template.is_retryable(exc) or msg.attempts >= budget:
            return _Result(_Kind.DEAD, msg.claim, error)
        at = datetime.fromtimestamp(time.time() + template.delay_s(msg.attempts, exc), UTC)
        return _Result(_Kind.RETRY, msg.claim, error, at)

    def _expect(self, at: float) -> None:
        """Remember that a written retry becomes due at ``at``: the idle wait ends then.

        Called once the retry is committed, not when it is queued for writing: a claim made
        at the due time before the write lands would find the row still in flight, and the
        due time would be forgotten until the fallback poll.
        """
        heapq.heappush(self._due, at)
        if len(self._due) > 1024:
            self._due = heapq.nsmallest(512, self._due)
        if self._due[0] == at:
            self._rearm.set()

    def _record(self, result: _Result) -> None:
        if self._writer is None:
            raise RuntimeError("relay is not running")
        self._writer.put_nowait(result, critical=True)

    async def _write_batch(self, batch: Batch[_Result]) -> None:
        await self._write_results(batch.items)

    def _undeliverable(self, letter: DeadLetter[_Result]) -> None:
        """Results that could not be written: their claims expire and the messages are
        claimed again (at least once, never silently lost)."""
        self._undelivered += len(letter.items)
        log.error(
            "%d delivery results could not be written (%s): %r",
            len(letter.items),
            letter.reason,
            letter.error,
        )

    async def _write_results(self, batch: list[_Result]) -> None:
        """One statement per kind, effective only under current claims (else counted stale).

        Sent, dead or released rows wake the claim loop: the rows behind them in their
        groups can be claimed now. Sent and failed rows are written before released ones,
        so a released row never overtakes the failed row ahead of it in its group.
        """
        groups: dict[_Kind, list[_Result]] = {k: [] for k in _Kind}
        for item in batch:
            groups[item.kind].append(item)
        for kind in (_Kind.SENT, _Kind.RETRY, _Kind.DEAD, _Kind.RELEASE):
            items = groups[kind]
            if not items:
                continue
            claims = [i.claim for i in items]
            failures = [Failure(i.claim.id, i.claim.token, i.error, i.retry_at) for i in items]
            if kind is _Kind.SENT:
                done: Sequence[int] = await self._storage.mark_outbox_sent(claims)
            elif kind is _Kind.RELEASE:
                done = await self._storage.release_outbox(claims)
            elif kind is _Kind.DEAD:
                done = await self._storage.dead_letter_outbox(failures)
            else:
                statuses = await self._storage.fail_outbox(failures)
                done = list(statuses)
                for item in items:
                    if statuses.get(item.claim.id) is OutboxStatus.PENDING:
                        due = item.retry_at.timestamp() if item.retry_at else time.time()
                        self._expect(due)
                dead = sum(1 for s in statuses.values() if s is OutboxStatus.DEAD)
                self._counts[_Kind.DEAD] += dead
                self._counts[_Kind.RETRY] -= dead
            self._counts[kind] += len(done)
            self._stale += len(items) - len(done)
            if done and kind is not _Kind.RETRY:
                # Finished rows unblock the next rows of their groups: claim again.
                self._wake.set()



async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    if any(e.is_set() for e in events):
        return
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


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
) -> AsyncIterator[OutboxRelay]:
    """Run a relay for the channels in ``senders`` while the ``async with`` body runs.

    ``senders`` maps a channel type to its async sender; ``templates`` maps a channel type
    to its ``RetryTemplate`` (default: ``RetryTemplate()``). Leaving the block stops
    claiming, lets in-flight sends finish for up to ``shutdown_grace_s``, then cancels them;
    every message not delivered is released (pending again, attempt not counted) and every
    result is written before returning. If the block raises or is cancelled, sends are
    cancelled at once and the releases are still written (shielded, bounded by a timeout).
    """
    relay = OutboxRelay(
        storage, senders, templates or {}, config or OutboxConfig(), relay_id or _default_relay_id()
    )
    async with anyio.create_task_group() as tg:
        await tg.start(relay._serve)
        try:
            yield relay
        finally:
            relay._stopping.set()
