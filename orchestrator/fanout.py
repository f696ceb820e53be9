"""The fan-out delivery loop shared by the WebSocket and SSE endpoints.

Owns how one open stream is fed: while its task is parked at the live head, whoever
publishes to the session writes the ready frames straight to the connection
(:class:`Pusher`, no task wake-up per subscriber); the stream's own task
(:func:`stream_batched`) takes over for what a publisher cannot do at once: a send that
would wait (a slow client), a reset, a resume, a catch-up, a heartbeat, the end. One timer
per connection serves the heartbeat and the send timeout. Relies on the hub's
``Subscription`` (``take_live``, ``take_ready``, ``next_within``, ``set_sink``, ``lagged``)
and on ASGI sends that complete without suspending while the socket takes the data.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from asyncstore.orchestrator.broadcast import StreamReset
from asyncstore.orchestrator.errors import SubscriberLagged
from asyncstore.storage import StreamEvent

if TYPE_CHECKING:
    from asyncstore.orchestrator.asgi_base import _Connection

__all__ = ["Encode", "Message", "Pusher", "Rest", "stream_batched"]

Message = dict[str, Any]
"""An ASGI message (``websocket.send`` or ``http.response.body``)."""

Item = StreamEvent | StreamReset

Encode = Callable[[list[Item]], list[tuple[Message, int]]]
"""Items -> the ASGI messages that carry them, each with how many items it carries (a
WebSocket sends one message per item; SSE coalesces a batch into one body write)."""

Send = Callable[[Message], Awaitable[None]]
"""An ASGI send; its awaitable must be a coroutine (a publisher steps it)."""


_DONE: Any = object()
"""What stepping a send gives back once it has completed (``Pusher.push``)."""


class Rest:
    """Awaits, in the awaiting task, the rest of a coroutine that another task ran up to its
    first suspension (``pending``: what it yielded there). Cancellation is thrown into it."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: the coroutine decides
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration:
                    return


