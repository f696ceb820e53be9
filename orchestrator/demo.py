"""An end-to-end walk through the storage API that prints what it did.

It is the project's main job until the load-test suite replaces it: one simulated agent
turn (lease, chat append with an outbox row, streamed events, a queued task claimed and
completed, a cancel request, a notification) against the configured database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import anyio

from asyncstore.storage import (
    AsyncStorageBackend,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    StorageSettings,
    open_storage,
)


async def run_demo(settings: StorageSettings, say: Callable[[str], None] = print) -> None:
    """Run the walk-through on ``settings`` (migrating first) and report each step."""
    async with open_storage(settings, migrate=True) as storage:
        say(f"opened {storage.dialect} storage, schema version {await storage.schema_version()}")
        await _walk(storage, say)
        stats = storage.statistics()
        say(f"done: {stats.total_statements} statements issued by this handle")


async def _walk(storage: AsyncStorageBackend, say: Callable[[str], None]) -> None:
    session = f"demo-{uuid.uuid4().hex[:8]}"
    lease = await storage.acquire_lease(session, "demo-worker", ttl_s=30)
    if lease is None:
        raise RuntimeError(f"session {session} is unexpectedly leased")
    say(f"lease on {session}: fencing token {lease.token}")

    messages = await storage.append_messages(
        session,
        [NewMessage("user", {"text": "What is the weather in Paris?"})],
        lease_token=lease.token,
    )
    say(f"appended user message seq={messages[0].seq}")

    async with storage.listen("demo_stream") as notes:
        start = time.perf_counter()
        tokens = ["It ", "is ", "sunny ", "and ", "22", "°C."]
        events = [
            NewStreamEvent(session, lease.token, seq, "delta", {"text": text})
            for seq, text in enumerate(tokens, start=1)
        ]
        stored = (await storage.append_stream_events(events)).stored
        retried = (await storage.append_stream_events(events)).stored
        await storage.notify("demo_stream", f"{session}:{len(events)}")
        with anyio.fail_after(5):
            note = await notes.receive()
        elapsed_ms = (time.perf_counter() - start) * 1000
        say(
            f"streamed {stored} events in one batch (retry stored {retried}); "
            f"notification {note.payload!r} after {elapsed_ms:.1f} ms"
        )

    replay = await storage.load_stream_events(session, after_seq=2)
    say("resume after seq 2 replays: " + "".join(e.payload["text"] for e in replay))

    answer = "".join(tokens)
    reply = await storage.append_messages(
        session,
        [NewMessage("assistant", {"text": answer})],
        outbox=[NewOutboxMessage("slack", "team-1", {"text": answer})],
        lease_token=lease.token,
    )
    say(f"appended assistant reply seq={reply[0].seq} with an outbox row in one transaction")

    (task,) = await storage.enqueue_tasks(
        [NewTask("agent", {"session": session, "tool": "summarise"}, idempotency_key=session)]
    )
    again = await storage.enqueue_task(NewTask("agent", {}, idempotency_key=session))
    claimed = await storage.claim_tasks("agent", "demo-worker", limit=10, lease_s=30)
    ours = [t for t in claimed if t.id == task.id]
    done = await storage.complete_tasks([t.claim for t in ours])
    say(
        f"task {task.id} enqueued (duplicate enqueue returned {again.id}), "
        f"claimed attempt {ours[0].attempts if ours else '?'}, completed {done}"
    )

    sent = await storage.claim_outbox("demo-relay", limit=10, lease_s=30, channels=["slack"])
    marked = await storage.mark_outbox_sent([m.claim for m in sent])
    say(f"outbox: claimed and marked {len(marked)} message(s) sent")

    cancel = await storage.request_cancel(session, "user pressed stop")
    say(f"cancel requested: {cancel.reason!r}")
    await storage.release_lease(session, lease.token)
    removed = await storage.delete_session(session)
    say(f"lease released; session deleted: {removed}")
