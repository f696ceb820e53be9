"""The ``Runtime`` object: flags, sessions and turns, workers, observation, intake.

This module owns the ``Runtime`` class that ``open_runtime`` (``orchestrator._wiring``)
builds and hands out: the per-session path choice over each component's ``Switch``, turns,
subscriptions and cancel requests, the worker and relay it runs, ``statistics()``, flag
updates and the ordered stop of intake and turns. Import it from ``orchestrator.runtime``,
the public module, which re-exports it with ``open_runtime``; keeping the class here lets
the wiring import it without an import cycle (``runtime`` -> ``_wiring`` -> ``_runtime``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import anyio.abc

from asyncstore.orchestrator.auth import LoginAttemptLimiter, PasswordHasher
from asyncstore.orchestrator.backlog import BacklogMonitor
from asyncstore.orchestrator.broadcast import (
    BroadcastHub,
    Position,
    Subscription,
)
from asyncstore.orchestrator.cancellation import (
    CancellationRegistry,
)
from asyncstore.orchestrator.config import (
    PER_SESSION_FLAGS,
    Flags,
    Settings,
    load_settings,
)
from asyncstore.orchestrator.errors import ComponentNotBuilt, OrchestratorError, RuntimeClosed
from asyncstore.orchestrator.heap_trim import HeapTrimmer
from asyncstore.orchestrator.locks import (
    SessionLimiter,
    default_instance_id,
)
from asyncstore.orchestrator.maintenance import MaintenanceSweeper
from asyncstore.orchestrator.metrics import Metrics
from asyncstore.orchestrator.outbox import Outbox, OutboxRelay, Sender, open_outbox_relay
from asyncstore.orchestrator.periodic import PeriodicRunner
from asyncstore.orchestrator.presence import PresencePublisher
from asyncstore.orchestrator.queue import AgentQueue, Handler, QueueConfig, Worker, open_worker
from asyncstore.orchestrator.runtime_report import RuntimeReport, RuntimeStatistics
from asyncstore.orchestrator.streams import (
    StreamEventWriter,
)
from asyncstore.orchestrator.switch import Switch
from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.orchestrator.turn import Turn, _superseded
from asyncstore.orchestrator.turn_metrics import TurnOutcome, TurnRecorder
from asyncstore.orchestrator.webhooks import (
    Webhooks,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    LeaseLost,
    StorageError,
    TaskCancellation,
)

__all__ = ["Runtime"]

log = logging.getLogger("asyncstore.runtime")


class Runtime:
    """The running components. Build it with ``open_runtime``; see the module docstring.

    ``turn``, ``subscribe`` and ``request_cancel`` pick the per-session path (optimized or
    legacy) of the stream writer, broadcast hub, session limiter and cancel registry for
    you, and ``statistics()`` reports every running path. ``queue`` and ``outbox`` are the
    producer sides; ``worker`` and ``relay`` are running when ``open_runtime`` got a
    handler / senders.

    Internal, for this package's tests and benchmarks only (they may change without
    notice): ``_streams``, ``_broadcast``, ``_limiter`` and ``_cancellation`` are the
    :class:`Switch` es over those components' optimized and legacy instances.
    """

    def __init__(
        self,
        settings: Settings,
        storage: AsyncStorageBackend,
        config_file: Path | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.storage = storage
        self.config_file = config_file
        self.instance_id = settings.runtime.instance_id or default_instance_id()
        self._flags = settings.flags
        self._flags_version = 0
        self._flags_changed = anyio.Event()
        self.queue = AgentQueue(storage, settings.queue.name, self._queue_config())
        self.outbox = Outbox(storage)
        self.webhooks: Webhooks | None = None
        self.worker: Worker | None = None
        self.relay: OutboxRelay | None = None
        self.backlog: BacklogMonitor | None = None
        self.periodic: PeriodicRunner | None = None  # set when schedules run
        self.report: RuntimeReport | None = None
        self.heap_trim = HeapTrimmer(settings.runtime.heap_trim_interval_s, clock=clock)
        self.presence = PresencePublisher(
            storage,
            self.instance_id,
            self.subscriber_counts,
            settings.runtime.presence_interval_s,
            clock=clock,
        )
        self.metrics = Metrics(settings.metrics)
        self.passwords = PasswordHasher(settings.auth.hashing)
        self.login_attempts = LoginAttemptLimiter(settings.auth.attempts, storage=storage)
        self.maintenance: MaintenanceSweeper
        # Set by open_runtime once the components run.
        self._streams: Switch[StreamEventWriter]
        self._broadcast: Switch[BroadcastHub]
        self._limiter: Switch[SessionLimiter]
        self._cancellation: Switch[CancellationRegistry]
        self._closing = False
        self._cancelling_turns = False
        self._turns_started = 0
        self.turn_metrics = TurnRecorder()  # exported as source "turns"
        self._active: dict[int, tuple[CancellationRegistry, str]] = {}
        self._turn_ids = 0
        self._no_turns = anyio.Event()
        self._no_turns.set()
        self._by_path: dict[str, dict[str, int]] = {
            flag: {"optimized": 0, "legacy": 0} for flag in PER_SESSION_FLAGS
        }

    # -- flags -------------------------------------------------------------------------

    @property
    def flags(self) -> Flags:
        """The flags in effect for sessions starting now."""
        return self._flags

    @property
    def flags_version(self) -> int:
        """Incremented on every effective flag change."""
        return self._flags_version

    def update_flags(self, flags: Flags | None = None, /, **changes: Any) -> Flags:
        """Change feature flags for sessions that start from now on; returns the new flags.

        Takes a whole ``Flags`` or field values (``stream_batching="10%"``, ``lock=
        "db_poll"``), validated like the settings; an invalid value raises and changes
        nothing. Every changed flag is logged with its old and new value. Turns already
        running keep their paths. ``queue`` / ``outbox`` apply to workers and relays opened
        after the change (``open_worker`` / ``open_outbox_relay``).
        """
        new = (
            flags
            if flags is not None
            else Flags.model_validate({**self._flags.model_dump(), **changes})
        )
        self._apply_flags(new, "update_flags")
        return new

    def _apply_flags(self, new: Flags, cause: str) -> None:
        old = self._flags
        before, after = old.model_dump(), new.model_dump()
        changed = [k for k in after if before[k] != after[k]]
        if not changed:
            log.info("flags unchanged (%s)", cause)
            return
        self._flags = new
        self.settings = self.settings.model_copy(update={"flags": new})
        for key in changed:
            log.warning("flag %s: %r -> %r (%s)", key, before[key], after[key], cause)
            if key in ("queue", "outbox"):
                log.warning(
                    "flag %s is process-wide: it applies to workers/relays opened from now on",
                    key,
                )
        self._flags_version += 1
        for switch in self._switches():
            # Build what the new flags need now, before its first session asks for it.
            switch.prepare(new)
        self._flags_changed.set()
        self._flags_changed = anyio.Event()

    async def wait_flags_changed(self, since_version: int) -> Flags:
        """Wait until ``flags_version`` exceeds ``since_version``; returns the flags.

        Cancelling the wait is harmless.
        """
        while self._flags_version <= since_version:
            await self._flags_changed.wait()
        return self._flags

    async def reload(self) -> Flags:
        """Re-read the environment and the TOML file and apply their ``flags``.

        Other settings that changed are logged as needing a restart. A file that fails
        to load or validate is logged and changes nothing. If cancelled, nothing changed.
        """
        path = self.config_file
        try:
            fresh = await anyio.to_thread.run_sync(load_settings, path)
        except (ValueError, OSError) as exc:
            log.error("reload of %s failed, flags unchanged: %s", path or "the environment", exc)
            return self._flags
        current = self.settings.model_dump(exclude={"flags"})
        for section, value in fresh.model_dump(exclude={"flags"}).items():
            if current.get(section) != value:
                log.warning("setting %s changed: it applies after a restart", section)
        self._apply_flags(fresh.flags, f"reload of {path or 'the environment'}")
        return self._flags

    async def _reload_on_sighup(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                log.info("SIGHUP: reloading flags")
                await self.reload()

    # -- sessions ----------------------------------------------------------------------

    def subscribe(self, session_id: str, after: Position | None = None) -> Subscription:
        """Subscribe to a session's events through the hub its delivery flag picks.

        See ``BroadcastHub.subscribe``; close it with ``aclose()`` or ``async with``. Right
        after a live flag change moved the session to the poll path, while that hub is still
        starting, the memory hub (always running: every writer publishes to it) serves it.
        """
        try:
            hub = self._broadcast.pick(session_id)
        except ComponentNotBuilt:
            memory = self._broadcast.optimized
            if memory is None:
                raise
            hub = memory
        return hub.subscribe(session_id, after)

    async def request_cancel(self, session_id: str, reason: str = "cancelled") -> None:
        """Persist a cancel request for the session and wake its tokens on every instance.

        While any session can be on the notify path, this process's token fires at once and
        the request is persisted and announced in one statement (other instances' notify
        tokens fire on the notification; poll tokens see it at their next poll); with the
        flag fully on ``poll`` it is only persisted, as the legacy code did. If cancelled:
        on the notify path the local token has fired and the request is written and
        announced together or not at all; on the poll path, nothing happened unless it was
        already persisted.
        """
        self._check_open()
        registry = await self._cancellation.get(self._flags.share("cancel") > 0)
        await registry.request_cancel(session_id, reason)

    @asynccontextmanager
    async def turn(self, session_id: str) -> AsyncIterator[Turn]:
        """Run one turn of ``session_id``: lease, cancel token, stream, webhooks.

        Waits for the session lease (the flags pick the limiter, the cancel registry, the
        stream writer and so the delivery path, for the whole turn), opens the cancel
        token, begins the stream with epoch = the lease's fencing token and fires
        ``turn_start``. The body runs in ``turn.cancel_scope``: a cancel request (or a lost
        lease, or the runtime's shutdown after its grace) cancels it and the block exits
        quietly after a critical ``cancelled`` event and clearing the request; a turn whose
        lease was lost (or whose epoch the database refused) emits nothing more, since a
        superseded holder's events would be refused, and leaves the request alone. At the end
        ``turn_complete`` (or ``error`` if the body raised) is fired and the turn's events
        are flushed (bounded by ``runtime.turn_flush_timeout_s``) before the lease is
        released, shielded from cancellation. Raises ``RuntimeClosed`` once closing began.
        Cancelling the wait for the lease leaves nothing held.
        """
        self._check_open()
        flags = self._flags
        paths = {flag: flags.optimized(flag, session_id) for flag in PER_SESSION_FLAGS}
        limiter = await self._limiter.get(paths["lock"])
        registry = await self._cancellation.get(paths["cancel"])
        writer = await self._streams.get(paths["stream_batching"])
        self._check_open()
        self._turn_ids += 1
        turn_id = self._turn_ids
        self._active[turn_id] = (registry, session_id)
        self._no_turns = anyio.Event() if len(self._active) == 1 else self._no_turns
        self._turns_started += 1
        for flag, optimized in paths.items():
            self._by_path[flag]["optimized" if optimized else "legacy"] += 1
        started = self.turn_metrics.start()
        outcome: TurnOutcome = "abandoned"  # until the turn has its lease
        try:
            async with (
                limiter.hold(session_id) as held,
                registry.open_token(session_id) as token,
                writer.session(session_id, held.token, lease=held) as stream,
            ):
                if self._cancelling_turns:
                    # The lease came after shutdown cancelled the running turns: stop at once.
                    registry.fire_local(session_id, "shutdown")
                turn = Turn(self, session_id, held, token, stream, MappingProxyType(paths))
                await turn.fire("turn_start")
                failed = False
                try:
                    with token.scope() as scope:
                        turn.cancel_scope = scope
                        yield turn
                except LeaseLost:
                    if not _superseded(turn, writer):
                        failed = True
                        raise
                    # The body emitted after the lease was lost, before the cancellation
                    # the loss fired reached it: the turn ends quietly, as a cancel would.
                except Exception:
                    failed = True
                    raise
                finally:
                    outcome = (
                        "failed" if failed else "cancelled" if token.cancelled else "completed"
                    )
                    # Shielded: the end of a turn (its last events, its hooks, the flush
                    # that must precede the lease release) must happen even when the turn
                    # is being cancelled from outside.
                    with anyio.CancelScope(shield=True):
                        await self._end_turn(turn, writer, registry, failed)
        finally:
            self.turn_metrics.end(started, outcome)
            del self._active[turn_id]
            if not self._active:
                self._no_turns.set()

    async def _end_turn(
        self,
        turn: Turn,
        writer: StreamEventWriter,
        registry: CancellationRegistry,
        failed: bool,
    ) -> None:
        with self._clock.move_on_after(self.settings.runtime.turn_flush_timeout_s) as bounded:
            try:
                if turn.token.cancelled and not _superseded(turn, writer):
                    # A turn that lost its lease neither emits (its epoch belongs to a
                    # superseded holder, the database would refuse it) nor consumes the
                    # request: a cancel may be meant for the session's new holder.
                    reason = turn.token.reason or "cancelled"
                    await turn.emit("cancelled", {"reason": reason}, critical=True)
                    await registry.clear(turn.session_id)
                await turn.fire("error" if failed else "turn_complete")
                await writer.flush()
            except (StorageError, OrchestratorError) as exc:
                log.error("session %r: ending the turn failed: %s", turn.session_id, exc)
        if bounded.cancelled_caught:
            log.error(
                "session %r: the turn's end took over %.1f s; its events may still be unwritten",
                turn.session_id,
                self.settings.runtime.turn_flush_timeout_s,
            )

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeClosed("the runtime is closing: no new turns")

    # -- workers -----------------------------------------------------------------------

    def _queue_config(self) -> QueueConfig:
        return self.settings.queue.component().model_copy(update={"mode": self._flags.queue})

    async def cancel_task(self, task_id: int, reason: str = "cancelled") -> TaskCancellation:
        """Cancel an agent task from this or any process (``AgentQueue.cancel``).

        A queued task never starts; a running one ends ``cancelled`` at once and the worker
        running it, in any process, cancels its handler when the notification arrives (a
        handler that catches the cancellation and returns is still recorded cancelled).
        The answer says whether this call cancelled it, or it was cancelled already,
        finished already (and how), or is unknown.
        """
        return await self.queue.cancel(task_id, reason)

    def open_worker(
        self, handler: Handler, *, max_workers: int | None = None
    ) -> AbstractAsyncContextManager[Worker]:
        """``open_worker`` for ``rt.queue`` with the current ``queue`` flag and settings.

        An async context manager; see ``orchestrator.queue.open_worker``.
        """
        return open_worker(
            self.queue,
            handler,
            max_workers=max_workers,
            config=self._queue_config(),
            worker_id=f"{self._instance_id()}:worker",
            clock=self._clock,
        )

    def open_outbox_relay(
        self, senders: Mapping[str, Sender]
    ) -> AbstractAsyncContextManager[OutboxRelay]:
        """``open_outbox_relay`` with the current ``outbox`` flag, settings and templates."""
        cfg = self.settings.outbox.component().model_copy(update={"mode": self._flags.outbox})
        return open_outbox_relay(
            self.storage,
            senders,
            templates=self.settings.outbox.templates,
            config=cfg,
            relay_id=f"{self._instance_id()}:relay",
            clock=self._clock,
        )

    def _instance_id(self) -> str:
        return self.instance_id

    def _evict_idle_rings(self) -> int:
        return sum(hub.evict_idle() for hub in self._broadcast.built().values())

    # -- observation -------------------------------------------------------------------

    def metrics_app(self) -> Callable[..., Any]:
        """An ASGI app serving ``GET /metrics`` (mount it in your web framework)."""
        return self.metrics.asgi_app()

    def _switches(self) -> tuple[Switch[Any], ...]:
        return tuple(
            getattr(self, name)
            for name in ("_broadcast", "_cancellation", "_limiter", "_streams")
            if hasattr(self, name)
        )

    def _metrics_on_build(self, names: tuple[str, str]) -> Callable[[bool, Any], None]:
        """Export a switch's instance from its build on (a path never built exports nothing)."""

        def track(optimized: bool, instance: Any) -> None:
            self.metrics.add_source(names[0] if optimized else names[1], instance)

        return track

    def _track_metrics(self) -> None:
        sources: dict[str, Any] = {
            "storage": self.storage,
            "passwords": self.passwords,
            "login_attempts": self.login_attempts,
            "turns": self.turn_metrics,
            "maintenance": self.maintenance,
            "heap_trim": self.heap_trim,
            "presence": self.presence,
        }
        if self.webhooks is not None:
            sources["webhooks"] = self.webhooks
        if self.worker is not None:
            sources["queue"] = self.worker
        if self.relay is not None:
            sources["outbox"] = self.relay
        if self.backlog is not None:
            sources["backlog"] = self.backlog
        if self.periodic is not None:
            sources["periodic"] = self.periodic
        for name, source in sources.items():
            self.metrics.add_source(name, source)

    def subscriber_counts(self) -> dict[str, int]:
        """Live stream subscribers per session in this process, over every running hub
        (see ``BroadcastHub.subscriber_counts``); for the operator dashboard."""
        counts: dict[str, int] = {}
        for hub in self._broadcast.built().values():
            for session_id, n in hub.subscriber_counts().items():
                counts[session_id] = counts.get(session_id, 0) + n
        return counts

    def statistics(self) -> RuntimeStatistics:
        def both(switch: Switch[Any]) -> Mapping[str, Any]:
            return MappingProxyType(
                {path: instance.statistics() for path, instance in switch.built().items()}
            )

        return RuntimeStatistics(
            flags=self._flags,
            flags_version=self._flags_version,
            turns_started=self._turns_started,
            turns_active=len(self._active),
            turns_by_path=MappingProxyType(
                {k: MappingProxyType(dict(v)) for k, v in self._by_path.items()}
            ),
            streams=both(self._streams),
            broadcast=both(self._broadcast),
            limiter=both(self._limiter),
            cancellation=both(self._cancellation),
        )

    # -- closing -----------------------------------------------------------------------

    async def _stop_intake(self, *, grace: bool) -> int:
        """Refuse new turns, give running ones the grace period, then cancel them."""
        self._closing = True
        if grace:
            with self._clock.move_on_after(self.settings.runtime.shutdown_grace_s):
                await self._no_turns.wait()
        cancelled = 0
        self._cancelling_turns = True  # turns still waiting for their lease stop on arrival
        for registry, session_id in list(self._active.values()):
            cancelled += registry.fire_local(session_id, "shutdown")
        if cancelled:
            log.warning("cancelled %d running turns at shutdown", cancelled)
        # Their ends are shielded and bounded by turn_flush_timeout_s.
        with self._clock.move_on_after(self.settings.runtime.turn_flush_timeout_s + 1.0):
            await self._no_turns.wait()
        return cancelled
