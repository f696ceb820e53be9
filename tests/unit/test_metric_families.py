"""The declaration protocol (storage.families): any component can be exported, and what it
exports must match what it declares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import pytest

from asyncstore.orchestrator.metrics import Metrics, MetricsConfig
from asyncstore.storage.families import Family, MetricSink


@dataclass(frozen=True)
class _JobStatistics:
    done: int
    by_kind: Mapping[str, int]

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("app_jobs_done", "counter", "Jobs done."),
        Family("app_jobs", "counter", "Jobs by kind.", ("kind",), known=("a", "b")),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("app_jobs_done", {}, self.done)
        out.samples("app_jobs", {}, self.by_kind)


class _Jobs:
    def __init__(self) -> None:
        self.done = 0
        self.by_kind: dict[str, int] = {}

    def statistics(self) -> _JobStatistics:
        return _JobStatistics(self.done, dict(self.by_kind))


def test_an_application_component_is_exported_with_its_known_labels_at_zero() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    jobs = metrics.track("jobs", _Jobs())
    text = metrics.render()[0].decode()
    assert 'asyncstore_app_jobs_total{kind="a",source="jobs"} 0.0' in text
    assert 'asyncstore_app_jobs_done_total{source="jobs"} 0.0' in text
    jobs.done, jobs.by_kind = 3, {"c": 2}
    text = metrics.render()[0].decode()
    assert 'asyncstore_app_jobs_done_total{source="jobs"} 3.0' in text
    assert 'asyncstore_app_jobs_total{kind="c",source="jobs"} 2.0' in text
    assert metrics.families()["jobs"] == _JobStatistics.METRIC_FAMILIES


def test_a_sample_that_does_not_match_its_declaration_is_a_collect_error() -> None:
    @dataclass(frozen=True)
    class Drifted(_JobStatistics):
        def export(self, out: MetricSink) -> None:
            out.sample("app_jobs_done", {}, self.done)
            out.sample("app_jobs", {"other": "x"}, 1)  # declared with ("kind",), as samples

    class Owner:
        def statistics(self) -> Drifted:
            return Drifted(1, {})

    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("drifted", Owner())
    text = metrics.render()[0].decode()
    assert metrics.statistics().collect_errors == 1
    assert "asyncstore_metrics_collect_errors_total 1.0" in text
    assert "app_jobs_done" not in text  # a failing source adds nothing, not half


def test_families_that_clash_are_refused_when_the_source_is_added() -> None:
    @dataclass(frozen=True)
    class Clash(_JobStatistics):
        METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
            Family("app_jobs_done", "gauge", "Not a counter this time."),
        )

    class Owner:
        def statistics(self) -> Clash:
            return Clash(0, {})

    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("jobs", _Jobs())
    with pytest.raises(ValueError, match="clashes"):
        metrics.add_source("other", Owner())
    with pytest.raises(ValueError, match="clashes"):
        metrics.add_source("lag", _Own())
    assert metrics.statistics().sources == ("jobs",)


@dataclass(frozen=True)
class _OwnStatistics:
    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("process_threads", "counter", "Clashes with the metrics' own gauge."),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("process_threads", {}, 1)


class _Own:
    def statistics(self) -> _OwnStatistics:
        return _OwnStatistics()


def test_the_slow_query_threshold_is_a_storage_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncstore.orchestrator.config import load_settings

    assert load_settings().storage.slow_query_threshold_s == 0.1
    given = load_settings(storage={"slow_query_threshold_s": 0.25})
    assert given.storage.slow_query_threshold_s == 0.25
    monkeypatch.setenv("ASYNCSTORE_STORAGE__SLOW_QUERY_THRESHOLD_S", "0.5")
    assert load_settings().storage.slow_query_threshold_s == 0.5
