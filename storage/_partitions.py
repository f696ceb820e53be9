"""The partitioned ``stream_events`` layout (opt-in): partition names, ranges, the setting.

Retention by partition (issue 17). With ``storage.stream_partitioning`` a Postgres database
keeps ``stream_events`` ``PARTITION BY RANGE (started_at)``, where ``started_at`` is the
time the session's first event was stored: the session's anchor in ``stream_anchors``
(migration 0009), the same on every event of the session. So:

- idempotency: a partitioned table's unique key must contain its partition key; the key
  is ``(session_id, seq, started_at)``, and since a session has one ``started_at`` (the
  anchor row is unique per session, and the first appends of a session agree on it
  through ``ON CONFLICT``), it is exactly as unique as ``(session_id, seq)``: a retried
  batch is skipped, an older epoch's event replaced, as on the plain table.
- a session never straddles a partition boundary: all its events live in the partition
  of its start, however long it runs. A partition is dropped only when its range ended
  more than the TTL ago and none of its events was stored within the TTL, so resume sees
  every event of a session until the whole session has expired (on the plain table,
  the batched DELETE removes a long session's oldest events one by one instead).
- the anchors of a partition are deleted in the transaction that drops it; an append
  holds its sessions' anchors ``FOR SHARE``, so a session that comes back during the drop
  either keeps its partition (the drop sees its new event and gives up) or gets a new
  anchor in a current partition.

Partitions are named ``stream_events_<lower>_<upper>`` (Unix seconds), which is how the
drivers read their ranges back; ``stream_events_default`` takes sessions anchored where no
ranged partition exists yet (the maintenance leader was behind), and the next
``create_stream_partitions`` moves them into their range. Partitions of other names are
left alone (never dropped). SQLite has no declarative partitioning: it keeps the plain
table and the batched DELETE, and says so when the setting asks for partitions.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

from asyncstore.storage.base import AsyncStorageBackend, StorageSettings, StreamPartition
from asyncstore.storage.errors import MigrationError

log = logging.getLogger("asyncstore.storage")

DEFAULT_PARTITION = "stream_events_default"
_RANGED = re.compile(r"^stream_events_(\d{1,12})_(\d{1,12})$")


def partition_name(lower: int, upper: int) -> str:
    """The name of the partition of anchors in ``[lower, upper)`` (Unix seconds)."""
    return f"stream_events_{lower}_{upper}"


def parse_partition(name: str) -> StreamPartition | None:
    """The partition ``name`` stands for; None for a name this module did not make."""
    if name == DEFAULT_PARTITION:
        return StreamPartition(name, None, None)
    match = _RANGED.match(name)
    if match is None:
        return None
    lower, upper = int(match.group(1)), int(match.group(2))
    return StreamPartition(name, _at(lower), _at(upper))


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def sort_partitions(partitions: list[StreamPartition]) -> list[StreamPartition]:
    """Oldest range first, the default partition last."""
    return sorted(partitions, key=lambda p: (p.lower is None, p.lower or _at(0), p.name))


def missing_ranges(
    existing: list[tuple[int, int]], times: list[float], start: float, end: float, width: int
) -> list[tuple[int, int]]:
    """The ``width``-aligned ranges (Unix seconds) that must exist: the one of each of
    ``times`` (sessions waiting in the default partition) and every one from ``start`` to
    ``end``; each cut to what no ``existing`` range covers (pieces of a range that an
    existing partition of another width overlaps), oldest first."""
    slots = {int(t // width) for t in times}
    slots.update(range(int(start // width), int(end // width) + 1))
    ranges: list[tuple[int, int]] = []
    for slot in sorted(slots):
        pieces = [(slot * width, (slot + 1) * width)]
        for a, b in existing:
            pieces = [
                piece
                for lo, hi in pieces
                for piece in ((lo, min(hi, a)), (max(lo, b), hi))
                if piece[0] < piece[1]
            ]
        ranges.extend(pieces)
    return ranges


async def apply_setting(
    backend: AsyncStorageBackend, settings: StorageSettings, *, migrate: bool
) -> None:
    """What ``open_storage`` does with ``storage.stream_partitioning`` once the schema is
    checked: with ``migrate`` it converts a plain table (``partition_stream_events``);
    without, a plain table is a ``MigrationError`` naming the step. SQLite logs that it
    keeps the plain table. Off (the default), nothing: a partitioned table stays one."""
    if not settings.stream_partitioning:
        return
    if backend.dialect != "postgres":
        log.warning(
            "storage.stream_partitioning is set but %s has no partitioned layout: "
            "stream_events stays a plain table purged by batched DELETE",
            backend.dialect,
        )
        return
    if await backend.list_stream_partitions():
        return
    if migrate:
        await backend.partition_stream_events()
        return
    raise MigrationError(
        "storage.stream_partitioning is set but stream_events is a plain table: run "
        "`asyncstore migrate` with the setting (or open with migrate=True) to convert it, "
        "with the stream writers stopped"
    )
