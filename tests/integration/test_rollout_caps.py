"""The global cap ``lock.max_running`` holds under a partial rollout of the lock flag.

Sessions on the legacy path (``db_poll``) and on the optimized path (``two_level``) run side
by side; however they mix, in one process or over two processes sharing Postgres, no more
than ``max_running`` sessions may run at once. Watched continuously: a sampler reads the
database's live leases and slots in a tight loop, and each process reports when its turns
enter and leave (intervals inside the real lease, so an overlap seen is a real one).
"""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg

from asyncstore.orchestrator.config import in_rollout, load_settings
from asyncstore.orchestrator.runtime import open_runtime
from tests.faults.procs import spawn_agent

CAP = 5
SESSIONS = 40


class _Sampler:
    """Reads live leases (of the test's sessions) and live slots (of its pool) in a loop."""

    def __init__(self, dsn: str, prefix: str, pool: str) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.pool = pool
        self.samples = 0
        self.max_leases = 0
        self.max_slots = 0

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while True:
                # One statement, one snapshot: both counts are of the same instant.
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM session_leases"
                    "        WHERE session_id LIKE $1 AND expires_at > now()) AS leases,"
                    "       (SELECT count(*) FROM lease_slots"
                    "        WHERE pool = $2 AND expires_at > now()) AS slots",
                    self.prefix + "%",
                    self.pool,
                )
                assert row is not None
                self.samples += 1
                self.max_leases = max(self.max_leases, row["leases"])
                self.max_slots = max(self.max_slots, row["slots"])
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()


def _peak_overlap(messages: list[dict[str, Any]]) -> int:
    """The most turns inside their lease at once, from every process's enter/exit reports."""
    edges: list[tuple[float, int]] = []
    for message in messages:
        if message.get("event") == "enter":
            edges.append((message["t"], 1))
        elif message.get("event") == "exit":
            edges.append((message["t"], -1))
    # At equal times an exit sorts first: the printed intervals lie inside the real ones.
    edges.sort()
    peak = running = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def test_half_rollout_never_runs_more_than_the_cap_over_two_processes(
    postgres_dsn: str,
) -> None:
    tag = secrets.token_hex(4)
    prefix = f"cap-{tag}-"
    pool = f"cap-{tag}"
    sessions = [f"{prefix}{i}" for i in range(SESSIONS)]
    legacy = [s for s in sessions if not in_rollout("lock", s, 50.0)]
    assert 0 < len(legacy) < SESSIONS  # the rollout really mixes the two paths
    common = {"max_running": CAP, "slot_pool": pool}
    sampler = _Sampler(postgres_dsn, prefix, pool)
    async with (
        # One starts with the share in its settings, the other gets it as a live change.
        spawn_agent("a", postgres_dsn, module="tests.integration.cap_agent", lock="50%",
                    **common) as a,
        spawn_agent("b", postgres_dsn, module="tests.integration.cap_agent",
                    lock="two_level", live_lock="50%", **common) as b,
    ):  # fmt: skip
        assert a.messages[0]["lock"] == b.messages[0]["lock"] == "50%"
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            with anyio.fail_after(240):
                ids = [await agent.send("run", sessions=sessions, hold_s=0.05) for agent in (a, b)]
                results = [await agent.answer(i, 240) for agent, i in zip((a, b), ids, strict=True)]
            tg.cancel_scope.cancel()
        await a.close()
        await b.close()
    for result in results:
        assert "error" not in result, result
        assert sorted(result["ran"]) == sorted(sessions)  # every session eventually ran
        assert result["acquires"]["legacy"] == len(legacy)
        assert result["acquires"]["optimized"] == SESSIONS - len(legacy)
        assert result["local_peak"] <= CAP
    assert sampler.samples > 0
    assert sampler.max_leases <= CAP, f"{sampler.max_leases} sessions held leases at once"
    assert sampler.max_slots <= CAP
    peak = _peak_overlap(a.messages + b.messages)
    assert peak <= CAP, f"{peak} turns ran at once over the two processes (cap {CAP})"


async def test_half_rollout_never_runs_more_than_the_cap_in_one_process(storage_url: str) -> None:
    settings = load_settings(
        storage={"url": storage_url},
        flags={"lock": "50%"},
        lock={"max_running": CAP, "poll_interval_s": 0.02, "backoff_max_s": 0.5},
        runtime={"reload_on_sighup": False},
        maintenance={"enabled": False},
    )
    sessions = [f"one-{i}" for i in range(SESSIONS)]
    running: set[str] = set()
    ran: list[str] = []
    peak = leases_peak = samples = 0
    paths: dict[str, bool] = {}
    async with open_runtime(settings) as rt:

        async def one(session: str) -> None:
            nonlocal peak
            async with rt.turn(session) as turn:
                running.add(session)
                peak = max(peak, len(running))
                paths[session] = turn.paths["lock"]
                await anyio.sleep(0.02)  # the turn's work
                running.discard(session)
                ran.append(session)

        async def sample() -> None:
            nonlocal leases_peak, samples
            while True:
                leases_peak = max(leases_peak, await rt.storage.count_leases())
                samples += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            with anyio.fail_after(240):
                async with anyio.create_task_group() as turns:
                    for session in sessions:
                        turns.start_soon(one, session)
            tg.cancel_scope.cancel()
    assert sorted(ran) == sorted(sessions)
    assert 0 < sum(not optimized for optimized in paths.values()) < SESSIONS
    assert samples > 0
    assert peak <= CAP, f"{peak} turns ran at once (cap {CAP})"
    assert leases_peak <= CAP, f"{leases_peak} live leases at once (cap {CAP})"
