"""The agent queue's settings and the handler's side of its contract.

``QueueConfig`` (``agent_queue.*`` in the settings tree: the worker's cap, leases, retry
schedule, wakeups and a queue's fleet-wide limits), ``Handler`` (what a worker runs) and
the two exceptions a handler raises to choose its task's outcome (``RetryTask``,
``PermanentFailure``). Moved out of ``orchestrator.queue``, which re-exports them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyncstore.orchestrator.timing import Backoff
from asyncstore.storage import InvalidInput, Task

__all__ = ["Handler", "PermanentFailure", "QueueConfig", "RetryTask"]

Handler = Callable[[Task], Awaitable[None]]
"""A task handler: an async callable that receives the claimed ``Task``."""


class QueueConfig(BaseModel):
    """Settings of the agent queue and its workers (``agent_queue.*`` in the settings tree).

    ``mode`` is the ``queue.mode`` feature flag: ``claim`` (the default: capped batched
    claims, leases, NOTIFY wakeup plus a rare jittered poll) or ``poll_spawn`` (the legacy
    loop kept for rollback and benchmarks: poll every ``poll_interval_s`` and spawn every
    task the poll returns, with no worker cap and one write per finished task).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["claim", "poll_spawn"] = "claim"
    max_workers: int = Field(default=16, ge=1, le=10_000)
    claim_batch: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="claim mode: most tasks one claim statement takes (None: every free slot); "
        "below max_workers, the next claim runs while the last batch's handlers run",
    )
    lease_s: float = Field(default=30.0, gt=0)
    heartbeat_interval_s: float | None = Field(
        default=None, gt=0, description="lease renewal period; default lease_s / 3"
    )
    max_attempts: int = Field(default=5, ge=1, description="default for enqueued tasks")
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    backoff_jitter: float = Field(
        default=0.5, ge=0, le=1, description="share of each delay that is randomized"
    )
    fallback_poll_s: float = Field(default=10.0, gt=0)
    expiry_wakeup: bool = Field(
        default=True,
        description="claim mode: an idle worker reads the queue's next due time or lease "
        "expiry and wakes then (False: only notifications and the fallback poll wake it)",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="legacy poll_spawn only")
    poll_batch: int = Field(default=1000, ge=1, le=10_000, description="legacy poll_spawn only")
    enqueue_notify: Literal["in_statement", "separate"] = Field(
        default="in_statement",
        description="in_statement: the enqueue statement sends the wakeup notification "
        "itself (one round trip); separate: the legacy notify after the commit",
    )
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    max_write_batch: int = Field(default=1000, ge=1, le=10_000)
    max_running: int | None = Field(
        default=None,
        ge=1,
        description="fleet-wide: most tasks of this queue running at once across every "
        "process (None: no cap). Setting any of max_running, max_per_second, max_per_group "
        "declares all three in the database when a worker starts (the last start wins)",
    )
    max_per_second: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="fleet-wide: most task starts per second across every process, as at "
        "most max(1, floor(rate)) starts in any window of that many / rate seconds",
    )
    max_per_group: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="tasks of one ordering group in flight at once, fleet-wide (None: "
        "declare nothing; a coordinated queue without a declaration has 1)",
    )
    cancel_listen: bool = Field(
        default=True,
        description="listen for cancel_task notifications and cancel a cancelled task's "
        "handler at once (False: the handler is stopped at the next lease renewal, which "
        "finds the task no longer running, and counts as lease_lost)",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> QueueConfig:
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s >= self.lease_s:
            raise ValueError("heartbeat_interval_s must be shorter than lease_s")
        return self

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_interval_s or self.lease_s / 3

    @property
    def backoff(self) -> Backoff:
        """The retry schedule: ``backoff_base_s`` doubling up to ``backoff_max_s``, a share
        ``backoff_jitter`` of each step random (a base above the cap means the cap)."""
        return Backoff(
            base_s=min(self.backoff_base_s, self.backoff_max_s),
            max_s=self.backoff_max_s,
            jitter=self.backoff_jitter,
        )

    @property
    def declares_limits(self) -> bool:
        """Whether this config declares the queue's limits (any of the three set)."""
        return (
            self.max_running is not None
            or self.max_per_second is not None
            or self.max_per_group is not None
        )

    def backoff_s(self, attempt: int) -> float:
        """Delay before retrying after failed attempt number ``attempt`` (1-based), jittered."""
        return self.backoff.delay(max(attempt, 1))


class RetryTask(Exception):
    """Raise from a handler to retry the task at ``at`` (or after ``delay_s``).

    The attempt counts toward ``max_attempts``: on the last attempt the task is dead-lettered.
    """

    def __init__(
        self,
        reason: str = "retry requested",
        *,
        at: datetime | None = None,
        delay_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        if at is not None and delay_s is not None:
            raise InvalidInput("RetryTask takes at= or delay_s=, not both")
        if at is not None and at.tzinfo is None:
            raise InvalidInput("RetryTask(at=...) needs a timezone-aware datetime")
        self.reason = reason
        self.at = (
            at if at is not None else datetime.fromtimestamp(time.time() + (delay_s or 0.0), UTC)
        )


class PermanentFailure(Exception):
    """Raise from a handler to dead-letter the task now, without further attempts."""
