"""Past one primary (issue 17): every unique key and every hot query is per session or per
a named key (queue, group, pool, login key), so the schema can be sharded by ``session_id``.

The unique keys are read from a freshly migrated Postgres database (``pg_index``, which
covers primary keys, unique constraints and unique indexes, partial ones with their
predicate) and must equal the documented list below: a new global unique key fails this
test until it is documented here, with what it would need on a sharded deployment. The
named queries of ``storage/sql/postgres/queries.sql`` must each be classified (hot per
session, hot per another key, or cold: maintenance and metrics), and every hot one must
name its key in its WHERE / ON CONFLICT, so a new query that scans across sessions on the
hot path is noticed too. The README section "Scaling past one primary" explains the list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.storage import StorageSettings, open_storage
from asyncstore.storage._sql import load_queries
from asyncstore.storage.base import render_job_queries

pytestmark = pytest.mark.postgres

Key = tuple[str, tuple[str, ...], str | None]
# (table, unique columns, partial-index predicate or None) -> what the key is scoped by.
SESSION_KEYS: dict[Key, str] = {
    ("chat_sessions", ("session_id",), None): "session",
    ("chat_messages", ("session_id", "seq"), None): "session",
    ("stream_events", ("session_id", "seq"), None): "session",
    ("session_leases", ("session_id",), None): "session",
    ("cancel_requests", ("session_id",), None): "session",
    ("stream_anchors", ("session_id",), None): "session",  # 0009: partitioned layout only
}
# The partitioned stream_events layout (storage.stream_partitioning) replaces the plain
# table's key: its unique key must hold the partition key, the session's anchor time, one
# per session (stream_anchors), so it is as per-session as (session_id, seq).
PARTITIONED_KEYS = {
    **{k: v for k, v in SESSION_KEYS.items() if k[0] != "stream_events"},
    ("stream_events", ("session_id", "seq", "started_at"), None): "session",
}
# Named exceptions: not per session. Each says its scope and what sharding would need.
EXCEPTIONS: dict[tuple[str, tuple[str, ...], str | None], str] = {
    ("agent_tasks", ("id",), None): "identity; rows are reached by queue (claim) then id",
    (
        "agent_tasks",
        ("queue", "idempotency_key"),
        "((idempotency_key IS NOT NULL) AND (status = ANY (ARRAY['queued'::text, "
        "'running'::text])))",
    ): "per queue: distribute agent_tasks by queue, or keep it on one node",
    ("outbox", ("id",), None): "identity; rows are reached by group (claim) then id",
    ("outbox_groups", ("channel", "account"), None): "per delivery group",
    ("lease_slot_pools", ("pool",), None): "per slot pool: a global concurrency cap",
    ("lease_slots", ("pool", "slot"), None): "per slot pool: a global concurrency cap",
    ("webhook_journal", ("id",), None): "identity; per endpoint",
    ("webhook_attempts", ("id",), None): "identity; per endpoint (audit log)",
    ("login_attempts", ("scope", "key"), None): "per login key (auth rate limit)",
    ("task_queues", ("queue",), None): "per task queue: its fleet-wide limits (0010)",
    ("periodic_ticks", ("schedule", "tick_at"), None): "per periodic schedule (one row a "
    "tick); keep it on the node that holds the schedule's queue, the tick's transaction "
    "writes both",
    ("operator_audit", ("id",), None): "identity; the operator audit log (dashboard)",
    ("instance_presence", ("instance_id",), None): "per runtime instance (0015): a few "
    "rows the whole fleet writes, one each; keep it on one node",
    ("schema_migrations", ("version",), None): "global, read and written at migrate only",
}
# Global counters: sequences every node would have to share (or replace).
SEQUENCES = {
    "lease_tokens": "fencing tokens: must only grow per session (a per-shard sequence "
    "would do if a session never moves shard)",
    "claim_tokens": "claim tokens of tasks and outbox messages (compared for equality only)",
    "agent_tasks_id_seq": "identity of agent_tasks",
    "outbox_id_seq": "identity of outbox",
    "webhook_journal_id_seq": "identity of webhook_journal",
    "webhook_attempts_id_seq": "identity of webhook_attempts",
    "operator_audit_id_seq": "identity of operator_audit",
}

_SESSION = r"session_id\s*(=|IN\b)|ON CONFLICT \(session_id\)"
# Hot statements that touch one session (append_stream_events: the sessions of one
# writer's flush, each by its key; on a sharded deployment a multi-session flush is a
# multi-shard statement unless the writer groups its batches by shard).
HOT_SESSION = {
    name: _SESSION
    for name in (
        "append_messages",
        "load_messages",
        "_lock_chat_session",
        "delete_session",
        "append_stream_events",
        "load_stream_events",
        "last_stream_seq",
        "_p_append_stream_events",
        "_p_load_stream_events",
        "_p_last_stream_seq",
        "acquire_lease",
        "renew_lease",
        "release_lease",
        "get_lease",
        "acquire_lease_slot",
        "renew_lease_slot",
        "release_lease_slot",
        "request_cancel",
        "get_cancel",
        "clear_cancel",
    )
}
# Hot statements keyed by something else: the regex their WHERE / ON CONFLICT must match.
_LOGIN_KEY = r"(a\.)?scope = \$1 AND (a\.)?key = \$2"
_BY_ID = r"\bid\s*=\s*(ANY|\$1|c\.id|f\.id)"
HOT_OTHER = {
    "enqueue_tasks": r"ON CONFLICT \(queue, idempotency_key\)",
    "claim_tasks": r"queue = \(\$3::text\[\]\)\[1\]",
    "heartbeat_tasks": _BY_ID,
    "complete_tasks": _BY_ID,
    "fail_tasks": _BY_ID,
    "release_tasks": _BY_ID,
    "dead_letter_tasks": _BY_ID,
    "redrive_tasks": _BY_ID,
    "get_tasks": _BY_ID,
    "cancel_task": _BY_ID,
    "next_task_due": r"queue = \$1",
    # Coordinated task queues (0010): every statement names its one queue.
    "enqueue_grouped_tasks": r"ON CONFLICT \(queue, idempotency_key\)",
    "set_queue_limits": r"ON CONFLICT \(queue\)",
    "get_queue_limits": r"queue = \$1",
    "_lock_task_queue": r"queue = \$1",
    "claim_limited_tasks": r"queue = \$3",
    "wake_task_queue": r"queue = \$1",
    "enqueue_outbox": r"INSERT INTO outbox_groups \(channel, account\)",
    # Scans the open messages of every group (optionally some channels): one node's job.
    "claim_outbox": r"p\.channel = o\.channel AND p\.account = o\.account",
    "heartbeat_outbox": _BY_ID,
    "complete_outbox": _BY_ID,
    "fail_outbox": _BY_ID,
    "release_outbox": _BY_ID,
    "dead_letter_outbox": _BY_ID,
    "redrive_outbox": _BY_ID,
    "get_outbox": _BY_ID,
    "ensure_lease_slots": r"pool",
    "journal_webhook_events": r"endpoint",
    "delete_webhook_events": _BY_ID,
    "claim_webhook_orphans": r"endpoint = ANY",
    "record_webhook_attempts": r"endpoint",
    "reserve_login_attempt": r"ON CONFLICT \(scope, key\)",
    "release_login_attempt": _LOGIN_KEY,
    "succeed_login_attempt": _LOGIN_KEY,
    "fail_login_attempt": _LOGIN_KEY,
    "record_periodic_tick": r"ON CONFLICT \(schedule, tick_at\)",
    "set_periodic_tick_task": r"schedule = \$1 AND tick_at = \$2",
    # A runner's start or leader change: each named schedule's latest tick, by key.
    "last_periodic_ticks": r"p\.schedule = s\.schedule",
    # No table: a notification, the maintenance leadership lock, the health check.
    "notify": r"pg_notify",
    "acquire_leadership": r"pg_try_advisory_lock",
    "release_leadership": r"pg_advisory_unlock",
    "ping": r"SELECT 1",
}
# Cold: maintenance sweeps, metrics and admin reads; they scan across sessions on purpose
# (on a sharded deployment they run on every node).
COLD = {
    "purge_stream_events",
    "purge_stream_events_batch",
    "expire_leases",
    "count_leases",  # legacy limiter only (lock.mode = db_poll): a global COUNT(*)
    "purge_tasks",
    "task_backlog",
    "outbox_backlog",
    "purge_outbox",
    "list_webhook_attempts",
    "purge_webhook_attempts",
    "purge_login_attempts",
    "purge_periodic_ticks",
    # The operator dashboard (0013): its lists and the audit log, never on a hot path.
    "list_tasks",
    "list_outbox",
    "list_queued_tasks",  # per queue, but over the queues named: an admin read
    "list_leases",
    "record_audit",
    "list_audit",
    # Instance presence (0015): one row per runtime instance, written every few seconds
    # by each instance and read by the dashboard; never on a session's hot path.
    "publish_presence",
    "list_presence",
    "withdraw_presence",
    "purge_presence",
    # The partitioned stream_events layout: its purge, catalog reads and rotation steps.
    "_p_purge_stream_events_batch",
    "_stream_layout",
    "_stream_partitions",
    "_partition_stream_events",
    "_default_partition_slots",
    "_move_into_partition",
    "_delete_partition_anchors",
    "_partition_is_live",
}

_UNIQUE_KEYS = """
SELECT c.relname AS table_name,
       array_agg(a.attname::text ORDER BY k.ord) AS columns,
       pg_get_expr(ix.indpred, ix.indrelid) AS predicate
