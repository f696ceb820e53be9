"""Outbox relays in separate OS processes on one Postgres database: per-group order.

Two or three relay processes deliver 1,600 messages of 40 (channel, account) groups with
random send delays; some messages fail transiently (retried), one is a poison message that
fails on every attempt. Every relay appends one JSON line per send attempt to its own file
(group, message id, attempt, start and end from ``time.time()``, outcome), flushed before
the sender returns, and the test checks what really happened across processes:

- within a group, send attempts never overlap in time (one in flight per group);
- within a group, attempts start in id (enqueue) order: no message is sent before an earlier
  message of its group (a dead-lettered message lets the rest of its group pass);
- every message is sent exactly once, after exactly the planned number of failed attempts;
  the poison message ends ``dead`` after ``max_attempts`` attempts, and its group goes on;
- once its receiver is fixed and it is redriven, the poison message is sent once, after
  every other message of its group (they had all passed), overlapping none of them.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncstore.orchestrator.outbox import Outbox
from asyncstore.storage import NewOutboxMessage, OutboxStatus, open_storage
from tests.conftest import truncate
from tests.waiting import wait_for

GROUPS = [(f"ch{c}", f"acct{a}") for c in range(4) for a in range(10)]  # 40 groups
MESSAGES = 1_600
MAX_ATTEMPTS = 3

RELAY = """
import json, os, random, sys, time
import anyio
from asyncstore.orchestrator.outbox import OutboxConfig, RetryTemplate, SendError, open_outbox_relay
from asyncstore.storage import open_storage

url, out_path, channels, batch, healed = sys.argv[1:6]
channels = channels.split(",")

async def main():
    template = RetryTemplate(delays_s=(0.02,), max_attempts=__MAX_ATTEMPTS__, jitter=0.0)
    cfg = OutboxConfig(batch_size=int(batch), max_in_flight=64, fallback_poll_s=0.5,
                       shutdown_grace_s=5.0)
    with open(out_path, "a", buffering=1) as out:
        async def send(msg):
            start = time.time()
            await anyio.sleep(random.uniform(0.0, 0.008))
            p = msg.payload
            poisoned = p["poison"] and not os.path.exists(healed)  # until the receiver is fixed
            fail = poisoned or msg.attempts <= p["fail"]
            out.write(json.dumps({
                "group": [msg.channel, msg.account], "id": msg.id, "attempt": msg.attempts,
                "start": start, "end": time.time(), "ok": not fail,
            }) + "\\n")
            if fail:
                raise SendError("planned failure", status=503)

        async with open_storage(url) as storage:
            senders = dict.fromkeys(channels, send)
            templates = dict.fromkeys(channels, template)
            print("ready", flush=True)
            # start gate: every relay starts claiming at once, so a slow interpreter start
            # cannot leave one relay to drain everything before the others are up
            await anyio.to_thread.run_sync(sys.stdin.readline)
            async with open_outbox_relay(storage, senders, templates=templates, config=cfg):
                await anyio.to_thread.run_sync(sys.stdin.readline)

anyio.run(main)
""".replace("__MAX_ATTEMPTS__", str(MAX_ATTEMPTS))


class Relay:
    def __init__(self, url: str, out: Path, channels: list[str], batch: int, healed: Path) -> None:
        self.out = out
        args = [url, str(out), ",".join(channels), str(batch), str(healed)]
        self.popen = subprocess.Popen(
            [sys.executable, "-c", RELAY, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )

    def wait_ready(self) -> None:
        assert self.popen.stdout is not None
        assert self.popen.stdout.readline().strip() == "ready"

    def go(self) -> None:
        """Open the gate: the relay starts claiming."""
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            assert self.popen.stdin is not None
            self.popen.stdin.write("stop\n")
            self.popen.stdin.close()  # EOF: a relay still at its start gate goes straight through
        try:
            assert self.popen.wait(timeout=60) == 0
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]


async def _wait_settled(dsn: str, timeout_s: float) -> None:
    """Until no message is pending or in flight (there is no cross-process event to await)."""
    conn = await asyncpg.connect(dsn)
    try:

        async def settled() -> bool:
            open_rows = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')"
            )
            return bool(open_rows == 0)

        await wait_for(settled, timeout_s, what="no message pending or in flight")
    finally:
        await conn.close()


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


def check_order_and_overlap(
    records: list[dict[str, Any]],
) -> tuple[list[str], list[str]]:
    """Order violations and overlaps, per group, over every relay's attempt records."""
    by_group: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_group[(rec["group"][0], rec["group"][1])].append(rec)
    order: list[str] = []
    overlap: list[str] = []
    for group, recs in by_group.items():
        recs.sort(key=lambda r: (r["start"], r["end"]))
        highest = 0
        for prev, cur in zip([None, *recs], recs, strict=False):
            if prev is not None and cur["start"] < prev["end"]:
                overlap.append(f"{group}: {prev['id']} and {cur['id']} in flight together")
            if cur["id"] < highest:
                order.append(f"{group}: {cur['id']} started after {highest}")
            highest = max(highest, cur["id"])
    return order, overlap


