"""The ``asyncstore`` command: ``migrate``, ``config``, ``doctor``, ``serve-metrics``, ``demo``,
``webhooks log``, ``webhooks resend`` and ``dashboard``.

``doctor`` checks what an instance needs from its database and says in plain words what is
wrong and how to fix it: connectivity, the schema version against the newest migration,
a LISTEN/NOTIFY round trip, pool health and the clock skew between this host and the
database. It exits 1 when a check fails.

The long-running commands (``serve-metrics``, ``demo``, ``dashboard``) stop the same way on
SIGTERM (what systemd and Kubernetes send) as on SIGINT (Ctrl-C): the signal is received on
the event loop, the work stops, and the runtime or storage drains before the process exits.
``serve-metrics`` prints the runtime's drain report and exits 0 when everything was
delivered, 1 otherwise; ``demo`` stopped by a signal exits 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from pydantic import SecretStr, ValidationError

from asyncstore.orchestrator.config import (
    Settings,
    load_settings,
    mask_url,
    masked_dump,
    setting_sources,
)
from asyncstore.storage import (
    AsyncStorageBackend,
    ConfigurationError,
    StorageError,
    StorageSettings,
    check_schema,
    dialect_of,
    open_storage,
)
from asyncstore.storage._partitions import apply_setting as apply_stream_partitioning

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTIFY_TIMEOUT_S = 5.0
MAX_CLOCK_SKEW_S = 1.0
SLOW_POOL_S = 1.0


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "url", None):
        storage = settings.storage.model_copy(update={"url": SecretStr(args.url)})
        settings = settings.model_copy(update={"storage": storage})
    return settings


async def _migrate(storage_settings: StorageSettings) -> int:
    # The schema guard runs after migrating: a database ahead of this code is refused.
    async with open_storage(storage_settings, check_schema_version=False) as storage:
        applied = await storage.migrate()
        version = await check_schema(storage, mask_url(storage_settings.url.get_secret_value()))
        # storage.stream_partitioning: convert a plain stream_events (issue 17).
        await apply_stream_partitioning(storage, storage_settings, migrate=True)
    url = mask_url(storage_settings.url.get_secret_value())
    if applied:
        print(f"{url}: applied migrations {applied}; schema version {version}")
    else:
        print(f"{url}: schema is up to date (version {version})")
    return 0


# -- doctor -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One doctor check: ``ok``, what was found, and the fix when it is not ok."""

    check: str
    ok: bool
    detail: str
    fix: str = ""


def latest_migration(url: str) -> int:
    """The newest migration version this code ships for the URL's dialect."""
    from asyncstore.storage._sql import load_migrations  # the drivers' own list, not a copy of it

    migrations = load_migrations(dialect_of(url))
    return migrations[-1].version if migrations else 0


async def _check_schema(storage: AsyncStorageBackend, url: str) -> Finding:
    version = await storage.schema_version()
    latest = latest_migration(url)
    if version == latest:
        return Finding("schema", True, f"schema version {version} (latest)")
    if version == 0:
        return Finding(
            "schema",
            False,
            f"the database has no asyncstore schema (version 0; this code needs {latest})",
            "run `asyncstore migrate` (or set ASYNCSTORE_MIGRATE_ON_START=true)",
        )
    if version < latest:
        return Finding(
            "schema",
            False,
            f"migrations {version + 1}..{latest} are missing (schema version {version})",
            "run `asyncstore migrate` before starting this version",
        )
    return Finding(
        "schema",
        False,
        f"the database (version {version}) is newer than this code (latest {latest})",
        "upgrade asyncstore on this host to the version that migrated the database",
    )


