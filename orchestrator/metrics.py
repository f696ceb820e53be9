"""Prometheus metrics for the seed's section 5: one generic collector over ``statistics()``.

A ``Metrics`` object owns its own ``CollectorRegistry``. Components are added as sources
(``metrics.add_source("streams", writer)``) and read through their ``statistics()``
snapshots at scrape time by one custom collector, so the hot paths pay nothing. Each
snapshot type declares its own families next to its fields (``METRIC_FAMILIES`` and
``export()``, the protocol of ``storage.families``): this module knows no component, and
any object whose snapshot follows the protocol can be exported. What a snapshot cannot
give is observed directly into histograms: event-loop lag and connection-pool acquire
wait (fed by ``metrics_probes``) and cancellation latency. ``metrics.asgi_app()`` is
prometheus-client's ASGI app for an ASGI server; ``metrics_http.serve_metrics`` /
``open_metrics_server`` serve prometheus-client's WSGI app for a process with no web
server (both re-exported here). Labels are component names, writer names, reasons and
operations: never a session id, account or address.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_asgi_app,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.metrics_http import (
    MetricsServer,
    open_metrics_server,
    serve_metrics,
)
from asyncstore.orchestrator.metrics_probes import (
    LAG_BUCKETS_S,
    WAIT_BUCKETS_S,
    LoopLagMonitor,
    LoopLagStatistics,
    open_loop_lag_monitor,
    open_pool_probe,
)
from asyncstore.storage.errors import InvalidArgument, InvalidType
from asyncstore.storage.families import Exportable, Family

__all__ = [
    "LoopLagMonitor",
    "LoopLagStatistics",
    "Metrics",
    "MetricsConfig",
    "MetricsServer",
    "MetricsStatistics",
    "open_loop_lag_monitor",
    "open_metrics_server",
    "open_pool_probe",
    "serve_metrics",
]

log = logging.getLogger(__name__)

# The families this module produces itself (no ``source`` label).
OWN_FAMILIES: tuple[Family, ...] = (
    Family(
        "event_loop_lag_seconds",
        "histogram",
        "How late the event loop woke a sleeping monitor task (scheduling delay).",
    ),
    Family(
        "cancellation_latency_seconds",
        "histogram",
        "From a cancel request to the cancelled work having stopped.",
    ),
    Family(
        "storage_pool_acquire_wait_seconds",
        "histogram",
        "Time a probe waited to acquire a pooled connection (sampled).",
        ("source",),
        where="Postgres (a pool), once probed",
    ),
    Family("worker_threads_busy", "gauge", "anyio worker-thread tokens in use."),
    Family("worker_threads_limit", "gauge", "anyio default thread limiter size."),
    Family("worker_threads_waiting", "gauge", "Tasks waiting for a worker thread."),
    Family("process_threads", "gauge", "Threads alive in this process."),
    Family("metrics_collect_errors", "counter", "Sources whose statistics() raised."),
)
_OWN = {f.name: f for f in OWN_FAMILIES}


class HasStatistics(Protocol):
    def statistics(self) -> object: ...


S = TypeVar("S", bound=HasStatistics)


class MetricsConfig(BaseModel):
    """Metrics settings (``metrics.*`` in the settings tree)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(default="asyncstore", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    process_metrics: bool = Field(default=True, description="process_*, python_gc_*, python_info")
    loop_lag_interval_s: float = Field(default=0.25, gt=0)
    pool_probe_interval_s: float = Field(default=5.0, gt=0)
    backlog_interval_s: float = Field(
        default=5.0, gt=0, description="how often queue/outbox depths are read for the gauges"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


@dataclass(frozen=True, slots=True)
class MetricsStatistics:
    sources: tuple[str, ...]
    collections: int
    collect_errors: int


_KINDS = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


class _Families:
    """Metric families of one collection, created on first use; samples accumulate."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace
        self._families: dict[str, Metric] = {}

    def add(self, family: Family, labels: Mapping[str, str], value: Any) -> None:
        metric = self._families.get(family.name)
        if metric is None:
            metric = self._families[family.name] = _KINDS[family.kind](
                f"{self._ns}_{family.name}", family.help, labels=list(labels)
            )
        if family.kind == "histogram":
            buckets, sum_value = value
            metric.add_metric(list(labels.values()), buckets, sum_value)  # type: ignore[union-attr]
        else:
            metric.add_metric(list(labels.values()), value)  # type: ignore[union-attr]

    def merge(self, other: _Families) -> None:
        for name, metric in other._families.items():
            mine = self._families.setdefault(name, metric)
            if mine is not metric:
                mine.samples.extend(metric.samples)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class _SourceSink:
    """The ``MetricSink`` one source's snapshot exports into: adds ``source`` and checks
    every sample against the snapshot's declared families (an undeclared name or other
    labels raise, so a declaration cannot drift from what is exported)."""

    __slots__ = ("_declared", "_out", "_source")

    def __init__(self, out: _Families, source: str, declared: Mapping[str, Family]) -> None:
        self._out = out
        self._source = source
        self._declared = declared

    def _family(self, name: str, labels: Mapping[str, str], extra: int = 0) -> Family:
        family = self._declared.get(name)
        if family is None:
            raise InvalidArgument(f"metric family {name!r} is not declared")
        if len(labels) + extra != len(family.labels) or any(
            k != f for k, f in zip(labels, family.labels, strict=False)
        ):
            raise InvalidArgument(f"{name}: labels {list(labels)} do not match {family.labels}")
        return family

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        family = self._family(name, labels)
        self._out.add(family, {"source": self._source, **labels}, value)

    def samples(self, name: str, labels: Mapping[str, str], values: Mapping[str, float]) -> None:
        family = self._family(name, labels, extra=1)
        key = family.labels[-1]
        base = {"source": self._source, **labels}
        for known in family.known:
            if known not in values:
                self._out.add(family, {**base, key: known}, 0)
        for value_key, value in values.items():
            self._out.add(family, {**base, key: value_key}, value)

    def histogram(
        self,
        name: str,
        labels: Mapping[str, str],
        buckets: Iterable[tuple[float, int]],
        total: float,
    ) -> None:
        family = self._family(name, labels)
        cumulative, count = [], 0
        for bound, n in buckets:
            count += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(count)))
        self._out.add(family, {"source": self._source, **labels}, (cumulative, total))


class _SourceCollector:
    """Reads every source's ``statistics()`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()


def _declarations(snapshot: object) -> tuple[Family, ...] | None:
    if not isinstance(snapshot, Exportable):
        return None
    families = type(snapshot).METRIC_FAMILIES
    if not isinstance(families, tuple) or not all(isinstance(f, Family) for f in families):
        return None
    return families


class Metrics:
    """The process's metrics: a private registry, the sources it reads, direct histograms.

    A source is any object with a ``statistics()`` method whose snapshot declares its
    families (``storage.families.Exportable``): the library's BatchWriter,
    StreamEventWriter, BroadcastHub, SessionLimiter, CancellationRegistry, queue Worker,
    OutboxRelay, Webhooks (or one AsyncWebhookBatcher), a storage backend, PasswordHasher,
    LoginAttemptLimiter, BacklogMonitor and ``asgi.EventStreams``, or an application's own.
    Collect on the event loop's thread (``asgi_app`` under an ASGI server, ``render`` from a
    task, or ``serve_metrics``, which hands collection to the loop): the snapshots read
    state the loop mutates.
    """

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = cfg = config or MetricsConfig()
        self.registry = CollectorRegistry()
        ns = cfg.namespace
        self._sources: dict[str, HasStatistics] = {}
        self._source_families: dict[str, Mapping[str, Family]] = {}
        self._declared: dict[str, Family] = dict(_OWN)
        self._collections = 0
        self._errors = 0

        def histogram(name: str, buckets: tuple[float, ...]) -> Histogram:
            family = _OWN[name]
            return Histogram(
                f"{ns}_{name}",
                family.help,
                list(family.labels),
                buckets=buckets,
                registry=self.registry,
            )

        self.loop_lag = histogram("event_loop_lag_seconds", LAG_BUCKETS_S)
        self.cancellation_latency = histogram("cancellation_latency_seconds", LAG_BUCKETS_S)
        self.pool_acquire_wait = histogram("storage_pool_acquire_wait_seconds", WAIT_BUCKETS_S)
        self._thread_pool: tuple[float, float, int] = (0.0, 0.0, 0)
        self.registry.register(_SourceCollector(self))
        if cfg.process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def add_source(self, name: str, source: HasStatistics) -> None:
        """Read ``source.statistics()`` at every scrape, labelled ``source=name``.

        ``name`` is a component name ("streams", "queue"), never a per-session value.
        Raises ``ValueError`` for a name already in use or for families that clash with
        ones already declared (same name, another type or other labels), and
        ``TypeError`` for an object whose snapshot declares no families.
        """
        if not name or len(name) > 64:
            raise InvalidArgument("source name must be 1 to 64 characters")
        if name in self._sources:
            raise InvalidArgument(f"metrics source {name!r} is already registered")
        stats = getattr(source, "statistics", None)
        if not callable(stats):
            raise InvalidType(f"{type(source).__name__} has no statistics() method")
        snapshot = stats()
        families = _declarations(snapshot)
        if families is None:
            raise InvalidType(
                f"metrics do not understand {type(snapshot).__name__} "
                f"(from {type(source).__name__}.statistics()): it declares no "
                "METRIC_FAMILIES / export() (see storage.families)"
            )
        declared = dict(self._declared)
        for family in families:
            seen = declared.setdefault(family.name, family)
            if (seen.kind, seen.labels) != (family.kind, family.labels) or "source" in (
                family.labels
            ):
                raise InvalidArgument(
                    f"metric family {family.name!r} of {type(snapshot).__name__} clashes "
                    f"with one already declared ({seen.kind} {seen.labels})"
                )
        self._declared = declared
        self._source_families[name] = {f.name: f for f in families}
        self._sources[name] = source

    def track(self, name: str, source: S) -> S:
        """``add_source`` that returns the source, for ``x = metrics.track("x", X(...))``."""
        self.add_source(name, source)
        return source

    def remove_source(self, name: str) -> None:
        """Stop reading a source (e.g. a component that closed). Unknown names are ignored."""
        self._sources.pop(name, None)
        self._source_families.pop(name, None)

    def families(self) -> dict[str, tuple[Family, ...]]:
        """The families each source declares (and this object's own, under ``""``)."""
        out = {"": OWN_FAMILIES}
        for name, families in self._source_families.items():
            out[name] = tuple(families.values())
        return out

    def statistics(self) -> MetricsStatistics:
        return MetricsStatistics(tuple(self._sources), self._collections, self._errors)

    def observe_cancellation_latency(self, seconds: float) -> None:
        """Record how long a cancelled turn took to stop after the request (seconds)."""
        self.cancellation_latency.observe(max(0.0, seconds))

    def set_thread_pool(self, borrowed: float, total: float, waiting: int) -> None:
        """Record anyio's worker-thread limiter (sampled on the loop by the lag monitor)."""
        self._thread_pool = (borrowed, total, waiting)

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this registry (mount it at ``/metrics``)."""
        return make_asgi_app(registry=self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition of this registry and its content type (negotiated on ``accept``)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def _collect(self) -> Iterator[Metric]:
        self._collections += 1
        out = _Families(self.config.namespace)
        for name, source in list(self._sources.items()):
            try:
                snapshot = source.statistics()
                if not isinstance(snapshot, Exportable) or _declarations(snapshot) is None:
                    raise InvalidType(f"{type(snapshot).__name__} declares no metric families")
                # Collected apart first: a source that fails half-way adds nothing.
                part = _Families(self.config.namespace)
                snapshot.export(_SourceSink(part, name, self._source_families[name]))
            except Exception:
                self._errors += 1
                log.exception("metrics: reading statistics of %r failed", name)
                continue
            out.merge(part)
        borrowed, total, waiting = self._thread_pool
        own = _OWN
        out.add(own["worker_threads_busy"], {}, borrowed)
        out.add(own["worker_threads_limit"], {}, total)
        out.add(own["worker_threads_waiting"], {}, waiting)
        out.add(own["process_threads"], {}, threading.active_count())
        out.add(own["metrics_collect_errors"], {}, self._errors)
        yield from out
