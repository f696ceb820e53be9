"""The metrics endpoint of a process with no web server: prometheus-client's own WSGI app,
served in threads, with collection handed to the event loop and a stop that drains.

Real HTTP on 127.0.0.1; the tests wait on the responses, never on sleeps."""

from __future__ import annotations

import threading
from functools import partial

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from prometheus_client.parser import text_string_to_metric_families

from asyncstore.orchestrator import metrics as metrics_module
from asyncstore.orchestrator import metrics_http
from asyncstore.orchestrator.auth import AttemptLimiterStatistics, LoginAttemptLimiter
from asyncstore.orchestrator.metrics import Metrics, MetricsConfig
from asyncstore.orchestrator.metrics_http import (
    SCRAPE_THREAD_NAME,
    MetricsServer,
    open_metrics_server,
    serve_metrics,
)


class _Recorder:
    """A source that notes the thread each ``statistics()`` call runs on."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self._limiter = LoginAttemptLimiter()

    def statistics(self) -> AttemptLimiterStatistics:
        self.threads.append(threading.get_ident())
        return self._limiter.statistics()


async def test_prometheus_clients_app_answers_name_filters_and_gzip() -> None:
    """Behaviour of prometheus-client's app that the hand-written server did not have."""
    metrics = Metrics(MetricsConfig(process_metrics=False))
    metrics.add_source("logins", LoginAttemptLimiter())
    metrics.observe_cancellation_latency(0.01)
    async with open_metrics_server(metrics, "127.0.0.1", 0) as server, httpx.AsyncClient() as c:
        # prometheus-client filters by sample name, among the collectors that describe
        # themselves (the direct histograms; the sources' families are collected at scrape).
        sample = "asyncstore_cancellation_latency_seconds_count"
        only = await c.get(server.url, params={"name[]": sample})
        assert only.status_code == 200
        samples = [s for f in text_string_to_metric_families(only.text) for s in f.samples]
        assert [(s.name, s.value) for s in samples] == [(sample, 1.0)]
        raw = await c.get(server.url, headers={"accept-encoding": "gzip"})
        assert raw.headers["content-encoding"] == "gzip"
        assert b"asyncstore_auth_lockouts_total" in raw.content  # httpx un-gzipped it
        options = await c.options(server.url)
        assert options.status_code == 200 and "GET" in options.headers["allow"]


async def test_the_server_reads_statistics_on_the_event_loop_thread() -> None:
    metrics = Metrics(MetricsConfig(process_metrics=False))
    recorder = metrics.track("recorder", _Recorder())
    recorder.threads.clear()
    async with open_metrics_server(metrics, "127.0.0.1", 0) as server, httpx.AsyncClient() as c:
        for _ in range(3):
            assert (await c.get(server.url)).status_code == 200
    assert recorder.threads == [threading.get_ident()] * 3


async def test_stopping_the_server_answers_the_scrape_in_flight_then_refuses() -> None:
    """The stop is requested while a scrape is being collected: that scrape still gets its
    whole answer, no scrape thread outlives the stop, and the port no longer answers."""
    metrics = Metrics(MetricsConfig(process_metrics=False))
    serving = anyio.CancelScope()
    armed = False

    class StopsTheServer(_Recorder):
        def statistics(self) -> AttemptLimiterStatistics:
            if armed:
                serving.cancel()  # runs on the loop, in the middle of the scrape
            return super().statistics()

    metrics.add_source("stopper", StopsTheServer())

    async def serve(*, task_status: TaskStatus[MetricsServer]) -> None:
        with serving:
            await serve_metrics(metrics, "127.0.0.1", 0, task_status=task_status)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            server: MetricsServer = await tg.start(serve)
            armed = True
            response = await anyio.to_thread.run_sync(partial(httpx.get, server.url, timeout=30))
        assert serving.cancel_called
        assert response.status_code == 200
        assert response.text.rstrip().endswith("asyncstore_metrics_collect_errors_total 0.0")
        assert [t for t in threading.enumerate() if t.name == SCRAPE_THREAD_NAME] == []
        with pytest.raises(httpx.ConnectError):
            await anyio.to_thread.run_sync(partial(httpx.get, server.url, timeout=10))


async def test_a_client_that_never_finishes_its_request_holds_up_neither_scrapes_nor_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A socket timeout beyond the bound below: only ending the idle connection's wait lets
    # the server stop in time (without it, the shielded stop overruns and fail_after raises).
    monkeypatch.setattr(metrics_http._Handler, "timeout", 120.0)
    metrics = Metrics(MetricsConfig(process_metrics=False))
    with anyio.fail_after(60):
        async with open_metrics_server(metrics, "127.0.0.1", 0) as server:
            idle = await anyio.connect_tcp("127.0.0.1", server.port)
            await idle.send(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            # Connections are accepted in order: once a later one is answered, the server
            # holds ``idle`` too, waiting for the rest of its request.
            async with httpx.AsyncClient() as c:
                assert (await c.get(server.url)).status_code == 200
        await idle.aclose()
        assert [t for t in threading.enumerate() if t.name == SCRAPE_THREAD_NAME] == []


def test_the_old_import_paths_name_the_moved_objects() -> None:
    from asyncstore.orchestrator import metrics_http, metrics_probes

    assert metrics_module.serve_metrics is metrics_http.serve_metrics
    assert metrics_module.open_metrics_server is metrics_http.open_metrics_server
    assert metrics_module.MetricsServer is metrics_http.MetricsServer
    assert metrics_module.open_loop_lag_monitor is metrics_probes.open_loop_lag_monitor
    assert metrics_module.open_pool_probe is metrics_probes.open_pool_probe
    assert metrics_module.LoopLagMonitor is metrics_probes.LoopLagMonitor
    assert metrics_module.LoopLagStatistics is metrics_probes.LoopLagStatistics
