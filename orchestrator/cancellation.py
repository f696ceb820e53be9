"""Per-session cancel tokens, event driven, across instances.

``open_cancellation(storage)`` owns a registry of ``CancelToken``s, one per session with a
live user in this process. ``request_cancel`` fires the local token at once, then persists
the request through the storage contract (so an instance that starts the session later
still sees it) with its notification in the same statement (one round trip); each other
registry's listener fires its token when the notification arrives. The legacy mode
(``cancel.mode = "poll"``) instead reads the persisted state of every live session every
200 ms, as the old code did. A token fires only on an explicit request or on lease loss
(``fire_local``): a subscriber that disconnects does not cancel the turn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import anyio
import orjson
from anyio.abc import TaskStatus
from pydantic import BaseModel, ConfigDict, Field

from asyncstore.orchestrator.timing import SYSTEM_CLOCK, Clock
from asyncstore.storage import AsyncStorageBackend, CancelState, StorageError
from asyncstore.storage.families import Family, MetricSink

log = logging.getLogger("asyncstore.cancellation")

__all__ = [
    "CancelToken",
    "CancellationConfig",
    "CancellationRegistry",
    "CancellationStatistics",
    "open_cancellation",
]


def _decode(payload: str) -> tuple[str, str]:
    try:
        session_id, reason = orjson.loads(payload)
        return str(session_id), str(reason)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        # Someone else's message on our channel: treat the payload as a bare session id.
        return payload, "cancelled"


class CancellationConfig(BaseModel):
    """Settings of the cancellation registry (``cancel.*`` in the settings tree).

    ``mode``: ``notify`` (default) fires tokens on a notification; ``poll`` is the legacy
    loop that reads every live session's cancel state each ``poll_interval_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["notify", "poll"] = "notify"
    poll_interval_s: float = Field(default=0.2, gt=0)
    channel: str = Field(default="asyncstore.cancel", min_length=1, max_length=63)


@dataclass(frozen=True, slots=True)
class CancellationStatistics:
    """A snapshot of a registry's counters."""

    mode: str
    tokens: int
    users: int
    fired: int
    requests: int
    notifications: int
    catch_up_reads: int
    polls: int
    storage_errors: int = 0  # catch-up reads that failed (retried, never fatal)

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family("cancel_tokens", "gauge", "Live cancel tokens."),
        Family("cancel_requests", "counter", "Cancel requests made here."),
        Family("cancel_fired", "counter", "Tokens fired."),
        Family("cancel_notifications", "counter", "Cancel notifications received."),
        Family("cancel_db_reads", "counter", "Catch-up reads.", ("cause",)),
    )

    def export(self, out: MetricSink) -> None:
        out.sample("cancel_tokens", {}, self.tokens)
        out.sample("cancel_requests", {}, self.requests)
        out.sample("cancel_fired", {}, self.fired)
        out.sample("cancel_notifications", {}, self.notifications)
        out.samples("cancel_db_reads", {}, {"catch_up": self.catch_up_reads, "poll": self.polls})


class CancelToken:
    """The cancel state of one session in this process, shared by all its local users.

    ``await token.wait()`` returns the reason once the token fires; ``token.cancelled`` says
    whether it has; ``with token.scope():`` runs a block in an anyio cancel scope that is
    cancelled the moment the token fires (at once if it already has), so an LLM call or a
    tool run stops at its next await. A fired token stays fired until its session ends.
    """

    __slots__ = ("_event", "_reason", "_scopes", "_users", "session_id")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._event = anyio.Event()
        self._reason: str | None = None
        self._scopes: set[anyio.CancelScope] = set()
        self._users = 0

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        """Why the token fired (None while it has not)."""
        return self._reason

    async def wait(self) -> str:
        """Wait until the token fires and return the reason; cancelling the wait is harmless."""
        await self._event.wait()
        return self._reason or ""

    @contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """Run the ``with`` block in a cancel scope that the token cancels when it fires.

        The block's cancellation is absorbed by the scope at its end (check
        ``scope.cancelled_caught`` or ``token.cancelled``); an outer cancellation still
        propagates as usual.
        """
        with anyio.CancelScope() as cancel_scope:
            if self.cancelled:
                cancel_scope.cancel()
            self._scopes.add(cancel_scope)
            try:
                yield cancel_scope
            finally:
                self._scopes.discard(cancel_scope)

    def _fire(self, reason: str) -> bool:
        if self._event.is_set():
            return False
        self._reason = reason
        self._event.set()
        for cancel_scope in list(self._scopes):
            cancel_scope.cancel()
        return True


