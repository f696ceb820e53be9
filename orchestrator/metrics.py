"""Prometheus metrics for the seed's section 5, through prometheus-client.

A ``Metrics`` object owns its own ``CollectorRegistry``. Components are added as sources
(``metrics.add_source("streams", writer)``) and read through their ``statistics()``
snapshots at scrape time by one custom collector, so the hot paths pay nothing. What a
snapshot cannot give is observed directly into histograms: event-loop lag (fed by
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

from orchestrator.auth import AttemptLimiterStatistics, HasherStatistics
from orchestrator.backlog import BacklogStatistics
from orchestrator.batching import BatchWriterStatistics
from orchestrator.broadcast import HubStatistics
from orchestrator.cancellation import CancellationStatistics
from orchestrator.locks import LimiterStatistics
from orchestrator.outbox import OutboxRelayStatistics
from orchestrator.queue import WorkerStatistics
from orchestrator.streams import StreamWriterStatistics
from orchestrator.webhooks import AsyncWebhookStatistics, WebhooksStatistics
from storage import StorageStatistics

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

# Label values whose counters exist at zero from the first scrape (the ones the components
# can produce; others still appear once they occur).
_DB_READ_CAUSES = ("resume", "catch_up", "fan_in", "head", "poll")
_RESET_REASONS = ("epoch_changed", "unknown_resume_point", "gap")
_HUB_DROP_REASONS = ("stale_epoch", "duplicate", "fetch_untaken")
_WRITER_DROP_REASONS = ("overflow", "overflow_oldest", "overflow_newest")
_DEAD_LETTER_REASONS = ("retries_exhausted", "retry_budget_exhausted", "not_retryable", "shutdown")

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

KNOWN_STATISTICS: tuple[type, ...] = (
    BatchWriterStatistics,
    StreamWriterStatistics,
    HubStatistics,
    LimiterStatistics,
    CancellationStatistics,
    WorkerStatistics,
    OutboxRelayStatistics,
    WebhooksStatistics,
    AsyncWebhookStatistics,
    StorageStatistics,
    HasherStatistics,
    AttemptLimiterStatistics,
    BacklogStatistics,
)


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


class _Families:
    """Metric families of one collection, created on first use; samples accumulate."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace
        self._families: dict[str, Metric] = {}

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = GaugeMetricFamily(
                f"{self._ns}_{name}", doc, labels=list(labels)
            )
        family.add_metric(list(labels.values()), value)  # type: ignore[attr-defined]

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = CounterMetricFamily(
                f"{self._ns}_{name}", doc, labels=list(labels)
            )
        family.add_metric(list(labels.values()), value)  # type: ignore[attr-defined]

    def counters(
        self,
        name: str,
        doc: str,
        labels: Mapping[str, str],
        key: str,
        values: Mapping[str, int],
        known: Iterable[str] = (),
    ) -> None:
        """One sample per label value; ``known`` values are present at zero from the start,
        so ``rate()`` and alerts see a series before its first increment."""
        for value_key in known:
            if value_key not in values:
                self.counter(name, doc, {**labels, key: value_key}, 0)
        for value_key, value in values.items():
            self.counter(name, doc, {**labels, key: value_key}, value)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Mapping[str, str],
        buckets: Iterable[tuple[float, int]],
        sum_value: float,
    ) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = HistogramMetricFamily(
                f"{self._ns}_{name}", doc, labels=list(labels)
            )
        cumulative, total = [], 0
        for bound, count in buckets:
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        family.add_metric(list(labels.values()), cumulative, sum_value)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class _SourceCollector:
    """Reads every source's ``statistics()`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()


class Metrics:
    """The process's metrics: a private registry, the sources it reads, direct histograms.

    Sources are components with a ``statistics()`` method returning one of the library's
    snapshot types (``KNOWN_STATISTICS``): BatchWriter, StreamEventWriter, BroadcastHub,
    SessionLimiter, CancellationRegistry, queue Worker, OutboxRelay, Webhooks (or one
    AsyncWebhookBatcher), a storage backend, PasswordHasher, LoginAttemptLimiter. Scrape
    from the event loop's thread (``asgi_app`` under an ASGI server, or ``serve_metrics``):
    the snapshots read state the loop mutates.
    """

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = cfg = config or MetricsConfig()
        self.registry = CollectorRegistry()
        ns = cfg.namespace
        self._sources: dict[str, HasStatistics] = {}
        self._collections = 0
        self._errors = 0
        self.loop_lag = Histogram(
            f"{ns}_event_loop_lag_seconds",
            "How late the event loop woke a sleeping monitor task (scheduling delay).",
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.cancellation_latency = Histogram(
            f"{ns}_cancellation_latency_seconds",
            "From a cancel request to the cancelled work having stopped.",
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.pool_acquire_wait = Histogram(
            f"{ns}_storage_pool_acquire_wait_seconds",
            "Time a probe waited to acquire a pooled connection (sampled).",
            ["source"],
            buckets=WAIT_BUCKETS_S,
            registry=self.registry,
        )
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
        Raises ``ValueError`` for a name already in use and ``TypeError`` for an object
        whose statistics this module does not understand.
        """
        if not name or len(name) > 64:
            raise ValueError("source name must be 1 to 64 characters")
        if name in self._sources:
            raise ValueError(f"metrics source {name!r} is already registered")
        stats = getattr(source, "statistics", None)
        if not callable(stats):
            raise TypeError(f"{type(source).__name__} has no statistics() method")
        snapshot = stats()
        if not isinstance(snapshot, KNOWN_STATISTICS):
            raise TypeError(
                f"metrics do not understand {type(snapshot).__name__} "
                f"(from {type(source).__name__}.statistics())"
            )
        self._sources[name] = source

    def track(self, name: str, source: S) -> S:
        """``add_source`` that returns the source, for ``x = metrics.track("x", X(...))``."""
        self.add_source(name, source)
        return source

    def remove_source(self, name: str) -> None:
        """Stop reading a source (e.g. a component that closed). Unknown names are ignored."""
        self._sources.pop(name, None)

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
        errors: dict[str, int] = {}
        for name, source in list(self._sources.items()):
            try:
                _emit(out, name, source.statistics(), source)
            except Exception:
                self._errors += 1
                errors[name] = errors.get(name, 0) + 1
                log.exception("metrics: reading statistics of %r failed", name)
        borrowed, total, waiting = self._thread_pool
        out.gauge("worker_threads_busy", "anyio worker-thread tokens in use.", {}, borrowed)
        out.gauge("worker_threads_limit", "anyio default thread limiter size.", {}, total)
        out.gauge("worker_threads_waiting", "Tasks waiting for a worker thread.", {}, waiting)
        out.gauge("process_threads", "Threads alive in this process.", {}, threading.active_count())
        out.counter(
            "metrics_collect_errors", "Sources whose statistics() raised.", {}, self._errors
        )
        yield from out


