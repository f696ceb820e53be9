"""Input validation and JSON encoding shared by every driver.

Every check that decides whether an argument is acceptable lives here, so both drivers
refuse exactly the same inputs with the same message, before they write anything. JSON
payloads are encoded once, here, with orjson; drivers pass the bytes through.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from asyncstore.storage.errors import InvalidInput
from asyncstore.storage.jobkinds import JOB_KINDS, JobKind
from asyncstore.storage.records import (
    LOGIN_SCOPES,
    EncodedJSON,
    FailureColumns,
    LoginPolicy,
    NewMessage,
    NewOutboxMessage,
    NewStreamEvent,
    NewTask,
    StreamRow,
    Task,
    WebhookAttempt,
)

MAX_ID_CHARS = 255
MAX_NAME_CHARS = 64
MAX_CHANNEL_BYTES = 63  # Postgres truncates identifiers (LISTEN/NOTIFY channels) at 63 bytes
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
MAX_NOTIFY_PAYLOAD_BYTES = 7900  # Postgres refuses NOTIFY payloads of 8000 bytes or more
MAX_LIMIT = 10_000
INT64_MAX = 2**63 - 1
# Durations beyond this would put a lease expiry or a cutoff outside years 1-9999, which
# one driver's datetime conversion could not represent (SQLite raised a raw OverflowError).
MAX_SECONDS = 1000 * 365 * 86400.0


def check_utf8(value: str, what: str) -> str:
    """Return ``value`` if it can be encoded to UTF-8 (no lone surrogate), else raise.

    Both databases store UTF-8; a str holding a lone surrogate (``"\\ud800"``, as
    ``os.fsdecode`` or ``surrogateescape`` make) has no UTF-8 form, so it is refused here
    instead of failing differently inside each driver.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"{what} is not valid Unicode text: lone surrogate at index {exc.start}"
            ) from None
    return value


def check_text(value: object, what: str, *, max_chars: int | None = None) -> str:
    """A free text (a reason, an error message): a str without NUL or lone surrogates.

    With ``max_chars`` the text is cut to that many characters first (what is kept is
    what is checked).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a str, got {type(value).__name__}")
    if max_chars is not None:
        value = value[:max_chars]
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    return check_utf8(value, what)


def check_id(value: object, what: str = "session_id") -> str:
    """Return ``value`` if it is a usable identifier, else raise.

    1..255 characters, no NUL, and valid Unicode (no lone surrogate: it has no UTF-8 form).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidInput(f"{what} is {len(value)} characters long; the limit is {MAX_ID_CHARS}")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    return check_utf8(value, what)


def check_name(value: object, what: str) -> str:
    """Like :func:`check_id` for short names (kinds, roles): 1..64 characters."""
    check_id(value, what)
    if len(value) > MAX_NAME_CHARS:  # type: ignore[arg-type]
        raise InvalidInput(f"{what} is longer than {MAX_NAME_CHARS} characters")
    return value  # type: ignore[return-value]


