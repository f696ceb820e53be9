"""The metrics endpoint of a process with no web server: prometheus-client's own WSGI app.

``serve_metrics`` / ``open_metrics_server`` serve a ``Metrics`` registry with
``prometheus_client.make_wsgi_app`` (content negotiation, OpenMetrics, gzip, ``OPTIONS``,
``name[]`` filters, which reach the collectors that describe themselves: the direct
histograms and process families, not the sources' families) on the standard library's
threading WSGI server, in threads of their own. An application that runs an ASGI server
mounts ``Metrics.asgi_app()`` instead.

Why WSGI in a thread rather than the ASGI app: the core install has no ASGI server (uvicorn
is in the ``asgi`` extra) and ``asyncstore serve-metrics`` must work without one. The
sources' ``statistics()`` read state the event loop mutates, so a scrape's *collection*
is handed to the loop (``anyio.from_thread.run_sync`` with the loop's token): a snapshot
never sees a dict change size mid-copy. Encoding, compression and socket I/O stay on the
server's threads, off the loop. This module adds only what prometheus-client's app leaves
out: 404 outside ``/metrics`` and ``/``, ``HEAD`` as a bodiless ``GET``, a per-connection
timeout, and a stop that answers the scrapes in flight but not idle connections.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskStatus
from prometheus_client import make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from asyncstore.orchestrator.metrics import Metrics

__all__ = ["MetricsServer", "open_metrics_server", "serve_metrics"]

log = logging.getLogger(__name__)

_PATHS = ("/metrics", "/")
_REQUEST_TIMEOUT_S = 10.0
# How often the accept loop checks for a stop: the bound on how long stopping waits for it.
_POLL_INTERVAL_S = 0.1
SCRAPE_THREAD_NAME = "asyncstore-metrics-scrape"


@dataclass(frozen=True, slots=True)
class MetricsServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


class _CollectOnLoop(Collector):
    """A registry as prometheus-client's app sees it: ``collect()`` runs on the event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        token: anyio.lowlevel.EventLoopToken,
        names: Iterable[str] | None = None,
    ) -> None:
        self._registry = registry
        self._token = token
        self._view: Collector = registry if names is None else registry.restricted_registry(names)

    def collect(self) -> Iterator[Metric]:
        return iter(anyio.from_thread.run_sync(_collect_all, self._view, token=self._token))

    def restricted_registry(self, names: Iterable[str]) -> _CollectOnLoop:
        """For ``?name[]=...`` scrapes (prometheus-client calls it on the registry it got)."""
        return _CollectOnLoop(self._registry, self._token, names)


def _collect_all(registry: Collector) -> list[Metric]:
    return list(registry.collect())


def _routed(app: WSGIApplication) -> WSGIApplication:
    """prometheus-client's app answers every path and refuses HEAD; narrow and complete it."""

    def route(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") not in _PATHS:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"404 Not Found\n"]
        if environ["REQUEST_METHOD"] != "HEAD":
            return app(environ, start_response)
        answered: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answered.append((status, headers))
            return lambda data: None

        body = b"".join(app({**environ, "REQUEST_METHOD": "GET"}, keep))
        status, headers = answered[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return []

    return route


class _Handler(WSGIRequestHandler):
    """One connection: a socket timeout bounds a stalled client; scrapes are not logged."""

    timeout = _REQUEST_TIMEOUT_S

    def setup(self) -> None:
        threading.current_thread().name = SCRAPE_THREAD_NAME
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection; ``server_close`` joins them, so a stop drains the scrapes."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def stop_reading(self) -> None:
        """End the waits for requests that have not arrived (a request already received is
        still read and answered): a stop does not wait out an idle or stalled client."""
        with self._open_lock:
            for connection in self._open:
                with contextlib.suppress(OSError):  # the client already closed it
                    connection.shutdown(socket.SHUT_RD)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stalled past the timeout or went away: nothing to answer.
        log.debug("metrics: a scrape from %s failed", client_address, exc_info=True)


def _bind(host: str, port: int, app: WSGIApplication) -> _Server:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    server_class = type("_BoundServer", (_Server,), {"address_family": family[0][0]})
    server: _Server = server_class((host, port), _Handler)
    server.set_app(app)
    return server


def _stop(server: _Server, accepting: threading.Thread) -> None:
    server.shutdown()  # returns once the accept loop has ended
    accepting.join()
    server.stop_reading()
    server.server_close()  # closes the listener, then joins the scrapes in flight


async def serve_metrics(
    metrics: Metrics,
    host: str | None = None,
    port: int | None = None,
    *,
    task_status: TaskStatus[MetricsServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET``/``HEAD /metrics`` with prometheus-client's WSGI app until cancelled.

    ``port=0`` picks a free port; ``task_status`` reports the bound ``MetricsServer``.
    Cancelling stops accepting connections, ends the connections whose request has not
    arrived, waits for the scrapes in flight (their collection still runs on this loop; a
    client that stops reading is bounded by a 10 s socket timeout) and closes the listener;
    the stop is shielded so the listener is never left open.
    """
    cfg = metrics.config
    bind_host = cfg.host if host is None else host
    app = _routed(make_wsgi_app(_CollectOnLoop(metrics.registry, anyio.lowlevel.current_token())))
    with anyio.CancelScope(shield=True):  # a bound listener must reach the stop below
        server = await anyio.to_thread.run_sync(
            _bind, bind_host, cfg.port if port is None else port, app
        )
    accepting = threading.Thread(
        target=server.serve_forever, args=(_POLL_INTERVAL_S,), name="asyncstore-metrics"
    )
    accepting.start()
    try:
        bound = MetricsServer(bind_host, server.server_port)
        log.info("serving metrics at %s", bound.url)
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        # Shielded: the scrapes in flight need this loop to collect while the stop waits.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_stop, server, accepting)


@asynccontextmanager
async def open_metrics_server(
    metrics: Metrics, host: str | None = None, port: int | None = None
) -> AsyncIterator[MetricsServer]:
    """``serve_metrics`` for the duration of the block; yields the bound address.

    Leaving (or cancelling) the block stops the server as ``serve_metrics`` describes.
    """
    async with anyio.create_task_group() as tg:
        server: MetricsServer = await tg.start(serve_metrics, metrics, host, port)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()
