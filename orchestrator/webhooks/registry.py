"""Webhooks: the hooks of one hooks file, registered and fired; ``open_webhooks`` runs them.

Registration follows the seed: enabled async webhooks first (one AsyncWebhookBatcher
each), then sync webhooks; a sync webhook whose name matches an async one routes through
that batcher (its events are queued, it never blocks or steers the caller). ``fire`` sends
to every matching hook concurrently and combines their answers. ``open_webhooks`` owns the
HTTP client, the batchers and, for ``durable = true`` endpoints, an outbox relay.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, ClassVar

import anyio
import httpx

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.orchestrator.webhooks.batcher import (
    AsyncWebhookBatcher,
    AsyncWebhookStatistics,
    WebhookDeadLetter,
    WebhookDrainReport,
)
from asyncstore.orchestrator.webhooks.breaker import Breakers
from asyncstore.orchestrator.webhooks.config import HooksConfig
from asyncstore.orchestrator.webhooks.durable import open_durable_delivery
from asyncstore.orchestrator.webhooks.sync import HookDecision, HookOutcome, WebhookHook, combine
from asyncstore.orchestrator.webhooks.transport import Transport
from asyncstore.orchestrator.webhooks.triggers import canonical
from asyncstore.storage import AsyncStorageBackend
from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.families import Family, MetricSink

__all__ = ["Webhooks", "WebhooksStatistics", "open_webhooks"]

log = logging.getLogger("asyncstore.webhooks")


@dataclass(frozen=True, slots=True)
class WebhooksStatistics:
    fires: int
    sync_requests: int  # HTTP requests of synchronous hooks, retries included
    decisions: Mapping[str, int]  # deny / modify / warning / ok
    batchers: Mapping[str, AsyncWebhookStatistics]

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("webhook_fires", "counter", "Trigger firings."),
        Family("webhook_sync_requests", "counter", "Synchronous hook requests."),
        Family("webhook_decisions", "counter", "Sync hook decisions.", ("decision",)),
        *(
            replace(f, where=f.where or "per asynchronous endpoint")
            for f in AsyncWebhookStatistics.METRIC_FAMILIES
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("webhook_fires", {}, self.fires)
        out.sample("webhook_sync_requests", {}, self.sync_requests)
        out.samples("webhook_decisions", {}, self.decisions)
        for batcher in self.batchers.values():
            batcher.export(out)


class _Route:
    """A registered hook: synchronous, or queued through a batcher."""

    __slots__ = ("batcher", "hook", "label", "name", "triggers")

    def __init__(
        self,
        name: str,
        triggers: frozenset[str],
        label: str,
        hook: WebhookHook | None,
        batcher: AsyncWebhookBatcher | None,
    ) -> None:
        self.name = name
        self.triggers = triggers
        self.label = label
        self.hook = hook
        self.batcher = batcher


class Webhooks:
    """The registered hooks of one configuration. Build it with ``open_webhooks``."""

    def __init__(
        self, config: HooksConfig, transport: Transport, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config
        self._transport = transport
        self._clock = clock
        self.batchers: dict[str, AsyncWebhookBatcher] = {}
        self._routes: list[_Route] = []
        self._fires = 0
        self._decisions = {"deny": 0, "modify": 0, "warning": 0, "ok": 0}

    def _register(self, batchers: Mapping[str, AsyncWebhookBatcher]) -> None:
        self.batchers = dict(batchers)
        for entry in self.config.async_webhooks:
            if entry.name in self.batchers and entry.trigger is not None:
                batcher = self.batchers[entry.name]
                self._routes.append(
                    _Route(entry.name, entry.triggers, entry.trigger, None, batcher)
                )
        for sync in self.config.webhooks:
            if not sync.enabled:
                continue
            routed = self.batchers.get(sync.name)
            hook = (
                None
                if routed is not None
                else WebhookHook(sync, self._transport, clock=self._clock)
            )
            self._routes.append(_Route(sync.name, sync.triggers, sync.trigger, hook, routed))

    def hooks_for(self, trigger: str) -> list[str]:
        """Names of the hooks a fire of ``trigger`` reaches, in registration order."""
        name = _canonical(trigger)
        return [r.name for r in self._routes if name in r.triggers]

    async def fire(
        self,
        trigger: str,
        context: Mapping[str, Any] | None = None,
        *,
        result: Mapping[str, Any] | None = None,
    ) -> HookDecision:
        """Send ``trigger`` to every matching enabled hook and combine their answers.

        ``context`` becomes ``hook_context`` (and ``result`` the ``result_context`` of
        post-tool style triggers). Synchronous hooks run concurrently; routed hooks only
        enqueue (a critical event waits at most ``block_timeout_ms`` for room, then spills
        to the outbox or is reported as ``overflow``; a durable event is ``queued`` once its
        outbox row committed). Delivery problems never raise here: they are warnings (or
        denies with ``fail_closed``, or ``error`` when a durable write failed). An unknown
        trigger raises ``ValueError``. If cancelled, requests
        in flight are abandoned, queued events stay queued, and no decision is returned.
        """
        name = _canonical(trigger)
        ctx: Mapping[str, Any] = context if context is not None else {}
        routes = [r for r in self._routes if name in r.triggers]
        self._fires += 1
        outcomes: list[HookOutcome | None] = [None] * len(routes)
        calls: list[tuple[int, WebhookHook]] = []
        for i, route in enumerate(routes):
            if route.hook is not None:
                calls.append((i, route.hook))
            elif route.batcher is not None:
                outcomes[i] = await self._enqueue(route, route.batcher, name, ctx, result)
        if len(calls) == 1:
            i, hook = calls[0]
            outcomes[i] = await hook.call(name, ctx, result)
        elif calls:

            async def run(i: int, hook: WebhookHook) -> None:
                outcomes[i] = await hook.call(name, ctx, result)

            async with anyio.create_task_group() as tg:
                for i, hook in calls:
                    tg.start_soon(run, i, hook)
        decision = combine(name, [o for o in outcomes if o is not None])
        self._decisions[decision.action] += 1
        return decision

    async def _enqueue(
        self,
        route: _Route,
        batcher: AsyncWebhookBatcher,
        trigger: str,
        context: Mapping[str, Any],
        result: Mapping[str, Any] | None,
    ) -> HookOutcome:
        merged = {**context, **result} if result else context
        sent = await batcher.submit(
            trigger, merged, hook_name=route.name, trigger_label=route.label
        )
        if sent.status == "queued":
            return HookOutcome(route.name, "ok", "", None, 0, "", queued=True)
        if sent.status == "spilled":
            message = "queue full: spilled to the outbox"
            return HookOutcome(route.name, "ok", message, None, 0, "", queued=True, spilled=True)
        if sent.status == "overflow":
            message = f"overflow: event not queued ({sent.error})"
            return HookOutcome(route.name, "warning", message, None, 0, "", overflow=True)
        if sent.status == "failed":
            return HookOutcome(route.name, "error", sent.error, None, 0, "")
        return HookOutcome(route.name, "warning", sent.error or sent.status, None, 0, "")

    async def flush(self) -> None:
        """Barrier over every batcher: returns once everything queued before is settled.

        If cancelled, stops waiting; deliveries still happen.
        """
        for batcher in self.batchers.values():
            await batcher.flush()

    @property
    def dead_letters(self) -> tuple[WebhookDeadLetter, ...]:
        return tuple(d for b in self.batchers.values() for d in b.dead_letters)

    def statistics(self) -> WebhooksStatistics:
        return WebhooksStatistics(
            fires=self._fires,
            sync_requests=sum(r.hook.requests for r in self._routes if r.hook is not None),
            decisions=MappingProxyType(dict(self._decisions)),
            batchers=MappingProxyType({n: b.statistics() for n, b in self.batchers.items()}),
        )


def _canonical(trigger: str) -> str:
    name = canonical(trigger)
    if name is None:
        raise InvalidArgument(f"unknown trigger {trigger!r}")
    return name


@asynccontextmanager
async def open_webhooks(
    config: HooksConfig,
    *,
    storage: AsyncStorageBackend | None = None,
    client: httpx.AsyncClient | None = None,
    reports: list[WebhookDrainReport] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[Webhooks]:
    """Run the hooks of ``config`` while the block runs; yields the ``Webhooks`` to fire.

    ``storage`` is required when an async webhook is ``durable``; given, it also runs an
    outbox relay that takes what a full queue spills. ``client`` is a shared
    ``httpx.AsyncClient`` (one is created and closed otherwise). Leaving the block flushes
    every batcher (bounded by its ``shutdown_timeout_secs``, shielded from cancellation)
    and, if ``reports`` is given, appends each batcher's drain report to it. ``clock``
    times the retries, circuit breakers, flush intervals and the orphan scan.
    """
    async with AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(
                httpx.AsyncClient(follow_redirects=False, trust_env=False)
            )
        transport = Transport(
            client,
            refuse_private=config.refuse_private_destinations,
            max_response_bytes=config.max_response_bytes,
            retry_after_max_s=config.retry_after_max_secs,
            breakers=Breakers(config.circuit_breaker, clock=clock),
        )
        enabled = [h for h in config.async_webhooks if h.enabled]
        batchers: dict[str, AsyncWebhookBatcher] = {}
        persist = None
        if any(h.durable for h in enabled) and storage is None:
            raise InvalidArgument("durable async webhooks need open_webhooks(storage=...)")
        if enabled and storage is not None:
            # The outbox takes durable batches, and the events any full queue spills.
            persist = await stack.enter_async_context(
                open_durable_delivery(
                    storage,
                    enabled,
                    batchers,
                    retry=config.durable_retry,
                    retry_after_max_s=config.retry_after_max_secs,
                    delivery_log=config.delivery_log,
                    clock=clock,
                )
            )
        webhooks = Webhooks(config, transport, clock=clock)
        for hook in enabled:
            batcher = AsyncWebhookBatcher(hook, transport, store=persist, clock=clock)
            batchers[hook.name] = await stack.enter_async_context(batcher)
            if reports is not None:
                stack.push_async_callback(_collect, batcher, reports)
        webhooks._register(batchers)
        yield webhooks


async def _collect(batcher: AsyncWebhookBatcher, reports: list[WebhookDrainReport]) -> None:
    reports.append(await batcher.aclose())
