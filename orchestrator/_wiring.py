"""The runtime's wiring: ``open_runtime`` builds, runs and drains every component.

This module owns the settings-to-components wiring behind ``open_runtime``: storage and
its migrations, the switches over each component's optimized and legacy instances, the
webhooks, worker, relay, maintenance, periodic schedules, metrics and probes, the presence
publisher, the SIGHUP reloader, and the ordered shutdown (stop intake, wait for turns, flush
writers, drain webhooks, withdraw presence, close storage) that ends in a
``RuntimeReport``. ``orchestrator.runtime`` re-exports ``open_runtime``; import it from there.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from asyncstore.orchestrator._runtime import Runtime
from asyncstore.orchestrator.backlog import open_backlog_monitor
from asyncstore.orchestrator.broadcast import (
    BroadcastHub,
    DeliveryMode,
    open_broadcast_hub,
)
from asyncstore.orchestrator.cancellation import (
    CancellationConfig,
    CancellationRegistry,
    open_cancellation,
)
from asyncstore.orchestrator.config import (
    Flags,
    Settings,
    load_settings,
    load_webhooks,
)
from asyncstore.orchestrator.locks import (
    open_session_limiter,
)
from asyncstore.orchestrator.maintenance import LeaseSweep, open_maintenance
from asyncstore.orchestrator.metrics import open_loop_lag_monitor, open_pool_probe
from asyncstore.orchestrator.outbox import Sender
from asyncstore.orchestrator.periodic import Periodic, open_periodic
from asyncstore.orchestrator.queue import Handler
from asyncstore.orchestrator.runtime_report import RuntimeReport
from asyncstore.orchestrator.streams import (
    open_stream_writer,
)
from asyncstore.orchestrator.switch import Switch, _open_switch
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.orchestrator.webhooks import (
    HooksConfig,
    WebhookDrainReport,
    open_webhooks,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    open_storage,
)

log = logging.getLogger("asyncstore.runtime")


class _FanOutCancellation(CancellationRegistry):
    """What the limiters fire on a lost lease: the session's token in every running registry."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        targets: Callable[[], tuple[CancellationRegistry, ...]],
    ):
        super().__init__(storage, CancellationConfig())
        self._targets = targets

    def fire_local(self, session_id: str, reason: str) -> bool:
        fired = [registry.fire_local(session_id, reason) for registry in self._targets()]
        return any(fired)


@dataclass(slots=True)
class _Drain:
    webhooks: list[WebhookDrainReport] = field(default_factory=list)
    turns_cancelled: int = 0


