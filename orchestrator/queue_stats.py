"""A queue worker's counters (``WorkerStatistics``) and the metric families they export.

Moved out of ``orchestrator.queue`` (which re-exports it); ``Worker.statistics()`` builds
the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from asyncstore.storage.families import Family, MetricSink

__all__ = ["WorkerStatistics"]


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of one worker's counters."""

    worker_id: str
    mode: str
    max_workers: int
    running: int
    peak_running: int
    held_leases: int
    claimed: int
    claim_statements: int
    succeeded: int
    retried: int
    dead: int
    released: int
    cancelled: int
    lease_lost: int
    stale_writes: int
    pending_writes: int
    undelivered_writes: int  # outcomes given up at shutdown: their leases expire
    notifications: int
    fallback_polls: int
    storage_errors: int
    reruns: int  # tasks claimed because their previous worker's lease expired
    due_queries: int  # next-due reads made on going idle
    expiry_wakeups: int  # idle waits ended at the next known due time or lease expiry
    coordinated: bool = False  # claims through the queue's limits row (groups, limits)
    held_back: int = 0  # coordinated claims that a limit or a group refused due tasks
    cancel_notifications: int = 0  # cancel_task notifications for this worker's tasks

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("queue_running", "gauge", "Tasks running."),
        Family("queue_max_workers", "gauge", "The worker's concurrency cap."),
        Family("queue_pending_writes", "gauge", "Outcomes not yet stored."),
        Family("queue_claimed", "counter", "Tasks claimed."),
        Family("queue_claim_statements", "counter", "Claim statements."),
        Family("queue_tasks_finished", "counter", "Task outcomes.", ("outcome",)),
        Family("queue_fallback_polls", "counter", "Fallback polls."),
        Family("queue_storage_errors", "counter", "Storage errors."),
        Family("queue_reruns", "counter", "Tasks re-run after their worker's lease expired."),
        Family("queue_due_queries", "counter", "Next-due reads on going idle."),
        Family("queue_expiry_wakeups", "counter", "Idle waits ended at a due time."),
        Family("queue_held_back", "counter", "Claims a fleet-wide limit or a group held back."),
        Family(
            "queue_cancel_notifications", "counter", "cancel_task notices for this worker's tasks."
        ),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("queue_running", {}, self.running)
        out.sample("queue_max_workers", {}, self.max_workers)
        out.sample("queue_pending_writes", {}, self.pending_writes)
        out.sample("queue_claimed", {}, self.claimed)
        out.sample("queue_claim_statements", {}, self.claim_statements)
        outcomes = {
            "succeeded": self.succeeded,
            "retried": self.retried,
            "dead": self.dead,
            "released": self.released,
            "cancelled": self.cancelled,
            "lease_lost": self.lease_lost,
        }
        out.samples("queue_tasks_finished", {}, outcomes)
        out.sample("queue_fallback_polls", {}, self.fallback_polls)
        out.sample("queue_storage_errors", {}, self.storage_errors)
        out.sample("queue_reruns", {}, self.reruns)
        out.sample("queue_due_queries", {}, self.due_queries)
        out.sample("queue_expiry_wakeups", {}, self.expiry_wakeups)
        out.sample("queue_held_back", {}, self.held_back)
        out.sample("queue_cancel_notifications", {}, self.cancel_notifications)
