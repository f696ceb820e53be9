"""Runtime: every component built from one ``Settings`` and run under one ``async with``.

``open_runtime(settings)`` opens storage (migrating when ``migrate_on_start``), the
broadcast hubs, cancellation registries, session limiters, stream writers, webhooks and,
when given handlers, the queue worker and the outbox relay; each owns its background loops
(listeners, flushers, sweepers, renewers, relays) in a task group nested in the runtime's
block, and the runtime's own task group runs the SIGHUP reloader. Per-session feature
flags are served by a :class:`Switch` over the optimized and the legacy instance of a
component, picking one per session from the current ``Flags``, so a rollout share or a flag
change applies to sessions that start after it. An instance is built only when some session
can take its path: at open for the shares in effect, later (flags change at runtime, by
``update_flags`` or SIGHUP) in the background right after the change and in any case on
first use. The session limiters sweep no leases: the maintenance leader does, one sweeper
per fleet. Closing stops intake, waits for running turns, flushes writers, lets leases be
released, closes storage and returns a :class:`RuntimeReport` of what could not be delivered.

This module is the runtime's public surface and owns no code: ``Runtime`` lives in
``orchestrator._runtime``, ``RuntimeReport`` / ``RuntimeStatistics`` in
``orchestrator.runtime_report``, the ``Switch`` in ``orchestrator.switch``, ``Turn`` in
``orchestrator.turn`` and the wiring behind ``open_runtime`` in ``orchestrator._wiring``;
every name is importable from here. The wiring imports the class from ``_runtime``, not
from here, so there is no import cycle.
"""

from __future__ import annotations

from asyncstore.orchestrator._runtime import Runtime
from asyncstore.orchestrator._wiring import open_runtime
from asyncstore.orchestrator.errors import ComponentNotBuilt, RuntimeClosed
from asyncstore.orchestrator.runtime_report import RuntimeReport, RuntimeStatistics
from asyncstore.orchestrator.switch import Switch
from asyncstore.orchestrator.switch import _open_switch as _open_switch  # re-exported
from asyncstore.orchestrator.turn import Turn

__all__ = [
    "ComponentNotBuilt",
    "Runtime",
    "RuntimeClosed",
    "RuntimeReport",
    "RuntimeStatistics",
    "Switch",
    "Turn",
    "open_runtime",
]
