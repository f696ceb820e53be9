"""Two OS processes on one Postgres database fire concurrent wrong passwords at one account:
in storage mode their verifications together stay within the account's limit."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys

import pytest

ATTACKER = """
import anyio, json, sys
from asyncstore.orchestrator.auth import (AttemptLimiterConfig, LoginAttemptLimiter, LoginLocked,
                               PasswordHasher, PasswordHashingConfig, check_login)
from asyncstore.storage import open_storage

async def main(url, mode, account):
    hasher = PasswordHasher(PasswordHashingConfig(
        time_cost=1, memory_cost=1024, parallelism=1, max_concurrent=2))
    stored = await hasher.hash("secret")
    config = AttemptLimiterConfig(mode=mode, max_failures_per_account=5)
    refused = 0
    async with open_storage(url) as storage:
        limiter = LoginAttemptLimiter(config, storage=storage)

        async def attempt(i):
            nonlocal refused
            try:
                await check_login(hasher, limiter, account=account, address=f"10.1.{i}.1",
                                  stored_hash=stored, password="wrong")
            except LoginLocked:
                refused += 1

        print("ready", flush=True)
        sys.stdin.readline()  # the parent's go: both processes fire together
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(attempt, i)
    stats = hasher.statistics()
    print(json.dumps({"verified": stats.mismatched, "refused": refused}), flush=True)

anyio.run(main, *sys.argv[1:])
"""


def _fire(dsn: str, mode: str, account: str) -> list[dict[str, int]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ATTACKER, dsn, mode, account],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(("mode", "bound"), [("storage", 5), ("memory", 10)])
async def test_two_processes_share_one_login_limit(
    postgres_dsn: str, mode: str, bound: int
) -> None:
    account = f"victim-{secrets.token_hex(4)}"
    results = await asyncio.to_thread(_fire, postgres_dsn, mode, account)
    verified = sum(r["verified"] for r in results)
    # storage: one count for the fleet; memory: each process counts alone (5 each).
    assert verified <= bound, results
    assert all(r["verified"] + r["refused"] == 50 for r in results)