async def _check_notifications(storage: AsyncStorageBackend) -> Finding:
    channel = f"asyncstore.doctor.{secrets.token_hex(4)}"
    payload = secrets.token_hex(8)
    fix = (
        "LISTEN needs its own session connection: connect directly to Postgres or through "
        "a session-pooling proxy (not PgBouncer transaction mode), and leave a free "
        "connection for it under the role's and database's connection limits"
    )
    try:
        async with storage.listen(channel) as stream:
            started = time.perf_counter()
            await storage.notify(channel, payload)
            with anyio.move_on_after(NOTIFY_TIMEOUT_S):
                async for note in stream:
                    if note.payload == payload:
                        took = (time.perf_counter() - started) * 1000
                        return Finding("notifications", True, f"round trip in {took:.1f} ms")
    except Exception as exc:
        return Finding(
            "notifications", False, f"the notification listener could not start: {exc}", fix
        )
    return Finding(
        "notifications",
        False,
        f"a NOTIFY sent on {channel} did not come back within {NOTIFY_TIMEOUT_S:g} s: "
        "cross-instance wake-ups (locks, cancellation, queue, streams) would fall back to "
        "slow polls",
        fix,
    )


async def _check_pool(storage: AsyncStorageBackend, size: int) -> Finding:
    times: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        started = time.perf_counter()
        try:
            await storage.ping()
        except StorageError as exc:
            errors.append(str(exc))
        times.append(time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for _ in range(size):
            tg.start_soon(one)
    slowest = max(times)
    if errors:
        return Finding(
            "pool",
            False,
            f"{len(errors)} of {size} concurrent queries failed: {errors[0]}",
            "lower storage.pool_max_size below the server's free connections "
            "(max_connections, role/database CONNECTION LIMIT) or raise those limits",
        )
    if slowest > SLOW_POOL_S:
        return Finding(
            "pool",
            False,
            f"{size} concurrent queries took up to {slowest:.2f} s",
            "the database or the network is saturated: check its load and latency",
        )
    return Finding("pool", True, f"{size} concurrent queries, slowest {slowest * 1000:.1f} ms")


async def _check_clock(storage: AsyncStorageBackend) -> Finding:
    # A lease's expiry is computed by the database's clock: compare it with ours.
    session = f"asyncstore-doctor-{secrets.token_hex(6)}"
    ttl = 60.0
    before = time.time()
    lease = await storage.acquire_lease(session, "asyncstore-doctor", ttl)
    after = time.time()
    if lease is None:
        return Finding("clock", False, "could not take a probe lease", "retry the check")
    await storage.release_lease(session, lease.token)
    db_now = lease.expires_at.timestamp() - ttl
    skew = db_now - (before + after) / 2
    uncertainty = (after - before) / 2
    if abs(skew) > MAX_CLOCK_SKEW_S + uncertainty:
        return Finding(
            "clock",
            False,
            f"the database clock is {skew:+.2f} s off this host's "
            f"({datetime.now(UTC).isoformat(timespec='seconds')} here)",
            "run time synchronisation (chrony / systemd-timesyncd / NTP) on both hosts: "
            "lease expiry, TTL purges and retry times depend on agreeing clocks",
        )
    return Finding("clock", True, f"skew {skew * 1000:+.0f} ms (±{uncertainty * 1000:.0f} ms)")


async def run_doctor(settings: Settings, say: Callable[[str], None] = print) -> list[Finding]:
    """Run every check against ``settings.storage`` and print the findings; returns them.

    If cancelled, the storage handle it opened is closed and nothing else happens.
    """
    url = settings.storage.url.get_secret_value()
    findings: list[Finding] = []

    def report(finding: Finding) -> None:
        findings.append(finding)
        say(f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.detail}")
        if finding.fix:
            say(f"     fix: {finding.fix}")

    say(f"asyncstore doctor: {mask_url(url)}")
    async with AsyncExitStack() as stack:
        try:
            with anyio.fail_after(settings.storage.connect_timeout_s + 5):
                # No schema guard here: the schema check below reports it with the others.
                storage = await stack.enter_async_context(
                    open_storage(settings.storage, check_schema_version=False)
                )
                started = time.perf_counter()
                await storage.ping()
        except ConfigurationError as exc:
            report(
                Finding(
                    "connectivity",
                    False,
                    f"the storage URL cannot be used: {exc}",
                    "fix storage.url (ASYNCSTORE_STORAGE__URL): postgresql://user@host:port/db "
                    "or sqlite:///path/to/file.db",
                )
            )
            return findings
        except (StorageError, OSError, TimeoutError) as exc:
            report(
                Finding(
                    "connectivity",
                    False,
                    f"cannot reach the database: {exc}",
                    "check storage.url (ASYNCSTORE_STORAGE__URL), that the server runs and "
                    "accepts connections from this host, and the credentials",
                )
            )
            return findings
        took = (time.perf_counter() - started) * 1000
        report(Finding("connectivity", True, f"{storage.dialect} answered in {took:.1f} ms"))
        checks: list[tuple[str, Callable[[], Awaitable[Finding]]]] = [
            ("schema", lambda: _check_schema(storage, url)),
            ("notifications", lambda: _check_notifications(storage)),
            ("pool", lambda: _check_pool(storage, settings.storage.pool_max_size)),
        ]
        for name, check in checks:
            try:
                report(await check())
            except StorageError as exc:
                report(Finding(name, False, f"the check failed: {exc}", "see the error above"))
        if findings[1].ok:
            try:
                report(await _check_clock(storage))
            except StorageError as exc:
                report(Finding("clock", False, f"the check failed: {exc}", "see the error"))
        else:
            say("skip clock: needs the schema")
    return findings


async def _serve_metrics(settings: Settings, host: str | None, port: int | None) -> int:
    """Serve until SIGTERM or SIGINT, then stop serving and drain the runtime.

    The signal leaves the runtime's block normally, so running turns get the runtime's
    grace period and everything flushes; the report is printed. Exit status 0 when the
    report is complete, 1 when something could not be delivered.
    """
    from asyncstore.orchestrator.metrics_http import serve_metrics
    from asyncstore.orchestrator.runtime import open_runtime

    async with open_runtime(settings) as rt:
        # Listen before announcing: a signal sent as soon as the line is read is handled.
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with anyio.create_task_group() as tg:
                server = await tg.start(serve_metrics, rt.metrics, host, port)
                print(f"serving metrics at {server.url} (SIGTERM or Ctrl-C stops)", flush=True)
                received = await _next_signal(signals)
                tg.cancel_scope.cancel()
        print(f"serve-metrics: {received.name}: draining the runtime", flush=True)
    report = rt.report
    print(f"serve-metrics: drained: {report}", flush=True)
    return 0 if report is not None and report.complete else 1


async def _next_signal(signals: AsyncIterator[int]) -> signal.Signals:
    async for signum in signals:
        return signal.Signals(signum)
    raise RuntimeError("the signal receiver ended")  # it does not: it is infinite


async def _demo(settings: StorageSettings) -> int:
    """The walk-through, stopped (storage closed cleanly) by SIGTERM or SIGINT."""
    from asyncstore.orchestrator.demo import run_demo

    stopped: list[signal.Signals] = []
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                stopped.append(await _next_signal(signals))
                print(f"demo: {stopped[0].name}: stopping", flush=True)
                tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signal)
            await run_demo(settings)
            tg.cancel_scope.cancel()
    return 128 + stopped[0] if stopped else 0


