"""The maintenance sweeper's settings and counters: pure data, no I/O.

``MaintenanceConfig`` (``maintenance.*`` in the settings tree: the round schedule, each
purge's retention, the stream-partition rotation, the leadership), ``LeaseSweep`` (the
session limiters' lease expiry handed to the maintenance leader), ``PURGE_KINDS`` and the
``MaintenanceStatistics`` snapshot with its metric families. Split from
``orchestrator.maintenance`` (the sweeper itself), which re-exports all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.families import Family, MetricSink

__all__ = ["PURGE_KINDS", "LeaseSweep", "MaintenanceConfig", "MaintenanceStatistics"]

PURGE_KINDS = (
    "stream_events",
    "tasks",
    "outbox",
    "leases",
    "login_attempts",
    "periodic_ticks",
    "presence",
)


class MaintenanceConfig(BaseModel):
    """Settings of the maintenance sweeper (``maintenance.*`` in the settings tree).

    A round starts every ``interval_s`` × uniform(1 - ``jitter``, 1 + ``jitter``) seconds.
    A retention of None switches that purge off. Stream events are deleted
    ``purge_batch_size`` rows per statement, at most ``purge_max_batches`` statements per
    round, with ``batch_pause_s`` between statements. ``leader_ttl_s`` (None: three
    intervals) is how long a SQLite leader that stopped renewing keeps the role; Postgres
    ends the role with the leader's connection instead. With ``enabled`` False no loop runs
    (``run_once()`` still works, e.g. from a CLI).
    On a partitioned ``stream_events`` the leader instead keeps partitions of
    ``stream_partition_s`` seconds (by session start) created ``stream_partitions_ahead``
    widths ahead, and drops a partition, one transaction each (``batch_pause_s`` between),
    once its range ended ``stream_ttl_s`` ago and no event of it is younger than that.
    ``stream_drop_partitions`` False keeps the legacy purge there too (batched DELETE of
    expired rows; partitions are still created ahead, never dropped).
    ``login_attempts_retention_s``: login attempt counts (``auth.attempts.mode = storage``)
    idle this long and not locked out are deleted; keep it at least
    ``auth.attempts.forget_after_s`` so a key's lockout growth is not forgotten early.
    ``periodic_tick_retention_s``: recorded periodic ticks older than this are deleted,
    except each schedule's latest (a restarted runner resumes from it); keep it longer
    than every schedule's grace.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    interval_s: float = Field(default=60.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, lt=1)
    stream_ttl_s: float | None = Field(default=86_400.0, ge=0)
    purge_batch_size: int = Field(default=5_000, ge=1, le=10_000)
    purge_max_batches: int = Field(default=1_000, ge=1)
    batch_pause_s: float = Field(default=0.0, ge=0)
    task_retention_s: float | None = Field(default=7 * 86_400.0, ge=0)
    outbox_retention_s: float | None = Field(default=7 * 86_400.0, ge=0)
    lease_grace_s: float | None = Field(default=60.0, ge=0)
    login_attempts_retention_s: float | None = Field(default=2 * 86_400.0, ge=0)
    periodic_tick_retention_s: float | None = Field(default=7 * 86_400.0, gt=0)
    stream_partition_s: int = Field(default=86_400, ge=1, le=366 * 86_400)
    stream_partitions_ahead: int = Field(default=2, ge=1, le=1000)
    stream_drop_partitions: bool = True
    leader_ttl_s: float | None = Field(default=None, gt=0)
    leadership_name: str = Field(default="asyncstore.maintenance", min_length=1, max_length=255)

    @model_validator(mode="after")
    def _check(self) -> MaintenanceConfig:
        if self.effective_leader_ttl_s <= self.interval_s * (1 + self.jitter):
            raise ValueError("leader_ttl_s must be longer than the longest round interval")
        return self

    @property
    def effective_leader_ttl_s(self) -> float:
        return self.leader_ttl_s or 3 * self.interval_s * (1 + self.jitter)


