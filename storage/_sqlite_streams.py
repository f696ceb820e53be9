"""SQLite session content: chat messages and stream events, fenced by the session lease.

This module owns ``SqliteStreams``, the part of ``SqliteBackend`` that appends chat
messages (refused if a given lease token is no longer the session's; their outbox rows in
the same write transaction) and stream events (each epoch checked against the session's
lease token, or its head epoch without a lease row: ``_fence_accepts``), and loads and
purges them. A stream-event batch runs its whole write transaction in one call on the
writer's thread and notifies in process once committed. SQLite keeps the plain
``stream_events`` table: its partition hooks answer that there are none.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from asyncstore.storage._sqlite_conn import _HUBS, Q, SqliteConnections, _on_writer_thread, _Tx
from asyncstore.storage.base import (
    ChatMessage,
    NewMessage,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    StreamRow,
)
from asyncstore.storage.errors import ConfigurationError


def _fence_accepts(fence: tuple[int | None, int | None], epoch: int) -> bool:
    """The stream fence: the lease token if the session has a lease row, else the head."""
    token, head_epoch = fence
    if token is not None:
        return epoch == token
    return head_epoch is None or epoch >= head_epoch


class SqliteStreams(SqliteConnections):
    """The chat and stream-event hooks of ``SqliteBackend`` (a base of it)."""

    if TYPE_CHECKING:
        # In SqliteJobs, another base of SqliteBackend: a message appended with outbox
        # rows writes them in the same transaction.
        async def _insert_outbox(
            self, tx: _Tx, rows: list[tuple[str, str, bytes, int]], now: float
        ) -> list[dict[str, Any]]: ...

    # -- chat ------------------------------------------------------------------

    async def _sql_append_messages(
        self,
        session_id: str,
        rows: list[tuple[str, bytes]],
        outbox: list[tuple[str, str, bytes, int]],
        lease_token: int | None,
        messages: Sequence[NewMessage],
    ) -> list[ChatMessage] | None:
        async with self._transaction() as tx:
            now = time.time()
            if lease_token is not None:
                fence = {"session_id": session_id, "token": lease_token, "now": now}
                if not await tx.fetch("_fence", fence):
                    return None
            params = {"session_id": session_id, "n": len(rows), "now": now}
            last = (await tx.fetch("append_messages", params))[0]["last_seq"]
            first = last - len(rows) + 1
            values = [
                (session_id, first + i, role, content.decode(), now)
                for i, (role, content) in enumerate(rows)
            ]
            await tx.execute_many("_insert_message", values)
            if outbox:
                await self._insert_outbox(tx, outbox, now)
        created = datetime.fromtimestamp(now, UTC)
        return [
            ChatMessage(session_id, first + i, m.role, m.content, created)
            for i, m in enumerate(messages)
        ]

    async def _sql_load_messages(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[ChatMessage]:
        params = {"session_id": session_id, "after": after_seq, "limit": limit}
        return [ChatMessage.from_row(r) for r in await self._read("load_messages", params)]

    async def _sql_delete_session(self, session_id: str) -> bool:
        params = {"session_id": session_id}
        removed = 0
        async with self._transaction() as tx:
            for name in (
                "delete_session",
                "_delete_chat_session",
                "_delete_stream_events",
                "_delete_cancel",
                "_delete_lease",
            ):
                removed += await tx.execute(name, params)
        return removed > 0

    # -- stream events ---------------------------------------------------------

    async def _sql_append_stream_events(
        self, rows: list[StreamRow], notify: tuple[str, Sequence[str]] | None = None
    ) -> StreamAppend:
        now = time.time()
        ids = orjson.dumps(sorted({row[0] for row in rows})).decode()
        fence_sql, insert_sql = Q["_stream_fence"], Q["append_stream_events"]

        def append(conn: sqlite3.Connection) -> StreamAppend:
            # The whole write transaction in one call on the writer's thread: one hand-off
            # instead of five (BEGIN, fence, insert, cursor close, COMMIT), each of which
            # waits for a busy event loop to come round. The fence is decided for every
            # (session, epoch) against the state before this batch, in its transaction, as
            # the Postgres statement does.
            conn.execute("BEGIN IMMEDIATE")
            try:
                fence = {
                    r["session_id"]: (r["token"], r["head_epoch"])
                    for r in conn.execute(fence_sql, {"ids": ids}).fetchall()
                }
                refused = frozenset(
                    (sid, epoch)
                    for sid, epoch in {(row[0], row[2]) for row in rows}
                    if not _fence_accepts(fence[sid], epoch)
                )
                values = [
                    (sid, seq, epoch, kind, data.decode(), now)
                    for sid, seq, epoch, kind, data in rows
                    if (sid, epoch) not in refused
                ]
                stored = conn.executemany(insert_sql, values).rowcount if values else 0
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return StreamAppend(stored, refused)

        self._count("_stream_fence")
        self._count("append_stream_events")
        async with self._write_lock:
            # Shielded like _transaction: the thread runs the call to its end regardless.
            with anyio.CancelScope(shield=True):
                result = await _on_writer_thread(self._conn, append)
                if notify is not None and not result.refused:
                    # The writer's notification, in process, once committed (as notify()).
                    channel, payloads = notify
                    hubs = list(_HUBS.get(self._hub_key, ()))
                    for payload in payloads:
                        for hub in hubs:
                            hub.deliver(channel, payload)
        return result

    async def _sql_load_stream_events(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[StreamEvent]:
        params = {"session_id": session_id, "after": after_seq, "limit": limit}
        return [StreamEvent.from_row(r) for r in await self._read("load_stream_events", params)]

    async def _sql_last_stream_seq(self, session_id: str) -> int:
        rows = await self._read("last_stream_seq", {"session_id": session_id})
        return int(next(iter(rows[0].values())))

    async def _sql_purge_stream_events(self, age_s: float) -> int:
        cutoff = time.time() - age_s
        return await self._write_count("purge_stream_events", {"cutoff": cutoff})

    async def _sql_purge_stream_events_batch(self, age_s: float, limit: int) -> int:
        params = {"cutoff": time.time() - age_s, "limit": limit}
        return await self._write_count("purge_stream_events_batch", params)

    # -- stream partitions: none on SQLite (storage/_partitions.py) ------------

    async def _sql_list_stream_partitions(self) -> list[StreamPartition]:
        return []

    async def _sql_partition_stream_events(self) -> bool:
        raise ConfigurationError(
            "sqlite has no partitioned stream_events layout: it keeps the plain table, "
            "purged by batched DELETE (maintenance.purge_batch_size)"
        )

    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int:
        return 0

    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None:
        return None