async def _webhooks(settings: Settings, args: argparse.Namespace) -> int:
    from asyncstore.orchestrator.webhooks.admin import (
        ResendRefused,
        delivery_log,
        format_attempt,
        resend,
    )

    async with open_storage(settings.storage) as storage:
        if args.action == "log":
            attempts = await delivery_log(
                storage, endpoint=args.endpoint, failed=args.failed, limit=args.limit
            )
            for attempt in attempts:
                print(format_attempt(attempt))
            if not attempts:
                print("no delivery attempts" + (" not delivered" if args.failed else ""))
            return 0
        try:
            row = await resend(storage, args.id)
        except ResendRefused as exc:
            print(f"asyncstore webhooks resend: {exc}", file=sys.stderr)
            return 1
        print(
            f"{args.id}: queued again as outbox row {row} (same webhook-id and body); the "
            "application's relay delivers it, signed afresh"
        )
        return 0


async def _dashboard(settings: Settings, host: str | None, port: int | None) -> int:
    """Serve the operator dashboard on storage alone until SIGTERM or SIGINT; exit 0."""
    from asyncstore.orchestrator.dashboard_server import serve_dashboard

    async with open_storage(settings.storage) as storage:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with anyio.create_task_group() as tg:
                url = await tg.start(serve_dashboard, storage, settings, host, port)
                mode = "read-only" if settings.dashboard.operator_token is None else "actions on"
                print(f"dashboard at {url} ({mode}; SIGTERM or Ctrl-C stops)", flush=True)
                received = await _next_signal(signals)
                tg.cancel_scope.cancel()
    print(f"dashboard: {received.name}: stopped", flush=True)
    return 0


