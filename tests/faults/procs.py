"""Test-side handles on agent processes (``tests/faults/agent.py``) and on stream checks.

``spawn_agent(url, ...)`` starts an agent, waits for its ``ready`` line and always kills it at
the end (a SIGSTOPped one included). ``Agent.call`` sends a command and waits for its answer;
``Agent.wait_for`` waits for a line that matches, so tests wait on what the process said,
never on a sleep. ``Collector`` drains a hub subscription in the background with the same
kind of wait, and ``listening`` records a channel's notifications and gap markers.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from asyncstore.orchestrator.broadcast import StreamReset, Subscription
from asyncstore.storage import AsyncStorageBackend, Notification, StreamEvent

ROOT = Path(__file__).resolve().parents[2]

Message = dict[str, Any]


class AgentDied(AssertionError):
    pass


class Agent:
    def __init__(self, name: str, process: anyio.abc.Process) -> None:
        self.name = name
        self.process = process
        self.messages: list[Message] = []
        self._changed = anyio.Event()
        self._eof = False
        self._ids = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                line = await stream.receive_until(b"\n", 1 << 24)
                try:
                    message = json.loads(line)
                except ValueError:
                    message = {"event": "text", "text": line.decode(errors="replace")}
                self.messages.append(message)
                self._wake()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass
        finally:
            self._eof = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(
        self, predicate: Callable[[Message], bool], limit_s: float = 60.0, *, start: int = 0
    ) -> Message:
        """The first message from index ``start`` on that matches; waits for it."""
        with anyio.fail_after(limit_s):
            seen = start
            while True:
                while seen < len(self.messages):
                    message = self.messages[seen]
                    seen += 1
                    if predicate(message):
                        return message
                if self._eof:
                    raise AgentDied(f"agent {self.name} exited (rc={self.process.returncode})")
                await self._changed.wait()

    async def send(self, op: str, **args: Any) -> int:
        self._ids += 1
        assert self.process.stdin is not None
        line = json.dumps({"op": op, "id": self._ids, **args}) + "\n"
        await self.process.stdin.send(line.encode())
        return self._ids

    async def answer(self, ident: int, limit_s: float = 60.0) -> Message:
        message = await self.wait_for(lambda m: m.get("id") == ident, limit_s)
        return message

    async def call(self, op: str, limit_s: float = 60.0, **args: Any) -> Message:
        """Send a command and wait for its answer; an ``error`` answer fails the test."""
        message = await self.answer(await self.send(op, **args), limit_s)
        if op not in ("emit", "append") and message.get("error"):
            raise AssertionError(f"agent {self.name}: {op} failed: {message['error']}")
        return message

    async def close(self, limit_s: float = 90.0) -> Message:
        """Ask the agent to drain and exit; returns its final statistics."""
        await self.send("close")
        closed = await self.wait_for(lambda m: m.get("event") == "closed", limit_s)
        with anyio.fail_after(limit_s):
            await self.process.wait()
        return closed

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


@asynccontextmanager
async def spawn_agent(
    name: str, url: str, *, module: str = "tests.faults.agent", **options: Any
) -> AsyncIterator[Agent]:
    """Start an agent process and wait for it to be ready; it is killed when the block ends."""
    process = await anyio.open_process(
        [sys.executable, "-m", module, json.dumps({"url": url, **options})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # inherited: pytest shows it with the failure
        cwd=ROOT,
    )
    agent = Agent(name, process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent._read)
            try:
                await agent.wait_for(lambda m: m.get("event") == "ready", limit_s=60)
                yield agent
            finally:
                # Shielded: a process left running would outlive the test and its database.
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()  # SIGKILL also ends a stopped process
                    await process.wait()
    finally:
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()


class Collector:
    """Reads a hub subscription in the background; tests wait on what it has seen."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.items: list[StreamEvent | StreamReset] = []
        self._changed = anyio.Event()

    @property
    def events(self) -> list[StreamEvent]:
        return [item for item in self.items if isinstance(item, StreamEvent)]

    @property
    def resets(self) -> list[StreamReset]:
        return [item for item in self.items if isinstance(item, StreamReset)]

    async def run(self) -> None:
        async for item in self.subscription:
            self.items.append(item)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_until(
        self, predicate: Callable[[Collector], bool], limit_s: float = 60.0, what: str = ""
    ) -> None:
        try:
            with anyio.fail_after(limit_s):
                while not predicate(self):
                    await self._changed.wait()
        except TimeoutError:
            last = self.items[-1] if self.items else None
            raise AssertionError(
                f"subscriber: {what or 'condition'} not met in {limit_s} s "
                f"({len(self.items)} items, last {last})"
            ) from None

    def last_seq(self) -> int:
        events = self.events
        return events[-1].seq if events else 0

    def head(self) -> int:
        """The seq the subscriber's view reaches: its last event's, or a later reset's."""
        return max([self.last_seq()] + [r.seq for r in self.resets])


