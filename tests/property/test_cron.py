"""Property tests of the cron parser against a brute-force, minute-by-minute matcher.

The reference below reads each field item by arithmetic (``a <= v <= b`` and
``(v - a) % step == 0``), written apart from ``orchestrator.cron``'s set expansion, and
``brute_next`` walks the minutes after an instant until the reference matches (whole
days are stepped over only when the reference says the day cannot match). Hypothesis
draws expressions (lists, ranges, steps, names, both day-field rules) and instants;
``Cron.next_after`` and ``Cron.matches`` must agree with the reference, in UTC and in
zones with daylight saving and non-hour offsets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asyncstore.orchestrator.cron import Cron
from asyncstore.storage.errors import InvalidArgument

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
NAMES: list[list[str]] = [[], [], [], MONTHS, DAYS]


def _number(token: str, index: int) -> int:
    names = NAMES[index]
    if token.upper() in names:
        return names.index(token.upper()) + (1 if index == 3 else 0)
    return int(token)


def ref_field(text: str, value: int, index: int) -> bool:
    low, high = BOUNDS[index]
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = int(step_text) if slash else 1
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, b = base.split("-")
            first, last = _number(a, index), _number(b, index)
        else:
            first = _number(base, index)
            last = high if slash else first
        if first <= value <= last and (value - first) % step == 0:
            return True
    return False


def ref_day(fields: list[str], local: datetime) -> bool:
    dow = (local.weekday() + 1) % 7
    dom_ok = ref_field(fields[2], local.day, 2)
    dow_ok = ref_field(fields[4], dow, 4) or (dow == 0 and ref_field(fields[4], 7, 4))
    month_ok = ref_field(fields[3], local.month, 3)
    if fields[2].startswith("*") or fields[4].startswith("*"):
        return month_ok and dom_ok and dow_ok
    return month_ok and (dom_ok or dow_ok)


def ref_matches(fields: list[str], local: datetime) -> bool:
    return (
        ref_field(fields[0], local.minute, 0)
        and ref_field(fields[1], local.hour, 1)
        and ref_day(fields, local)
    )


def brute_next(fields: list[str], after: datetime, zone: str) -> datetime:
    """The first UTC minute after ``after`` whose wall-clock time in ``zone`` matches."""
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    t = after.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(5_000_000):
        local = t.astimezone(tz)
        if tz is UTC and not ref_day(fields, local):
            t = t.replace(hour=0, minute=0) + timedelta(days=1)
            continue
        if not ref_day(fields, local) and t.minute % 15 == 0:
            # Every zone offset in use is a multiple of 15 minutes, so local midnights fall
            # on UTC quarter hours: stepping a quarter hour never skips a matching day's start.
            t += timedelta(minutes=15)
            continue
        if ref_matches(fields, local):
            return t
        t += timedelta(minutes=1)
    raise AssertionError("brute force found no match")


def _item(index: int) -> st.SearchStrategy[str]:
    low, high = BOUNDS[index]
    value = st.integers(low, high)
    names = NAMES[index]

    def token(v: int, named: bool) -> str:
        if named and names and (index == 3 or v <= 6):
            name = names[v - (1 if index == 3 else 0)]
            return name.lower() if v % 2 else name
        return str(v)

    step = st.integers(1, high - low + 1).map(lambda s: f"/{s}")
    return st.one_of(
        st.just("*"),
        step.map(lambda s: f"*{s}"),
        st.tuples(value, st.booleans()).map(lambda p: token(*p)),
        st.tuples(value, value, st.booleans(), st.one_of(st.just(""), step)).map(
            lambda p: f"{token(min(p[0], p[1]), p[2])}-{token(max(p[0], p[1]), p[2])}{p[3]}"
        ),
        st.tuples(value, step).map(lambda p: f"{p[0]}{p[1]}"),
    )


def _field(index: int) -> st.SearchStrategy[str]:
    return st.lists(_item(index), min_size=1, max_size=3).map(",".join)


EXPRESSIONS = st.tuples(*(_field(i) for i in range(5))).map(list)
# Zones with daylight saving (New York, London, Lord Howe's 30-minute shift) and a
# 45-minute offset (Kathmandu).
ZONES = st.sampled_from(
    ["UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kathmandu"]
)
INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)


def _cron(fields: list[str], zone: str = "UTC") -> Cron:
    try:
        return Cron(" ".join(fields), zone)
    except InvalidArgument:
        # Refused only when no month of the expression has one of its days (dow '*').
        assert fields[4].startswith("*")
        days = [d for d in range(1, 32) if ref_field(fields[2], d, 2)]
        months = [m for m in range(1, 13) if ref_field(fields[3], m, 3)]
        limits = {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}
        assert all(d > limits.get(m, 31) for m in months for d in days)
        assume(False)
        raise


@PROPERTY
@given(fields=EXPRESSIONS, after=INSTANTS)
def test_next_after_matches_brute_force_in_utc(fields: list[str], after: datetime) -> None:
    cron = _cron(fields)
    expected = brute_next(fields, after, "UTC")
    got = cron.next_after(after)
    assert got == expected, (" ".join(fields), after)
    assert cron.matches(got)
    assert not cron.matches(got - timedelta(minutes=1)) or got - timedelta(minutes=1) <= after


@PROPERTY
@given(
    fields=st.tuples(_field(0), _field(1), st.just("*"), st.just("*"), _field(4)).map(list),
    after=INSTANTS,
    zone=ZONES,
)
def test_next_after_matches_brute_force_in_zones(
    fields: list[str], after: datetime, zone: str
) -> None:
    cron = _cron(fields, zone)
    assert cron.next_after(after) == brute_next(fields, after, zone), (" ".join(fields), after)


@PROPERTY
@given(fields=EXPRESSIONS, instant=INSTANTS, zone=ZONES)
def test_matches_agrees_with_reference(fields: list[str], instant: datetime, zone: str) -> None:
    cron = _cron(fields, zone)
    local = instant.astimezone(UTC if zone == "UTC" else ZoneInfo(zone))
    assert cron.matches(instant) == ref_matches(fields, local)


@PROPERTY
@given(fields=EXPRESSIONS, after=INSTANTS)
def test_successive_ticks_increase_and_skip_nothing(fields: list[str], after: datetime) -> None:
    cron = _cron(fields)
    first = cron.next_after(after)
    second = cron.next_after(first)
    assert second > first
    assert second == brute_next(fields, first, "UTC")


def test_spring_gap_skips_and_autumn_fold_ticks_twice() -> None:
    cron = Cron("30 2 * * *", "America/New_York")
    # 2026-03-08 02:30 does not exist in New York: the 7th is followed by the 9th.
    assert cron.next_after(datetime(2026, 3, 7, 8, tzinfo=UTC)) == datetime(
        2026, 3, 9, 6, 30, tzinfo=UTC
    )
    fold = Cron("30 1 * * *", "America/New_York")
    first = fold.next_after(datetime(2026, 11, 1, 0, tzinfo=UTC))
    assert first == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    assert fold.next_after(first) == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("@hourly", datetime(2026, 12, 1, 6, 0, tzinfo=UTC)),
        ("@daily", datetime(2026, 12, 2, 0, 0, tzinfo=UTC)),
        ("@weekly", datetime(2026, 12, 6, 0, 0, tzinfo=UTC)),
        ("@monthly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        ("@yearly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        ("0 0 29 2 *", datetime(2028, 2, 29, 0, 0, tzinfo=UTC)),
        ("*/5 9-17 * * MON-FRI", datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
        ("0 12 13 * FRI", datetime(2026, 12, 4, 12, 0, tzinfo=UTC)),
        ("0 0 * * 7", datetime(2026, 12, 6, 0, 0, tzinfo=UTC)),
    ],
)
def test_known_next_ticks(expression: str, expected: datetime) -> None:
    assert Cron(expression).next_after(datetime(2026, 12, 1, 5, 33, tzinfo=UTC)) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("60 * * * *", "outside 0-59"),
        ("* 24 * * *", "outside 0-23"),
        ("* * 0 * *", "outside 1-31"),
        ("* * * 13 *", "outside 1-12"),
        ("* * * * 8", "outside 0-7"),
        ("5-1 * * * *", "runs backwards"),
        ("*/0 * * * *", "step"),
        ("*/x * * * *", "step"),
        ("* * * FOO *", "known name"),
        ("1,,2 * * * *", "empty item"),
        ("0 0 30 2 *", "never matches"),
        ("0 0 31 4,6 *", "never matches"),
    ],
)
def test_bad_expressions_are_refused(expression: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Cron(expression)


def test_unknown_timezone_and_naive_datetime_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown timezone"):
        Cron("* * * * *", "Mars/Olympus")
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        Cron("* * * * *").next_after(datetime(2026, 1, 1))
