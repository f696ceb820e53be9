"""Two relays claiming at the same instant on Postgres never split one (channel, account)
group: while one claim transaction holds the group's head row, the other claim must not
take the rows behind it (it would send them before the head)."""

from __future__ import annotations

import asyncpg

from asyncstore.storage import NewOutboxMessage, open_storage
from asyncstore.storage._sql import load_queries

CLAIM = load_queries("postgres")["claim_outbox"]


async def test_a_concurrent_claim_skips_the_whole_group_of_a_locked_head(
    postgres_dsn: str,
) -> None:
    async with open_storage(postgres_dsn) as storage:
        await storage.enqueue_outbox(
            [NewOutboxMessage("race", "acct", i) for i in range(3)]
            + [NewOutboxMessage("race", "other", "x")]
        )
        conn = await asyncpg.connect(postgres_dsn)
        try:
            async with conn.transaction():
                # Relay A's claim takes the head of the group and has not committed yet.
                first = await conn.fetch(CLAIM, "relay-a", 1, ["race"], 30.0)
                assert len(first) == 1
                # Relay B claims meanwhile: nothing of the "acct" group may be taken.
                second = await storage.claim_outbox(
                    "relay-b", limit=10, lease_s=30, channels=["race"]
                )
                taken = {(m.account, m.payload) for m in second}
                assert all(account != "acct" for account, _ in taken), taken
                assert ("other", "x") in taken  # other groups are not held up
        finally:
            await conn.close()
