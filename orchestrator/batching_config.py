"""BatchWriter settings: thresholds, capacity, overflow policy and retry policy
(``BatchConfig``), and the settings of outcome writers (``outcome_batches``). Split from
``orchestrator/batching.py``, which re-exports them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.timing import Backoff

__all__ = [
    "HEALTH_MIN_AGE_S",
    "OUTCOME_RETRY_BUDGET_S",
    "BatchConfig",
    "OverflowPolicy",
    "outcome_batches",
]


class OverflowPolicy(StrEnum):
    """What a put does when the writer holds ``capacity`` items (or bytes)."""

    BLOCK = "block"  # wait up to block_timeout_s for room, then raise WriterOverloaded
    DROP_OLDEST = "drop_oldest"  # evict the oldest waiting non-critical item
    DROP_NEWEST = "drop_newest"  # refuse the new item


class BatchConfig(BaseModel):
    """Thresholds, capacity and retry policy of one writer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch: int = Field(default=100, ge=1, description="flush when this many items wait")
    max_batch_bytes: int | None = Field(
        default=1 << 20, ge=1, description="flush when the waiting items' sizes add up to this"
    )
    flush_interval_s: float = Field(
        default=0.05, gt=0, description="flush when the oldest waiting item is this old"
    )
    capacity: int = Field(default=10_000, ge=1, description="items buffered, in flight included")
    capacity_bytes: int | None = Field(default=None, ge=1, description="bytes buffered, if bounded")
    overflow: OverflowPolicy = OverflowPolicy.BLOCK
    block_timeout_s: float = Field(default=5.0, ge=0, description="how long a blocking put waits")
    max_retries: int | None = Field(
        default=5, ge=0, description="sink retries of a batch before dead-lettering; None: no limit"
    )
    retry_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="how long a failing sink is retried, from the first failure of the current "
        "outage (not of each batch); None: no time limit (max_retries decides)",
    )
    retry_base_s: float = Field(default=0.05, gt=0, description="first backoff step")
    retry_max_s: float = Field(default=5.0, gt=0, description="backoff cap between attempts")
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="how long aclose() keeps flushing before dead-lettering"
    )
    eager: bool = Field(
        default=False,
        description="group commit: send whatever waits as soon as the previous batch is done "
        "(thresholds still cap a batch; the interval is not waited for)",
    )

    @model_validator(mode="after")
    def _capacity_holds_a_batch(self) -> Self:
        if self.capacity < self.max_batch:
            raise ValueError(f"capacity ({self.capacity}) must be >= max_batch ({self.max_batch})")
        if self.max_retries is None and self.retry_budget_s is None:
            raise ValueError(
                "max_retries and retry_budget_s cannot both be None: a failing sink would "
                "hold its batch (and the whole writer) forever"
            )
        return self

    @property
    def backoff(self) -> Backoff:
        """The retry policy: ``retry_base_s`` doubling up to ``retry_max_s``, equal jitter."""
        return Backoff(min(self.retry_base_s, self.retry_max_s), self.retry_max_s, jitter=0.5)


HEALTH_MIN_AGE_S = 1.0

# Outcomes used to be retried 10 000 times (hours at the 2 s cap): effectively unbounded. A
# time budget says the same thing explicitly and keeps "minutes", which outlasts a restart
# or failover with room to spare; past it the leases expire and the work runs elsewhere.
OUTCOME_RETRY_BUDGET_S = 300.0


def outcome_batches(max_batch: int) -> BatchConfig:
    """Settings for small records that must reach storage (task outcomes, delivery results).

    Group commit (``eager``): whatever finished while a write was in flight goes in the next
    one. Never dropped (``block`` with room for a million), retried through an outage of up
    to ``OUTCOME_RETRY_BUDGET_S`` (backoff capped at 2 s), and drained for up to 10 s at
    close; what is still unwritten then is dead-lettered, so its lease expires and the work
    runs again elsewhere.
    """
    return BatchConfig(
        max_batch=max_batch,
        max_batch_bytes=None,
        eager=True,
        capacity=max(1_000_000, max_batch),
        overflow=OverflowPolicy.BLOCK,
        max_retries=None,
        retry_budget_s=OUTCOME_RETRY_BUDGET_S,
        retry_base_s=0.05,
        retry_max_s=2.0,
        drain_timeout_s=10.0,
    )
