"""The partition arithmetic of storage/_partitions.py: names, ranges, gaps."""

from __future__ import annotations

from datetime import UTC, datetime

from asyncstore.storage import StreamPartition
from asyncstore.storage._partitions import (
    missing_ranges,
    parse_partition,
    partition_name,
    sort_partitions,
)

DAY = 86_400


def test_names_round_trip_and_foreign_names_are_ignored() -> None:
    name = partition_name(DAY, 2 * DAY)
    assert name == "stream_events_86400_172800"
    assert parse_partition(name) == StreamPartition(
        name, datetime(1970, 1, 2, tzinfo=UTC), datetime(1970, 1, 3, tzinfo=UTC)
    )
    assert parse_partition("stream_events_default") == StreamPartition(
        "stream_events_default", None, None
    )
    assert parse_partition("stream_events_2026") is None
    assert parse_partition("stream_events_1_2; DROP TABLE x") is None


def test_sorted_oldest_first_default_last() -> None:
    default = parse_partition("stream_events_default")
    old, new = (
        parse_partition(partition_name(0, DAY)),
        parse_partition(partition_name(DAY, 2 * DAY)),
    )
    assert default is not None and old is not None and new is not None
    assert sort_partitions([default, new, old]) == [old, new, default]


def test_ranges_ahead_and_for_waiting_sessions_only() -> None:
    now = 10 * DAY + 5
    assert missing_ranges([], [], now, now + DAY, DAY) == [
        (10 * DAY, 11 * DAY),
        (11 * DAY, 12 * DAY),
    ]
    # A session waiting in the default partition from day 3: its day, not days 4..9.
    waiting = [3 * DAY + 7.5]
    assert missing_ranges([], waiting, now, now, DAY) == [(3 * DAY, 4 * DAY), (10 * DAY, 11 * DAY)]


def test_existing_ranges_are_skipped_and_other_widths_leave_only_the_gaps() -> None:
    now = 10 * DAY
    existing = [(10 * DAY, 11 * DAY), (11 * DAY, 11 * DAY + 3600)]  # an hourly one
    assert missing_ranges(existing, [], now, now + DAY, DAY) == [(11 * DAY + 3600, 12 * DAY)]
