"""Durable webhooks in storage: the event journal and the delivery log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from asyncstore.storage import AsyncStorageBackend, InvalidInput, WebhookAttempt


async def test_journal_commit_delete_and_orphan_takeover(storage: AsyncStorageBackend) -> None:
    ids = await storage.journal_webhook_events("ledger", "p1", [b'{"n":1}', b'{"n":2}', b'{"n":3}'])
    assert len(ids) == 3 and ids == sorted(ids)
    other = await storage.journal_webhook_events("audit", "p1", [b'{"a":1}'])
    assert await storage.journal_webhook_events("ledger", "p1", []) == []
    # Young rows belong to their owner.
    assert await storage.claim_webhook_orphans(["ledger"], "p2", older_than_s=60, limit=10) == []
    assert await storage.delete_webhook_events([ids[0]]) == 1
    await anyio.sleep(1.1)  # the rows are now older than 1 s
    taken = await storage.claim_webhook_orphans(["ledger"], "p2", older_than_s=1.0, limit=1)
    assert [(e.id, e.endpoint, e.body) for e in taken] == [(ids[1], "ledger", b'{"n":2}')]
    rest = await storage.claim_webhook_orphans(["ledger"], "p3", older_than_s=1.0, limit=10)
    assert [e.id for e in rest] == [ids[2]]  # the row p2 just took is held afresh
    audit = await storage.claim_webhook_orphans(["audit"], "p3", older_than_s=0, limit=10)
    assert [e.id for e in audit] == other
    assert await storage.delete_webhook_events([ids[1], ids[2], *other]) == 3
    assert await storage.delete_webhook_events([ids[1]]) == 0


async def test_journal_refuses_bad_input(storage: AsyncStorageBackend) -> None:
    with pytest.raises(InvalidInput):
        await storage.journal_webhook_events("", "p1", [b"{}"])
    with pytest.raises(InvalidInput):
        await storage.journal_webhook_events("ledger", "p1", ["{}"])  # type: ignore[list-item]
    with pytest.raises(InvalidInput):
        await storage.journal_webhook_events("ledger", "p1", [b"{}", b"\xff"])
    assert await storage.claim_webhook_orphans(["ledger"], "p2", older_than_s=0, limit=10) == []


async def test_delivery_log_lists_filters_and_purges(storage: AsyncStorageBackend) -> None:
    now = datetime.now(UTC)

    def attempt(wid: str, ok: bool, status: int | None, endpoint: str = "ledger") -> Any:
        error = "" if ok else (f"HTTP {status}" if status else "ConnectError")
        return WebhookAttempt(endpoint, wid, 7, now, status, error, ok)

    log = [
        attempt("msg_a", False, 503),
        attempt("msg_a", True, 200),
        attempt("msg_b", False, None),
        attempt("msg_b", False, 500),
        attempt("msg_c", True, 204, endpoint="audit"),
    ]
    assert await storage.record_webhook_attempts(log) == 5
    assert await storage.record_webhook_attempts([]) == 0
    everything = await storage.list_webhook_attempts()
    assert [a.webhook_id for a in everything] == ["msg_c", "msg_b", "msg_b", "msg_a", "msg_a"]
    first = everything[-1]
    assert (first.endpoint, first.outbox_id, first.status, first.error, first.ok) == (
        "ledger",
        7,
        503,
        "HTTP 503",
        False,
    )
    assert abs((first.attempted_at - now).total_seconds()) < 1
    failed = await storage.list_webhook_attempts(endpoint="ledger", failed=True)
    assert [(a.webhook_id, a.status) for a in failed] == [("msg_b", 500), ("msg_b", None)]
    assert len(await storage.list_webhook_attempts(webhook_id="msg_a")) == 2
    assert len(await storage.list_webhook_attempts(endpoint="audit", limit=10)) == 1
    with pytest.raises(InvalidInput):
        naive = WebhookAttempt("x", "y", None, now.replace(tzinfo=None), None, "", True)
        await storage.record_webhook_attempts([naive])
    assert await storage.purge_webhook_attempts(3600) == 0
    await anyio.sleep(0.05)
    assert await storage.purge_webhook_attempts(0.01) == 5
    assert await storage.list_webhook_attempts() == []
