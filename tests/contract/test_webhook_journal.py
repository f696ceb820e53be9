"""The durable webhook journal: commit events, delete batched ones, take over orphans."""

from __future__ import annotations

import anyio
import pytest

from storage import AsyncStorageBackend, InvalidInput


async def test_journal_commit_delete_and_orphan_takeover(storage: AsyncStorageBackend) -> None:
    ids = await storage.journal_webhook_events("ledger", "p1", [b'{"n":1}', b'{"n":2}', b'{"n":3}'])
    assert len(ids) == 3 and ids == sorted(ids)
    other = await storage.journal_webhook_events("audit", "p1", [b'{"a":1}'])
    assert await storage.journal_webhook_events("ledger", "p1", []) == []
    # Young rows belong to their owner.
    assert await storage.claim_webhook_orphans(["ledger"], "p2", older_than_s=60, limit=10) == []
    assert await storage.delete_webhook_events([ids[0]]) == 1
    await anyio.sleep(0.05)
    taken = await storage.claim_webhook_orphans(["ledger"], "p2", older_than_s=0.01, limit=1)
    assert [(e.id, e.endpoint, e.body) for e in taken] == [(ids[1], "ledger", b'{"n":2}')]
    rest = await storage.claim_webhook_orphans(["ledger"], "p3", older_than_s=0.01, limit=10)
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