@pytest.mark.parametrize("relays", [2, 3])
async def test_relay_processes_keep_group_order_with_retries_and_a_poison_message(
    dsn: str, tmp_path: Path, relays: int
) -> None:
    rng = random.Random(1300 + relays)
    plan: list[tuple[tuple[str, str], dict[str, Any]]] = []
    poison_at = MESSAGES // 3
    for i in range(MESSAGES):
        group = GROUPS[rng.randrange(len(GROUPS))]
        fail = 1 if rng.random() < 0.05 else 0  # transient: one failed attempt, then sent
        plan.append((group, {"i": i, "fail": fail, "poison": i == poison_at}))
    async with open_storage(dsn) as storage:
        rows = []
        for start in range(0, MESSAGES, 400):
            chunk = plan[start : start + 400]
            rows += await storage.enqueue_outbox(
                [NewOutboxMessage(c, a, p, max_attempts=MAX_ATTEMPTS) for (c, a), p in chunk]
            )
    channels = sorted({c for c, _ in GROUPS})
    healed = tmp_path / "healed"
    procs = [Relay(dsn, tmp_path / f"relay{n}.jsonl", channels, 50, healed) for n in range(relays)]
    poison_id = rows[poison_at].id
    try:
        for proc in procs:
            proc.wait_ready()
        for proc in procs:
            proc.go()
        await _wait_settled(dsn, timeout_s=180)
        first_pass = [rec for proc in procs for rec in proc.records()]
        healed.touch()
        async with open_storage(dsn) as storage:
            assert await Outbox(storage).redrive([poison_id]) == [poison_id]
        await _wait_settled(dsn, timeout_s=60)
    finally:
        for proc in procs:
            proc.stop()

    assert sum(1 for proc in procs if proc.records()) >= 2  # the work was actually shared
    order, overlap = check_order_and_overlap(first_pass)
    assert (len(order), len(overlap)) == (0, 0), (order[:10], overlap[:10])
    records = [rec for proc in procs for rec in proc.records()]
    assert check_order_and_overlap(records)[1] == []  # the redriven send overlaps nothing

    attempts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        attempts[rec["id"]].append(rec)
    async with open_storage(dsn) as storage:
        for row, (_, payload) in zip(rows, plan, strict=True):
            tries = sorted(attempts[row.id], key=lambda r: r["start"])
            final = await storage.get_outbox(row.id)
            assert final is not None and final.status is OutboxStatus.SENT
            if row.id == poison_id:
                # Dead after max_attempts on the first pass, then sent once when redriven.
                assert [t["ok"] for t in tries] == [False] * MAX_ATTEMPTS + [True]
                before = [t for t in first_pass if t["id"] == poison_id]
                assert sorted(before, key=lambda r: r["start"]) == tries[:-1]
            else:
                expected = [False] * payload["fail"] + [True]
                assert [t["ok"] for t in tries] == expected, (row.id, tries)
    # A dead message lets its group pass: every other message of the poison's group was sent
    # on the first pass, and the redriven message after all of them.
    group = list(plan[poison_at][0])
    others = [r for r in records if r["group"] == group and r["id"] != poison_id]
    assert others and all(r in first_pass for r in others)
    redriven = max(attempts[poison_id], key=lambda r: r["start"])
    assert redriven["start"] >= max(r["end"] for r in others)
