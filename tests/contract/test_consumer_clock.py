"""The leased-job consumer loop's timing reads its injected ``Clock`` (issue 18).

An idle outbox relay waits for a notification or its jittered fallback poll, and a consumer
renews its leases every ``heartbeat_s``; with a ``ManualClock`` both happen when the test
moves time past them, not after wall seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.jobs import ConsumerSpec, JobConsumer, Outcome, OutcomeKind
from asyncstore.orchestrator.outbox import OutboxConfig, open_outbox_relay
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import (
    OUTBOX,
    TASKS,
    AsyncStorageBackend,
    NewOutboxMessage,
    NewTask,
    OutboxMessage,
    Task,
)

POLL_S = 10.0  # the fallback poll comes after 5 to 15 s of the relay's clock


async def test_an_idle_relay_polls_when_its_clock_says_so(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    sent: list[object] = []
    delivered = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        sent.append(msg.payload)
        delivered.set()

    config = OutboxConfig(fallback_poll_s=POLL_S)
    with anyio.fail_after(30):
        async with open_outbox_relay(storage, {"chat": send}, config=config, clock=clock) as relay:
            await clock.wait_sleepers(1)  # found nothing: idle, asleep on the clock
            # A row nobody announces (no notification): only the fallback poll finds it.
            await storage.enqueue_jobs(OUTBOX, [NewOutboxMessage("chat", "a", 7)])
            clock.advance(0.5 * POLL_S - 0.01)  # short of the earliest poll
            await anyio.lowlevel.checkpoint()
            assert relay.statistics().fallback_polls == 0 and not sent
            assert clock.sleepers == 1
            clock.advance(POLL_S)  # past the latest poll
            await delivered.wait()
            await relay.flush()
            stats = relay.statistics()
    assert sent == [7]
    assert stats.fallback_polls == 1 and stats.sent == 1 and stats.notifications == 0


class _Holder(JobConsumer[Task]):
    """Claims one task and holds it, renewing its lease every ``heartbeat_s`` of its clock."""

    def __init__(self, storage: AsyncStorageBackend, clock: ManualClock) -> None:
        spec = ConsumerSpec(
            kind=TASKS,
            name="holder",
            writer_name="holder-outcomes",
            queues=["held"],
            channel=None,
            lease_s=30.0,
            fallback_poll_s=1_000.0,
            max_write_batch=10,
            heartbeat_s=HEARTBEAT_S,
        )
        super().__init__(storage, spec, "holder", clock=clock)
        self.jobs: list[Task] = []
        self.claimed = anyio.Event()
        self.lost = anyio.Event()

    def _room(self) -> int:
        return 0 if self.jobs else 1  # one task, then wait for room that never comes

    def _dispatch(self, jobs: Sequence[Task]) -> None:
        self.jobs.extend(jobs)
        self.claimed.set()

    async def _drain(self) -> None:
        for job in self.jobs:
            if job.claim.id in self._held:
                self._record(Outcome(OutcomeKind.RELEASE, job.claim))

    def _on_lease_lost(self, job_id: int) -> None:
        self.lost.set()


HEARTBEAT_S = 10.0


async def test_the_heartbeat_runs_on_the_consumers_clock(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    holder = _Holder(storage, clock)
    await storage.enqueue_tasks([NewTask("held", 1)])
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(holder._serve)
            await holder.claimed.wait()
            await clock.wait_sleepers(1)  # the heartbeat, asleep until its next renewal
            # Someone else finishes the task: the lease is gone, but only a renewal notices.
            (task,) = holder.jobs
            assert await storage.complete_tasks([task.claim]) == [task.id]
            clock.advance(HEARTBEAT_S - 0.01)
            await anyio.lowlevel.checkpoint()
            assert not holder.lost.is_set() and clock.sleepers == 1
            clock.advance(0.01)  # the renewal is due: it finds the lease gone
            await holder.lost.wait()
            holder.stop()
    assert holder._lease_lost == 1
