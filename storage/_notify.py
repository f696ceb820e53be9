"""In-process fan-out of notifications to subscriptions, shared by both drivers.

A driver feeds the hub (from Postgres LISTEN on its one dedicated connection, or from
in-process ``notify`` calls on SQLite); the hub hands each subscription its notifications
in order through a bounded buffer. A subscriber that falls a whole buffer behind loses the
buffered items (counted) and receives one ``gap`` notification, after which it catches up
from storage. A listener reconnect is reported to every subscription the same way. While
the driver reports its listener down, a waiting subscription runs the driver's ``on_idle``
hook at once (the Postgres driver reconnects there), instead of at its next idle check.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import anyio

from asyncstore.storage.base import Notification, NotificationStream
from asyncstore.storage.errors import StorageClosed

# How long a waiting subscription stays idle before running the driver's hook (the Postgres
# driver pings its listener there, to notice a connection cut without a reset). A lost
# connection does not wait for it: the hub wakes every subscription when it is reported.
IDLE_CHECK_S = 5.0


class Subscription(NotificationStream):
    """One subscriber's ordered, bounded buffer of notifications."""

    __slots__ = ("_buffer", "_channels", "_gap", "_hub", "_max", "_on_idle", "_wakeup")

    def __init__(
        self,
        hub: NotificationHub,
        channels: frozenset[str],
        max_buffer: int,
        on_idle: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._hub = hub
        self._on_idle = on_idle
        self._channels = channels
        self._max = max_buffer
        self._buffer: collections.deque[Notification] = collections.deque()
        self._gap: Notification | None = None
        self._wakeup = anyio.Event()

    @property
    def channels(self) -> frozenset[str]:
        return self._channels

    def _push(self, item: Notification) -> None:
        if len(self._buffer) >= self._max:
            # The catch-up read a gap triggers supersedes everything buffered; keep none.
            self._hub.dropped += len(self._buffer) + 1
            self._buffer.clear()
            self._gap = Notification(item.channel, "", gap=True)
        else:
            self._buffer.append(item)
        self._wakeup.set()

    def _push_gap(self, channel: str) -> None:
        self._gap = self._gap or Notification(channel, "", gap=True)
        self._wakeup.set()

    def _poke(self) -> None:
        self._wakeup.set()

    async def receive(self) -> Notification:
        """Wait for the next notification; a gap marker comes before newer items.

        While waiting, the subscription runs the driver's ``on_idle`` hook at once while the
        listener is reported down, and otherwise when it is woken without an item or has
        been idle for ``IDLE_CHECK_S`` (the Postgres driver reconnects or pings there).
        Cancelling the wait loses nothing. Once the backend is closed, what was buffered is
        still returned, then ``StorageClosed`` is raised instead of waiting.
        """
        while True:
            if self._gap is not None:
                gap, self._gap = self._gap, None
                return gap
            if self._buffer:
                return self._buffer.popleft()
            if self._hub.closed is not None:
                raise StorageClosed(self._hub.closed)
            self._wakeup = anyio.Event()
            if self._on_idle is None:
                await self._wakeup.wait()
                continue
            if not self._hub.listener_down:
                with anyio.move_on_after(IDLE_CHECK_S):
                    await self._wakeup.wait()
                if self._gap is not None or self._buffer:
                    continue
            await self._on_idle()

    async def _iterate(self) -> AsyncIterator[Notification]:
        while True:
            yield await self.receive()

    def __aiter__(self) -> AsyncIterator[Notification]:
        return self._iterate()


class NotificationHub:
    """Routes notifications by channel to the live subscriptions of one backend."""

    def __init__(self, max_buffer: int) -> None:
        self._max = max_buffer
        self._by_channel: dict[str, set[Subscription]] = {}
        self.received = 0
        self.dropped = 0
        # Set by the driver between losing its listener connection and having it back.
        self.listener_down = False
        # The StorageClosed message once the backend is closed; None while it is open.
        self.closed: str | None = None

    def close(self, message: str) -> None:
        """The backend closed: waiting subscriptions raise ``StorageClosed``, new ones too."""
        self.closed = message
        self.wake_all()

    def channels(self) -> list[str]:
        return list(self._by_channel)

    def has_subscribers(self, channel: str) -> bool:
        """Whether a live subscription listens to ``channel``."""
        return channel in self._by_channel

    def deliver(self, channel: str, payload: str) -> None:
        self.received += 1
        subs = self._by_channel.get(channel)
        if subs:
            item = Notification(channel, payload)
            for sub in subs:
                sub._push(item)

    def gap_all(self) -> None:
        """Tell every subscription it may have missed notifications (listener reconnected)."""
        for channel, subs in self._by_channel.items():
            for sub in subs:
                sub._push_gap(channel)

    def listener_lost(self) -> None:
        """The driver's listener is down: wake every subscription so one reconnects now."""
        self.listener_down = True
        self.wake_all()

    def wake_all(self) -> None:
        """Wake every waiting subscription so it runs its ``on_idle`` hook now."""
        for subs in self._by_channel.values():
            for sub in subs:
                sub._poke()

    def add(
        self,
        channels: Iterable[str],
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[Subscription, list[str]]:
        """Register a subscription; returns it and the channels that had no subscriber yet."""
        chans = frozenset(channels)
        sub = Subscription(self, chans, self._max, on_idle)
        new = [c for c in chans if c not in self._by_channel]
        for channel in chans:
            self._by_channel.setdefault(channel, set()).add(sub)
        return sub, new

    def remove(self, sub: Subscription) -> list[str]:
        """Unregister; returns the channels that have no subscriber left."""
        emptied = []
        for channel in sub.channels:
            subs = self._by_channel.get(channel)
            if subs is None:
                continue
            subs.discard(sub)
            if not subs:
                del self._by_channel[channel]
                emptied.append(channel)
        return emptied

    @asynccontextmanager
    async def subscribe_local(self, channels: Iterable[str]) -> AsyncIterator[Subscription]:
        """Subscribe with no external listener (in-process delivery)."""
        if self.closed is not None:
            raise StorageClosed(self.closed)
        sub, _ = self.add(channels)
        try:
            yield sub
        finally:
            self.remove(sub)
