"""The runtime's presence publisher (issue 19): this instance's live subscribers per session
go to the database at once and every ``runtime.presence_interval_s`` of the runtime's clock
(TTL three intervals), are counted in statistics and metrics, are withdrawn on a clean
close, and nothing is published with the interval at 0. Real SQLite files; time is a
``ManualClock``."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError

from asyncstore.orchestrator.config import Settings, load_settings
from asyncstore.orchestrator.presence import PresencePublisher, fit_counts
from asyncstore.orchestrator.runtime import open_runtime
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import open_storage
from tests.waiting import wait_for


def _settings(url: str, interval_s: float) -> Settings:
    return load_settings(
        storage={"url": url},
        migrate_on_start=True,
        runtime={
            "reload_on_sighup": False,
            "presence_interval_s": interval_s,
            "instance_id": "web-1",
            "shutdown_grace_s": 0.5,
        },
    )


async def test_the_runtime_publishes_its_subscribers_on_its_clock_and_withdraws_on_close(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'presence.db'}"
    clock = ManualClock()
    with anyio.fail_after(60):  # a hang guard; the intervals are the clock's
        async with open_runtime(_settings(url, 5.0), clock=clock) as rt:
            await wait_for(lambda: rt.presence.statistics().publishes == 1, what="first publish")
            (row,) = await rt.storage.list_presence()
            assert (row.instance_id, dict(row.counts)) == ("web-1", {})
            assert (row.expires_at - row.seen_at).total_seconds() == pytest.approx(15.0)
            async with rt.subscribe("chat-1"), rt.subscribe("chat-1"), rt.subscribe("chat-2"):
                clock.advance(5.0)
                await wait_for(lambda: rt.presence.statistics().publishes == 2, what="publish 2")
                (row,) = await rt.storage.list_presence()
                assert dict(row.counts) == {"chat-1": 2, "chat-2": 1}
            stats = rt.presence.statistics()
            assert (stats.sessions, stats.subscribers, stats.failures) == (2, 3, 0)
            text = rt.metrics.render()[0].decode()
            assert 'asyncstore_presence_publishes_total{source="presence"} 2.0' in text
            assert 'asyncstore_presence_failures_total{source="presence"} 0.0' in text
            assert 'asyncstore_presence_subscribers{source="presence"} 3.0' in text
        assert rt.presence.statistics().withdrawn is True
    async with open_storage(url) as storage:
        assert await storage.list_presence() == []


async def test_an_interval_of_zero_publishes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'off.db'}"
    clock = ManualClock()
    with anyio.fail_after(60):
        async with open_runtime(_settings(url, 0.0), clock=clock) as rt, rt.subscribe("chat-1"):
            # Off: the loop returned at once, so no sleeper of it waits on the clock.
            for _ in range(3):
                clock.advance(5.0)
                assert await rt.storage.list_presence() == []
        stats = rt.presence.statistics()
        assert (stats.publishes, stats.failures, stats.withdrawn) == (0, 0, False)


async def test_a_failed_publish_is_counted_and_not_raised(tmp_path: Path) -> None:
    async with open_storage(f"sqlite:///{tmp_path / 'closed.db'}", migrate=True) as storage:
        publisher = PresencePublisher(storage, "web-1", lambda: {"chat-1": 1}, 5.0)
        assert await publisher.publish() is True
    # The storage is closed now: every publish fails (StorageClosed), counted and logged.
    assert await publisher.publish() is False
    stats = publisher.statistics()
    assert (stats.publishes, stats.failures) == (1, 1)
    assert stats.last_error is not None and "closed" in stats.last_error
    assert await publisher.withdraw() is False  # the row expires on its own


def test_fit_counts_keeps_the_busiest_sessions_within_the_caps() -> None:
    counts = {"a": 1, "b": 5, "c": 0, "d": 5, "e": 2}
    assert fit_counts(counts, max_sessions=3) == ({"b": 5, "d": 5, "e": 2}, 1)
    kept, left_out = fit_counts(counts, max_bytes=len(b'{"b":5,"d":5}'))
    assert (kept, left_out) == ({"b": 5, "d": 5}, 2)
    assert fit_counts({}) == ({}, 0)


def test_the_setting_defaults_to_five_seconds_and_refuses_negative() -> None:
    assert load_settings().runtime.presence_interval_s == 5.0
    with pytest.raises(ValidationError):
        load_settings(runtime={"presence_interval_s": -1})