def _emit(out: _Families, name: str, s: object, source: object) -> None:
    src = {"source": name}
    if isinstance(s, BatchWriterStatistics):
        _writer(out, name, s)
    elif isinstance(s, StreamWriterStatistics):
        out.gauge("stream_sessions", "Sessions with a live stream writer state.", src, s.sessions)
        out.counter("stream_events_emitted", "Events published.", src, s.emitted)
        out.counter("stream_events_persisted", "Events stored.", src, s.persisted)
        out.counter("stream_events_lost", "Events published but never stored.", src, s.lost)
        out.counters(
            "stream_events_dropped", "Events refused, by reason.", src, "reason", s.dropped
        )
        out.counter("stream_notifications", "Stream notifications sent.", src, s.notifications)
        out.counter("stream_notify_failures", "Notifications that failed.", src, s.notify_failures)
        out.counter(
            "stream_insert_statements", "Legacy per-event INSERTs.", src, s.insert_statements
        )
        if s.writer is not None:
            _writer(out, name, s.writer)
    elif isinstance(s, HubStatistics):
        out.gauge("broadcast_rings", "Per-session ring buffers.", src, s.rings)
        out.gauge("broadcast_subscribers", "Live stream subscribers (WS/SSE).", src, s.subscribers)
        out.counter("broadcast_published", "Events put in rings.", src, s.published)
        out.counter("broadcast_delivered", "Events handed to subscribers.", src, s.delivered)
        out.counters(
            "broadcast_db_reads",
            "Database reads caused by subscribers.",
            src,
            "cause",
            s.db_reads,
            known=_DB_READ_CAUSES,
        )
        out.counters(
            "broadcast_resets",
            "Resets sent, by reason.",
            src,
            "reason",
            s.resets,
            known=_RESET_REASONS,
        )
        out.counters(
            "broadcast_dropped",
            "Publishes refused.",
            src,
            "reason",
            s.dropped,
            known=_HUB_DROP_REASONS,
        )
        out.counter("broadcast_rings_evicted", "Idle rings evicted.", src, s.rings_evicted)
        out.counter(
            "broadcast_lagged_disconnects", "Slow subscribers cut.", src, s.lagged_disconnects
        )
        out.counter("broadcast_fetch_errors", "Failed event fetches.", src, s.fetch_errors)
        out.counter(
            "broadcast_inline_events",
            "Other instances' events taken from notifications without a read.",
            src,
            s.inline_events,
        )
    elif isinstance(s, LimiterStatistics):
        out.gauge("lock_holders", "Session leases held.", src, s.holders)
        out.gauge("lock_waiters", "Tasks waiting for a session.", src, s.waiters)
        out.gauge("lock_cap_waiters", "Tasks waiting for a global slot.", src, s.cap_waiters)
        out.counter("lock_acquires", "Leases acquired.", src, s.acquires)
        out.counter("lock_acquire_attempts", "Acquire attempts.", src, s.acquire_attempts)
        out.counter(
            "lock_acquire_statements", "Statements on the acquire path.", src, s.acquire_statements
        )
        out.counter("lock_wakeups", "Waits ended by a wake-up.", src, s.wakeups)
        out.counter("lock_fallback_retries", "Waits ended by the backoff.", src, s.fallback_retries)
        out.counter("lock_leases_lost", "Held leases lost.", src, s.leases_lost)
        out.histogram(
            "lock_wait_seconds", "Wait to acquire a session.", src, s.wait_histogram, s.wait_total_s
        )
    elif isinstance(s, CancellationStatistics):
        out.gauge("cancel_tokens", "Live cancel tokens.", src, s.tokens)
        out.counter("cancel_requests", "Cancel requests made here.", src, s.requests)
        out.counter("cancel_fired", "Tokens fired.", src, s.fired)
        out.counter("cancel_notifications", "Cancel notifications received.", src, s.notifications)
        out.counter(
            "cancel_db_reads", "Catch-up reads.", {**src, "cause": "catch_up"}, s.catch_up_reads
        )
        out.counter("cancel_db_reads", "Catch-up reads.", {**src, "cause": "poll"}, s.polls)
    elif isinstance(s, WorkerStatistics):
        out.gauge("queue_running", "Tasks running.", src, s.running)
        out.gauge("queue_max_workers", "The worker's concurrency cap.", src, s.max_workers)
        out.gauge("queue_pending_writes", "Outcomes not yet stored.", src, s.pending_writes)
        out.counter("queue_claimed", "Tasks claimed.", src, s.claimed)
        out.counter("queue_claim_statements", "Claim statements.", src, s.claim_statements)
        outcomes = {
            "succeeded": s.succeeded,
            "retried": s.retried,
            "dead": s.dead,
            "released": s.released,
            "cancelled": s.cancelled,
            "lease_lost": s.lease_lost,
        }
        out.counters("queue_tasks_finished", "Task outcomes.", src, "outcome", outcomes)
        out.counter("queue_fallback_polls", "Fallback polls.", src, s.fallback_polls)
        out.counter("queue_storage_errors", "Storage errors.", src, s.storage_errors)
        out.counter(
            "queue_reruns", "Tasks re-run after their worker's lease expired.", src, s.reruns
        )
        out.counter("queue_due_queries", "Next-due reads on going idle.", src, s.due_queries)
        out.counter(
            "queue_expiry_wakeups", "Idle waits ended at a due time.", src, s.expiry_wakeups
        )
    elif isinstance(s, BacklogStatistics):
        _backlog(out, name, s)
    elif isinstance(s, OutboxRelayStatistics):
        out.gauge("outbox_in_flight", "Messages being sent.", src, s.in_flight)
        out.gauge("outbox_lanes", "Channels with a send lane.", src, s.lanes)
        out.gauge("outbox_pending_writes", "Outcomes not yet stored.", src, s.pending_writes)
        out.counter("outbox_claimed", "Messages claimed.", src, s.claimed)
        outcomes = {"sent": s.sent, "retried": s.retried, "dead": s.dead, "released": s.released}
        out.counters("outbox_messages_finished", "Message outcomes.", src, "outcome", outcomes)
        out.counter("outbox_send_errors", "Failed sends.", src, s.send_errors)
        out.counter("outbox_fallback_polls", "Fallback polls.", src, s.fallback_polls)
    elif isinstance(s, WebhooksStatistics):
        out.counter("webhook_fires", "Trigger firings.", src, s.fires)
        out.counter("webhook_sync_requests", "Synchronous hook requests.", src, s.sync_requests)
        out.counters("webhook_decisions", "Sync hook decisions.", src, "decision", s.decisions)
        for batcher in s.batchers.values():
            _webhook(out, name, batcher)
    elif isinstance(s, AsyncWebhookStatistics):
        _webhook(out, name, s)
    elif isinstance(s, StorageStatistics):
        labels = {**src, "dialect": s.dialect}
        out.counters(
            "storage_statements", "Statements by operation.", labels, "operation", s.statements
        )
        out.counter(
            "storage_notifications_received", "Notifications.", labels, s.notifications_received
        )
        out.counter("storage_notifications_dropped", "Dropped.", labels, s.notifications_dropped)
        out.counter(
            "storage_listener_reconnects", "Listener reconnects.", labels, s.listener_reconnects
        )
        out.counter(
            "storage_listener_reconnect_failures",
            "Listener reconnect attempts that failed.",
            labels,
            s.listener_reconnect_failures,
        )
        _pool(out, labels, source)
    elif isinstance(s, HasherStatistics):
        out.gauge("auth_hashing_running", "Hashes running.", src, s.running)
        out.gauge("auth_hashing_waiting", "Hashes waiting for a slot.", src, s.waiting)
        out.gauge("auth_hashing_slots", "Hashing pool size.", src, s.max_concurrent)
        out.counter("auth_hashes", "Passwords hashed.", src, s.hashes)
        results = {
            "ok": s.verified,
            "mismatch": s.mismatched,
            "invalid_hash": s.invalid,
            "overloaded": s.overloaded,
        }
        out.counters("auth_verifications", "Verifications.", src, "result", results)
        out.counter("auth_rehashes", "Rehashes on verify.", src, s.rehashed)
        out.counter("auth_hashing_busy_seconds", "Time spent hashing.", src, s.busy_s)
    elif isinstance(s, AttemptLimiterStatistics):
        out.gauge(
            "auth_limiter_keys", "Tracked keys.", {**src, "scope": "account"}, s.accounts_tracked
        )
        out.gauge(
            "auth_limiter_keys", "Tracked keys.", {**src, "scope": "address"}, s.addresses_tracked
        )
        out.counters("auth_logins_rejected", "Refused: locked out.", src, "scope", s.rejected)
        out.counters("auth_lockouts", "Lockouts started.", src, "scope", s.lockouts)
        out.counter("auth_login_failures", "Failed logins.", src, s.failures)
        out.counter("auth_login_successes", "Successful logins.", src, s.successes)


