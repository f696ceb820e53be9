"""TurnRecorder: how many turns run, how they end and how long they take, for the metrics.

Seed 003 section 5 asks for request latency percentiles, error rate and timeout rate of
the chat endpoint. In this library that request is a turn (``Runtime.turn``): the runtime
records each one here (from asking for the lease to the end of its final flush) and the
snapshot declares the families. Percentiles come from the histogram
(``histogram_quantile``); a timeout is the application cancelling the turn, so it counts
as ``cancelled``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal

from asyncstore.storage.families import Family, MetricSink

__all__ = ["TURN_BUCKETS_S", "TurnOutcome", "TurnRecorder", "TurnStatistics"]

TurnOutcome = Literal["completed", "failed", "cancelled", "abandoned"]
OUTCOMES: tuple[TurnOutcome, ...] = ("completed", "failed", "cancelled", "abandoned")
TURN_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class TurnStatistics:
    """``outcomes``: completed, failed (the body raised), cancelled (a cancel request, a
    lost lease or shutdown), abandoned (the wait for the lease was cancelled or failed)."""

    active: int
    outcomes: Mapping[str, int]
    durations: tuple[tuple[float, int], ...]  # (upper bound, count); the last bound is inf
    total_s: float

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("turns_active", "gauge", "Turns running (or waiting for their lease)."),
        Family(
            "turns",
            "counter",
            "Turns ended, by outcome: completed, failed, cancelled, abandoned.",
            ("outcome",),
            known=OUTCOMES,
        ),
        Family(
            "turn_duration_seconds",
            "histogram",
            "From asking for the session's lease to the end of the turn's final flush.",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("turns_active", {}, self.active)
        out.samples("turns", {}, self.outcomes)
        out.histogram("turn_duration_seconds", {}, self.durations, self.total_s)


class TurnRecorder:
    """Counts turns; ``start()`` when one begins, ``end(started, outcome)`` when it ends."""

    def __init__(self) -> None:
        self._active = 0
        self._outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._counts = [0] * (len(TURN_BUCKETS_S) + 1)
        self._total = 0.0

    def start(self) -> float:
        self._active += 1
        return time.perf_counter()

    def end(self, started: float, outcome: TurnOutcome) -> None:
        seconds = max(0.0, time.perf_counter() - started)
        self._active -= 1
        self._outcomes[outcome] += 1
        self._counts[bisect.bisect_left(TURN_BUCKETS_S, seconds)] += 1
        self._total += seconds

    def statistics(self) -> TurnStatistics:
        bounds = (*TURN_BUCKETS_S, float("inf"))
        return TurnStatistics(
            active=self._active,
            outcomes=MappingProxyType(dict(self._outcomes)),
            durations=tuple(zip(bounds, self._counts, strict=True)),
            total_s=self._total,
        )
