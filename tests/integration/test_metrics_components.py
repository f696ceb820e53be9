"""Metrics read from real components on both drivers: they move when work happens, and no
session id ever becomes a label."""

from __future__ import annotations

import time

import anyio
import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, HubConfig
from asyncstore.orchestrator.cancellation import open_cancellation
from asyncstore.orchestrator.locks import open_session_limiter
from asyncstore.orchestrator.metrics import Metrics, MetricsConfig, open_pool_probe
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import AsyncStorageBackend, StreamEvent
from tests.waiting import wait_for

SESSIONS = [f"sess-{i}-7f3a" for i in range(3)]
SLOW_TIMER = BatchConfig(max_batch=10_000, flush_interval_s=60, capacity=20_000)


async def scrape(metrics: Metrics) -> dict[str, Metric]:
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    for session_id in SESSIONS:
        assert session_id not in response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for family in families.values():
        for sample in family.samples:
            assert not any(v.startswith("sess-") for v in sample.labels.values()), sample
    return families


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    matches = [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample, labels, matches)
    return matches[0]


def total(families: dict[str, Metric], sample: str, **labels: str) -> float:
    return sum(
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_stream_and_broadcast_metrics_move_with_events(storage: AsyncStorageBackend) -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("storage", storage)
    async with (
        BroadcastHub(storage, HubConfig(resume_wait_s=0.05)) as hub,
        StreamEventWriter(storage, hub, StreamConfig(batch=SLOW_TIMER)) as writer,
    ):
        metrics.add_source("broadcast", hub)
        metrics.add_source("streams", writer)
        for session_id in SESSIONS:
            await writer.begin(session_id, epoch=1)
        idle = await scrape(metrics)
        async with hub.subscribe(SESSIONS[0]) as sub:
            for session_id in SESSIONS:
                for i in range(4):
                    writer.emit_nowait(session_id, "delta", {"i": i})
            with anyio.fail_after(5):
                for _ in range(4):
                    assert isinstance(await sub.__anext__(), StreamEvent)
            live = await scrape(metrics)
            await writer.flush()
            flushed = await scrape(metrics)
        after = await scrape(metrics)
    # A hub that never saw the events (another instance) must read them to serve a resume.
    async with BroadcastHub(storage, HubConfig(resume_wait_s=0.05)) as late:
        metrics.add_source("late", late)
        async with late.subscribe(SESSIONS[1], after=(1, 2)) as resumed:
            with anyio.fail_after(5):
                event = await resumed.__anext__()
            assert isinstance(event, StreamEvent) and event.seq == 3
        resumed_scrape = await scrape(metrics)

    src = {"source": "streams"}
    assert value(idle, "asyncstore_stream_events_emitted_total", **src) == 0
    assert value(live, "asyncstore_stream_events_emitted_total", **src) == 12
    assert value(live, "asyncstore_stream_sessions", **src) == 3
    assert value(live, "asyncstore_broadcast_subscribers", source="broadcast") == 1
    assert value(after, "asyncstore_broadcast_subscribers", source="broadcast") == 0
    assert value(live, "asyncstore_broadcast_delivered_total", source="broadcast") >= 4
    assert value(live, "asyncstore_writer_pending", writer="stream-events", **src) == 12
    assert value(flushed, "asyncstore_writer_flushed_total", writer="stream-events", **src) == 12
    assert value(flushed, "asyncstore_stream_events_persisted_total", **src) == 12
    assert value(flushed, "asyncstore_writer_pending", writer="stream-events", **src) == 0
    statements = total(flushed, "asyncstore_storage_statements_total", source="storage")
    assert statements > total(idle, "asyncstore_storage_statements_total", source="storage")
    ops = {
        s.labels["operation"]
        for s in flushed["asyncstore_storage_statements"].samples
        if s.name.endswith("_total")
    }
    assert ops and all(not op.startswith("sess-") for op in ops)
    assert total(live, "asyncstore_broadcast_db_reads_total", source="broadcast") == 0
    resume_reads = value(
        resumed_scrape, "asyncstore_broadcast_db_reads_total", source="late", cause="resume"
    )
    assert resume_reads >= 1


async def test_lock_and_cancellation_metrics(storage: AsyncStorageBackend) -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    async with (
        open_cancellation(storage) as cancellation,
        open_session_limiter(storage, cancellation=cancellation) as limiter,
    ):
        metrics.add_source("locks", limiter)
        metrics.add_source("cancel", cancellation)
        async with limiter.hold(SESSIONS[0]):
            held = await scrape(metrics)
            async with cancellation.open_token(SESSIONS[0]) as token:
                started = time.perf_counter()
                with token.scope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancellation.request_cancel, SESSIONS[0], "user")
                        await anyio.sleep_forever()
                assert scope.cancelled_caught
                metrics.observe_cancellation_latency(time.perf_counter() - started)
        done = await scrape(metrics)

    assert value(held, "asyncstore_lock_holders", source="locks") == 1
    assert value(done, "asyncstore_lock_holders", source="locks") == 0
    assert value(done, "asyncstore_lock_acquires_total", source="locks") == 1
    assert value(done, "asyncstore_lock_wait_seconds_count", source="locks") == 1
    assert value(done, "asyncstore_lock_wait_seconds_bucket", source="locks", le="+Inf") == 1
    assert value(done, "asyncstore_cancel_requests_total", source="cancel") == 1
    assert value(done, "asyncstore_cancel_fired_total", source="cancel") >= 1
    assert value(done, "asyncstore_cancellation_latency_seconds_count") == 1


async def test_pool_probe_measures_acquire_wait_on_postgres(storage: AsyncStorageBackend) -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("storage", storage)
    async with open_pool_probe(metrics, storage, interval_s=0.01):

        async def probed() -> bool:
            if storage.dialect != "postgres":
                return True  # no pool, no probe: the block just runs
            families = await scrape(metrics)
            return value(families, "asyncstore_storage_pool_acquire_wait_seconds_count") >= 1

        await wait_for(probed, what="a pool probe sample")
    families = await scrape(metrics)
    if storage.dialect == "postgres":
        assert value(families, "asyncstore_storage_pool_acquire_wait_seconds_count") >= 1
        assert value(families, "asyncstore_storage_pool_max_connections", source="storage") > 0
        idle = value(families, "asyncstore_storage_pool_connections", state="idle")
        assert idle >= 0
    else:
        assert "asyncstore_storage_pool_connections" not in families
        assert total(families, "asyncstore_storage_pool_acquire_wait_seconds_count") == 0
