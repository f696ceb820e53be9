"""Two OS processes on one database: claims stay exclusive, concurrent migrations are safe."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg

from asyncstore.storage import NewTask, open_storage
from asyncstore.storage._sql import load_migrations

CLAIMER = """
import asyncio, json, sys
from asyncstore.storage import open_storage

async def main(url):
    seen = []
    async with open_storage(url) as s:
        idle = 0
        while idle < 3:
            batch = await s.claim_tasks("q", sys.argv[2], limit=7, lease_s=60)
            if not batch:
                idle += 1
                await asyncio.sleep(0.02)
                continue
            idle = 0
            seen.extend(t.payload for t in batch)
            await s.complete_tasks([t.claim for t in batch])
    print(json.dumps(seen))

asyncio.run(main(sys.argv[1]))
"""

MIGRATOR = """
import asyncio, json, sys
from asyncstore.storage import open_storage

async def main(url):
    # As `asyncstore migrate` does: no schema guard before migrating by hand.
    async with open_storage(url, check_schema_version=False) as s:
        print(json.dumps(await s.migrate()))

asyncio.run(main(sys.argv[1]))
"""


def _run_pair(script: str, *args_per_process: list[str]) -> list[str]:
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
        for args in args_per_process
    ]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outs.append(out)
    return outs


async def test_two_processes_claim_every_task_exactly_once(storage_url: str) -> None:
    async with open_storage(storage_url) as storage:
        for start in range(0, 600, 200):
            await storage.enqueue_tasks([NewTask("q", i) for i in range(start, start + 200)])
    outs = await asyncio.to_thread(_run_pair, CLAIMER, [storage_url, "p1"], [storage_url, "p2"])
    seen = [item for out in outs for item in json.loads(out)]
    assert sorted(seen) == list(range(600))


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def test_two_processes_migrating_at_once_apply_each_version_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    name = f"asyncstore_mig_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pg_url = f"{postgres_dsn.rpartition('/')[0]}/{name}"
    try:
        for url in (f"sqlite:///{tmp_path / 'fresh.db'}", pg_url):
            outs = await asyncio.to_thread(_run_pair, MIGRATOR, [url], [url])
            applied = sorted(v for out in outs for v in json.loads(out))
            async with open_storage(url) as storage:
                version = await storage.schema_version()
            # Every shipped version once (versions may have gaps while branches land).
            shipped = [m.version for m in load_migrations(_dialect(url))]
            assert applied == shipped and version == shipped[-1], url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
