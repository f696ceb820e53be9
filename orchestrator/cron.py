"""Cron expressions: parse the classic 5-field syntax and find the next matching minute.

``Cron("*/5 9-17 * * MON-FRI")`` is minute, hour, day of month, month, day of week; each
field a comma list of ``*``, ``N``, ``N-M``, each optionally ``/step`` (``N/step`` runs from
N to the field's end); months ``JAN``-``DEC`` and days ``SUN``-``SAT`` by name (any case),
day of week 0-7 with both 0 and 7 Sunday. The macros ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` stand for their usual
expressions. Day matching follows Vixie cron: when both day fields are restricted (neither
starts with ``*``), a day matches if either does; otherwise both must.

Times are evaluated in ``timezone`` (an IANA name, default UTC). A tick is a UTC instant,
on a whole minute, whose local wall-clock time matches; so in a zone with daylight saving,
a local time skipped by the spring change never ticks and one repeated in the autumn ticks
twice (once per UTC instant). Pure code, no I/O; it relies on ``zoneinfo`` only.
"""

from __future__ import annotations

import bisect
import calendar
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from asyncstore.storage.errors import InvalidArgument, InvalidType

__all__ = ["Cron", "load_timezone"]

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name: i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
# (field name, lowest, highest, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {k.upper(): v for k, v in _MONTHS.items()}),
    ("day of week", 0, 7, _DAYS),
)
_MINUTE = timedelta(minutes=1)
# Offsets between a zone's local time and UTC differ by at most this across a change
# (a daylight-saving shift); a local candidate this far past the first one found cannot
# be an earlier instant.
_MAX_SHIFT = timedelta(hours=3)


def load_timezone(name: str) -> tzinfo:
    """The IANA zone ``name`` (``"UTC"`` gives ``datetime.UTC``); ``InvalidArgument`` if unknown."""
    if not isinstance(name, str):
        raise InvalidType(f"timezone must be an IANA name (str), not {type(name).__name__}")
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument(f"unknown timezone {name!r}") from exc