def _backlog(out: _Families, source: str, s: BacklogStatistics) -> None:
    depth_doc = "Unfinished rows: waiting (claimable now), delayed, in_flight (leased)."
    age_doc = "Seconds the longest-waiting claimable row has waited."
    for q in s.queues:
        labels = {"source": source, "queue": q.name}
        for state, n in (
            ("waiting", q.waiting),
            ("delayed", q.delayed),
            ("in_flight", q.in_flight),
        ):
            out.gauge("queue_depth", depth_doc, {**labels, "state": state}, n)
        out.gauge("queue_oldest_wait_seconds", age_doc, labels, q.oldest_wait_s)
    if s.outbox is not None:
        o, labels = s.outbox, {"source": source}
        for state, n in (
            ("waiting", o.waiting),
            ("delayed", o.delayed),
            ("in_flight", o.in_flight),
        ):
            out.gauge("outbox_depth", depth_doc, {**labels, "state": state}, n)
        out.gauge("outbox_oldest_wait_seconds", age_doc, labels, o.oldest_wait_s)
    staleness = s.staleness_s if s.staleness_s != float("inf") else -1.0
    out.gauge(
        "backlog_read_age_seconds",
        "Age of the backlog reading; -1: none.",
        {"source": source},
        staleness,
    )
    out.counter("backlog_read_errors", "Failed backlog reads.", {"source": source}, s.errors)


