"""Metric families declared by the components, on both drivers: the same exported names as
before the move, every declared family present from the first scrape of a fresh runtime's
``/metrics`` (over HTTP, the SSE/WebSocket endpoints included), endpoint counters moving
with real requests, and the slow-query counter with a real blocked statement."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Mount, Route

from asyncstore.orchestrator.asgi import EventStreams, StreamingServer
from asyncstore.orchestrator.runtime import Runtime
from asyncstore.storage import StorageSettings, open_storage
from tests.unit.metrics_inventory import inventory, open_full_runtime
from tests.waiting import wait_for

MAIN_INVENTORY = Path(__file__).parent.parent / "unit" / "metrics_families_main.json"

# Families added since main's inventory was taken (issue 15 item 5). Any other difference
# from main (a family gone, renamed, retyped, re-documented, or a series gone) fails.
NEW_FAMILIES = {
    "asyncstore_auth_limiter_evicted",
    "asyncstore_auth_limiter_in_flight",
    "asyncstore_auth_logins_allowed",
    "asyncstore_queue_cancel_notifications",
    "asyncstore_queue_held_back",
    "asyncstore_storage_query_duration_seconds",
    "asyncstore_storage_slow_queries",
    "asyncstore_storage_slow_query_threshold_seconds",
    "asyncstore_stream_events_dropped",
    "asyncstore_stream_events_refused",
    "asyncstore_turn_duration_seconds",
    "asyncstore_turns",
    "asyncstore_turns_active",
    "asyncstore_webhook_events_dropped",
    "asyncstore_webhook_events_not_persisted",
    "asyncstore_webhook_events_spilled",
    # The maintenance sweeper's own families (issue 18: declared next to its statistics).
    "asyncstore_maintenance_rounds",
    "asyncstore_maintenance_sweeps",
    "asyncstore_maintenance_leading",
    "asyncstore_maintenance_purged_rows",
    "asyncstore_maintenance_stream_batches",
    "asyncstore_maintenance_lease_sweeps",
    "asyncstore_maintenance_partitions",
    "asyncstore_maintenance_evictor_runs",
    "asyncstore_maintenance_evicted",
    "asyncstore_maintenance_errors",
    "asyncstore_maintenance_last_sweep_duration_seconds",
    # The runtime's heap trim (issue 16).
    "asyncstore_heap_trims",
    "asyncstore_heap_trims_released",
    "asyncstore_heap_trim_last_seconds",
    # The runtime's presence publisher (issue 19: fleet-wide subscribers on the dashboard).
    "asyncstore_presence_publishes",
    "asyncstore_presence_failures",
    "asyncstore_presence_sessions",
    "asyncstore_presence_subscribers",
    "asyncstore_presence_sessions_left_out",
}


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def test_exported_families_are_mains_plus_the_new_ones(storage_url: str) -> None:
    before = json.loads(MAIN_INVENTORY.read_text())[_dialect(storage_url)]
    after = await inventory(storage_url)
    assert set(after) - set(before) == NEW_FAMILIES
    assert set(before) - set(after) == set()
    for name, family in before.items():
        now = after[name]
        assert (now["type"], now["help"]) == (family["type"], family["help"]), name
        assert set(family["series"]) <= set(now["series"]), name


class _QuietServer(StreamingServer):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test process keeps its own signal handlers


def _only(session_id: str) -> Callable[[HTTPConnection, str], bool]:
    def authorize(conn: HTTPConnection, sid: str) -> bool:
        return sid == session_id

    return authorize


@contextlib.asynccontextmanager
async def _served(url: str) -> AsyncIterator[tuple[Runtime, EventStreams, httpx.AsyncClient]]:
    """A full runtime with its endpoints and its /metrics behind uvicorn on 127.0.0.1."""
    async with open_full_runtime(url) as rt:
        streams = EventStreams.for_runtime(rt, authorize=_only("allowed"))
        rt.metrics.add_source("endpoints", streams)
        app = Starlette(
            routes=[
                Route("/s/{session_id}/events", streams.sse),
                Mount("/metrics", rt.metrics_app()),
            ]
        )
        server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off"), streams)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            await wait_for(lambda: server.started, what="uvicorn started")  # only a flag
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                yield rt, streams, c
            server.should_exit = True


Samples = dict[str, list[tuple[dict[str, str], float]]]


async def _scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics/")
    assert response.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out.setdefault(family.name, []).append((s.labels, s.value))
    return out


def _value(samples: Samples, family: str, **labels: str) -> float:
    found = [v for lbl, v in samples.get(family, []) if labels.items() <= lbl.items()]
    assert len(found) == 1, (family, labels, found)
    return found[0]


async def test_every_declared_family_is_exported_from_the_first_scrape(storage_url: str) -> None:
    async with _served(storage_url) as (rt, _streams, client):
        first = await _scrape(client)
        declared = rt.metrics.families()
    ns = rt.metrics.config.namespace
    missing = []
    for source, families in declared.items():
        for family in families:
            if family.where and not (
                _dialect(storage_url) == "postgres" and family.where == "Postgres (a pool)"
            ):
                continue  # exported only where it applies (documented in ``where``)
            name = f"{ns}_{family.name}"
            series = [
                lbl for lbl, _ in first.get(name, []) if source == "" or lbl.get("source") == source
            ]
            if not series:
                missing.append((source, family.name))
            for known in family.known:
                key = family.labels[-1]
                if not any(lbl.get(key) == known for lbl in series):
                    missing.append((source, family.name, known))
    assert missing == []
    # The endpoints' and the limiter's counters exist at zero before anything happened.
    for family, labels in (
        ("endpoint_streams_refused", {}),
        ("endpoint_streams_ended", {"reason": "stalled"}),
        ("endpoint_open_streams", {"transport": "websocket"}),
        ("auth_limiter_in_flight", {}),
        ("stream_events_dropped", {"reason": "overflow_newest", "source": "streams"}),
    ):
        assert _value(first, f"{ns}_{family}", **labels) == 0, family


def _endpoint(samples: Samples, family: str, **labels: str) -> float:
    return _value(samples, f"asyncstore_endpoint_{family}", source="endpoints", **labels)


async def test_endpoint_counters_move_with_real_requests(storage_url: str) -> None:
    async with _served(storage_url) as (_rt, streams, client):
        refused = await client.get("/s/denied/events")
        assert refused.status_code == 403
        async with client.stream("GET", "/s/allowed/events") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event: ready"):
                    break
            during = await _scrape(client)
        await wait_for(lambda: streams.statistics().ended_by_client >= 1, what="stream ended")
        after = await _scrape(client)
    assert _endpoint(during, "streams_refused") == 1
    assert _endpoint(during, "streams_accepted") == 1
    assert _endpoint(during, "open_streams", transport="sse") == 1
    assert _endpoint(after, "open_streams", transport="sse") == 0
    assert _endpoint(after, "streams_ended", reason="client") == 1
    assert _endpoint(after, "streams_ended", reason="shutdown") == 0


async def test_turns_are_counted_by_outcome_with_their_durations(storage_url: str) -> None:
    async with open_full_runtime(storage_url) as rt:
        async with rt.turn("done") as turn:
            await turn.emit("turn_completed", {})
        with pytest.raises(RuntimeError, match="boom"):
            async with rt.turn("broken"):
                raise RuntimeError("boom")
        async with rt.turn("stopped"):
            await rt.request_cancel("stopped", "timeout")
            with anyio.fail_after(10):
                await anyio.sleep_forever()
        text = rt.metrics.render()[0].decode()
    for outcome, n in (("completed", 1), ("failed", 1), ("cancelled", 1), ("abandoned", 0)):
        line = f'asyncstore_turns_total{{outcome="{outcome}",source="turns"}} {n}.0'
        assert line in text, line
    assert 'asyncstore_turn_duration_seconds_count{source="turns"} 3.0' in text
    assert 'asyncstore_turns_active{source="turns"} 0.0' in text


# -- slow queries ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _holding_cancel_requests(url: str) -> AsyncIterator[None]:
    """Another connection holds a lock a cancel request must wait for, within the block."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the database's write lock
            yield
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    import asyncpg

    pg = await asyncpg.connect(url)
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE cancel_requests IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()