async def _doctor(settings: Settings) -> int:
    findings = await run_doctor(settings)
    failed = [f.check for f in findings if not f.ok]
    print(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "all checks passed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncstore`` console script."""
    parser = argparse.ArgumentParser(prog="asyncstore", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $ASYNCSTORE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="apply pending schema migrations")
    migrate.add_argument("--url", help="storage URL (default: settings storage.url)")
    sub.add_parser("config", help="print the effective settings with their sources, secrets masked")
    doctor = sub.add_parser("doctor", help="check the database setup; exit 1 on a problem")
    doctor.add_argument("--url", help="storage URL (default: settings storage.url)")
    serve = sub.add_parser(
        "serve-metrics", help="run the runtime and serve its Prometheus metrics on /metrics"
    )
    serve.add_argument("--url", help="storage URL (default: settings storage.url)")
    serve.add_argument("--host", help="bind address (default: settings metrics.host)")
    serve.add_argument("--port", type=int, help="port (default: settings metrics.port)")
    demo = sub.add_parser("demo", help="walk through the storage API end to end")
    demo.add_argument("--url", help="storage URL (default: settings storage.url)")
    hooks = sub.add_parser("webhooks", help="durable webhooks: delivery log and resend")
    hooks_sub = hooks.add_subparsers(dest="action", required=True)
    hooks_log = hooks_sub.add_parser("log", help="delivery attempts, newest first")
    hooks_log.add_argument("--endpoint", help="only this endpoint (the webhook's name)")
    hooks_log.add_argument(
        "--failed", action="store_true", help="only deliveries no attempt delivered"
    )
    hooks_log.add_argument("--limit", type=int, default=100)
    hooks_log.add_argument("--url", help="storage URL (default: settings storage.url)")
    hooks_resend = hooks_sub.add_parser(
        "resend", help="deliver a webhook-id again (same id and body, freshly signed)"
    )
    hooks_resend.add_argument("id", help="the webhook-id (msg_...)")
    hooks_resend.add_argument("--url", help="storage URL (default: settings storage.url)")
    board = sub.add_parser(
        "dashboard",
        help="serve the operator dashboard (actions need dashboard.operator_token, from "
        "ASYNCSTORE_DASHBOARD__OPERATOR_TOKEN or the settings file)",
    )
    board.add_argument("--url", help="storage URL (default: settings storage.url)")
    board.add_argument("--host", help="bind address (default: settings dashboard.host)")
    board.add_argument("--port", type=int, help="port, 0 for any (default: dashboard.port)")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "config":
            dumped = masked_dump(settings, sources=setting_sources(args.config))
            print(json.dumps(dumped, indent=2, sort_keys=True))
            return 0
        if args.command == "migrate":
            return anyio.run(_migrate, settings.storage)
        if args.command == "doctor":
            return anyio.run(_doctor, settings)
        if args.command == "webhooks":
            return anyio.run(_webhooks, settings, args)
        if args.command == "dashboard":
            return anyio.run(_dashboard, settings, args.host, args.port)
        if args.command == "serve-metrics":
            try:
                return anyio.run(_serve_metrics, settings, args.host, args.port)
            except KeyboardInterrupt:
                return 130  # Ctrl-C while the runtime was still opening
        return anyio.run(_demo, settings.storage)
    except (StorageError, ValidationError, FileNotFoundError) as exc:
        print(f"asyncstore {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
