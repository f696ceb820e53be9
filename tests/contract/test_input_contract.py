"""Issue 14: both drivers refuse the same hostile text, as text and as bytes.

Every id, name and text argument of every method is tried with a lone surrogate (a str
that cannot be encoded to UTF-8): both drivers must answer ``InvalidInput`` and write
nothing. Channel names are limited to 63 UTF-8 bytes (Postgres truncates identifiers at 63
bytes), so two names can never share a Postgres channel.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import pytest

from asyncstore.storage import (
    AsyncStorageBackend,
    Claim,
    Failure,
    InvalidInput,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
)
from asyncstore.storage.base import LoginPolicy, WebhookAttempt

BAD = "a\ud800b"  # a lone surrogate: valid str, not encodable to UTF-8
POLICY = LoginPolicy(5, 60.0, 1.0, 2.0, 60.0, 600.0)
NOW = datetime(2026, 1, 1, tzinfo=UTC)

Call = Callable[[AsyncStorageBackend], Awaitable[object]]


async def _listen(s: AsyncStorageBackend, channel: str) -> None:
    async with s.listen(channel):
        pass


async def _lead(s: AsyncStorageBackend, name: str) -> None:
    async with s.open_leadership(name, ttl_s=5.0) as role:
        await role.try_lead()


def _attempt(**kw: object) -> WebhookAttempt:
    base: dict[str, object] = {
        "endpoint": "e",
        "webhook_id": "w",
        "outbox_id": None,
        "attempted_at": NOW,
        "status": 500,
        "error": "boom",
        "ok": False,
    }
    base.update(kw)
    return WebhookAttempt(**base)  # type: ignore[arg-type]


# (argument kind, call with the hostile value in that argument)
CASES: list[tuple[str, Call]] = [
    ("append_messages.session_id", lambda s: s.append_messages(BAD, [NewMessage("user", 1)])),
    ("append_messages.role", lambda s: s.append_messages("s", [NewMessage(BAD, 1)])),
    ("append_messages.content", lambda s: s.append_messages("s", [NewMessage("user", BAD)])),
    (
        "append_messages.content key",
        lambda s: s.append_messages("s", [NewMessage("user", {BAD: 1})]),
    ),
    (
        "append_messages.outbox.account",
        lambda s: s.append_messages(
            "s", [NewMessage("user", 1)], outbox=[NewOutboxMessage("c", BAD, 1)]
        ),
    ),
    ("load_messages.session_id", lambda s: s.load_messages(BAD)),
    ("delete_session.session_id", lambda s: s.delete_session(BAD)),
    (
        "append_stream_events.session_id",
        lambda s: s.append_stream_events([NewStreamEvent(BAD, 0, 1, "delta", 1)]),
    ),
    (
        "append_stream_events.kind",
        lambda s: s.append_stream_events([NewStreamEvent("s", 0, 1, BAD, 1)]),
    ),
    (
        "append_stream_events.payload",
        lambda s: s.append_stream_events([NewStreamEvent("s", 0, 1, "delta", [BAD])]),
    ),
    ("load_stream_events.session_id", lambda s: s.load_stream_events(BAD)),
    ("last_stream_seq.session_id", lambda s: s.last_stream_seq(BAD)),
    ("acquire_lease.session_id", lambda s: s.acquire_lease(BAD, "h", 5.0)),
    ("acquire_lease.holder", lambda s: s.acquire_lease("s", BAD, 5.0)),
    ("renew_lease.session_id", lambda s: s.renew_lease(BAD, 1, 5.0)),
    ("release_lease.session_id", lambda s: s.release_lease(BAD, 1)),
    ("get_lease.session_id", lambda s: s.get_lease(BAD)),
    ("ensure_lease_slots.pool", lambda s: s.ensure_lease_slots(BAD, 1)),
    ("acquire_lease_slot.session_id", lambda s: s.acquire_lease_slot(BAD, "h", 5.0)),
    ("acquire_lease_slot.holder", lambda s: s.acquire_lease_slot("s", BAD, 5.0)),
    (
        "acquire_lease_slot.pool",
        lambda s: s.acquire_lease_slot("s", "h", 5.0, pool=BAD, slots=1),
    ),
    ("renew_lease_slot.session_id", lambda s: s.renew_lease_slot(BAD, 1, 5.0)),
    ("renew_lease_slot.pool", lambda s: s.renew_lease_slot("s", 1, 5.0, pool=BAD)),
    ("release_lease_slot.session_id", lambda s: s.release_lease_slot(BAD, 1, channel="c")),
    ("release_lease_slot.channel", lambda s: s.release_lease_slot("s", 1, channel=BAD)),
    (
        "release_lease_slot.pool",
        lambda s: s.release_lease_slot("s", 1, channel="c", pool=BAD),
    ),
    ("enqueue_tasks.queue", lambda s: s.enqueue_tasks([NewTask(BAD, 1)])),
    ("enqueue_tasks.payload", lambda s: s.enqueue_tasks([NewTask("q", {"k": BAD})])),
    (
        "enqueue_tasks.idempotency_key",
        lambda s: s.enqueue_tasks([NewTask("q", 1, idempotency_key=BAD)]),
    ),
    ("claim_tasks.queue", lambda s: s.claim_tasks(BAD, "w", limit=1, lease_s=5.0)),
    ("claim_tasks.worker_id", lambda s: s.claim_tasks("q", BAD, limit=1, lease_s=5.0)),
    ("fail_tasks.error", lambda s: s.fail_tasks([Failure(1, 1, BAD)])),
    ("dead_letter_tasks.error", lambda s: s.dead_letter_tasks([Failure(1, 1, BAD)])),
    ("next_task_due_s.queue", lambda s: s.next_task_due_s(BAD)),
    ("enqueue_outbox.channel", lambda s: s.enqueue_outbox([NewOutboxMessage(BAD, "a", 1)])),
    ("enqueue_outbox.account", lambda s: s.enqueue_outbox([NewOutboxMessage("c", BAD, 1)])),
    ("enqueue_outbox.payload", lambda s: s.enqueue_outbox([NewOutboxMessage("c", "a", BAD)])),
    ("claim_outbox.worker_id", lambda s: s.claim_outbox(BAD, limit=1, lease_s=5.0)),
    (
        "claim_outbox.channels",
        lambda s: s.claim_outbox("w", limit=1, lease_s=5.0, channels=[BAD]),
    ),
    ("fail_outbox.error", lambda s: s.fail_outbox([Failure(1, 1, BAD)])),
    ("dead_letter_outbox.error", lambda s: s.dead_letter_outbox([Failure(1, 1, BAD)])),
    ("journal_webhook_events.endpoint", lambda s: s.journal_webhook_events(BAD, "o", [b"1"])),
    ("journal_webhook_events.owner", lambda s: s.journal_webhook_events("e", BAD, [b"1"])),
    (
        "claim_webhook_orphans.endpoints",
        lambda s: s.claim_webhook_orphans([BAD], "o", older_than_s=1.0, limit=1),
    ),
    (
        "claim_webhook_orphans.owner",
        lambda s: s.claim_webhook_orphans(["e"], BAD, older_than_s=1.0, limit=1),
    ),
    (
        "record_webhook_attempts.endpoint",
        lambda s: s.record_webhook_attempts([_attempt(endpoint=BAD)]),
    ),
    (
        "record_webhook_attempts.webhook_id",
        lambda s: s.record_webhook_attempts([_attempt(webhook_id=BAD)]),
    ),
    (
        "record_webhook_attempts.error",
        lambda s: s.record_webhook_attempts([_attempt(error=BAD)]),
    ),
    ("list_webhook_attempts.endpoint", lambda s: s.list_webhook_attempts(endpoint=BAD)),
    ("list_webhook_attempts.webhook_id", lambda s: s.list_webhook_attempts(webhook_id=BAD)),
    ("request_cancel.session_id", lambda s: s.request_cancel(BAD, "r")),
    ("request_cancel.reason", lambda s: s.request_cancel("s", BAD)),
    (
        "request_cancel.notify_channel",
        lambda s: s.request_cancel("s", "r", notify_channel=BAD),
    ),
    ("get_cancel.session_id", lambda s: s.get_cancel(BAD)),
    ("clear_cancel.session_id", lambda s: s.clear_cancel(BAD)),
    ("notify.channel", lambda s: s.notify(BAD, "p")),
    ("notify.payload", lambda s: s.notify("c", BAD)),
    ("listen.channel", lambda s: _listen(s, BAD)),
    ("open_leadership.name", lambda s: _lead(s, BAD)),
    ("reserve_login_attempt.key", lambda s: s.reserve_login_attempt("account", BAD, POLICY)),
    (
        "finish_login_attempt.key",
        lambda s: s.finish_login_attempt("account", BAD, 0.0, "failure", POLICY),
    ),
]


async def _row_counts(storage: AsyncStorageBackend) -> tuple[object, ...]:
    return (
        await storage.load_messages("s"),
        await storage.load_stream_events("s"),
        await storage.get_lease("s"),
        await storage.get_cancel("s"),
        await storage.next_task_due_s("q"),
        await storage.claim_outbox("peek", limit=10, lease_s=0.001),
        await storage.list_webhook_attempts(),
        await storage.claim_webhook_orphans(["e"], "peek", older_than_s=0, limit=10),
    )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_lone_surrogates_are_invalid_input(
    storage: AsyncStorageBackend, case: tuple[str, Call]
) -> None:
    _, call = case
    before = await _row_counts(storage)
    with pytest.raises(InvalidInput):
        await call(storage)
    assert await _row_counts(storage) == before  # nothing written
    await storage.ping()  # the handle still works


@pytest.mark.parametrize("length", [64, 100])
async def test_channel_names_over_63_bytes_are_refused(
    storage: AsyncStorageBackend, length: int
) -> None:
    name = "c" * length
    with pytest.raises(InvalidInput, match="63"):
        await storage.notify(name, "x")
    with pytest.raises(InvalidInput, match="63"):
        await _listen(storage, name)
    with pytest.raises(InvalidInput, match="63"):
        await storage.request_cancel("s", "r", notify_channel=name)
    with pytest.raises(InvalidInput, match="63"):
        await storage.release_lease_slot("s", 1, channel=name)
    assert await storage.get_cancel("s") is None


async def test_channel_limit_counts_bytes_not_characters(storage: AsyncStorageBackend) -> None:
    # 32 two-byte letters: 32 characters but 64 bytes, over Postgres's 63-byte identifiers.
    with pytest.raises(InvalidInput, match="63"):
        await storage.notify("é" * 32, "x")
    with pytest.raises(InvalidInput, match="63"):
        await _listen(storage, "é" * 32)


async def test_a_63_byte_channel_is_delivered_and_its_prefix_is_distinct(
    storage: AsyncStorageBackend,
) -> None:
    longest = "é" * 31 + "x"  # 63 bytes
    prefix = longest[:-1]
    async with storage.listen(longest, prefix) as stream:
        await storage.notify(longest, "long")
        await storage.notify(prefix, "short")
        with anyio.fail_after(30):
            got = [await stream.receive(), await stream.receive()]
    assert [(n.channel, n.payload) for n in got] == [(longest, "long"), (prefix, "short")]


async def test_valid_non_ascii_text_still_round_trips(storage: AsyncStorageBackend) -> None:
    text = "héllo \U0001f600 ✓"
    await storage.append_messages(text, [NewMessage(text[:10], {text: text})])
    [m] = await storage.load_messages(text)
    assert (m.session_id, m.role, m.content) == (text, text[:10], {text: text})
    state = await storage.request_cancel(text, text)
    assert state.reason == text
    [task] = await storage.enqueue_tasks([NewTask(text, text, idempotency_key=text)])
    [claimed] = await storage.claim_tasks(text, text, limit=1, lease_s=5.0)
    assert await storage.fail_tasks([Failure(*claimed.claim, text)]) == {task.id: "queued"}
    got = await storage.get_task(task.id)
    assert got is not None and got.last_error == text
    assert Claim(task.id, 1)  # records stay plain tuples
