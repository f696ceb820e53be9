"""The leased-job consumer loop's timing reads its injected ``Clock`` (issue 18).

An idle outbox relay waits for a notification or its jittered fallback poll; with a
``ManualClock`` the poll comes when the test moves time past it, not after wall seconds.
"""

from __future__ import annotations

import anyio

from asyncstore.orchestrator.outbox import OutboxConfig, open_outbox_relay
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import OUTBOX, AsyncStorageBackend, NewOutboxMessage, OutboxMessage

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