@dataclass(frozen=True, slots=True)
class LeaseSweep:
    """The session limiter's lease expiry, handed to the maintenance leader.

    Every ``interval_s`` (jittered like the rounds) the instance holding the maintenance
    leadership deletes leases expired for more than ``grace_s`` seconds. It runs only when
    the rounds do not already do it (``enabled`` False or ``lease_grace_s`` None).
    """

    interval_s: float
    grace_s: float

    def __post_init__(self) -> None:
        if not self.interval_s > 0 or not self.grace_s >= 0:
            raise InvalidArgument("LeaseSweep needs interval_s > 0 and grace_s >= 0")


@dataclass(frozen=True, slots=True)
class MaintenanceStatistics:
    """A snapshot of a sweeper's counters.

    ``rounds`` counts finished rounds; in each, this instance either swept (``sweeps_run``),
    found another instance leading (``sweeps_skipped``), or could not tell (an error).
    ``purged`` maps each kind of ``PURGE_KINDS`` to rows deleted; ``stream_batches`` counts
    batch statements. ``errors`` counts failed steps (each logged); ``last_error`` is the
    latest one. With a ``LeaseSweep`` running (rounds disabled), its lease-only rounds are
    rounds too: ``lease_sweeps`` counts those this instance swept as leader (their rows are
    in ``purged["leases"]``), ``sweeps_skipped`` those another instance led. On a
    partitioned ``stream_events``: ``partitions_created`` and ``partitions_dropped`` (their
    rows are in ``purged["stream_events"]``), and ``partitions_kept``: expired-range
    partitions a drop found still live (a session of them stored an event within the TTL).
    """

    rounds: int
    sweeps_run: int
    sweeps_skipped: int
    leading: bool
    purged: Mapping[str, int]
    stream_batches: int
    evictor_runs: int
    evicted: int
    errors: int
    last_error: str | None
    last_sweep_duration_s: float | None
    lease_sweeps: int = 0
    partitions_created: int = 0
    partitions_dropped: int = 0
    partitions_kept: int = 0

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("maintenance_rounds", "counter", "Finished maintenance rounds (lease-only too)."),
        Family(
            "maintenance_sweeps",
            "counter",
            "Rounds by outcome: this instance swept as the leader, or another one led.",
            ("outcome",),
            known=("run", "skipped"),
        ),
        Family("maintenance_leading", "gauge", "1 while this instance leads the maintenance."),
        Family(
            "maintenance_purged_rows",
            "counter",
            "Rows the sweeper deleted, by kind.",
            ("kind",),
            known=PURGE_KINDS,
        ),
        Family("maintenance_stream_batches", "counter", "Stream-event purge statements."),
        Family("maintenance_lease_sweeps", "counter", "Lease-only rounds swept as the leader."),
        Family(
            "maintenance_partitions",
            "counter",
            "Stream partitions the leader created, dropped, or found still live (kept).",
            ("outcome",),
            known=("created", "dropped", "kept"),
        ),
        Family("maintenance_evictor_runs", "counter", "Evictor calls (every instance)."),
        Family("maintenance_evicted", "counter", "Idle per-process entries the evictors dropped."),
        Family("maintenance_errors", "counter", "Failed maintenance steps (each logged)."),
        Family(
            "maintenance_last_sweep_duration_seconds",
            "gauge",
            "Duration of this instance's last sweep; -1: none yet.",
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("maintenance_rounds", {}, self.rounds)
        sweeps = {"run": self.sweeps_run, "skipped": self.sweeps_skipped}
        out.samples("maintenance_sweeps", {}, sweeps)
        out.sample("maintenance_leading", {}, 1 if self.leading else 0)
        out.samples("maintenance_purged_rows", {}, self.purged)
        out.sample("maintenance_stream_batches", {}, self.stream_batches)
        out.sample("maintenance_lease_sweeps", {}, self.lease_sweeps)
        partitions = {
            "created": self.partitions_created,
            "dropped": self.partitions_dropped,
            "kept": self.partitions_kept,
        }
        out.samples("maintenance_partitions", {}, partitions)
        out.sample("maintenance_evictor_runs", {}, self.evictor_runs)
        out.sample("maintenance_evicted", {}, self.evicted)
        out.sample("maintenance_errors", {}, self.errors)
        duration = -1.0 if self.last_sweep_duration_s is None else self.last_sweep_duration_s
        out.sample("maintenance_last_sweep_duration_seconds", {}, duration)