@asynccontextmanager
async def open_runtime(
    settings: Settings | None = None,
    *,
    config_file: str | Path | None = None,
    hooks: HooksConfig | None = None,
    queue_handler: Handler | None = None,
    outbox_senders: Mapping[str, Sender] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    periodic: Sequence[Periodic] = (),
) -> AsyncIterator[Runtime]:
    """Open storage and run every component while the block runs; yields the ``Runtime``.

    ``settings`` defaults to ``load_settings(config_file)``; ``config_file`` (default
    ``$ASYNCSTORE_CONFIG``) is also what ``reload()`` and SIGHUP re-read. ``hooks``
    replaces the settings' hooks file. ``queue_handler`` runs a worker for ``rt.queue``
    and ``outbox_senders`` an outbox relay, both inside the runtime. ``periodic`` (with
    the schedules of ``settings.periodic``) runs a periodic runner, ``rt.periodic``, that
    enqueues each tick as a task on its schedule's queue (``periodic.enabled`` False, or
    no schedule at all: none runs).

    Leaving the block drains in order: new turns are refused and running ones get
    ``runtime.shutdown_grace_s`` before they are cancelled; the worker and relay stop
    claiming and write their outcomes; webhooks and stream writers flush; limiters,
    registries and hubs stop (every lease was released by its turn); storage closes.
    The closing is shielded by each component where it must finish. ``rt.report`` then
    says what could not be delivered (also logged). Cancelling the block cancels running
    turns at once but still runs those drains.

    ``clock`` is what the runtime's timing reads (the shutdown grace, the bound on a turn's
    end) and what it hands to every component it builds that keeps time (broadcast hubs,
    stream writers, cancel registries, session limiters, webhooks, maintenance, the worker,
    the outbox relay, the periodic runner): ``SYSTEM_CLOCK`` in production, a
    ``ManualClock`` in tests. Database time (lease expiry, ``retry_at``) stays the
    database's; the backlog sampler and the loop-lag and pool probes measure real time.
    """
    from asyncstore.orchestrator.config import config_path

    path = config_path(config_file)
    if settings is None:
        settings = load_settings(path)
    hooks_config = hooks if hooks is not None else load_webhooks(settings)
    drain = _Drain()
    async with AsyncExitStack() as stack:
        storage = await stack.enter_async_context(
            open_storage(settings.storage, migrate=settings.migrate_on_start)
        )
        rt = Runtime(settings, storage, path, clock=clock)
        instance = rt._instance_id()
        flags = rt.flags

        def current() -> Flags:
            return rt.flags

        broadcast: Switch[BroadcastHub] = await stack.enter_async_context(
            _open_switch(
                "stream_delivery",
                current,
                {
                    True: lambda: open_broadcast_hub(
                        storage,
                        settings.broadcast.model_copy(update={"mode": DeliveryMode.MEMORY}),
                        clock=clock,
                    ),
                    False: lambda: open_broadcast_hub(
                        storage,
                        settings.broadcast.model_copy(update={"mode": DeliveryMode.POLL}),
                        clock=clock,
                    ),
                },
                on_built=rt._metrics_on_build(("broadcast", "broadcast_poll")),
                # Always: both stream writers publish to it, whatever the delivery flag.
                always=(True,),
            )
        )
        rt._broadcast = broadcast
        memory_hub = await broadcast.get(True)
        rt._cancellation = await stack.enter_async_context(
            _open_switch(
                "cancel",
                current,
                {
                    True: lambda: open_cancellation(
                        storage, settings.cancel.model_copy(update={"mode": "notify"}), clock=clock
                    ),
                    False: lambda: open_cancellation(
                        storage, settings.cancel.model_copy(update={"mode": "poll"}), clock=clock
                    ),
                },
                on_built=rt._metrics_on_build(("cancel", "cancel_poll")),
            )
        )
        on_lost = _FanOutCancellation(storage, lambda: tuple(rt._cancellation.built().values()))
        # The maintenance leader sweeps expired leases for the fleet, not every limiter.
        lock = settings.lock.model_copy(update={"sweep_leases": False})
        rt._limiter = await stack.enter_async_context(
            _open_switch(
                "lock",
                current,
                {
                    True: lambda: open_session_limiter(
                        storage,
                        lock.model_copy(update={"mode": "two_level"}),
                        cancellation=on_lost,
                        instance_id=instance,
                        clock=clock,
                    ),
                    False: lambda: open_session_limiter(
                        storage,
                        lock.model_copy(update={"mode": "db_poll"}),
                        cancellation=on_lost,
                        instance_id=f"{instance}/db_poll",
                        clock=clock,
                    ),
                },
                on_built=rt._metrics_on_build(("lock", "lock_db_poll")),
            )
        )
        # Both writers publish to the memory hub: a session's live subscribers on the
        # memory path see its events whichever writer the session's flag picked.
        rt._streams = await stack.enter_async_context(
            _open_switch(
                "stream_batching",
                current,
                {
                    True: lambda: open_stream_writer(
                        storage,
                        memory_hub,
                        settings.stream.model_copy(update={"batching": True}),
                        clock=clock,
                    ),
                    False: lambda: open_stream_writer(
                        storage,
                        memory_hub,
                        settings.stream.model_copy(update={"batching": False}),
                        clock=clock,
                    ),
                },
                on_built=rt._metrics_on_build(("streams", "streams_legacy")),
            )
        )
        if hooks_config is not None:
            rt.webhooks = await stack.enter_async_context(
                open_webhooks(hooks_config, storage=storage, reports=drain.webhooks, clock=clock)
            )
        rt.maintenance = await stack.enter_async_context(
            open_maintenance(
                storage,
                settings.maintenance,
                evictors=(rt._evict_idle_rings,),
                lease_sweep=LeaseSweep(settings.lock.sweep_interval_s, settings.lock.sweep_grace_s),
                clock=clock,
            )
        )
        if outbox_senders is not None:
            rt.relay = await stack.enter_async_context(rt.open_outbox_relay(outbox_senders))
        if queue_handler is not None:
            rt.worker = await stack.enter_async_context(rt.open_worker(queue_handler))
        if settings.periodic.enabled and (periodic or settings.periodic.schedules):
            rt.periodic = await stack.enter_async_context(
                open_periodic(storage, periodic, settings.periodic, clock=clock)
            )
        rt.backlog = await stack.enter_async_context(
            open_backlog_monitor(storage, interval_s=settings.metrics.backlog_interval_s)
        )
        rt._track_metrics()
        await stack.enter_async_context(open_loop_lag_monitor(rt.metrics))
        await stack.enter_async_context(open_pool_probe(rt.metrics, storage))
        # Runs once the task group below has stopped publishing, before storage closes.
        stack.push_async_callback(_withdraw_presence, rt)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        if (
            settings.runtime.reload_on_sighup
            and hasattr(signal, "SIGHUP")
            and threading.current_thread() is threading.main_thread()
        ):
            await tg.start(rt._reload_on_sighup)
        tg.start_soon(rt.heap_trim.run)
        tg.start_soon(rt.presence.run)
        log.info(
            "runtime open on %s (instance %s); flags %s",
            storage.dialect,
            instance,
            flags.model_dump(),
        )
        try:
            yield rt
        except BaseException:
            # Shielded: the drain must run even though the block is failing or cancelled;
            # no grace period then, running turns are cancelled at once.
            with anyio.CancelScope(shield=True):
                drain.turns_cancelled = await rt._stop_intake(grace=False)
            raise
        else:
            # Shielded: nothing may cut the drain short once it started.
            with anyio.CancelScope(shield=True):
                drain.turns_cancelled = await rt._stop_intake(grace=True)
    rt.report = _report(rt, drain)
    if rt.report.complete:
        log.info("runtime closed; everything was delivered")
    else:
        log.error("runtime closed with undelivered work: %s", rt.report)


async def _withdraw_presence(rt: Runtime) -> None:
    """Delete this instance's presence row as the runtime closes, so the fleet's counts
    drop its subscribers at once rather than after the row's TTL."""
    # Shielded: a cancelled or failing close still withdraws; bounded by the row's TTL,
    # after which the row no longer counts anyway.
    with anyio.CancelScope(shield=True), rt._clock.move_on_after(max(rt.presence.ttl_s, 1.0)):
        await rt.presence.withdraw()


def _report(rt: Runtime, drain: _Drain) -> RuntimeReport:
    lost = sum(writer.statistics().lost for writer in rt._streams.built().values())
    return RuntimeReport(
        stream_events_lost=lost,
        webhooks=tuple(drain.webhooks),
        queue_outcomes_undelivered=(
            rt.worker.statistics().undelivered_writes if rt.worker is not None else 0
        ),
        outbox_results_undelivered=(
            rt.relay.statistics().undelivered_writes if rt.relay is not None else 0
        ),
        turns_cancelled=drain.turns_cancelled,
    )
