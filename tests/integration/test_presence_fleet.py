"""Fleet-wide subscribers on the operator dashboard (issue 19), across real processes.

A runtime in a child process (``presence_agent``) holds live stream subscriptions on two
sessions and publishes its presence to Postgres; a dashboard in this process, on storage
alone (as ``asyncstore dashboard`` runs), shows those counts. SIGKILLed, the child never
withdraws: its counts disappear once its row's TTL passed on the database's clock (and the
maintenance purge then deletes the row). Closed cleanly, it withdraws its row at once.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from asyncstore.orchestrator.config import DashboardSettings
from asyncstore.orchestrator.dashboard import Dashboard
from asyncstore.storage import open_storage
from tests.conftest import truncate
from tests.faults.procs import spawn_agent
from tests.waiting import wait_for

pytestmark = pytest.mark.postgres

SUBSCRIBERS = {"chat-a": 2, "chat-b": 1}


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    await truncate(postgres_dsn)
    return postgres_dsn


def _shown(state: dict[str, Any]) -> dict[str, int]:
    return {s["session_id"]: s["subscribers"] for s in state["sessions"]}


async def _stored_expired(dsn: str, instance: str) -> bool | None:
    """Whether the instance's stored row has expired (None: no row), read past the API."""
    conn = await asyncpg.connect(dsn)
    try:
        sql = "SELECT expires_at <= now() FROM instance_presence WHERE instance_id = $1"
        expired: bool | None = await conn.fetchval(sql, instance)
        return expired
    finally:
        await conn.close()


async def test_a_killed_instances_subscribers_leave_the_dashboard_after_the_ttl(
    dsn: str,
) -> None:
    instance = f"web-{uuid.uuid4().hex[:8]}"
    options = {"instance_id": instance, "interval_s": 0.2, "subscribers": SUBSCRIBERS}
    async with open_storage(dsn) as storage:
        dashboard = Dashboard(storage, DashboardSettings(refresh_interval_s=0.05))
        async with spawn_agent(
            "presence", dsn, module="tests.integration.presence_agent", **options
        ) as agent:
            state: dict[str, Any] = {}

            async def counts_shown() -> bool:
                nonlocal state
                state = await dashboard.snapshot(fresh=True)
                return _shown(state) == SUBSCRIBERS

            await wait_for(counts_shown, what="the child's subscribers on the dashboard")
            assert state["subscribers_known"] is True and state["subscribers_note"] is None
            (shown,) = state["subscriber_instances"]
            assert (shown["instance_id"], shown["pid"]) == (instance, agent.pid)
            assert (shown["sessions"], shown["subscribers"]) == (2, 3)

            agent.kill()
            await agent.process.wait()

            async def counts_gone() -> bool:
                nonlocal state
                state = await dashboard.snapshot(fresh=True)
                return state["subscribers_known"] is False

            await wait_for(counts_gone, what="the killed child's counts expired")
        assert _shown(state) == {} and state["subscriber_instances"] == []
        assert "no live instance publishes" in state["subscribers_note"]
        # Gone by expiry on the database's clock, not withdrawn: the row is still stored,
        # expired, until the maintenance purge deletes it.
        assert await _stored_expired(dsn, instance) is True
        assert await storage.purge_presence() == 1
        assert await _stored_expired(dsn, instance) is None


async def test_a_clean_close_withdraws_the_instances_subscribers_at_once(dsn: str) -> None:
    instance = f"web-{uuid.uuid4().hex[:8]}"
    # A long interval (TTL 3 minutes): only the withdrawal can remove the row in this test.
    options = {"instance_id": instance, "interval_s": 60.0, "subscribers": SUBSCRIBERS}
    async with open_storage(dsn) as storage:
        dashboard = Dashboard(storage, DashboardSettings(refresh_interval_s=0.05))
        async with spawn_agent(
            "presence", dsn, module="tests.integration.presence_agent", **options
        ) as agent:

            async def counts_shown() -> bool:
                state = await dashboard.snapshot(fresh=True)
                return _shown(state) == SUBSCRIBERS

            await wait_for(counts_shown, what="the child's subscribers on the dashboard")
            closed = await agent.close()
        assert closed["withdrawn"] is True and closed["failures"] == 0
        state = await dashboard.snapshot(fresh=True)
        assert state["subscribers_known"] is False and _shown(state) == {}
        assert await storage.list_presence() == []