class CancellationRegistry:
    """Cancel tokens of the sessions live in this process. Build with ``open_cancellation``."""

    def __init__(
        self,
        storage: AsyncStorageBackend,
        config: CancellationConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._storage = storage
        self._config = config
        self._clock = clock
        self._tokens: dict[str, CancelToken] = {}
        self._fired = 0
        self._requests = 0
        self._notifications = 0
        self._catch_up_reads = 0
        self._polls = 0
        self._storage_errors = 0

    @property
    def config(self) -> CancellationConfig:
        return self._config

    @asynccontextmanager
    async def open_token(self, session_id: str) -> AsyncIterator[CancelToken]:
        """Use the session's token for the ``async with`` block (one read of the persisted state).

        A token whose session was cancelled before it existed starts cancelled. The token
        is shared with the session's other local users and evicted when the last one leaves.
        If the opening read is cancelled, the token is released and nothing else happens.
        """
        token = self._tokens.get(session_id)
        if token is None:
            token = self._tokens[session_id] = CancelToken(session_id)
        token._users += 1
        try:
            if not token.cancelled:
                # Registered before the read: a notification that races the read still fires it.
                state = await self._storage.get_cancel(session_id)
                if state is not None:
                    self._fire_token(token, state.reason)
            yield token
        finally:
            token._users -= 1
            if token._users == 0 and self._tokens.get(session_id) is token:
                del self._tokens[session_id]

    def get_token(self, session_id: str) -> CancelToken | None:
        """The session's live token in this process, if some user has it open."""
        return self._tokens.get(session_id)

    async def request_cancel(self, session_id: str, reason: str = "cancelled") -> CancelState:
        """Persist a cancel request and fire the session's tokens on every instance.

        ``notify`` mode: this process's token fires first, before any await, with the
        requested ``reason``; then one statement persists the request and notifies the
        other instances (their tokens fire with the kept reason, carried in the payload).
        The write is still awaited, so a storage failure is raised here, after the local
        token has fired: this process stops its work either way, while other instances and
        later turns see the request only if it was written. The returned state holds the
        kept reason: the first request's, which differs from ``reason`` only when an
        earlier request stands that this process's token has not seen yet (it raced this
        one, or its notification is still on its way).

        ``poll`` mode (legacy): the request is only persisted; tokens, the local one too,
        fire on their registry's next poll.

        If this call is cancelled (notify mode): the local token has fired; the request is
        persisted and announced together, or not at all. Poll mode: if cancelled before the
        request is persisted, nothing happened; after, it stands.
        """
        self._requests += 1
        if self._config.mode == "poll":
            return await self._storage.request_cancel(session_id, reason)
        token = self._tokens.get(session_id)
        # A reason the storage refuses (InvalidInput below) must not fire anything either.
        if token is not None and isinstance(reason, str) and "\x00" not in reason:
            self._fire_token(token, reason)
        return await self._storage.request_cancel(
            session_id, reason, notify_channel=self._config.channel
        )

    async def clear(self, session_id: str) -> bool:
        """Forget a session's persisted cancel request (a new turn starts)."""
        return await self._storage.clear_cancel(session_id)

    def fire_local(self, session_id: str, reason: str) -> bool:
        """Fire the session's token in this process only, without persisting anything.

        Used when this process must stop working on a session it no longer owns (its lease
        was lost): other instances and later turns are not affected. Returns whether a live
        token fired.
        """
        token = self._tokens.get(session_id)
        return token is not None and self._fire_token(token, reason)

    def statistics(self) -> CancellationStatistics:
        return CancellationStatistics(
            mode=self._config.mode,
            tokens=len(self._tokens),
            users=sum(t._users for t in self._tokens.values()),
            fired=self._fired,
            requests=self._requests,
            notifications=self._notifications,
            catch_up_reads=self._catch_up_reads,
            polls=self._polls,
            storage_errors=self._storage_errors,
        )

    def _fire_token(self, token: CancelToken, reason: str) -> bool:
        fired = token._fire(reason)
        self._fired += fired
        return fired

    async def _catch_up(self) -> bool:
        """Read the persisted state of every live token; False if storage failed (retry)."""
        for session_id, token in list(self._tokens.items()):
            if token.cancelled:
                continue
            self._catch_up_reads += 1
            try:
                state = await self._storage.get_cancel(session_id)
            except StorageError as exc:
                # A database restart must not take the registry (and its owner) down.
                self._storage_errors += 1
                log.warning("cancel catch-up failed, will retry: %s", exc)
                return False
            if state is not None:
                self._fire_token(token, state.reason)
        return True

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        async with self._storage.listen(self._config.channel) as stream:
            task_status.started()
            behind = False  # a catch-up after a gap failed: retry it every half second
            while True:
                note = None
                with self._clock.move_on_after(0.5 if behind else math.inf):
                    note = await stream.receive()  # cancelling this wait loses nothing
                if note is None or note.gap:
                    # Some requests may have been missed: read the state of every live token.
                    behind = not await self._catch_up()
                    continue
                self._notifications += 1
                session_id, reason = _decode(note.payload)
                token = self._tokens.get(session_id)
                if token is not None:
                    self._fire_token(token, reason)

    async def _poll(self, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._clock.sleep(self._config.poll_interval_s)
            self._polls += 1
            await self._catch_up()


@asynccontextmanager
async def open_cancellation(
    storage: AsyncStorageBackend,
    config: CancellationConfig | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[CancellationRegistry]:
    """Open a cancellation registry on ``storage``; its listener or poller runs in the block.

    ``clock`` paces the legacy poll and the retry of a failed catch-up read.

    The listener is subscribed before the block starts, so a request sent after that is
    never missed. Leaving the block (or cancelling it) stops the background task.
    """
    registry = CancellationRegistry(storage, config or CancellationConfig(), clock=clock)
    async with anyio.create_task_group() as tg:
        if registry.config.mode == "notify":
            await tg.start(registry._listen)
        else:
            await tg.start(registry._poll)
        try:
            yield registry
        finally:
            tg.cancel_scope.cancel()