async def _blocked_call_duration(url: str, threshold_s: float) -> tuple[dict[str, int], float]:
    """Make ``request_cancel`` wait behind another connection's lock for longer than
    ``threshold_s`` (it cannot finish before the lock goes); return the slow counts."""
    settings = StorageSettings(url=url, slow_query_threshold_s=threshold_s)
    async with open_storage(settings) as storage:
        await storage.get_cancel("warm")  # connections open, not under the lock
        done = anyio.Event()
        async with anyio.create_task_group() as tg, _holding_cancel_requests(url):

            async def call() -> None:
                await storage.request_cancel("slow", "test")
                done.set()

            started = time.perf_counter()
            tg.start_soon(call)
            # Held until the call has waited past the threshold: a bound, not a guess.
            with anyio.fail_after(30):
                while time.perf_counter() - started < 0.3:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            assert not done.is_set()  # the lock really held it
        stats = storage.statistics()
    counts, total = stats.durations["request_cancel"]
    assert sum(counts) == 1 and total >= 0.3
    return dict(stats.slow_queries), stats.slow_query_threshold_s


async def test_a_storage_call_blocked_past_the_threshold_counts_as_slow(storage_url: str) -> None:
    slow, threshold = await _blocked_call_duration(storage_url, 0.2)
    assert threshold == 0.2
    assert slow.get("request_cancel") == 1
    # The same blocked call under a threshold it does not reach is not slow.
    slow, _ = await _blocked_call_duration(storage_url, 120.0)
    assert slow == {}


async def test_slow_queries_are_exported_per_operation_at_zero_first(storage_url: str) -> None:
    from asyncstore.orchestrator.metrics import Metrics, MetricsConfig

    settings = StorageSettings(url=storage_url, slow_query_threshold_s=60.0)
    async with open_storage(settings) as storage:
        metrics = Metrics(MetricsConfig(process_metrics=False))
        metrics.add_source("storage", storage)
        await storage.get_cancel("s")
        text = metrics.render()[0].decode()
    dialect = storage.dialect
    zero = (
        f'asyncstore_storage_slow_queries_total{{dialect="{dialect}",operation="get_cancel",'
        'source="storage"} 0.0'
    )
    assert zero in text
    assert "asyncstore_storage_slow_query_threshold_seconds" in text
    count = (
        f'asyncstore_storage_query_duration_seconds_count{{dialect="{dialect}",'
        'operation="get_cancel",source="storage"} 1.0'
    )
    assert count in text


@pytest.mark.parametrize("value", [0, -1])
def test_the_slow_query_threshold_must_be_positive(value: float) -> None:
    with pytest.raises(ValueError, match="slow_query_threshold_s"):
        StorageSettings(slow_query_threshold_s=value)
