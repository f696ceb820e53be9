"""A maintenance leader process for the rotation fault test (test_rotation_kill.py).

``python -m tests.faults.rotation_leader '{"url": ...}'`` opens the storage and the
maintenance sweeper (rounds only when asked), says ``ready``, runs one round (partition
rotation only: the other purges are off) and reports its statistics, then waits to be
killed or for stdin to close.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from asyncstore.orchestrator.maintenance import MaintenanceConfig, open_maintenance
from asyncstore.storage import open_storage
from tests.faults.agent import out


def config(options: dict[str, Any]) -> MaintenanceConfig:
    """The rotation-only settings both the process and the test's own leader use."""
    return MaintenanceConfig(
        enabled=False,
        stream_ttl_s=options["ttl_s"],
        stream_partition_s=options["partition_s"],
        stream_partitions_ahead=1,
        task_retention_s=None,
        outbox_retention_s=None,
        lease_grace_s=None,
        login_attempts_retention_s=None,
    )


async def main(options: dict[str, Any]) -> None:
    async with (
        open_storage(options["url"]) as storage,
        open_maintenance(storage, config(options)) as sweeper,
    ):
        out({"event": "ready", "pid": os.getpid()})
        led = await sweeper.run_once()
        out({"event": "round", "led": led, "stats": sweeper.statistics()})
        stdin = anyio.wrap_file(sys.stdin)
        async for _ in stdin:
            pass


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
