"""Metric families declared next to the statistics they read: the exporting protocol.

A statistics snapshot that can be exported lists its families in ``METRIC_FAMILIES`` (name,
type, help, labels) and writes its samples into a ``MetricSink`` with ``export(out)``.
``orchestrator.metrics`` collects from any snapshot that does both, so a component (a
storage driver, an application's own class) is exportable without the exporter knowing it.
No dependencies: storage declares its families without importing the orchestrator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

__all__ = ["Exportable", "Family", "MetricKind", "MetricSink"]

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: ``asyncstore_<name>`` (counters get ``_total``) with a ``source``
    label (the name the component was added under) before ``labels``.

    ``known``: values of the last label whose series exist at zero from the first scrape.
    ``where``: empty when every snapshot of the type exports the family; otherwise when it
    does (e.g. "Postgres: the pool"), for families that do not apply to every instance.
    """

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    where: str = ""


class MetricSink(Protocol):
    """Where ``export`` writes; labels exclude ``source``, which the sink adds."""

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """One series of a gauge or counter family."""

    def samples(self, name: str, labels: Mapping[str, str], values: Mapping[str, float]) -> None:
        """One series per key of ``values`` for the family's last label; the family's
        ``known`` values missing from ``values`` are written at zero."""

    def histogram(
        self,
        name: str,
        labels: Mapping[str, str],
        buckets: Iterable[tuple[float, int]],
        total: float,
    ) -> None:
        """A histogram series from per-bucket counts (upper bound, count; the last bound
        ``inf``) and the sum of the observations."""


@runtime_checkable
class Exportable(Protocol):
    """A statistics snapshot the metrics can export."""

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]]

    def export(self, out: MetricSink) -> None: ...