@asynccontextmanager
async def collect(subscription: Subscription) -> AsyncIterator[Collector]:
    collector = Collector(subscription)
    async with anyio.create_task_group() as tg:
        tg.start_soon(collector.run)
        try:
            yield collector
        finally:
            await subscription.aclose()
            tg.cancel_scope.cancel()


class Notes:
    """Every notification one ``listen()`` subscription received, gap markers included."""

    def __init__(self) -> None:
        self.items: list[Notification] = []
        self.changed = anyio.Event()
        self.first_gap_at: float | None = None  # time.monotonic() of the first gap marker

    async def run(self, storage: AsyncStorageBackend, channel: str) -> None:
        async with storage.listen(channel) as stream:
            async for note in stream:
                self.items.append(note)
                if note.gap and self.first_gap_at is None:
                    self.first_gap_at = time.monotonic()
                self.changed.set()
                self.changed = anyio.Event()

    def gaps(self) -> int:
        return sum(1 for note in self.items if note.gap)

    async def wait_gap(self, limit_s: float = 60.0) -> None:
        with anyio.fail_after(limit_s):
            while not self.gaps():
                await self.changed.wait()


@asynccontextmanager
async def listening(storage: AsyncStorageBackend, channel: str) -> AsyncIterator[Notes]:
    notes = Notes()
    async with anyio.create_task_group() as tg:
        tg.start_soon(notes.run, storage, channel)
        yield notes
        tg.cancel_scope.cancel()


# -- checks on the stored stream and on what subscribers saw -----------------------------


async def load_stream(storage: AsyncStorageBackend, session_id: str) -> list[StreamEvent]:
    rows: list[StreamEvent] = []
    after = 0
    while True:
        page = await storage.load_stream_events(session_id, after_seq=after, limit=1000)
        if not page:
            return rows
        rows.extend(page)
        after = page[-1].seq


def check_stored_stream(rows: list[StreamEvent]) -> None:
    """Seqs 1..n without a gap, and epochs that never go back in seq order."""
    seqs = [row.seq for row in rows]
    assert seqs == list(range(1, len(rows) + 1)), f"stored seqs have gaps: {_runs(seqs)}"
    epochs = [(row.seq, row.epoch) for row in rows]
    for (seq_a, epoch_a), (seq_b, epoch_b) in itertools.pairwise(epochs):
        assert epoch_b >= epoch_a, (
            f"stored epoch goes back: seq {seq_a} has epoch {epoch_a}, seq {seq_b} has "
            f"epoch {epoch_b} (epochs by seq: {_epoch_runs(rows)})"
        )


def check_view(items: list[StreamEvent | StreamReset], rows: list[StreamEvent]) -> None:
    """What a subscriber saw is one consistent stream: each event it got is the stored one,
    or was superseded and followed by a reset; seqs advance by one except after a reset."""
    stored = {row.seq: row for row in rows}
    expected_next: int | None = None
    unconfirmed: list[StreamEvent] = []  # events not matching storage, awaiting a reset
    for item in items:
        if isinstance(item, StreamReset):
            # The client reloads the stream up to item.seq: what it saw before is replaced.
            unconfirmed = []
            expected_next = item.seq + 1
            continue
        if expected_next is not None:
            assert item.seq == expected_next, (
                f"subscriber got seq {item.seq} after {expected_next - 1} with no reset"
            )
        expected_next = item.seq + 1
        row = stored.get(item.seq)
        if row is None or (row.epoch, row.payload) != (item.epoch, item.payload):
            unconfirmed.append(item)
    assert not unconfirmed, (
        "subscriber saw events that are not the stored ones and got no reset after them: "
        f"{[(e.epoch, e.seq, e.payload) for e in unconfirmed][:10]}"
    )


def view_of(items: list[dict[str, Any]]) -> list[StreamEvent | StreamReset]:
    """An agent's ``seen`` answer as subscription items (timestamps are not compared)."""
    out: list[StreamEvent | StreamReset] = []
    for entry in items:
        if "reset" in entry:
            out.append(StreamReset("", entry["reset"], entry["epoch"], entry["seq"]))
        else:
            out.append(StreamEvent("", entry["epoch"], entry["seq"], "", entry["payload"], _EPOCH0))
    return out


_EPOCH0 = datetime.fromtimestamp(0, UTC)


def _runs(seqs: list[int]) -> str:
    if not seqs:
        return "[]"
    parts = []
    start = prev = seqs[0]
    for seq in seqs[1:]:
        if seq != prev + 1:
            parts.append(f"{start}..{prev}")
            start = seq
        prev = seq
    parts.append(f"{start}..{prev}")
    return ", ".join(parts)


def _epoch_runs(rows: list[StreamEvent]) -> str:
    parts: list[str] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].epoch != rows[start].epoch:
            parts.append(f"{rows[start].seq}..{rows[i - 1].seq}@{rows[start].epoch}")
            start = i
    return ", ".join(parts)
