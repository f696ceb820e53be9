"""The outbox relay's send timeout and shutdown grace run on the ``Clock`` it is given (issue 18).

``open_outbox_relay(..., clock=...)``: a send that hangs is cancelled once ``send_timeout_s``
of that clock passed, and leaving the relay waits ``shutdown_grace_s`` of that clock for the
sends in flight, so a ``ManualClock`` makes each happen when the test moves time past it,
never after wall seconds. A runtime built with a clock gives it to its relay. A clock whose
wall time is behind the database's still reads an ordinary enqueue's notification as due
now. Real storage; nothing here waits on wall time (``fail_after`` is a hang guard only).
"""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.config import load_settings
from asyncstore.orchestrator.outbox import (
    Outbox,
    OutboxConfig,
    OutboxRelay,
    RetryTemplate,
    open_outbox_relay,
)
from asyncstore.orchestrator.runtime import open_runtime
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import (
    AsyncStorageBackend,
    NewOutboxMessage,
    OutboxMessage,
    OutboxStatus,
)
from tests.waiting import wait_for

# Long in wall terms: on the system clock none of these would come within ``BOUND_S``.
SEND_TIMEOUT_S = 600.0
GRACE_S = 3600.0
BOUND_S = 30.0  # a hang guard for a loaded machine, not a timing
# One message claimed at a time: the claim loop then waits for room (an event), not on the
# clock, so the clock's sleepers are the send's timeout and the grace alone.
CONFIG = OutboxConfig(
    batch_size=1,
    lease_s=100_000.0,
    send_timeout_s=SEND_TIMEOUT_S,
    shutdown_grace_s=GRACE_S,
    fallback_poll_s=100_000.0,
)
LATER = RetryTemplate(delays_s=(100_000.0,), jitter=0.0)  # no second attempt in the test


class _Hanging:
    """A sender that never returns on its own, and says when it started and ended."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.ended = anyio.Event()

    async def __call__(self, msg: OutboxMessage) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.ended.set()


async def _send_times_out(clock: ManualClock, relay: OutboxRelay, sender: _Hanging) -> None:
    """The send started (its timeout is armed by then): it ends exactly when
    ``SEND_TIMEOUT_S`` of ``clock`` passed, as a retryable failure."""
    await sender.started.wait()
    clock.advance(SEND_TIMEOUT_S - 0.01)
    await anyio.lowlevel.checkpoint()
    assert not sender.ended.is_set() and relay.statistics().send_errors == 0
    clock.advance(0.01)
    await sender.ended.wait()
    await wait_for(lambda: relay.statistics().send_errors == 1, what="the send's failure")
    await relay.flush()


async def test_a_hanging_send_times_out_on_the_relays_clock(storage: AsyncStorageBackend) -> None:
    clock = ManualClock()
    sender = _Hanging()
    (msg,) = await Outbox(storage).enqueue([NewOutboxMessage("chat", "a", 1)])
    with anyio.fail_after(BOUND_S):
        async with open_outbox_relay(
            storage, {"chat": sender}, templates={"chat": LATER}, config=CONFIG, clock=clock
        ) as relay:
            await _send_times_out(clock, relay, sender)
            stats = relay.statistics()
    assert stats.retried == 1 and stats.sent == 0 and stats.dead == 0
    stored = await Outbox(storage).get(msg.id)
    assert stored is not None and stored.status is OutboxStatus.PENDING
    assert stored.attempts == 1 and "TimeoutError" in (stored.last_error or "")


async def test_the_shutdown_grace_runs_on_the_relays_clock(storage: AsyncStorageBackend) -> None:
    """An hour of grace is one ``advance``; then the send is cancelled and its message
    released (pending again, its attempt not counted)."""
    clock = ManualClock()
    sender = _Hanging()
    sleepers_before_leaving: list[int] = []

    async def end_the_grace() -> None:
        await clock.wait_sleepers(sleepers_before_leaving[0] + 1)  # the grace's timer
        assert not sender.ended.is_set()  # leaving waits for the clock, not for time
        clock.advance(GRACE_S - 1.0)
        await anyio.lowlevel.checkpoint()
        assert not sender.ended.is_set()
        clock.advance(1.0)

    (msg,) = await Outbox(storage).enqueue([NewOutboxMessage("chat", "a", 1)])
    # The send's timeout is longer than the grace: the grace ends the send, not the timeout.
    config = CONFIG.model_copy(update={"send_timeout_s": 10 * GRACE_S})
    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            async with open_outbox_relay(
                storage, {"chat": sender}, config=config, clock=clock
            ) as relay:
                await sender.started.wait()
                sleepers_before_leaving.append(clock.sleepers)
                tg.start_soon(end_the_grace)
            stats = relay.statistics()
    assert sender.ended.is_set()
    assert stats.released == 1 and stats.sent == 0 and stats.retried == 0
    stored = await Outbox(storage).get(msg.id)
    assert stored is not None and stored.status is OutboxStatus.PENDING and stored.attempts == 0


async def test_an_enqueue_wakes_a_relay_whose_clock_is_behind_the_database(
    storage: AsyncStorageBackend,
) -> None:
    """An enqueue's notification carries its rows' earliest ``run_after``: database (wall)
    time, due now here. A ``ManualClock``'s wall time is years behind it; the relay still
    reads it as due now and claims at once (it has nothing else to wake it: no poll)."""
    clock = ManualClock()
    assert clock.time() < time.time() - 86_400
    sent: list[object] = []
    delivered = anyio.Event()

    async def send(msg: OutboxMessage) -> None:
        sent.append(msg.payload)
        delivered.set()

    with anyio.fail_after(BOUND_S):
        async with open_outbox_relay(storage, {"chat": send}, config=CONFIG, clock=clock) as relay:
            await Outbox(storage).enqueue([NewOutboxMessage("chat", "a", 1)])
            await delivered.wait()
            await relay.flush()
            stats = relay.statistics()
    assert sent == [1] and clock.now == ManualClock().now  # no time was advanced
    assert stats.sent == 1 and stats.notifications == 1 and stats.fallback_polls == 0


async def test_a_runtime_gives_its_clock_to_its_relay(storage_url: str) -> None:
    clock = ManualClock()
    settings = load_settings(
        storage={"url": storage_url},
        runtime={"reload_on_sighup": False},
        outbox={**CONFIG.model_dump(), "templates": {"chat": LATER.model_dump()}},
    )
    sender = _Hanging()
    with anyio.fail_after(BOUND_S):
        async with open_runtime(settings, clock=clock, outbox_senders={"chat": sender}) as rt:
            assert rt.relay is not None
            await rt.outbox.enqueue([NewOutboxMessage("chat", "a", 1)])
            await _send_times_out(clock, rt.relay, sender)
            assert rt.relay.statistics().retried == 1
