"""Writer health in the metrics: a failing sink, what it buffers, and dead letters by reason."""

from __future__ import annotations

import anyio
from prometheus_client.parser import text_string_to_metric_families

from asyncstore.orchestrator.batching import Batch, BatchConfig, BatchWriter, DeadLetter
from asyncstore.orchestrator.metrics import Metrics, MetricsConfig
from asyncstore.storage import StorageUnavailable


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    text = metrics.render()[0].decode()
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, (name, labels, values)
    return values[0]


async def test_writer_metrics_say_storage_is_unavailable_and_what_waits() -> None:
    down = True
    failed = anyio.Event()

    async def sink(batch: Batch[int]) -> None:
        if down:
            failed.set()
            raise StorageUnavailable("postgres unreachable")

    letters: list[DeadLetter[int]] = []
    config = BatchConfig(
        max_batch=2,
        flush_interval_s=0.01,
        max_retries=None,
        retry_budget_s=60,
        retry_base_s=0.001,
        retry_max_s=0.005,
    )
    metrics = Metrics(MetricsConfig(process_metrics=False))
    labels = {"source": "events", "writer": "events"}
    async with BatchWriter(sink, config, on_dead_letter=letters.append, name="events") as w:
        metrics.add_source("events", w)
        assert sample(metrics, "asyncstore_writer_sink_unavailable", **labels) == 0
        for i in range(5):
            w.put_nowait(i)
        with anyio.fail_after(10):
            await failed.wait()
        assert sample(metrics, "asyncstore_writer_sink_unavailable", **labels) == 1
        assert sample(metrics, "asyncstore_writer_buffered", **labels) == 5
        assert sample(metrics, "asyncstore_writer_sink_consecutive_failures", **labels) >= 1
        assert sample(metrics, "asyncstore_writer_sink_failing_seconds", **labels) >= 0
        assert sample(metrics, "asyncstore_writer_oldest_pending_age_seconds", **labels) > 0
        down = False
        with anyio.fail_after(10):
            await w.flush()
        assert sample(metrics, "asyncstore_writer_sink_unavailable", **labels) == 0
        assert sample(metrics, "asyncstore_writer_sink_failing_seconds", **labels) == 0
        assert sample(metrics, "asyncstore_writer_buffered", **labels) == 0
        assert letters == []


async def test_dead_letters_are_exported_by_reason() -> None:
    async def sink(batch: Batch[int]) -> None:
        raise StorageUnavailable("postgres unreachable")

    config = BatchConfig(
        max_batch=3, flush_interval_s=0.01, max_retries=None, retry_budget_s=0.05, retry_max_s=0.01
    )
    metrics = Metrics(MetricsConfig(process_metrics=False))
    async with BatchWriter(sink, config, name="w") as w:
        metrics.add_source("w", w)
        for i in range(3):
            w.put_nowait(i)
        with anyio.fail_after(10):
            await w.flush()
        value = sample(
            metrics,
            "asyncstore_writer_dead_letters_total",
            source="w",
            writer="w",
            reason="retry_budget_exhausted",
        )
    assert value == 3