FROM pg_index ix
JOIN pg_class c ON c.oid = ix.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE ix.indisunique AND n.nspname = current_schema() AND NOT c.relispartition
GROUP BY ix.indexrelid, c.relname, ix.indpred, ix.indrelid
"""
_SEQUENCES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname = current_schema()
"""


async def unique_keys(dsn: str) -> set[tuple[str, tuple[str, ...], str | None]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_UNIQUE_KEYS)
    finally:
        await conn.close()
    return {(r["table_name"], tuple(r["columns"]), r["predicate"]) for r in rows}


async def sequences(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0] for r in await conn.fetch(_SEQUENCES)}
    finally:
        await conn.close()


def undocumented(
    found: set[tuple[str, tuple[str, ...], str | None]], session_keys: Iterable[Key] = SESSION_KEYS
) -> list[str]:
    """What differs between the database's unique keys and the documented list (each
    partition's copy of its table's key is the table's key)."""
    documented = set(session_keys) | set(EXCEPTIONS)
    return [f"undocumented unique key {k}" for k in sorted(found - documented, key=str)] + [
        f"documented but missing {k}" for k in sorted(documented - found, key=str)
    ]


@pytest.fixture
async def migrated_url(empty_postgres_url: str) -> str:
    async with open_storage(empty_postgres_url, migrate=True):
        pass
    return empty_postgres_url