def _value(token: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    upper = token.upper()
    if upper in names:
        return names[upper]
    if not token.isdigit():
        raise InvalidArgument(f"cron {field}: {token!r} is not a number or a known name")
    number = int(token)
    if not low <= number <= high:
        raise InvalidArgument(f"cron {field}: {number} is outside {low}-{high}")
    return number


def _parse_field(text: str, index: int) -> frozenset[int]:
    field, low, high, names = _FIELDS[index]
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise InvalidArgument(f"cron {field}: step {step_text!r} must be a number >= 1")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            start, _, end = base.partition("-")
            first = _value(start, field, low, high, names)
            last = _value(end, field, low, high, names)
            if first > last:
                raise InvalidArgument(f"cron {field}: range {base!r} runs backwards")
        elif base:
            first = _value(base, field, low, high, names)
            last = high if slash else first  # "N/step": from N to the field's end
        else:
            raise InvalidArgument(f"cron {field}: empty item in {text!r}")
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:  # Sunday is 0 and 7
        values.discard(7)
        values.add(0)
    return frozenset(values)


class Cron:
    """A parsed 5-field cron expression in a timezone (default UTC).

    ``matches(t)`` says whether the minute of instant ``t`` is a tick; ``next_after(t)`` is
    the first tick strictly after ``t``. Instants are timezone-aware ``datetime`` objects
    (``InvalidArgument`` for a naive one); results are in UTC. An expression that can never
    match (``0 0 30 2 *``) is refused when parsed. Immutable; equal when the expression
    and the timezone are.
    """

    __slots__ = ("_dom_any", "_dow_any", "_fields", "_sorted", "_zone", "expression", "timezone")

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        if not isinstance(expression, str):
            raise InvalidType("a cron expression must be a str")
        text = _MACROS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise InvalidArgument(
                f"cron expression {expression!r} must have 5 fields "
                "(minute hour day-of-month month day-of-week) or be a macro like @hourly"
            )
        fields = tuple(_parse_field(part, i) for i, part in enumerate(parts))
        self.expression = expression
        self.timezone = timezone
        self._zone = load_timezone(timezone)
        self._fields = fields
        self._sorted = tuple(tuple(sorted(f)) for f in fields)
        self._dom_any = parts[2].startswith("*")
        self._dow_any = parts[4].startswith("*")
        if self._dow_any and not any(
            day <= calendar.monthrange(2000, month)[1] for month in fields[3] for day in fields[2]
        ):
            raise InvalidArgument(f"cron expression {expression!r} never matches a date")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cron):
            return NotImplemented
        return (self._fields, self._dom_any, self._dow_any, self.timezone) == (
            other._fields,
            other._dom_any,
            other._dow_any,
            other.timezone,
        )

    def __hash__(self) -> int:
        return hash((self._fields, self._dom_any, self._dow_any, self.timezone))

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, timezone={self.timezone!r})"

    def _day_matches(self, local: datetime) -> bool:
        dom = local.day in self._fields[2]
        dow = (local.weekday() + 1) % 7 in self._fields[4]
        if self._dom_any or self._dow_any:
            return dom and dow
        return dom or dow

    def matches_local(self, local: datetime) -> bool:
        """Whether a wall-clock time (its minute; its timezone, if any, ignored) matches."""
        minute, hour, _, month, _ = self._fields
        return (
            local.minute in minute
            and local.hour in hour
            and local.month in month
            and self._day_matches(local)
        )

    def matches(self, instant: datetime) -> bool:
        """Whether the minute of ``instant`` is a tick, read in this schedule's timezone."""
        return self.matches_local(_aware(instant).astimezone(self._zone))

    def _next_local(self, start: datetime) -> datetime:
        """The first matching naive wall-clock minute at or after naive ``start``."""
        minutes, hours, _, months, _ = self._sorted
        t = start
        limit = start.year + 10  # a valid expression matches within 8 years (29 February)
        while t.year <= limit:
            if t.month not in self._fields[3]:
                i = bisect.bisect_left(months, t.month)
                year = t.year if i < len(months) else t.year + 1
                t = datetime(year, months[i % len(months)], 1)
                continue
            if not self._day_matches(t):
                t = datetime(t.year, t.month, t.day) + timedelta(days=1)
                continue
            if t.hour not in self._fields[1]:
                i = bisect.bisect_left(hours, t.hour)
                day = datetime(t.year, t.month, t.day)
                t = day + timedelta(hours=hours[i]) if i < len(hours) else day + timedelta(days=1)
                continue
            if t.minute not in self._fields[0]:
                i = bisect.bisect_left(minutes, t.minute)
                hour = t.replace(minute=0)
                t = (
                    hour + timedelta(minutes=minutes[i])
                    if i < len(minutes)
                    else hour + timedelta(hours=1)
                )
                continue
            return t
        raise InvalidArgument(f"cron expression {self.expression!r} found no tick")  # unreachable

    def next_after(self, instant: datetime) -> datetime:
        """The first tick strictly after ``instant`` (UTC)."""
        after = _aware(instant).astimezone(UTC)
        floor = after.replace(second=0, microsecond=0)
        if self._zone is UTC:
            naive = self._next_local(floor.replace(tzinfo=None) + _MINUTE)
            return naive.replace(tzinfo=UTC)
        # Walk local candidates from a margin before; each maps to 0 (a spring gap), 1 or 2
        # (an autumn fold) instants; keep the earliest after ``after``.
        local = floor.astimezone(self._zone).replace(tzinfo=None) - _MAX_SHIFT
        best: datetime | None = None
        stop: datetime | None = None
        while stop is None or local <= stop:
            local = self._next_local(local + _MINUTE)
            for instant_ in _instants(local, self._zone):
                if instant_ > after and (best is None or instant_ < best):
                    best = instant_
                    stop = local + _MAX_SHIFT
        if best is None:  # the loop only ends once one was found
            raise InvalidArgument(f"cron expression {self.expression!r} found no tick")
        return best


def _instants(local: datetime, zone: tzinfo) -> list[datetime]:
    """The UTC instants whose wall-clock time in ``zone`` is naive ``local``."""
    found: list[datetime] = []
    for fold in (0, 1):
        instant = local.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == local and instant not in found:
            found.append(instant)
    return found


def _aware(instant: datetime) -> datetime:
    if not isinstance(instant, datetime):
        raise InvalidType(f"expected a datetime, not {type(instant).__name__}")
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise InvalidArgument("a cron schedule needs a timezone-aware datetime")
    return instant
