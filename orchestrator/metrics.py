"""Prometheus metrics for the seed's section 5, through prometheus-client.

A ``Metrics`` object owns its own ``CollectorRegistry``. Components are added as sources
(``metrics.add_source("streams", writer)``) and read through their ``statistics()``
snapshots at scrape time by one custom collector, so the hot paths pay nothing. Each
snapshot type declares its own families next to its fields (``METRIC_FAMILIES`` and
``export()``, the protocol of ``storage.families``): this module knows no component, and
any object whose snapshot follows the protocol can be exported. What a snapshot cannot
give is observed directly into histograms: event-loop lag (fed by
``open_loop_lag_monitor``), connection-pool acquire wait (``open_pool_probe``) and
cancellation latency. ``metrics.asgi_app()`` serves the registry to an ASGI server;
``serve_metrics`` / ``open_metrics_server`` serve it on the event loop for a process with
no web server. Labels are component names, writer names, reasons and operations: never a
session id, account or address.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import SocketAttribute, TaskStatus
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

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

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
    Scrape from the event loop's thread (``asgi_app`` under an ASGI server, or
    ``serve_metrics``): the snapshots read state the loop mutates.
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

    # -- sources ---------------------------------------------------------------------

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

    # -- direct observations ---------------------------------------------------------

    def observe_cancellation_latency(self, seconds: float) -> None:
        """Record how long a cancelled turn took to stop after the request (seconds)."""
        self.cancellation_latency.observe(max(0.0, seconds))

    def _set_thread_pool(self, borrowed: float, total: float, waiting: int) -> None:
        self._thread_pool = (borrowed, total, waiting)

    # -- exposition ------------------------------------------------------------------

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this registry (mount it at ``/metrics``)."""
        return make_asgi_app(registry=self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition of this registry and its content type (negotiated on ``accept``)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- collection ------------------------------------------------------------------

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


def _pool_of(source: object) -> Any:
    try:
        # Only the Postgres driver has a pool; a closed one raises, which means no pool.
        pool = getattr(source, "pool", None)
    except Exception:
        return None
    if pool is None or not callable(getattr(pool, "get_size", None)):
        return None
    return pool


# -- event-loop lag ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoopLagStatistics:
    """Lag samples: ``max_s`` since the start, percentiles over the last ``window`` samples."""

    samples: int
    window: int
    last_s: float
    max_s: float
    p50_s: float
    p99_s: float


class LoopLagMonitor:
    """Sleeps ``interval_s`` in a loop and records how late it woke (``open_loop_lag_monitor``)."""

    def __init__(self, metrics: Metrics, interval_s: float, window: int = 1000) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._recent: deque[float] = deque(maxlen=window)
        self._samples = 0
        self._last = self._max = 0.0

    def reset(self) -> None:
        """Forget the recent samples and the maximum (the histogram keeps counting)."""
        self._recent.clear()
        self._last = self._max = 0.0

    def statistics(self) -> LoopLagStatistics:
        ordered = sorted(self._recent)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        return LoopLagStatistics(
            samples=self._samples,
            window=len(ordered),
            last_s=self._last,
            max_s=self._max,
            p50_s=pct(0.50),
            p99_s=pct(0.99),
        )

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            start = anyio.current_time()
            await anyio.sleep(self.interval_s)
            lag = max(0.0, anyio.current_time() - start - self.interval_s)
            self._samples += 1
            self._last = lag
            self._max = max(self._max, lag)
            self._recent.append(lag)
            self.metrics.loop_lag.observe(lag)
            # The thread limiter is per event loop: sample it here, on the loop.
            limiter = anyio.to_thread.current_default_thread_limiter()
            self.metrics._set_thread_pool(
                limiter.borrowed_tokens, limiter.total_tokens, limiter.statistics().tasks_waiting
            )


@asynccontextmanager
async def open_loop_lag_monitor(
    metrics: Metrics, *, interval_s: float | None = None
) -> AsyncIterator[LoopLagMonitor]:
    """Measure event-loop lag into ``asyncstore_event_loop_lag_seconds`` within the block.

    Also samples anyio's default worker-thread limiter (``asyncstore_worker_threads_*``).
    Leaving or cancelling the block stops the monitor task.
    """
    monitor = LoopLagMonitor(metrics, interval_s or metrics.config.loop_lag_interval_s)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor._run)
        try:
            yield monitor
        finally:
            tg.cancel_scope.cancel()


