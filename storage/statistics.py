"""``StorageStatistics``: a storage handle's counters and the metric families they export.

This module owns the snapshot ``AsyncStorageBackend.statistics()`` returns (statements by
query name, listener activity, per-operation durations and slow calls, pool occupancy),
the Prometheus families it declares (``METRIC_FAMILIES``) and its ``export`` to a
``MetricSink``, plus the duration buckets (``QUERY_BUCKETS_S``). ``storage.base``
re-exports both names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from asyncstore.storage.families import Family, MetricSink

QUERY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of ``storage_query_duration_seconds``'s buckets (+Inf follows)."""
_DIALECT = ("dialect",)
_OP = ("dialect", "operation")


@dataclass(frozen=True, slots=True)
class StorageStatistics:
    """A snapshot of a backend's counters (statements by query name, notifications)."""

    dialect: str
    statements: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    notifications_received: int = 0
    notifications_dropped: int = 0
    listener_reconnects: int = 0
    listener_reconnect_failures: int = 0  # reconnect attempts that failed (server down)
    # storage calls slower than slow_query_threshold_s, by operation (a method's name)
    slow_queries: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    slow_query_threshold_s: float = 0.1
    # per operation: calls by QUERY_BUCKETS_S bucket (the last one is +Inf) and their sum
    durations: Mapping[str, tuple[tuple[int, ...], float]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    pool: tuple[int, int, int] | None = None  # Postgres: (size, idle, max_size)

    @property
    def total_statements(self) -> int:
        return sum(self.statements.values())

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("storage_statements", "counter", "Statements by operation.", _OP),
        Family("storage_notifications_received", "counter", "Notifications.", _DIALECT),
        Family("storage_notifications_dropped", "counter", "Dropped.", _DIALECT),
        Family("storage_listener_reconnects", "counter", "Listener reconnects.", _DIALECT),
        Family(
            "storage_listener_reconnect_failures",
            "counter",
            "Listener reconnect attempts that failed.",
            _DIALECT,
        ),
        Family(
            "storage_slow_queries",
            "counter",
            "Storage calls slower than the slow-query threshold, by operation "
            "(at zero for every operation called).",
            _OP,
        ),
        Family(
            "storage_slow_query_threshold_seconds",
            "gauge",
            "The slow-query threshold (storage.slow_query_threshold_s).",
            _DIALECT,
        ),
        Family(
            "storage_query_duration_seconds",
            "histogram",
            "Duration of storage calls (pool wait included), by operation.",
            _OP,
            where="once an operation was called",
        ),
        Family(
            "storage_pool_connections",
            "gauge",
            "Pool connections.",
            (*_DIALECT, "state"),
            where="Postgres (a pool)",
        ),
        Family(
            "storage_pool_max_connections",
            "gauge",
            "Pool maximum size.",
            _DIALECT,
            where="Postgres (a pool)",
        ),
    )

    def export(self, out: MetricSink) -> None:
        d = {"dialect": self.dialect}
        out.samples("storage_statements", d, self.statements)
        out.sample("storage_notifications_received", d, self.notifications_received)
        out.sample("storage_notifications_dropped", d, self.notifications_dropped)
        out.sample("storage_listener_reconnects", d, self.listener_reconnects)
        out.sample("storage_listener_reconnect_failures", d, self.listener_reconnect_failures)
        slow = {name: self.slow_queries.get(name, 0) for name in self.durations}
        out.samples("storage_slow_queries", d, slow)
        out.sample("storage_slow_query_threshold_seconds", d, self.slow_query_threshold_s)
        for name, (counts, total) in self.durations.items():
            buckets = zip((*QUERY_BUCKETS_S, float("inf")), counts, strict=True)
            labels = {**d, "operation": name}
            out.histogram("storage_query_duration_seconds", labels, buckets, total)
        if self.pool is not None:
            size, idle, max_size = self.pool
            out.samples("storage_pool_connections", d, {"idle": idle, "in_use": size - idle})
            out.sample("storage_pool_max_connections", d, max_size)
