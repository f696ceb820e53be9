"""Metrics: names and movement from statistics snapshots, isolation, the HTTP and ASGI paths
(the HTTP server itself: test_metrics_http.py)."""

from __future__ import annotations

import pathlib

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from asyncstore.orchestrator.auth import LoginAttemptLimiter, PasswordHasher, PasswordHashingConfig
from asyncstore.orchestrator.batching import Batch, BatchConfig, BatchWriter, OverflowPolicy
from asyncstore.orchestrator.errors import Dropped
from asyncstore.orchestrator.metrics import (
    Metrics,
    MetricsConfig,
    open_loop_lag_monitor,
    open_metrics_server,
)
from tests.waiting import wait_for


async def scrape(metrics: Metrics) -> dict[str, Metric]:
    """GET /metrics through the ASGI app and parse the exposition."""
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    matches = [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample, labels, matches)
    return matches[0]


async def test_batch_writer_metrics_move_with_work() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    seen: list[int] = []

    async def sink(batch: Batch[int]) -> None:
        seen.extend(batch.items)

    config = BatchConfig(
        max_batch=10, flush_interval_s=60, capacity=10, overflow=OverflowPolicy.DROP_NEWEST
    )
    async with BatchWriter(sink, config, name="events") as writer:
        metrics.add_source("events", writer)
        dropped = 0
        for i in range(12):
            try:
                writer.put_nowait(i, nbytes=5)
            except Dropped:  # the *_nowait rule: a policy drop raises, and is counted
                dropped += 1
        assert dropped == 2
        before = await scrape(metrics)
        await writer.flush()
        after = await scrape(metrics)

    labels = {"source": "events", "writer": "events"}
    assert value(before, "asyncstore_writer_flushed_total", **labels) == 0
    assert value(after, "asyncstore_writer_flushed_total", **labels) == 10 == len(seen)
    assert value(after, "asyncstore_writer_batches_total", **labels) == 1
    assert value(after, "asyncstore_writer_accepted_total", **labels) == 10
    assert value(before, "asyncstore_writer_dropped_total", reason="overflow_newest", **labels) == 2
    assert (
        value(before, "asyncstore_writer_pending", **labels)
        + value(before, "asyncstore_writer_in_flight", **labels)
        == 10
    )
    assert value(after, "asyncstore_writer_pending", **labels) == 0
    assert value(before, "asyncstore_writer_oldest_pending_age_seconds", **labels) >= 0
    assert before["asyncstore_writer_flushed"].type == "counter"
    assert before["asyncstore_writer_pending"].type == "gauge"


async def test_auth_sources_report_verifications_and_lockouts() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    hasher = PasswordHasher(PasswordHashingConfig(time_cost=1, memory_cost=64, parallelism=1))
    limiter = LoginAttemptLimiter()
    metrics.add_source("passwords", hasher)
    metrics.add_source("logins", limiter)
    stored = await hasher.hash("pw")
    await hasher.verify(stored, "pw")
    await hasher.verify(stored, "nope")
    for _ in range(5):
        limiter.record_failure("alice", "10.0.0.1")
    families = await scrape(metrics)
    src = {"source": "passwords"}
    assert value(families, "asyncstore_auth_verifications_total", result="ok", **src) == 1
    assert value(families, "asyncstore_auth_verifications_total", result="mismatch", **src) == 1
    assert value(families, "asyncstore_auth_hashes_total", **src) == 1
    assert value(families, "asyncstore_auth_lockouts_total", scope="account", source="logins") == 1
    text = (metrics.render()[0]).decode()
    assert "alice" not in text and "10.0.0.1" not in text


def test_add_source_rejects_duplicates_and_unknown_objects() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("logins", LoginAttemptLimiter())
    with pytest.raises(ValueError, match="already registered"):
        metrics.add_source("logins", LoginAttemptLimiter())
    with pytest.raises(TypeError, match="no statistics"):
        metrics.add_source("other", object())  # type: ignore[arg-type]

    class Odd:
        def statistics(self) -> int:
            return 1

    with pytest.raises(TypeError, match="do not understand int"):
        metrics.add_source("odd", Odd())
    metrics.remove_source("logins")
    assert metrics.statistics().sources == ()


async def test_two_metrics_objects_do_not_clash() -> None:
    first, second = Metrics(), Metrics()
    first.observe_cancellation_latency(0.2)
    one, two = await scrape(first), await scrape(second)
    assert value(one, "asyncstore_cancellation_latency_seconds_count") == 1
    assert value(two, "asyncstore_cancellation_latency_seconds_count") == 0
    assert "process_cpu_seconds" in one  # process collectors on the private registry


async def test_a_failing_source_does_not_break_the_scrape() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))

    class Flaky:
        calls = 0

        def statistics(self) -> object:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("broken")
            return LoginAttemptLimiter().statistics()

    metrics.add_source("flaky", Flaky())
    families = await scrape(metrics)
    assert value(families, "asyncstore_metrics_collect_errors_total") == 1
    assert metrics.statistics().collect_errors == 1


async def test_loop_lag_monitor_feeds_the_histogram() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    async with open_loop_lag_monitor(metrics, interval_s=0.005) as monitor:
        await wait_for(lambda: monitor.statistics().samples >= 3, what="3 samples")
    families = await scrape(metrics)
    assert value(families, "asyncstore_event_loop_lag_seconds_count") >= 3
    assert value(families, "asyncstore_worker_threads_limit") > 0


async def test_metrics_server_negotiates_the_format_and_refuses_other_paths_and_methods() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.observe_cancellation_latency(0.01)
    async with open_metrics_server(metrics, "127.0.0.1", 0) as server, httpx.AsyncClient() as c:
        ok = await c.get(server.url)
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(ok.text)}
        assert "asyncstore_cancellation_latency_seconds" in names
        om = await c.get(server.url, headers={"accept": "application/openmetrics-text"})
        assert om.text.rstrip().endswith("# EOF")
        assert (await c.get(server.url.replace("/metrics", "/nope"))).status_code == 404
        assert (await c.post(server.url)).status_code == 405
        head = await c.head(server.url)
        assert head.status_code == 200 and int(head.headers["content-length"]) > 0


async def test_known_counters_are_present_at_zero_before_anything_happens(
    tmp_path: pathlib.Path,
) -> None:
    """``rate()`` and alerts need a series before its first increment."""
    from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig
    from asyncstore.orchestrator.metrics import Metrics
    from asyncstore.orchestrator.streams import StreamEventWriter
    from asyncstore.storage import open_storage

    async with (
        open_storage(f"sqlite:///{tmp_path / 'm.db'}", migrate=True) as storage,
        BroadcastHub(storage, HubConfig(cross_instance=False)) as hub,
        StreamEventWriter(storage, hub) as writer,
    ):
        metrics = Metrics()
        metrics.add_source("broadcast", hub)
        metrics.add_source("streams", writer)
        text = metrics.render()[0].decode()
    for line in (
        'asyncstore_broadcast_db_reads_total{cause="fan_in",source="broadcast"} 0.0',
        'asyncstore_broadcast_resets_total{reason="gap",source="broadcast"} 0.0',
        'asyncstore_writer_dead_letters_total{reason="retry_budget_exhausted"',
        'asyncstore_writer_dropped_total{reason="overflow_newest"',
    ):
        assert line in text, line