async def test_every_unique_key_is_per_session_or_a_documented_exception(
    migrated_url: str,
) -> None:
    assert undocumented(await unique_keys(migrated_url)) == []
    for (_, columns, _), scope in SESSION_KEYS.items():
        assert columns[0] == "session_id", (columns, scope)
    for (table, columns, _), _reason in EXCEPTIONS.items():
        assert "session_id" not in columns, f"{table}{columns} is per session: move it"


async def test_the_partitioned_layout_keeps_every_unique_key_per_session(
    empty_postgres_url: str,
) -> None:
    settings = StorageSettings(url=SecretStr(empty_postgres_url), stream_partitioning=True)
    async with open_storage(settings, migrate=True) as storage:
        assert await storage.create_stream_partitions(86_400, ahead_s=86_400) >= 2
    found = await unique_keys(empty_postgres_url)
    assert undocumented(found, PARTITIONED_KEYS) == []
    assert await sequences(empty_postgres_url) == set(SEQUENCES)


async def test_a_new_global_unique_key_is_reported(migrated_url: str) -> None:
    """The check can fail: a global key (here on the events' kind) is flagged."""
    conn = await asyncpg.connect(migrated_url)
    try:
        await conn.execute("CREATE UNIQUE INDEX scratch_global ON stream_events (kind, seq)")
    finally:
        await conn.close()
    assert undocumented(await unique_keys(migrated_url)) == [
        "undocumented unique key ('stream_events', ('kind', 'seq'), None)"
    ]


async def test_global_counters_are_the_documented_sequences(migrated_url: str) -> None:
    assert await sequences(migrated_url) == set(SEQUENCES)


def test_every_named_query_is_classified_and_hot_ones_name_their_key() -> None:
    # The job templates (<op>_jobs) are classified as the statements they render to, one
    # per kind (<op>_tasks, <op>_outbox), each with its table filled in.
    queries = render_job_queries(load_queries("postgres"))
    classified = set(HOT_SESSION) | set(HOT_OTHER) | COLD
    assert not set(HOT_SESSION) & set(HOT_OTHER) and not (set(HOT_SESSION) | set(HOT_OTHER)) & COLD
    assert sorted(set(queries) - classified) == [], "classify the new query here"
    assert sorted(classified - set(queries)) == [], "a classified query no longer exists"
    for name, key in {**HOT_SESSION, **HOT_OTHER}.items():
        body = "\n".join(
            line for line in queries[name].splitlines() if not line.lstrip().startswith("--")
        )
        assert re.search(key, body), f"{name} does not name its key ({key})"