def check_int(value: object, what: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """Return ``value`` if it is an int (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum or value > maximum:
        raise InvalidInput(f"{what} must be between {minimum} and {maximum}, got {value}")
    return value


def check_limit(value: object) -> int:
    return check_int(value, "limit", minimum=1, maximum=MAX_LIMIT)


def check_seconds(value: object, what: str, *, minimum: float = 0.001) -> float:
    """Return ``value`` as float seconds if it is a finite number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < minimum:
        raise InvalidInput(f"{what} must be a finite number of seconds >= {minimum}, got {value}")
    if seconds > MAX_SECONDS:
        raise InvalidInput(f"{what} must be at most {MAX_SECONDS:g} s (1000 years), got {value}")
    return seconds


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def encode_json(value: Any, what: str = "payload", index: int | None = None) -> bytes:
    """Encode a JSON value once, refusing what either database would refuse or alter.

    Refused: values orjson cannot encode (sets, bytes, objects, lone surrogates, integers
    beyond 64 bits), NaN and infinities (orjson would silently write ``null``), the NUL
    character anywhere in a string (Postgres ``jsonb`` cannot store it), and payloads larger
    than 8 MiB. ``index`` names the batch position in the message (``events[3].payload``).
    An ``EncodedJSON`` (made by :func:`encode_payload`, so already checked) passes through.
    """
    if type(value) is EncodedJSON:
        return value.data
    try:
        data = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidInput(f"{_label(what, index)} is not a JSON value: {exc}") from exc
    # orjson writes NaN and infinities as null; only then is a walk needed to tell them apart.
    # ``find`` rather than ``in``: bytes ``in`` first tries its operand as an int (and
    # clears the TypeError), which costs twice the search on a short payload (hot path).
    if data.find(b"null") != -1 and _has_non_finite(value):
        raise InvalidInput(
            f"{_label(what, index)} contains NaN or infinity, which JSON cannot represent"
        )
    if data.find(b"\\u0000") != -1:
        raise InvalidInput(
            f"{_label(what, index)} contains a NUL character, which jsonb cannot store"
        )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidInput(
            f"{_label(what, index)} is {len(data)} bytes encoded; the limit is {MAX_PAYLOAD_BYTES}"
        )
    return data


def encode_payload(value: Any) -> EncodedJSON:
    """Validate and encode a JSON value once; storage methods accept the result as is."""
    return EncodedJSON(encode_json(value))


def _label(what: str, index: int | None) -> str:
    return what if index is None else f"events[{index}].{what}"


def decode_json(data: bytes | str) -> Any:
    return orjson.loads(data)


def check_channel(channel: object) -> str:
    """A notification channel: letters, digits, ``_ . : -``; at most 63 UTF-8 bytes.

    Postgres truncates identifiers at 63 bytes, so a longer name would share a channel
    with its prefix there; the limit is counted in bytes, not characters.
    """
    name = check_id(channel, "channel")
    if not name.replace("_", "").replace(".", "").replace(":", "").replace("-", "").isalnum():
        raise InvalidInput(f"channel {name!r} may contain only letters, digits and _ . : -")
    size = len(name) if name.isascii() else len(name.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise InvalidInput(
            f"channel is {size} bytes in UTF-8; the limit is {MAX_CHANNEL_BYTES} "
            "(Postgres truncates longer identifiers)"
        )
    return name


def check_notify_payload(channel: object, payload: object) -> tuple[str, str]:
    """Validate a notification: channel is an identifier-like name, payload small text."""
    name = check_channel(channel)
    text = check_text(payload, "notification payload")
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > MAX_NOTIFY_PAYLOAD_BYTES:
        raise InvalidInput(
            f"notification payload is {size} bytes; the limit is {MAX_NOTIFY_PAYLOAD_BYTES} "
            "(send ids, not data)"
        )
    return name, text


MAX_REASON_CHARS = 1000


def prepare_cancel(
    session_id: object, reason: object, notify_channel: object
) -> tuple[str, str, str | None]:
    """``request_cancel``'s arguments: the reason cut to 1000 characters, then checked."""
    check_id(session_id)
    kept = check_text(reason, "reason", max_chars=MAX_REASON_CHARS)
    channel = None if notify_channel is None else check_channel(notify_channel)
    return session_id, kept, channel  # type: ignore[return-value]


def unique_ids(ids: Iterable[int], what: str = "id") -> list[int]:
    out = [check_int(i, what, minimum=1) for i in ids]
    if len(set(out)) != len(out):
        raise InvalidInput(f"duplicate {what} in one call")
    return out


# ---------------------------------------------------------------- whole-call preparation
# Each prepare_* validates every record of a call before the driver writes anything, and
# returns plain tuples with JSON already encoded, so a batch is all or nothing.


def check_when(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be timezone-aware (naive datetimes are ambiguous)")
    try:
        # Stored as UTC (a float of seconds on SQLite): a time that has no UTC datetime in
        # years 1-9999, or whose float rounds past it, would make its row unreadable.
        datetime.fromtimestamp(value.astimezone(UTC).timestamp(), UTC)
    except (OverflowError, ValueError, OSError) as exc:
        raise InvalidInput(f"{what} must fall within years 1-9999 in UTC, got {value}") from exc
    return value


def _batch(items: object, what: str, *, allow_empty: bool = True) -> list[Any]:
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InvalidInput(f"{what} must be a sequence")
    if not items and not allow_empty:
        raise InvalidInput(f"{what} must not be empty")
    return list(items)


def prepare_messages(session_id: object, messages: object) -> list[tuple[str, bytes]]:
    check_id(session_id)
    out = []
    for i, m in enumerate(_batch(messages, "messages", allow_empty=False)):
        if not isinstance(m, NewMessage):
            raise InvalidInput(f"messages[{i}] must be a NewMessage")
        out.append(
            (
                check_name(m.role, f"messages[{i}].role"),
                encode_json(m.content, f"messages[{i}].content"),
            )
        )
    return out


def prepare_stream_events(events: object) -> list[StreamRow]:
    # The hottest validation path: plain checks inline, messages built only on failure,
    # and each distinct session id and kind checked once per batch.
    out = []
    ok_ids: set[str] = set()
    ok_kinds: set[str] = set()
    seen: set[tuple[str, int]] = set()
    for i, e in enumerate(_batch(events, "events")):
        if not isinstance(e, NewStreamEvent):
            raise InvalidInput(f"events[{i}] must be a NewStreamEvent")
        sid, seq, epoch, kind = e.session_id, e.seq, e.epoch, e.kind
        if sid not in ok_ids:
            check_id(sid, f"events[{i}].session_id")
            ok_ids.add(sid)
        if type(seq) is not int or not 1 <= seq <= INT64_MAX:
            check_int(seq, f"events[{i}].seq", minimum=1)
        if type(epoch) is not int or not 0 <= epoch <= INT64_MAX:
            check_int(epoch, f"events[{i}].epoch", minimum=0)
        if kind not in ok_kinds:
            check_name(kind, f"events[{i}].kind")
            ok_kinds.add(kind)
        key = (sid, seq)
        if key in seen:
            continue  # the same (session, seq) twice in one batch: the first one counts
        seen.add(key)
        out.append((sid, seq, epoch, kind, encode_json(e.payload, "payload", i)))
    return out


PreparedTask = tuple[str, bytes, int, datetime | None, str | None, int]


def prepare_tasks(tasks: object) -> list[PreparedTask]:
    out: list[PreparedTask] = []
    for i, t in enumerate(_batch(tasks, "tasks")):
        if not isinstance(t, NewTask):
            raise InvalidInput(f"tasks[{i}] must be a NewTask")
        key = t.idempotency_key
        out.append(
            (
                check_id(t.queue, f"tasks[{i}].queue"),
                encode_json(t.payload, f"tasks[{i}].payload"),
                check_int(t.priority, f"tasks[{i}].priority", minimum=-(2**31), maximum=2**31 - 1),
                check_when(t.run_after, f"tasks[{i}].run_after"),
                None if key is None else check_id(key, f"tasks[{i}].idempotency_key"),
                check_int(t.max_attempts, f"tasks[{i}].max_attempts", minimum=1, maximum=10_000),
            )
        )
    return out


def task_groups(tasks: object) -> list[str | None]:
    """The ordering group of each task (checked as an id), None for ungrouped ones.

    Called after ``prepare_tasks`` accepted the batch (every item is a ``NewTask``)."""
    out: list[str | None] = []
    for i, t in enumerate(_batch(tasks, "tasks")):
        group = getattr(t, "group", None)
        out.append(None if group is None else check_id(group, f"tasks[{i}].group"))
    return out


def prepare_outbox(messages: object) -> list[tuple[str, str, bytes, int]]:
    out = []
    for i, m in enumerate(_batch(messages, "outbox messages")):
        if not isinstance(m, NewOutboxMessage):
            raise InvalidInput(f"outbox[{i}] must be a NewOutboxMessage")
        out.append(
            (
                check_id(m.channel, f"outbox[{i}].channel"),
                check_id(m.account, f"outbox[{i}].account"),
                encode_json(m.payload, f"outbox[{i}].payload"),
                check_int(m.max_attempts, f"outbox[{i}].max_attempts", minimum=1, maximum=10_000),
            )
        )
    return out


def check_job_kind(kind: object) -> JobKind[Any, Any, Any]:
    """One of the closed set of job kinds (``TASKS``, ``OUTBOX``), by identity."""
    for known in JOB_KINDS:
        if kind is known:
            return known
    raise InvalidInput(f"kind must be one of the storage job kinds (TASKS, OUTBOX), got {kind!r}")


def check_names(values: object, what: str) -> list[str]:
    """A list of ids (a sequence, not a str), each checked by ``check_id``."""
    return [check_id(n, what) for n in _batch(values, f"{what}s")]


def prepare_claims(claims: object) -> tuple[list[int], list[int]]:
    ids, tokens = [], []
    for i, c in enumerate(_batch(claims, "claims")):
        if not isinstance(c, tuple) or len(c) != 2:
            raise InvalidInput(f"claims[{i}] must be a Claim(id, token)")
        ids.append(check_int(c[0], f"claims[{i}].id", minimum=1))
        tokens.append(check_int(c[1], f"claims[{i}].token", minimum=1))
    if len(set(ids)) != len(ids):
        raise InvalidInput("the same id appears twice in one call")
    return ids, tokens


def prepare_failures(failures: object) -> FailureColumns:
    items = _batch(failures, "failures")
    ids, tokens = prepare_claims([tuple(f)[:2] if isinstance(f, tuple) else f for f in items])
    errors: list[str] = []
    retry: list[datetime | None] = []
    for i, f in enumerate(items):
        if len(f) != 4:
            raise InvalidInput(f"failures[{i}] must be a Failure(id, token, error, retry_at)")
        if not isinstance(f[2], str):
            raise InvalidInput(f"failures[{i}].error must be a str")
        errors.append(check_utf8(f[2][:10_000].replace("\x00", ""), f"failures[{i}].error"))
        retry.append(check_when(f[3], f"failures[{i}].retry_at"))
    return FailureColumns(ids, tokens, errors, retry)


def match_enqueued(inputs: list[PreparedTask], rows: list[Task]) -> list[Task]:
    """Put enqueue results back in input order.

    Keyed inputs match by (queue, key); unkeyed ones take the new rows without a key in id
    order, which is input order because drivers insert in input order.
    """
    by_key = {(t.queue, t.idempotency_key): t for t in rows if t.idempotency_key is not None}
    unkeyed = iter(sorted((t for t in rows if t.idempotency_key is None), key=lambda t: t.id))
    return [by_key[(r[0], r[4])] if r[4] is not None else next(unkeyed) for r in inputs]


def prepare_journal(endpoint: object, owner: object, bodies: object) -> list[str]:
    """Journaled webhook events: an endpoint, an owner and JSON bodies (bytes)."""
    check_id(endpoint, "endpoint")
    check_id(owner, "owner")
    out: list[str] = []
    for i, body in enumerate(_batch(bodies, "bodies")):
        if not isinstance(body, bytes):
            raise InvalidInput(f"bodies[{i}] must be bytes, got {type(body).__name__}")
        if len(body) > MAX_PAYLOAD_BYTES:
            raise InvalidInput(
                f"bodies[{i}] is {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
            )
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"bodies[{i}] is not UTF-8") from None
        if "\x00" in text:
            raise InvalidInput(f"bodies[{i}] must not contain NUL characters")
        out.append(text)
    return out


def prepare_attempts(
    attempts: object,
) -> list[tuple[str, str, int | None, datetime, int | None, str, bool]]:
    """Delivery-log entries: ids checked, errors cut at 1000 characters, aware times."""
    out = []
    for i, a in enumerate(_batch(attempts, "attempts")):
        if not isinstance(a, WebhookAttempt):
            raise InvalidInput(f"attempts[{i}] must be a WebhookAttempt")
        if not isinstance(a.attempted_at, datetime) or a.attempted_at.tzinfo is None:
            raise InvalidInput(f"attempts[{i}].attempted_at must be an aware datetime")
        check_when(a.attempted_at, f"attempts[{i}].attempted_at")
        if not isinstance(a.error, str) or "\x00" in a.error:
            raise InvalidInput(f"attempts[{i}].error must be a str without NUL characters")
        check_utf8(a.error[:1000], f"attempts[{i}].error")
        out.append(
            (
                check_id(a.endpoint, f"attempts[{i}].endpoint"),
                check_id(a.webhook_id, f"attempts[{i}].webhook_id"),
                None if a.outbox_id is None else check_int(a.outbox_id, "outbox_id", minimum=1),
                a.attempted_at,
                None if a.status is None else check_int(a.status, "status", minimum=100),
                a.error[:1000],
                bool(a.ok),
            )
        )
    return out


# ---------------------------------------------------------------- instance presence

PRESENCE_MAX_SESSIONS = 10_000
"""The most sessions one presence row may count (``publish_presence``)."""
PRESENCE_MAX_BYTES = 1024 * 1024
"""The most bytes a presence row's counts may take as JSON (``publish_presence``)."""
_HOST = socket.gethostname() or "localhost"


def prepare_presence(
    instance_id: object, counts: object, ttl_s: object, host: object, pid: object
) -> tuple[str, str, int, float, bytes]:
    """``publish_presence``'s arguments: (instance_id, host, pid, ttl_s, counts as JSON).

    ``host`` and ``pid`` default to this process's; ``counts`` is a mapping of session ids
    to non-negative ints within the session and byte caps.
    """
    check_id(instance_id, "instance_id")
    if not isinstance(counts, Mapping):
        raise InvalidInput(f"counts must be a mapping, got {type(counts).__name__}")
    if len(counts) > PRESENCE_MAX_SESSIONS:
        raise InvalidInput(
            f"counts has {len(counts)} sessions; a presence row holds at most "
            f"{PRESENCE_MAX_SESSIONS} sessions (publish the busiest)"
        )
    for session_id, n in counts.items():
        check_id(session_id, "counts session id")
        check_int(n, f"counts[{session_id!r}]", minimum=0)
    data = encode_json(dict(counts), "counts")
    if len(data) > PRESENCE_MAX_BYTES:
        raise InvalidInput(
            f"counts is {len(data)} bytes as JSON; the limit is {PRESENCE_MAX_BYTES} bytes "
            "(publish the busiest sessions)"
        )
    seconds = check_seconds(ttl_s, "ttl_s")
    where = _HOST if host is None else check_id(host, "host")
    process = os.getpid() if pid is None else check_int(pid, "pid", maximum=2**31 - 1)
    return instance_id, where, process, seconds, data  # type: ignore[return-value]


# ---------------------------------------------------------------- login attempts


def check_login_attempt(scope: object, key: object, policy: object) -> LoginPolicy:
    """Validate the arguments of the login attempt methods (the same on both drivers)."""
    if scope not in LOGIN_SCOPES:
        raise InvalidInput(f"scope must be one of {LOGIN_SCOPES}, got {scope!r}")
    check_id(key, "key")
    if not isinstance(policy, LoginPolicy):
        raise InvalidInput(f"policy must be a LoginPolicy, got {type(policy).__name__}")
    check_int(policy.limit, "policy.limit", minimum=1, maximum=2**31 - 1)
    for name in ("window_s", "lockout_base_s", "lockout_max_s", "forget_after_s"):
        check_seconds(getattr(policy, name), f"policy.{name}")
    if check_seconds(policy.lockout_factor, "policy.lockout_factor", minimum=1.0) > 1e6:
        raise InvalidInput("policy.lockout_factor must be <= 1e6")
    return policy


LOGIN_OUTCOMES = ("failure", "success", "release")


def check_login_finish(window_start: object, outcome: object) -> float:
    """Validate ``finish_login_attempt``'s window start and outcome (both drivers)."""
    if (
        isinstance(window_start, bool)
        or not isinstance(window_start, int | float)
        or window_start != window_start
    ):
        raise InvalidInput(f"window_start must be a number, got {window_start!r}")
    if outcome not in LOGIN_OUTCOMES:
        raise InvalidInput(f"outcome must be failure, success or release, got {outcome!r}")
    return float(window_start)
