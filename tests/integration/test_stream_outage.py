"""The stream writer rides out a storage outage with its default retry budget.

The outage is real: another connection holds SQLite's write lock (``BEGIN EXCLUSIVE``), so
every append fails with "database is locked" (``StorageUnavailable``) until it commits.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
from pydantic import SecretStr

from asyncstore.orchestrator.streams import StreamConfig, StreamEventWriter
from asyncstore.storage import StorageSettings, open_storage
from tests.waiting import wait_for


async def test_stream_writer_rides_out_an_outage_past_the_old_retry_limit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outage.db"
    settings = StorageSettings(url=SecretStr(f"sqlite:///{path}"), sqlite_busy_timeout_s=0.01)
    # Only the backoff is shortened (the test need not wait seconds per attempt); the retry
    # budget and limits are the stream writer's defaults.
    config = StreamConfig(batch={"retry_base_s": 0.002, "retry_max_s": 0.01})
    assert config.batch.retry_budget_s == StreamConfig().batch.retry_budget_s
    assert config.batch.max_retries is None
    async with open_storage(settings, migrate=True) as store:
        async with StreamEventWriter(store, None, config) as writer:
            await writer.begin("s1", epoch=1)
            locker = sqlite3.connect(path, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                for i in range(20):
                    assert writer.emit_nowait("s1", "delta", i) is not None

                def failed_25_times() -> bool:
                    s = writer.statistics().writer
                    return s is not None and s.consecutive_failures >= 25

                # The old default gave up (and lost the batch) after 6 attempts.
                await wait_for(failed_25_times, what="25 failed attempts in a row")
                assert writer.emit_nowait("s1", "turn_completed", {"ok": True}) is not None
                during = writer.statistics()
                health = writer.health()
            finally:
                locker.execute("COMMIT")
                locker.close()
            with anyio.fail_after(20):
                await writer.flush()
            after = writer.statistics()
        events = await store.load_stream_events("s1")
    assert not health.ok and health.reason.startswith("storage unavailable for ")
    assert "21 items buffered" in health.reason
    assert during.writer is not None and during.writer.sink_unavailable
    assert "locked" in during.writer.last_error and during.persisted == 0
    assert after.lost == 0 and after.persisted == 21
    assert after.writer is not None and after.writer.dead_lettered == 0
    assert not after.writer.sink_unavailable and writer.health().ok is False  # closed
    assert [e.seq for e in events] == list(range(1, 22))
    assert events[-1].kind == "turn_completed"