# -- connection-pool wait ----------------------------------------------------------------


@asynccontextmanager
async def open_pool_probe(
    metrics: Metrics, storage: object, *, source: str = "storage", interval_s: float | None = None
) -> AsyncIterator[None]:
    """Sample the storage pool's acquire wait into ``..._storage_pool_acquire_wait_seconds``.

    Every ``interval_s`` a probe borrows a connection and returns it at once, timing the
    borrow: the wait a request would have seen at that moment. Without a pool (SQLite) the
    block runs with no probe. Leaving or cancelling the block stops the probe.
    """
    pool = _pool_of(storage)
    if pool is None:
        yield
        return
    every = interval_s or metrics.config.pool_probe_interval_s
    observe = metrics.pool_acquire_wait.labels(source=source).observe

    async def probe() -> None:
        while True:
            start = time.perf_counter()
            try:
                with anyio.move_on_after(WAIT_BUCKETS_S[-1]):
                    async with pool.acquire():
                        pass
            except Exception as exc:
                log.warning("metrics: pool probe failed: %s", exc)
            else:
                observe(time.perf_counter() - start)
            await anyio.sleep(every)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


# -- a small HTTP server on the event loop -----------------------------------------------

_REQUEST_TIMEOUT_S = 10.0
_MAX_HEAD_BYTES = 16 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


@dataclass(frozen=True, slots=True)
class MetricsServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


async def serve_metrics(
    metrics: Metrics,
    host: str | None = None,
    port: int | None = None,
    *,
    task_status: TaskStatus[MetricsServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` over HTTP/1.1 on the event loop until cancelled.

    Runs on the loop (not ``prometheus_client.start_http_server``'s thread) because the
    sources' ``statistics()`` read state the loop mutates: a scrape from another thread
    could see a dict change size mid-copy. ``port=0`` picks a free port; ``task_status``
    reports the bound ``MetricsServer``. Cancelling stops listening and drops open scrapes.
    """
    cfg = metrics.config
    bind_host = cfg.host if host is None else host
    listener = await anyio.create_tcp_listener(
        local_host=bind_host, local_port=cfg.port if port is None else port
    )
    async with listener:
        bound = MetricsServer(bind_host, listener.extra(SocketAttribute.local_port))
        log.info("serving metrics at %s", bound.url)
        task_status.started(bound)
        await listener.serve(partial(_handle, metrics))


@asynccontextmanager
async def open_metrics_server(
    metrics: Metrics, host: str | None = None, port: int | None = None
) -> AsyncIterator[MetricsServer]:
    """``serve_metrics`` for the duration of the block; yields the bound address."""
    async with anyio.create_task_group() as tg:
        server: MetricsServer = await tg.start(serve_metrics, metrics, host, port)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


async def _handle(metrics: Metrics, stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            with anyio.fail_after(_REQUEST_TIMEOUT_S):
                head = await _read_head(stream)
                await stream.send(_respond(metrics, head))
        except (TimeoutError, OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            return  # the client went away or stalled: nothing to answer


async def _read_head(stream: anyio.abc.SocketStream) -> bytes | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > _MAX_HEAD_BYTES:
            return None
        buffer += await stream.receive()
    return buffer.partition(b"\r\n\r\n")[0]


def _respond(metrics: Metrics, head: bytes | None) -> bytes:
    lines = (head or b"").decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    extra: dict[str, str] = {}
    body, content_type = b"", "text/plain; charset=utf-8"
    if head is None or len(parts) != 3:
        status = 400
    elif parts[0] not in ("GET", "HEAD"):
        status, extra = 405, {"Allow": "GET, HEAD"}
    elif parts[1].partition("?")[0] not in ("/metrics", "/"):
        status = 404
    else:
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )
        try:
            body, content_type = metrics.render(headers.get("accept", ""))
            status = 200
        except Exception:
            log.exception("metrics: rendering the registry failed")
            status = 500
        if parts[0] == "HEAD":
            extra["Content-Length"] = str(len(body))
            body = b""
    if status != 200 and not body:
        body = f"{status} {_REASONS[status]}\n".encode()
    fields = {"Content-Type": content_type, "Content-Length": str(len(body)), **extra}
    fields["Connection"] = "close"
    lines_out = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines_out += [f"{k}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines_out) + "\r\n\r\n").encode("latin-1") + body
