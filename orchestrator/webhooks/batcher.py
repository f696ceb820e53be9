"""AsyncWebhookBatcher: webhook events queued in memory and POSTed in batches.

It is a BatchWriter (``orchestrator.batching``) whose sink POSTs ``{"events": [...]}``: the
writer flushes at ``batch_size`` events or ``flush_interval_ms`` after the oldest one,
bounds the queue (overflow policy and drop counters are the writer's) and retries a failing
batch with exponential backoff and jitter. This module adds what is webhook-specific: a
stable delivery id per batch (the same on every retry); retries only for what a later
attempt can fix (408, 425, 429, 5xx, connection errors; any other 4xx dead-letters at once
with its status); Retry-After on 429/503; waiting out an open circuit instead of burning
retries; 410 Gone disabling the endpoint; dead-letter records with error and status; and
``submit``, which never raises and never blocks longer than ``block_timeout_ms`` (a
critical event then spills to the outbox or is counted as overflow). With ``durable =
true`` each event is first committed to the storage journal (group commit), then batched
as usual, and each batch is written to the outbox instead of POSTed; an outbox relay (see
``orchestrator.webhooks.durable``) POSTs it, so a crash loses nothing committed.

The records it takes and reports (events, submissions, dead letters, statistics, retryable
statuses) live in ``orchestrator.webhooks.records`` and are re-exported here. What is left
is one class: intake and delivery share its writer, its circuit and its counters, so it
stays one module of about 600 lines rather than a mixin pair with shared private state.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import Any, Self

import anyio
import orjson

from asyncstore.orchestrator.batching import (
    Batch,
    BatchConfig,
    BatchWriter,
    DeadLetter,
)
from asyncstore.orchestrator.errors import (
    AttemptFailed,
    Dropped,
    WriterClosed,
    WriterOverloaded,
)
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.orchestrator.webhooks.config import AsyncWebhookConfig
from asyncstore.orchestrator.webhooks.errors import NotPersisted
from asyncstore.orchestrator.webhooks.records import (  # re-exported: their historical home
    CRITICAL_TRIGGERS,
    RETRYABLE_STATUSES,
    AsyncWebhookStatistics,
    DurableStore,
    Submission,
    WebhookDeadLetter,
    WebhookDrainReport,
    WebhookEvent,
    is_retryable_status,
)
from asyncstore.orchestrator.webhooks.signing import delivery_id
from asyncstore.orchestrator.webhooks.transport import DeliveryFailed, Transport
from asyncstore.orchestrator.webhooks.triggers import ALIASES, EVENT_NAMES
from asyncstore.storage.errors import InvalidArgument

__all__ = [
    "CRITICAL_TRIGGERS",
    "RETRYABLE_STATUSES",
    "AsyncWebhookBatcher",
    "AsyncWebhookStatistics",
    "AttemptFailed",
    "DurableStore",
    "Submission",
    "WebhookDeadLetter",
    "WebhookDrainReport",
    "WebhookEvent",
    "is_retryable_status",
    "open_webhook_batcher",
]

log = logging.getLogger("asyncstore.webhooks")


_SPELLINGS = {name: name for name in EVENT_NAMES} | dict(ALIASES)


class AsyncWebhookBatcher:
    """Queues events for one endpoint and POSTs them in batches; use as ``async with``.

    ``send_nowait`` only enqueues (no I/O). Leaving the block (or ``aclose()``) flushes
    what remains, bounded by ``shutdown_timeout_secs``, and reports what it could not
    deliver; those batches are dead-lettered with reason ``shutdown``.
    """

    def __init__(
        self,
        config: AsyncWebhookConfig,
        transport: Transport,
        *,
        on_dead_letter: Callable[[WebhookDeadLetter], None] | None = None,
        store: DurableStore | None = None,
        keep_dead_letters: int = 1000,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if config.durable and store is None:
            raise InvalidArgument(f"async webhook {config.name!r} is durable: it needs storage")
        self.config = config
        self._clock = clock
        self.name = config.name
        self._transport = transport
        self._persist = store if config.durable else None
        # Any endpoint with an outbox at hand spills there what a full queue cannot take.
        self._spill = store
        # Durable "journal" mode: each event is committed alone first (group commit, so a
        # caller waits one write), and batched for HTTP like a non-durable event.
        self._journal: BatchWriter[WebhookEvent] | None = None
        if self._persist is not None and config.durable_mode == "journal":
            self._journal = BatchWriter(
                self._journal_sink,
                BatchConfig(
                    max_batch=1000,
                    max_batch_bytes=None,
                    eager=True,
                    capacity=config.capacity,
                    overflow=config.overflow,
                    block_timeout_s=config.block_timeout_ms / 1000,
                    max_retries=config.retries,
                    retry_base_s=0.05,
                    retry_max_s=1.0,
                    drain_timeout_s=config.shutdown_timeout_secs,
                ),
                on_dead_letter=self._journal_dead_letter,
                name=f"webhook-journal:{config.name}",
                clock=clock,
            )
        self._on_dead_letter = on_dead_letter
        self._writer: BatchWriter[WebhookEvent] = BatchWriter(
            self._sink,
            BatchConfig(
                max_batch=config.batch_size,
                max_batch_bytes=None,
                flush_interval_s=config.flush_interval_ms / 1000,
                capacity=config.capacity,
                overflow=config.overflow,
                block_timeout_s=config.block_timeout_ms / 1000,
                max_retries=config.retries,
                retry_base_s=0.1,  # 100 ms, 200 ms, 400 ms, ... with jitter (the writer's)
                retry_max_s=30.0,
                drain_timeout_s=config.shutdown_timeout_secs,
            ),
            on_dead_letter=self._writer_dead_letter,
            name=f"webhook:{config.name}",
            clock=clock,
        )
        self._ids = itertools.count(1)
        self._id_prefix = f"evt_{secrets.token_hex(6)}_"
        self._keys = config.signing_keys
        self._headers = config.header_values()
        self._disabled = False
        self._not_before = 0.0
        # delivery id -> (last error, last status), while the writer retries the batch
        self._last_error: dict[str, tuple[str, int | None]] = {}
        self._dead_letters: deque[WebhookDeadLetter] = deque(maxlen=keep_dead_letters)
        self._accepted = self._delivered = self._batches = 0
        self._requests = self._failed = self._dead = self._disabled_drops = 0
        self._spilled = self._not_persisted = self._journaled = self._adopted = 0
        self._overflow: dict[str, int] = {}
        # Durable: event id -> None once its outbox row committed, or the error that kept it
        # out; only for the events a caller is waiting on (submit / send).
        self._awaited: dict[str, str | None] = {}

    async def __aenter__(self) -> Self:
        await self._writer.__aenter__()
        if self._journal is not None:
            try:
                await self._journal.__aenter__()
            except BaseException:
                await self._writer.__aexit__(None, None, None)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._report(await self._close_writer())
        # The writers' exits drain (shielded, bounded by shutdown_timeout_secs).
        if self._journal is not None:
            await self._journal.__aexit__(exc_type, exc, tb)
        return await self._writer.__aexit__(exc_type, exc, tb)

    async def _close_writer(self) -> WebhookDrainReport:
        with anyio.CancelScope(shield=True):  # the final flush must run even when cancelled
            if self._journal is not None:
                await self._journal.aclose()  # first: it feeds the batch writer
            await self._writer.aclose()
        return self._drain_report()

    async def aclose(self) -> WebhookDrainReport:
        """Stop intake, deliver what is queued, and report what could not be delivered.

        Bounded by ``shutdown_timeout_secs``. Safe to call twice. Shielded: cancelling the
        caller does not interrupt the drain.
        """
        report = await self._close_writer()
        await self._report(report)
        return report

    async def _report(self, report: WebhookDrainReport) -> None:
        if not report.complete:
            log.error(
                "async webhook %r: %d event(s) could not be delivered (dead-lettered)",
                self.name,
                report.undelivered,
            )

    def _drain_report(self) -> WebhookDrainReport:
        dropped = dict(self._writer.statistics().dropped)
        for reason, count in self._overflow.items():
            dropped[reason] = dropped.get(reason, 0) + count
        if self._disabled_drops:
            dropped["disabled"] = self._disabled_drops
        return WebhookDrainReport(self.name, self._delivered, self._dead, MappingProxyType(dropped))

    # -- intake -----------------------------------------------------------------------

    def _event(
        self, trigger: str, context: Mapping[str, Any], hook_name: str | None, label: str | None
    ) -> tuple[WebhookEvent, bool]:
        name = _SPELLINGS.get(trigger)
        if name is None:
            raise InvalidArgument(f"unknown trigger {trigger!r}")
        event = WebhookEvent(
            f"{self._id_prefix}{next(self._ids)}",
            EVENT_NAMES[name],
            hook_name or self.name,
            label or self.config.trigger or name,
            dict(context),
            time.time_ns() // 1_000_000,
        )
        return event, name in CRITICAL_TRIGGERS

    def send_nowait(
        self,
        trigger: str,
        context: Mapping[str, Any],
        *,
        hook_name: str | None = None,
        trigger_label: str | None = None,
    ) -> None:
        """Queue one event without waiting; returns once it is queued, else raises.

        ``trigger`` is a canonical name or alias; ``context`` is copied (shallowly) and
        must be JSON-serializable. The ``*_nowait`` rule (``orchestrator.errors``): a full
        queue applies the overflow policy (``drop_oldest``, the default, evicts older
        events, counted, and queues this one); an event the policy drops itself
        (``drop_newest``) is counted and raises ``Dropped``, an ``anyio.WouldBlock``; an
        event of a critical trigger is never dropped and raises plain ``anyio.WouldBlock``
        (use ``send``), as does any event under ``block``. After a 410 the endpoint is
        disabled: events are counted as ``disabled`` and raise ``Dropped``. Raises
        ``WriterClosed`` once closing.
        """
        event, critical = self._event(trigger, context, hook_name, trigger_label)
        if self._disabled:
            self._disabled_drops += 1
            raise Dropped(f"async webhook {self.name!r} is disabled (410 Gone)", reason="disabled")
        (self._journal or self._writer).put_nowait(event, critical=critical)
        self._accepted += 1

    async def submit(
        self,
        trigger: str,
        context: Mapping[str, Any],
        *,
        hook_name: str | None = None,
        trigger_label: str | None = None,
    ) -> Submission:
        """Queue one event and say what became of it; never raises for delivery problems.

        Droppable events are queued without waiting (the overflow policy applies). An event
        that is never dropped (critical trigger, or ``overflow = "block"``) waits at most
        ``block_timeout_ms`` for room; past it, it is written to the outbox as its own row
        when one is configured (``spilled``), else counted as ``overflow_critical`` (or
        ``overflow_blocked``) and reported. When ``durable``, ``queued`` is answered only
        once the event's outbox row committed (concurrent callers share one write), and
        ``failed`` when the write failed. Raises only ``ValueError`` for an unknown trigger.
        If cancelled while waiting for room the event was not queued; while its outbox
        write is in flight, the write still completes or fails on its own.
        """
        event, critical = self._event(trigger, context, hook_name, trigger_label)
        if self._disabled:
            self._disabled_drops += 1
            return Submission("disabled", "the endpoint answered 410 Gone")
        intake = self._journal or self._writer
        try:
            try:
                intake.put_nowait(event, critical=critical)
                accepted = True
            except Dropped:
                accepted = False
            except anyio.WouldBlock:
                accepted = await intake.put(event, critical=critical)
        except WriterOverloaded:
            return await self._overflowed(event, critical)
        except WriterClosed:
            return Submission("closed", "the webhook batcher is closed")
        if not accepted:
            return Submission("dropped", "event dropped (queue full)")
        self._accepted += 1
        if self._persist is not None:
            error = await self._wait_persisted(event)
            if error is not None:
                return Submission("failed", f"not persisted: {error}")
        return Submission("queued")

    async def _overflowed(self, event: WebhookEvent, critical: bool) -> Submission:
        waited = f"queue full for {self.config.block_timeout_ms} ms"
        if self._spill is not None:
            body = orjson.dumps({"events": [event.as_json()]})
            msg_id = delivery_id(self.name, event.id, event.id, "1")
            try:
                await self._spill.persist(self.name, msg_id, body, 1, ())
            except Exception as exc:  # storage is down too: count it like any overflow
                error = f"{waited}; the outbox write failed: {type(exc).__name__}"
            else:
                self._spilled += 1
                log.warning("async webhook %r: %s, event spilled to the outbox", self.name, waited)
                return Submission("spilled")
        else:
            error = f"{waited} and no outbox configured"
        reason = "overflow_critical" if critical else "overflow_blocked"
        self._overflow[reason] = self._overflow.get(reason, 0) + 1
        log.error("async webhook %r: event lost to overflow (%s)", self.name, error)
        return Submission("overflow", error)

    async def _wait_persisted(self, event: WebhookEvent) -> str | None:
        """Wait until the event's batch is in the outbox; None, or why it is not."""
        self._awaited[event.id] = "pending"
        try:
            await (self._journal or self._writer).flush()
        finally:
            outcome = self._awaited.pop(event.id, "pending")
        if outcome == "pending":
            outcome = "the batcher closed before the event was written"
        if outcome is not None:
            self._not_persisted += 1
        return outcome

    async def send(
        self,
        trigger: str,
        context: Mapping[str, Any],
        *,
        hook_name: str | None = None,
        trigger_label: str | None = None,
    ) -> bool:
        """Like ``send_nowait``, but waits for room where the policy (or criticality) says.

        Waits at most ``block_timeout_ms`` (then ``WriterOverloaded``). When ``durable``,
        also waits until the event's batch is written to the outbox (events sent
        concurrently share one row) and raises ``NotPersisted`` if that write failed.
        ``submit`` is the variant that never raises. If cancelled while waiting for room,
        the event was not queued; if cancelled while persisting, it is still persisted.
        """
        event, critical = self._event(trigger, context, hook_name, trigger_label)
        if self._disabled:
            self._disabled_drops += 1
            return False
        if not await (self._journal or self._writer).put(event, critical=critical):
            return False
        self._accepted += 1
        if self._persist is not None:
            error = await self._wait_persisted(event)
            if error is not None:
                raise NotPersisted(f"async webhook {self.name!r}: {error}")
        return True

    async def flush(self) -> None:
        """Barrier: returns once every event queued before the call is delivered or
        dead-lettered. If cancelled, stops waiting; the delivery still happens."""
        await self._writer.flush()

    # -- delivery ---------------------------------------------------------------------

    async def _sink(self, batch: Batch[WebhookEvent]) -> None:
        events = batch.items
        msg_id = delivery_id(self.name, events[0].id, events[-1].id, str(len(events)))
        if self._disabled:
            self._dead_letter(events, msg_id, "disabled", "the endpoint answered 410 Gone")
            return
        body = orjson.dumps({"events": [e.as_json() for e in events]})
        if self._persist is not None:
            journal_ids = [e.journal_id for e in events if e.journal_id is not None]
            await self._persist.persist(self.name, msg_id, body, len(events), journal_ids)
            for event in events:
                if event.id in self._awaited:
                    self._awaited[event.id] = None  # committed: its caller may say queued
            self._delivered += len(events)
            self._batches += 1
            return
        if batch.attempt > 0:
            # The writer already slept its backoff; a Retry-After asks for at least this.
            wait = self._not_before - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
        breaker = self._transport.breakers.for_url(self.config.url)
        wait = breaker.retry_in_s()
        if wait > 0:
            # The receiver is down: wait for the next probe instead of burning a retry
            # (the queue keeps filling meanwhile, within capacity and the overflow policy).
            await self._clock.sleep(wait)
        try:
            await self.deliver(msg_id, body)
        except AttemptFailed as exc:
            if exc.retryable:
                self._last_error[msg_id] = (str(exc), exc.status)
                if exc.retry_after_s is not None:
                    self._not_before = self._clock.monotonic() + exc.retry_after_s
                raise
            # A 4xx other than 408/425/429 (or a refused destination): no retry can
            # succeed, so the batch is dead-lettered now, with the status kept.
            self._last_error.pop(msg_id, None)
            reason = "gone" if exc.status == 410 else "refused"
            self._dead_letter(events, msg_id, reason, str(exc), exc.status)
            return
        self._last_error.pop(msg_id, None)
        self._delivered += len(events)
        self._batches += 1

    async def _journal_sink(self, batch: Batch[WebhookEvent]) -> None:
        if self._persist is None:
            raise RuntimeError("the journal is only built for durable endpoints")
        events = batch.items
        ids = await self._persist.journal(self.name, [orjson.dumps(e.as_json()) for e in events])
        self._journaled += len(events)
        for event, journal_id in zip(events, ids, strict=True):
            if event.id in self._awaited:
                self._awaited[event.id] = None  # committed: its caller may say queued
            self._feed(dataclasses.replace(event, journal_id=journal_id))

    def _feed(self, event: WebhookEvent) -> bool:
        """Hand a journaled event to the HTTP batches; never raises.

        Refused only when the batch writer is full or closed: the event stays in the
        journal, and the orphan scan hands it over again later (this process or another).
        """
        try:
            self._writer.put_nowait(event, critical=True)
        except (anyio.WouldBlock, WriterClosed):
            log.warning("async webhook %r: batch queue full, event left in the journal", self.name)
            return False
        return True

    def adopt(self, journal_id: int, body: bytes) -> bool:
        """Batch an orphaned journal event (its owner did not batch it in time)."""
        event = WebhookEvent.from_json(orjson.loads(body), journal_id)
        if self._feed(event):
            self._adopted += 1
            return True
        return False

    def _journal_dead_letter(self, dead: DeadLetter[WebhookEvent]) -> None:
        error = f"{dead.reason}: {type(dead.error).__name__ if dead.error else dead.reason}"
        for event in dead.items:
            if event.id in self._awaited:
                self._awaited[event.id] = error
        msg_id = delivery_id(self.name, dead.items[0].id, dead.items[-1].id, str(len(dead.items)))
        self._dead_letter(dead.items, msg_id, "not_persisted", error)

    async def deliver(self, msg_id: str, body: bytes) -> int:
        """POST one batch body once; its 2xx status, else ``AttemptFailed``.

        A 410 disables the endpoint (``retryable=False``). If cancelled, the request is
        abandoned.
        """
        if self._disabled:
            raise AttemptFailed("the endpoint answered 410 Gone", status=410, retryable=False)
        self._requests += 1
        try:
            reply = await self._transport.send(
                self.config.method,
                self.config.url,
                body,
                msg_id=msg_id,
                headers=self._headers,
                keys=self._keys,
                timeout_s=self.config.timeout_secs,
            )
        except DeliveryFailed as exc:
            self._failed += 1
            log.warning("async webhook %r: delivery %s failed: %s", self.name, msg_id, exc)
            raise AttemptFailed(
                str(exc),
                retryable=exc.retryable,
                retry_after_s=exc.retry_in_s,
                circuit_open=exc.retry_in_s is not None,
            ) from None
        if 200 <= reply.status < 300:
            return reply.status
        self._failed += 1
        if reply.status == 410:
            if not self._disabled:
                log.error("async webhook %r: 410 Gone, endpoint disabled", self.name)
            self._disabled = True
            raise AttemptFailed("HTTP 410 Gone", status=410, retryable=False)
        log.warning("async webhook %r: delivery %s got HTTP %d", self.name, msg_id, reply.status)
        raise AttemptFailed(
            f"HTTP {reply.status}",
            status=reply.status,
            retryable=is_retryable_status(reply.status),
            retry_after_s=reply.retry_after_s,
        )

    def _writer_dead_letter(self, dead: DeadLetter[WebhookEvent]) -> None:
        events = dead.items
        msg_id = delivery_id(self.name, events[0].id, events[-1].id, str(len(events)))
        error, status = self._last_error.pop(msg_id, (str(dead.error) if dead.error else "", None))
        if self._persist is not None:
            for event in events:
                if event.id in self._awaited:
                    self._awaited[event.id] = f"{dead.reason}: {error or dead.reason}"
        self._dead_letter(events, msg_id, dead.reason, error or dead.reason, status)

    def _dead_letter(
        self,
        events: list[WebhookEvent],
        msg_id: str,
        reason: str,
        error: str,
        status: int | None = None,
    ) -> None:
        self._dead += len(events)
        record = WebhookDeadLetter(self.name, msg_id, tuple(events), reason, error, status)
        self._dead_letters.append(record)
        log.error(
            "async webhook %r: dead-lettered %d event(s), delivery %s (%s: %s)",
            self.name,
            len(events),
            msg_id,
            reason,
            error,
        )
        if self._on_dead_letter is not None:
            try:
                self._on_dead_letter(record)
            except Exception:
                log.exception("async webhook %r: dead-letter callback failed", self.name)

    # -- observation ------------------------------------------------------------------

    @property
    def disabled(self) -> bool:
        """True once the endpoint answered 410 Gone."""
        return self._disabled

    @property
    def dead_letters(self) -> tuple[WebhookDeadLetter, ...]:
        """The most recent dead-letter records (``keep_dead_letters`` of them)."""
        return tuple(self._dead_letters)

    def statistics(self) -> AsyncWebhookStatistics:
        return AsyncWebhookStatistics(
            endpoint=self.name,
            enabled=not self._disabled,
            accepted=self._accepted,
            delivered=self._delivered,
            batches=self._batches,
            requests=self._requests,
            failed_attempts=self._failed,
            dead_lettered=self._dead,
            dropped=self._drain_report().dropped,
            writer=self._writer.statistics(),
            spilled=self._spilled,
            not_persisted=self._not_persisted,
            journaled=self._journaled,
            adopted=self._adopted,
        )


@asynccontextmanager
async def open_webhook_batcher(
    config: AsyncWebhookConfig,
    transport: Transport,
    *,
    on_dead_letter: Callable[[WebhookDeadLetter], None] | None = None,
    store: DurableStore | None = None,
    keep_dead_letters: int = 1000,
) -> AsyncIterator[AsyncWebhookBatcher]:
    """Run an ``AsyncWebhookBatcher`` for one endpoint while the block runs.

    Leaving the block flushes what remains (bounded by ``shutdown_timeout_secs``). ``async
    with AsyncWebhookBatcher(...)`` does the same.
    """
    batcher = AsyncWebhookBatcher(
        config,
        transport,
        on_dead_letter=on_dead_letter,
        store=store,
        keep_dead_letters=keep_dead_letters,
    )
    async with batcher:
        yield batcher