def _writer(out: _Families, source: str, s: BatchWriterStatistics) -> None:
    labels = {"source": source, "writer": s.name}
    out.gauge("writer_pending", "Items waiting for a flush.", labels, s.pending)
    out.gauge("writer_in_flight", "Items handed to the sink.", labels, s.in_flight)
    out.gauge("writer_buffered_bytes", "Bytes buffered.", labels, s.buffered_bytes)
    out.gauge("writer_blocked_puts", "Puts waiting for room.", labels, s.blocked_puts)
    out.gauge(
        "writer_oldest_pending_age_seconds",
        "Age of the oldest item.",
        labels,
        s.oldest_pending_age_s,
    )
    out.gauge(
        "writer_last_flush_latency_seconds", "Last flush duration.", labels, s.last_flush_latency_s
    )
    out.counter("writer_accepted", "Items accepted.", labels, s.accepted)
    out.counter("writer_flushed", "Items the sink confirmed (writes).", labels, s.flushed)
    out.counter("writer_batches", "Batches confirmed.", labels, s.batches)
    out.counters(
        "writer_dropped",
        "Items dropped, by reason.",
        labels,
        "reason",
        s.dropped,
        known=_WRITER_DROP_REASONS,
    )
    out.counter("writer_retries", "Batch retries.", labels, s.retries)
    out.counter("writer_dead_lettered", "Items dead-lettered.", labels, s.dead_lettered)
    out.counters(
        "writer_dead_letters",
        "Items dead-lettered, by reason.",
        labels,
        "reason",
        s.dead_letters,
        known=_DEAD_LETTER_REASONS,
    )
    out.gauge(
        "writer_sink_unavailable",
        "1 while the sink's latest write failed (storage unavailable), else 0.",
        labels,
        1.0 if s.sink_unavailable else 0.0,
    )
    out.gauge(
        "writer_sink_failing_seconds",
        "How long the sink has been failing (0 while healthy).",
        labels,
        s.failing_for_s,
    )
    out.gauge(
        "writer_sink_consecutive_failures",
        "Failed sink calls since the last success.",
        labels,
        s.consecutive_failures,
    )
    out.gauge("writer_buffered", "Items buffered: waiting plus in flight.", labels, s.unsettled)