class Pusher:
    """The fan-out side of one stream (WebSocket or SSE).

    While the stream's task is parked at the live head, the hub calls :meth:`push` from
    whichever task publishes to the session, and it writes the frames that are ready
    straight to the connection: one task wake-up per event for the session, not one per
    subscriber. A send that completes without waiting (the usual case: the socket takes
    the data) is done there; one that would wait (a slow or stalled client) is handed to the
    stream's task with the messages after it (:class:`Rest`), so a slow socket never holds
    up the others. The task also takes over when a command's answer holds the lock, or when
    the next item needs iteration (a reset, a resume, a catch-up, the end). While that task
    is blocked in a send, a publish that finds the subscriber fallen behind the ring under
    the ``disconnect`` policy ends the stream as ``lagged`` at once.
    """

    __slots__ = (
        "batch",
        "conn",
        "counts",
        "encode",
        "failure",
        "handoff",
        "items",
        "last",
        "lock",
        "loop",
        "parked",
        "run",
        "send",
        "send_scope",
        "sending",
        "time",
    )

    def __init__(
        self,
        conn: _Connection,
        items: Any,
        lock: anyio.Lock,
        send_scope: anyio.CancelScope,
        send: Send,
        encode: Encode,
        counts: dict[str, int],
        batch: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        # asyncio's loop.time() is time.monotonic() behind a Python call; uvloop's is C.
        base = type(self.loop).time is asyncio.BaseEventLoop.time
        self.time = time.monotonic if base else self.loop.time
        self.conn = conn
        self.items = items
        self.lock = lock
        self.send_scope = send_scope
        self.send = send
        self.encode = encode
        self.counts = counts  # the endpoint's counters (``events_pushed`` is there)
        self.batch = batch
        # Sends run in this stream's context, not the publisher's (middleware may read it);
        # its bound ``run`` once, not a new method object per push.
        self.run = contextvars.copy_context().run
        self.last = self.time()  # the start of the last send
        self.sending = False  # the stream's task is in a send
        self.parked: asyncio.Future[None] | None = None
        self.handoff: tuple[Rest, list[tuple[Message, int]]] | None = None
        self.failure: Exception | None = None  # a publisher's send failed: the task decides

    async def park(self) -> None:
        """Wait until a publisher or the timer needs the stream's task. If cancelled: the
        stream is no longer parked (a handoff made before stays for the caller)."""
        fut = self.loop.create_future()
        self.parked = fut
        try:
            await fut
        finally:
            self.parked = None

    def unpark(self) -> None:
        fut, self.parked = self.parked, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def interrupt(self) -> None:
        """End the task's current or next wait (heartbeat due, stream ending)."""
        self.items.interrupt()
        self.unpark()

    def push(self) -> None:
        """The hub's sink: called synchronously on every publish to the session."""
        if self.parked is None:
            if self.sending:
                lagged = self.items.lagged()
                if lagged is not None:
                    self.conn.end(f"lagged:{lagged}")
                    self.send_scope.cancel()
            return
        if self.lock.locked() or self.conn.client_gone:
            self.unpark()
            return
        batch = self.items.take_live(self.batch)
        if batch is None:
            self.unpark()
            return
        if not batch:
            return
        messages = self.encode(batch)
        self.last = self.time()
        send, run = self.send, self.run
        if len(messages) == 1:
            # The usual case (one event, one frame): no loop, no slicing.
            message, n = messages[0]
            coro: Coroutine[Any, Any, None] = send(message)  # type: ignore[assignment]
            try:
                # ``next(..., _DONE)`` steps the coroutine as ``coro.send(None)`` would, but
                # one that returns None ends without a StopIteration raised and caught:
                # this runs once per subscriber per event.
                pending = run(next, coro.__await__(), _DONE)
            except Exception as exc:
                self.failure = exc
            else:
                if pending is _DONE:
                    self.counts["events_pushed"] += n
                    if len(batch) == self.batch:
                        self.unpark()  # a backlog: the task sends the rest
                    return
                self.handoff = (Rest(coro, pending), [])
            self.unpark()
            return
        done = 0
        for i, (message, n) in enumerate(messages):
            coro = send(message)  # type: ignore[assignment]
            try:
                pending = run(next, coro.__await__(), _DONE)
            except Exception as exc:
                self.failure = exc
            else:
                if pending is _DONE:
                    done += n
                    continue
                self.handoff = (Rest(coro, pending), messages[i + 1 :])
            if done:
                self.counts["events_pushed"] += done
            self.unpark()
            return
        self.counts["events_pushed"] += done
        if len(batch) == self.batch:
            self.unpark()  # a backlog: the task sends the rest, yielding between batches


async def stream_batched(
    conn: _Connection,
    items: Any,
    lock: anyio.Lock,
    *,
    send: Send,
    encode: Encode,
    counts: dict[str, int],
    heartbeat: Message,
    gone: Callable[[Exception], None],
    errors: tuple[type[Exception], ...],
    heartbeat_s: float,
    send_timeout_s: float,
    batch: int,
    fanout: bool,
) -> bool:
    """Feed one stream until it ends (``conn.end_reason``) or the client is gone; True when
    a send outlasted ``send_timeout_s`` or the stream was found lagging while blocked in a
    send (``conn.end_reason`` then says which: ``stalled`` is the caller's to set).

    Batches: the events ready now go out under one lock, with no cancel scope or timer per
    frame. With ``fanout`` the task parks while the stream is at the live head and whoever
    publishes writes to the connection (:class:`Pusher`). One timer serves both deadlines:
    it interrupts the wait when the heartbeat is due, and cancels the send scope when a
    batch has been sending for ``send_timeout_s``; it is re-armed only when it fires (or when
    a send needs an earlier check), not on every event. A send error goes to ``gone`` (which
    may re-raise it). If cancelled, the handoff left by a publisher is closed.
    """
    loop = asyncio.get_running_loop()
    send_scope = anyio.CancelScope()
    push = Pusher(conn, items, lock, send_scope, send, encode, counts, batch)
    fanout = fanout and hasattr(items, "take_live")
    timer: asyncio.TimerHandle | None = None
    timer_at = 0.0

    def arm(when: float) -> None:
        nonlocal timer, timer_at
        timer_at = when
        timer = loop.call_at(when, check)

    def check() -> None:
        now = loop.time()
        last = push.last
        if push.sending:
            if now - last >= send_timeout_s:
                send_scope.cancel()
                return
            arm(last + send_timeout_s)
        elif now - last >= heartbeat_s:
            push.interrupt()  # the wait ends with None: a heartbeat
            arm(now + heartbeat_s)
        else:
            arm(last + heartbeat_s)

    conn.interrupt = push.interrupt
    next_within = items.next_within
    take_ready = items.take_ready
    take_live = items.take_live if fanout else None
    arm(push.last + heartbeat_s)
    if fanout:
        items.set_sink(push.push)
    try:
        with send_scope:
            while True:
                rest: Rest | None = None
                messages: list[tuple[Message, int]] | None = None
                full = False  # a whole batch: more may be ready
                if push.failure is not None:
                    failure, push.failure = push.failure, None
                    gone(failure)
                    return False
                if push.handoff is not None:
                    rest, messages = push.handoff  # a publisher's send that must wait
                    push.handoff = None
                else:
                    ready = None
                    if take_live is not None and conn.end_reason is None:
                        ready = take_live(batch)
                        if ready is not None and not ready:
                            await push.park()  # publishers write until something else
                            continue
                    if ready is None:
                        item: Item | None = None
                        if conn.end_reason is None:
                            try:
                                item = await next_within(None)
                            except StopAsyncIteration:
                                conn.end("shutdown:stream closed")  # the hub is closing
                            except SubscriberLagged as exc:
                                conn.end(f"lagged:{exc}")
                        if item is None:
                            if conn.end_reason is not None:
                                break
                            messages = [(heartbeat, 0)]
                            counts["heartbeats"] = counts.get("heartbeats", 0) + 1
                        else:
                            ready = [item, *take_ready(batch - 1)]
                    if messages is None:
                        ready = ready or []
                        full = len(ready) >= batch
                        messages = encode(ready)
                if conn.client_gone:
                    return False
                push.last = loop.time()
                push.sending = True
                if timer_at > push.last + send_timeout_s and timer is not None:
                    timer.cancel()  # a heartbeat longer than the send timeout
                    arm(push.last + send_timeout_s)
                try:
                    lock.acquire_nowait()
                except anyio.WouldBlock:
                    await lock.acquire()  # a command's answer is being sent
                try:
                    if rest is not None:
                        await rest
                    for message, _ in messages:
                        await send(message)
                except errors as exc:
                    gone(exc)
                    return False
                finally:
                    lock.release()
                    push.sending = False
                if full:
                    # A backlog: uvicorn's send does not yield while the socket takes
                    # data, so yield here (other streams; a reset socket's close). A
                    # shorter batch took all there was: the next wait yields.
                    await anyio.lowlevel.checkpoint()
    finally:
        if fanout:
            items.set_sink(None)
        conn.interrupt = None
        if timer is not None:
            timer.cancel()
        if push.handoff is not None:
            push.handoff[0].close()
    return send_scope.cancelled_caught
