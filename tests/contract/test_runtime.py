"""The runtime on both drivers: flags switch paths at runtime, reload, cancel, eviction, drain."""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncstore.orchestrator.broadcast import StreamReset
from asyncstore.orchestrator.config import Settings, load_settings
from asyncstore.orchestrator.runtime import Runtime, RuntimeClosed, open_runtime
from asyncstore.orchestrator.timing import ManualClock
from asyncstore.storage import StreamEvent
from tests.waiting import wait_for


def _settings(url: str, **overrides: Any) -> Settings:
    runtime = {"reload_on_sighup": False, **overrides.pop("runtime", {})}
    return load_settings(storage={"url": url}, runtime=runtime, **overrides)


async def _read_until(rt: Runtime, session_id: str, kind: str) -> list[str]:
    kinds: list[str] = []
    async with rt.subscribe(session_id, after=(0, 0)) as sub:
        with anyio.fail_after(10):
            async for item in sub:
                assert not isinstance(item, StreamReset)
                kinds.append(item.kind)
                if item.kind == kind:
                    return kinds
    return kinds


async def test_flags_switch_every_path_at_runtime(
    storage_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_runtime(_settings(storage_url)) as rt:
        async with rt.turn("fast") as turn:
            assert all(turn.paths.values())
            for i in range(5):
                await turn.emit("delta", i)
            await turn.emit("turn_completed", {})
        assert await _read_until(rt, "fast", "turn_completed") == ["delta"] * 5 + ["turn_completed"]
        stats = rt.statistics()
        assert stats.streams["optimized"].persisted == 6
        assert stats.streams["optimized"].insert_statements == 0
        assert stats.streams["optimized"].writer is not None
        assert stats.streams["optimized"].writer.batches <= 2
        assert stats.limiter["optimized"].acquires == 1
        assert stats.broadcast["optimized"].live_db_reads == 0

        with caplog.at_level(logging.WARNING, logger="asyncstore.runtime"):
            rt.update_flags(stream_batching=False, stream_delivery="poll", lock="db_poll")
            rt.update_flags(cancel="poll")
        logged = caplog.text
        assert "flag stream_batching: True -> False (update_flags)" in logged
        assert "flag lock: 'two_level' -> 'db_poll'" in logged
        assert "flag cancel: 'notify' -> 'poll'" in logged
        assert rt.flags_version == 2

        seen: list[str] = []
        got_delta = anyio.Event()

        async def legacy_reader() -> None:
            async with rt.subscribe("legacy", after=(0, 0)) as sub:
                async for item in sub:
                    assert isinstance(item, StreamEvent)
                    seen.append(item.kind)
                    got_delta.set()
                    if item.kind == "turn_completed":
                        return

        async with anyio.create_task_group() as tg, rt.turn("legacy") as turn:
            assert not any(turn.paths.values())
            tg.start_soon(legacy_reader)
            before = rt.statistics().streams["legacy"].insert_statements
            await turn.emit("delta", "x")
            # Legacy write: the emit itself inserted the event, one statement.
            assert rt.statistics().streams["legacy"].insert_statements == before + 1
            assert await rt.storage.last_stream_seq("legacy") == 1
            with anyio.fail_after(5):
                await got_delta.wait()
            await turn.emit("turn_completed", {})
        # Legacy delivery: the live subscriber polled the database for the second event.
        assert seen == ["delta", "turn_completed"]
        stats = rt.statistics()
        assert stats.broadcast["legacy"].db_reads.get("poll", 0) >= 1
        assert stats.limiter["legacy"].acquires == 1
        assert stats.limiter["legacy"].acquire_statements >= 3  # DELETE, COUNT(*), INSERT
        assert stats.turns_by_path["lock"] == {"optimized": 1, "legacy": 1}

        # Cancellation on the legacy path: the poller fires the token.
        async with rt.turn("stop-me") as turn:
            assert not turn.paths["cancel"]
            await rt.request_cancel("stop-me", "stop")
            with anyio.fail_after(5):
                await anyio.sleep_forever()
        assert turn.cancelled and turn.token.reason == "stop"
        assert rt.statistics().cancellation["legacy"].polls >= 1
        assert await rt.storage.get_cancel("stop-me") is None  # cleared for the next turn
    assert rt.report is not None and rt.report.complete


async def test_notify_cancel_interrupts_the_turn_and_tells_subscribers(storage_url: str) -> None:
    async with open_runtime(_settings(storage_url)) as rt:
        async with anyio.create_task_group() as tg, rt.turn("s") as turn:
            tg.start_soon(rt.request_cancel, "s", "user pressed stop")
            await turn.emit("delta", "a")
            with anyio.fail_after(5):
                await anyio.sleep_forever()
        assert turn.token.reason == "user pressed stop"
        assert await _read_until(rt, "s", "cancelled") == ["delta", "cancelled"]
        assert rt.statistics().cancellation["optimized"].polls == 0


async def test_rollout_share_splits_sessions_between_paths(storage_url: str) -> None:
    async with open_runtime(_settings(storage_url, flags={"stream_batching": "50%"})) as rt:
        ids = [f"r{i}" for i in range(40)]
        for sid in ids:
            async with rt.turn(sid) as turn:
                await turn.emit("turn_completed", {})
                assert turn.paths["stream_batching"] == rt.flags.optimized("stream_batching", sid)
        stats = rt.statistics()
        legacy = sum(not rt.flags.optimized("stream_batching", sid) for sid in ids)
        assert 0 < legacy < len(ids)
        assert stats.streams["legacy"].insert_statements == legacy
        assert stats.streams["optimized"].persisted == len(ids) - legacy


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP is POSIX")
async def test_sighup_reloads_flags_from_the_file(
    storage_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "asyncstore.toml"
    base = f'[storage]\nurl = "{storage_url}"\n'
    config.write_text(base + '[flags]\nstream_delivery = "memory"\n')
    previous = signal.getsignal(signal.SIGHUP)
    try:
        async with open_runtime(config_file=config) as rt:
            version = rt.flags_version
            config.write_text(base + '[flags]\nstream_delivery = "10%"\nlock = "db_poll"\n')
            with caplog.at_level(logging.WARNING, logger="asyncstore.runtime"):
                os.kill(os.getpid(), signal.SIGHUP)
                with anyio.fail_after(10):
                    flags = await rt.wait_flags_changed(version)
            assert flags.stream_delivery == 10.0 and flags.lock == 0.0
            assert "flag stream_delivery: 'memory' -> '10%'" in caplog.text
            async with rt.turn("after-reload") as turn:
                assert not turn.paths["lock"]
            # A broken file changes nothing.
            config.write_text(base + '[flags]\nlock = "sometimes"\n')
            assert (await rt.reload()).lock == 0.0
    finally:
        signal.signal(signal.SIGHUP, previous)


async def test_per_session_state_stays_flat_across_many_sessions(storage_url: str) -> None:
    """Full turns leave nothing behind but LRU-capped rings (RSS: benchmarks/runtime_bench)."""
    settings = _settings(storage_url, broadcast={"max_rings": 200})
    sizes: list[int] = []
    async with open_runtime(settings) as rt:

        async def turns(worker: int, count: int, start: int) -> None:
            for i in range(start + worker, start + count, 25):
                async with rt.turn(f"t{i}") as turn:
                    await turn.emit("delta", "x")
                    await turn.emit("turn_completed", {})

        for start, count in ((0, 300), (300, 900)):
            async with anyio.create_task_group() as tg:
                for worker in range(25):
                    tg.start_soon(turns, worker, count, start)
            sizes.append(rt.statistics().tracked)
        stats = rt.statistics()
        assert stats.turns_started == 1200
        assert stats.streams["optimized"].sessions == 0
        assert stats.limiter["optimized"].sessions_tracked == 0
        assert stats.cancellation["optimized"].tokens == 0
        assert stats.broadcast["optimized"].rings <= 200
        assert sizes[0] == sizes[1] == 200

        # 100,000 short live sessions (subscribe, publish, leave) on the memory path.
        hub = rt._broadcast.optimized
        now = datetime.now(UTC)
        for i in range(100_000):
            sid = f"live-{i}"
            sub = rt.subscribe(sid)
            hub.publish(StreamEvent(sid, 1, 1, "delta", "x", now), 1, persisted=True)
            await sub.aclose()
            if i == 999:
                sizes.append(rt.statistics().tracked)
        sizes.append(rt.statistics().tracked)
        assert sizes[2] == sizes[3] == 200
        assert rt._broadcast.optimized.statistics().subscribers == 0


async def test_closing_refuses_new_turns_and_cancels_stragglers(storage_url: str) -> None:
    settings = _settings(storage_url, runtime={"shutdown_grace_s": 0.2})
    entered = anyio.Event()
    ended: list[bool] = []

    async def straggler(rt: Runtime) -> None:
        async with rt.turn("slow") as turn:
            entered.set()
            await anyio.sleep_forever()
        ended.append(turn.cancelled)

    async with anyio.create_task_group() as tg:
        async with open_runtime(settings) as rt:
            tg.start_soon(straggler, rt)
            await entered.wait()
        assert ended == [True]
        assert rt.report is not None and rt.report.turns_cancelled == 1
        with pytest.raises(RuntimeClosed):
            async with rt.turn("late"):
                pass
    lease = None
    async with open_runtime(settings) as rt2:
        lease = await rt2.storage.get_lease("slow")
    assert lease is None  # released by the cancelled turn, not left to expire


async def test_the_shutdown_grace_runs_on_the_clock_the_runtime_is_given(storage_url: str) -> None:
    """``open_runtime(clock=...)``: the runtime's own timing (the shutdown grace, the bound
    on a turn's end) reads the injected clock, so an hour of grace is one ``advance``."""
    clock = ManualClock()
    settings = _settings(storage_url, runtime={"shutdown_grace_s": 3600.0})
    entered = anyio.Event()
    ended: list[bool] = []
    still_running_at_close: list[bool] = []

    async def straggler(rt: Runtime) -> None:
        async with rt.turn("slow") as turn:
            entered.set()
            await anyio.sleep_forever()
        ended.append(turn.cancelled)

    async def end_the_grace(rt: Runtime) -> None:
        await wait_for(lambda: rt._closing, what="the runtime to start closing")
        still_running_at_close.append(ended == [])
        clock.advance(3600.0)

    with anyio.fail_after(60):  # a hang guard in real time; the grace is an hour of the clock
        async with anyio.create_task_group() as tg, open_runtime(settings, clock=clock) as rt:
            tg.start_soon(straggler, rt)
            await entered.wait()
            tg.start_soon(end_the_grace, rt)
    assert still_running_at_close == [True]  # closing waited on the clock, not on time
    assert ended == [True]
    assert rt.report is not None


async def test_the_runtime_gives_its_clock_to_its_broadcast_hub(storage_url: str) -> None:
    """The hub the runtime builds reads the runtime's clock: a ring is idle once
    ``ring_idle_ttl_s`` of that clock passed, however little wall time did."""
    clock = ManualClock()
    settings = _settings(storage_url, broadcast={"ring_idle_ttl_s": 60, "sweep_interval_s": 3600})
    async with open_runtime(settings, clock=clock) as rt:
        hub = await rt._broadcast.get(True)
        event = StreamEvent(
            session_id="idle",
            epoch=1,
            seq=1,
            kind="delta",
            payload={},
            created_at=datetime.now(UTC),
        )
        hub.publish(event, persisted=True)
        clock.advance(59)
        rt._evict_idle_rings()
        assert hub.statistics().rings_evicted == 0  # 59 s of the runtime's clock: not idle
        clock.advance(2)
        rt._evict_idle_rings()  # (a maintenance round on the clock may have evicted it first)
        assert hub.statistics().rings_evicted == 1


async def test_metrics_and_maintenance_run_inside_the_runtime(storage_url: str) -> None:
    async with open_runtime(_settings(storage_url)) as rt:
        async with rt.turn("m") as turn:
            await turn.emit("turn_completed", {})
        body, _ = rt.metrics.render()
        text = body.decode()
        assert 'source="streams"' in text and 'source="lock"' in text
        # No session can take a legacy path: no legacy component runs, none is exported.
        assert 'source="lock_db_poll"' not in text
        rt.update_flags(lock="db_poll")
        async with rt.turn("m2"):
            pass
        body, _ = rt.metrics.render()
        assert 'source="lock_db_poll"' in body.decode()
        assert "asyncstore_event_loop_lag_seconds" in text
        assert rt.maintenance.statistics() is not None
        assert 'asyncstore_maintenance_rounds_total{source="maintenance"}' in text
        assert callable(rt.metrics_app())


def test_serve_metrics_command_serves_the_runtime_metrics(storage_url: str) -> None:
    import subprocess
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncstore.orchestrator.cli",
            "serve-metrics",
            "--url",
            storage_url,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split("serving metrics at ")[1].split()[0]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"asyncstore_" in response.read()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


async def test_a_turn_that_gets_its_lease_after_shutdown_began_stops_at_once(
    storage_url: str,
) -> None:
    settings = _settings(storage_url, runtime={"shutdown_grace_s": 0.2})
    holding = anyio.Event()
    ended: list[tuple[str, bool]] = []

    async def turn(rt: Runtime, name: str) -> None:
        async with rt.turn("shared") as t:
            holding.set()
            await anyio.sleep_forever()
        ended.append((name, t.cancelled))

    started = anyio.current_time()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, open_runtime(settings) as rt:
            tg.start_soon(turn, rt, "first")
            await holding.wait()
            tg.start_soon(turn, rt, "waiting")  # queued behind the first for the lease
            await wait_for(
                lambda: sum(s.waiters for s in rt.statistics().limiter.values()) == 1,
                what="the second turn waiting for the lease",
            )
    # The waiting turn got the lease only after shutdown cancelled the first: it must not
    # run its body, so closing does not wait out turn_flush_timeout_s for it.
    assert sorted(ended) == [("first", True), ("waiting", True)]
    assert anyio.current_time() - started < settings.runtime.turn_flush_timeout_s


async def test_a_path_no_session_can_take_is_not_built(storage_url: str) -> None:
    """Share 100%: no legacy component; share 0%: no optimized one (but the memory hub,
    which every writer publishes to); a live change builds the newly needed path."""
    async with open_runtime(_settings(storage_url)) as rt:
        for switch in (rt._streams, rt._broadcast, rt._limiter, rt._cancellation):
            assert switch.optimized is not None and switch.legacy is None, switch.flag
        stats = rt.statistics()
        for per_path in (stats.streams, stats.broadcast, stats.limiter, stats.cancellation):
            assert set(per_path) == {"optimized"}
        # Behaviour unchanged: a turn on the optimized paths, delivered from memory.
        async with rt.turn("only-new") as turn:
            assert all(turn.paths.values())
            await turn.emit("turn_completed", {})
        assert await _read_until(rt, "only-new", "turn_completed") == ["turn_completed"]
        assert rt._limiter.legacy is None and rt._streams.legacy is None

        # A live change to a share: the legacy paths are built (in the background at once,
        # on first use at the latest) and sessions split between the two.
        rt.update_flags(lock="50%", stream_batching="50%", cancel="50%", stream_delivery="50%")
        paths: dict[str, bool] = {}
        for i in range(20):
            async with rt.turn(f"mixed-{i}") as turn:
                paths[f"mixed-{i}"] = turn.paths["lock"]
                await turn.emit("turn_completed", {})
        assert set(paths.values()) == {True, False}
        for switch in (rt._streams, rt._broadcast, rt._limiter, rt._cancellation):
            assert switch.optimized is not None and switch.legacy is not None, switch.flag
        stats = rt.statistics()
        assert stats.limiter["legacy"].acquires == sum(not p for p in paths.values())
        assert stats.limiter["optimized"].acquires == 1 + sum(paths.values())

    settings = _settings(
        storage_url,
        flags={"lock": "db_poll", "stream_batching": False, "cancel": "poll",
               "stream_delivery": "poll"},
    )  # fmt: skip
    async with open_runtime(settings) as rt:
        for switch in (rt._streams, rt._limiter, rt._cancellation):
            assert switch.optimized is None and switch.legacy is not None, switch.flag
        # Every writer publishes to the memory hub, so it runs whatever the flag says.
        assert rt._broadcast.optimized is not None and rt._broadcast.legacy is not None
        async with rt.turn("only-old") as turn:
            assert not any(turn.paths.values())
            await turn.emit("turn_completed", {})
        assert await _read_until(rt, "only-old", "turn_completed") == ["turn_completed"]
        # Delivered by the poll hub: its reads, none by the memory hub.
        assert sum(rt.statistics().broadcast["legacy"].db_reads.values()) >= 1
        assert sum(rt.statistics().broadcast["optimized"].db_reads.values()) == 0
        assert set(rt.statistics().limiter) == {"legacy"}
    assert rt.report is not None and rt.report.complete


@pytest.mark.parametrize("maintenance_enabled", [True, False])
async def test_one_lease_sweeper_for_two_runtimes(
    storage_url: str, maintenance_enabled: bool
) -> None:
    """The limiters sweep no leases themselves: the maintenance leader does, for the fleet,
    and still does (lease-only rounds) when maintenance is disabled."""
    settings = _settings(
        storage_url,
        lock={"sweep_interval_s": 0.05, "sweep_grace_s": 0},
        # A long leader TTL: with the default (three 0.1 s intervals) a loaded machine that
        # held a SQLite leader back past 0.36 s handed the role over once ([1, 6] sweeps).
        maintenance={
            "enabled": maintenance_enabled,
            "interval_s": 0.1,
            "lease_grace_s": 0,
            "leader_ttl_s": 60.0,
        },
    )
    async with open_runtime(settings) as a, open_runtime(settings) as b:
        with anyio.fail_after(60):
            await a.maintenance.wait_rounds(6)
            await b.maintenance.wait_rounds(6)
        counts = [rt.storage.statistics().statements.get("expire_leases", 0) for rt in (a, b)]
        stats = [rt.maintenance.statistics() for rt in (a, b)]
    sweepers = [n for n in counts if n > 0]
    assert len(sweepers) == 1, f"expire_leases statements per runtime: {counts}"
    leader = stats[counts.index(sweepers[0])]
    follower = stats[1 - counts.index(sweepers[0])]
    led = leader.sweeps_run if maintenance_enabled else leader.lease_sweeps
    assert led >= 6 and follower.sweeps_skipped >= 6
    assert follower.sweeps_run == follower.lease_sweeps == 0
    for rt in (a, b):
        for limiter in rt._limiter.built().values():
            assert limiter.statistics().sweeps == 0


async def test_subscribe_right_after_a_live_change_is_served(storage_url: str) -> None:
    """The poll hub starts in the background after the change; until it runs, the memory
    hub (every writer publishes to it) serves ``subscribe``; ``choose`` waits for it."""
    from asyncstore.orchestrator.runtime import ComponentNotBuilt

    async with open_runtime(_settings(storage_url)) as rt:
        rt.update_flags(stream_delivery="poll")
        assert rt._broadcast.legacy is None  # nothing awaited since the change
        with pytest.raises(ComponentNotBuilt):
            rt._broadcast.pick("early")
        sub = rt.subscribe("early", after=(0, 0))  # no error: the memory hub serves it
        async with sub, rt.turn("early") as turn:
            await turn.emit("turn_completed", {})
            with anyio.fail_after(10):
                item = await sub.__anext__()
        assert isinstance(item, StreamEvent) and item.kind == "turn_completed"
        poll_hub = await rt._broadcast.choose("later")
        assert poll_hub is rt._broadcast.legacy is rt._broadcast.pick("later")