def _webhook(out: _Families, source: str, s: AsyncWebhookStatistics) -> None:
    labels = {"source": source, "endpoint": s.endpoint}
    out.gauge("webhook_enabled", "1 while the endpoint is enabled.", labels, float(s.enabled))
    out.counter("webhook_events_accepted", "Events queued.", labels, s.accepted)
    out.counter("webhook_events_delivered", "Events confirmed.", labels, s.delivered)
    out.counter("webhook_requests", "HTTP requests, retries included.", labels, s.requests)
    out.counter("webhook_failed_attempts", "Failed attempts.", labels, s.failed_attempts)
    out.counter("webhook_events_dead_lettered", "Events given up.", labels, s.dead_lettered)
    out.counters("webhook_events_dropped", "Events dropped.", labels, "reason", s.dropped)
    _writer(out, source, s.writer)


def _pool_of(source: object) -> Any:
    try:
        # Only the Postgres driver has a pool; a closed one raises, which means no pool.
        pool = getattr(source, "pool", None)
    except Exception:
        return None
    if pool is None or not callable(getattr(pool, "get_size", None)):
        return None
    return pool


def _pool(out: _Families, labels: Mapping[str, str], source: object) -> None:
    pool = _pool_of(source)
    if pool is None:
        return
    size, idle = pool.get_size(), pool.get_idle_size()
    out.gauge("storage_pool_connections", "Pool connections.", {**labels, "state": "idle"}, idle)
    out.gauge(
        "storage_pool_connections", "Pool connections.", {**labels, "state": "in_use"}, size - idle
    )
    out.gauge("storage_pool_max_connections", "Pool maximum size.", labels, pool.get_max_size())


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
