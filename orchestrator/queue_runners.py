"""The queue worker's handler runners: at most ``size`` long-lived tasks run queued items.

``RunnerPool`` owns the scheduling of claimed tasks onto runners (claim mode of
``orchestrator.queue_worker``): the queue of items claimed but not started, the idle
runners, and the policy of waking them one after the other. What running an item means
(holding its lease, running the handler, recording its outcome) is the worker's, passed in
as ``run``. Runners are started in the task group given with the items and end with it.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

__all__ = ["RunnerPool"]

T = TypeVar("T")

YIELD_EVERY = 64
"""A runner that ran this many items without waiting yields once (see ``_runner``)."""


class RunnerPool(Generic[T]):
    """Queued items run one at a time by each of at most ``size`` long-lived runners.

    ``run(item, scope)`` runs one item under ``scope``, the runner's cancel scope for that
    item: cancelling it stops just that item, and the runner replaces a cancelled scope
    before its next item.
    """

    def __init__(self, size: int, run: Callable[[T, anyio.CancelScope], Awaitable[None]]) -> None:
        self._size = size
        self._run = run
        self._ready: collections.deque[T] = collections.deque()  # queued, not started
        self._sleepers: collections.deque[anyio.Event] = collections.deque()  # idle runners
        self._runners = 0
        # One runner at a time is being woken (or started); it wakes the next if work is left.
        self._wake_pending = False
        self._tasks: TaskGroup | None = None

    def put(self, items: Iterable[T], tasks: TaskGroup) -> None:
        """Queue ``items``; runners are started in ``tasks`` as the work needs them."""
        self._tasks = tasks
        self._ready.extend(items)
        self._wake_one()

    def take_unstarted(self) -> list[T]:
        """Remove and return the items no runner has started."""
        items = list(self._ready)
        self._ready.clear()
        return items

    def _wake_one(self) -> None:
        """Wake an idle runner, or start one (up to ``size``), unless one is on its way.

        Runners are woken one after the other, each as the previous one takes an item and
        sees more waiting, so a batch of items that never wait is run by the first runner
        without waking the others for nothing; items that wait still start at once.
        """
        if self._wake_pending or self._tasks is None:
            return
        if self._sleepers:
            self._wake_pending = True
            self._sleepers.popleft().set()
        elif self._runners < self._size:
            self._wake_pending = True
            self._runners += 1
            self._tasks.start_soon(self._runner)

    async def _runner(self) -> None:
        """A long-lived runner: runs queued items one at a time, each under its current
        cancel scope (replaced once cancelled). Cancelled with the task group it runs in."""
        self._wake_pending = False  # this is the runner that was started
        since_yield = 0
        while True:
            with anyio.CancelScope() as scope:
                while not scope.cancel_called:
                    if not self._ready:
                        since_yield = 0
                        await self._sleep()
                        continue
                    item = self._ready.popleft()
                    if self._ready:
                        self._wake_one()  # more work: a helper, in case this item waits
                    await self._run(item, scope)
                    since_yield += 1
                    if since_yield >= YIELD_EVERY:
                        # Items that never wait must not starve the claim loop and writer.
                        since_yield = 0
                        await anyio.lowlevel.checkpoint()

    async def _sleep(self) -> None:
        """Wait until ``_wake_one`` picks this runner."""
        woken = anyio.Event()
        self._sleepers.append(woken)
        try:
            await woken.wait()
        finally:
            if woken.is_set():
                self._wake_pending = False
            else:  # cancelled while idle
                self._sleepers.remove(woken)
