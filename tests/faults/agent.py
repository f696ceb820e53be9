"""A fault-test agent process: storage, a session limiter, a hub and a stream writer, driven
by JSON commands, one per line on stdin, and answering JSON lines on stdout.

Run as ``python -m tests.faults.agent '<options json>'`` (see ``tests/faults/procs.py``).
Options: ``url``, ``lease_ttl_s``, ``flush_interval_s``, ``log`` (a file that gets every
emitted seq, one line each, written before the next emit so a SIGKILL loses no record).
Commands are handled one at a time, in order; each answer carries the command's ``id``.
Lines with an ``event`` key are unsolicited: ``ready``, ``lost`` (a held lease was lost,
with the wall-clock time), ``progress`` (of a ``run``), ``closed`` (final statistics).

This module is deliberately dumb: it does what it is told even with a lost lease (as a
process that has not noticed yet would), so the tests see what storage and the library do.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import anyio
import anyio.abc

from asyncstore.orchestrator.batching import BatchConfig
from asyncstore.orchestrator.broadcast import BroadcastHub, StreamReset, Subscription
from asyncstore.orchestrator.locks import (
    HeldLease,
    LimiterConfig,
    SessionLimiter,
    open_session_limiter,
)
from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import AsyncStorageBackend, NewMessage, open_storage


def out(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, default=_plain) + "\n")
    sys.stdout.flush()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return repr(value)


def _head(view: list[dict[str, Any]]) -> int:
    return max((entry["seq"] for entry in view), default=0)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Agent:
    def __init__(
        self,
        storage: AsyncStorageBackend,
        hub: BroadcastHub,
        limiter: SessionLimiter,
        writer: StreamEventWriter,
        tg: anyio.abc.TaskGroup,
        log_path: str | None,
    ) -> None:
        self.storage = storage
        self.hub = hub
        self.limiter = limiter
        self.writer = writer
        self.tg = tg
        self.holds: dict[str, tuple[HeldLease, contextlib.AsyncExitStack]] = {}
        self.running: anyio.CancelScope | None = None
        self.run_result: dict[str, Any] = {}
        self.run_done = anyio.Event()
        self.views: dict[str, list[dict[str, Any]]] = {}
        self.view_changed = anyio.Event()
        self.log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    def stats(self) -> dict[str, Any]:
        w = self.writer.statistics()
        h = self.hub.statistics()
        s = self.storage.statistics()
        return {
            "writer": {
                "emitted": w.emitted,
                "persisted": w.persisted,
                "lost": w.lost,
                "dropped": dict(w.dropped),
                "refused": w.refused,
                "notifications": w.notifications,
                "notify_failures": w.notify_failures,
                "unsettled": w.writer.unsettled if w.writer is not None else 0,
            },
            "hub": {"db_reads": dict(h.db_reads), "notifications": h.notifications},
            "listener_reconnects": s.listener_reconnects,
            "leases_lost": self.limiter.statistics().leases_lost,
            "renewals": self.limiter.statistics().renewals,
            "lost": {sid: held.lost for sid, (held, _) in self.holds.items()},
        }

    async def emit_one(self, session: str, tag: str, i: int) -> int:
        event = await self.writer.emit(session, "delta", {"tag": tag, "i": i})
        if event is None:
            return 0
        if self.log is not None:
            self.log.write(f"{event.epoch} {event.seq}\n")
        return event.seq

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        session = cmd.get("session", "")
        if op == "hold":
            stack = contextlib.AsyncExitStack()
            held = await stack.enter_async_context(self.limiter.hold(session))
            self.holds[session] = (held, stack)
            self.tg.start_soon(self._watch, held)
            return {"token": held.token}
        if op == "begin":
            epoch = cmd.get("epoch", self.holds[session][0].token if session in self.holds else 0)
            last = await self.writer.begin(session, epoch=epoch)
            return {"last": last, "epoch": epoch}
        if op == "emit":
            seqs: list[int] = []
            error = None
            try:
                for i in range(cmd["n"]):
                    seqs.append(await self.emit_one(session, cmd.get("tag", ""), i))
            except Exception as exc:
                error = _error(exc)
            return {"seqs": seqs, "error": error}
        if op == "append":
            token = self.holds[session][0].token
            try:
                stored = await self.storage.append_messages(
                    session, [NewMessage("assistant", cmd.get("text", ""))], lease_token=token
                )
            except Exception as exc:
                return {"stored": 0, "error": _error(exc)}
            return {"stored": len(stored), "error": None}
        if op == "flush":
            with anyio.fail_after(cmd.get("limit_s", 120)):
                await self.writer.flush()
            return self.stats()
        if op == "run":
            self.run_done = anyio.Event()
            self.tg.start_soon(self._run, session, cmd)
            return {}
        if op == "halt":
            if self.running is not None:
                self.running.cancel()
            await self.run_done.wait()
            return self.run_result
        if op == "subscribe":
            after = cmd.get("after")
            sub = self.hub.subscribe(session, tuple(after) if after is not None else None)
            self.views[session] = []
            self.tg.start_soon(self._view, session, sub)
            return {}
        if op == "seen":
            # Wait until this process's subscriber has reached ``head`` (an event or a reset).
            with anyio.fail_after(cmd.get("limit_s", 60)):
                while _head(self.views[session]) < cmd.get("head", 0):
                    await self.view_changed.wait()
            return {"items": self.views[session]}
        if op == "stats":
            return self.stats()
        if op == "release":
            _, stack = self.holds.pop(session)
            await stack.aclose()
            return {}
        raise ValueError(f"unknown op {op!r}")

    async def _run(self, session: str, cmd: dict[str, Any]) -> None:
        """Emit one event every ``every_s`` until halted, reporting progress."""
        every_s = float(cmd.get("every_s", 0.005))
        report = int(cmd.get("report_every", 10))
        count = 0
        last = 0
        error = None
        with anyio.CancelScope() as scope:
            self.running = scope
            try:
                while True:
                    last = await self.emit_one(session, cmd.get("tag", ""), count) or last
                    count += 1
                    if count % report == 0:
                        out({"event": "progress", "count": count, "seq": last, "t": time.time()})
                    await anyio.sleep(every_s)
            except Exception as exc:
                error = _error(exc)
        self.running = None
        self.run_result = {"count": count, "last": last, "error": error}
        self.run_done.set()

    async def _view(self, session: str, sub: Subscription) -> None:
        async with sub:
            async for item in sub:
                if isinstance(item, StreamReset):
                    entry = {"reset": item.reason, "epoch": item.epoch, "seq": item.seq}
                else:
                    entry = {"epoch": item.epoch, "seq": item.seq, "payload": item.payload}
                self.views[session].append(entry)
                self.view_changed.set()
                self.view_changed = anyio.Event()

    async def _watch(self, held: HeldLease) -> None:
        reason = await held.wait_lost()
        out({"event": "lost", "session": held.session_id, "token": held.token,
             "reason": reason, "t": time.time()})  # fmt: skip


async def main(options: dict[str, Any]) -> None:
    batch = BatchConfig.model_validate(
        {**StreamConfig().batch.model_dump(), **options.get("batch", {})}
    )
    stream_config = StreamConfig(batch=batch)
    limiter_config = LimiterConfig(
        lease_ttl_s=options.get("lease_ttl_s", 30.0), **options.get("limiter", {})
    )
    async with (
        open_storage(options["url"]) as storage,
        BroadcastHub(storage) as hub,
        open_session_limiter(storage, limiter_config) as limiter,
    ):
        writer = StreamEventWriter(storage, hub, stream_config)
        async with writer, anyio.create_task_group() as tg:
            agent = Agent(storage, hub, limiter, writer, tg, options.get("log"))
            out({"event": "ready", "pid": os.getpid()})
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                if not line.strip():
                    continue
                cmd = json.loads(line)
                if cmd["op"] == "close":
                    break
                try:
                    answer = await agent.handle(cmd)
                except Exception as exc:
                    answer = {"error": _error(exc)}
                out({"id": cmd["id"], **answer})
            if agent.running is not None:
                agent.running.cancel()
            for _, stack in agent.holds.values():
                await stack.aclose()
            tg.cancel_scope.cancel()
        # The writer has drained: its final statistics say what was lost at shutdown.
        out({"event": "closed", **agent.stats()})


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
