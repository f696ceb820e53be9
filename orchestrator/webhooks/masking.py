"""Masking of the secrets a webhook URL can carry, for logs and displays.

Secrets hide in three places of a URL: the user info (``https://TOKEN@host``), query
values (``?access_token=...``) and path segments (Slack's ``/services/T.../B.../secret``,
Discord's ``/api/webhooks/<id>/<token>``). ``mask_url`` replaces all three with ``***``;
a path segment is treated as a secret when it looks like a token (see ``_token_like``) or
follows a segment that names one (``token``, ``key``, ``secret``, ``services``). Standard
library only; the result is for people, never for requests.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

__all__ = ["mask_url"]

MASK = "***"
# A segment after one of these words is the credential the word announces.
_MARKERS = frozenset({"token", "tokens", "key", "keys", "secret", "secrets", "services"})
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")
# A whole ${VAR} reference (a template from hooks.toml) names a secret without holding it.
_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def _token_like(segment: str) -> bool:
    """Long segments, or shorter ones mixing letters and digits, or long numbers.

    Readable path words (``robot``, ``send``, ``atomcode``, ``v2``) stay visible; ids and
    random tokens (``T0123ABCD``, 24 random characters, an 18-digit snowflake) do not.
    """
    if len(segment) >= 16:
        return True
    has_digit = _DIGIT.search(segment) is not None
    if len(segment) >= 6 and has_digit and _LETTER.search(segment) is not None:
        return True
    return len(segment) >= 8 and segment.isdigit()


def _mask_path(path: str) -> str:
    segments = path.split("/")
    out: list[str] = []
    after_marker = False
    for segment in segments:
        decoded = unquote(segment)
        if _REFERENCE.fullmatch(decoded):
            out.append(segment)
        elif segment and (after_marker or _token_like(decoded)):
            out.append(MASK)
        else:
            out.append(segment)
        after_marker = decoded.lower() in _MARKERS
    return "/".join(out)


def mask_url(url: str) -> str:
    """``url`` with user info, query values and token-like path segments replaced by ***.

    Whole ``${VAR}`` references (templates from hooks.toml) are kept: they hold no secret.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{k}={v if _REFERENCE.fullmatch(v) else MASK}" for k, v in pairs)
    return urlunsplit(parts._replace(netloc=netloc, path=_mask_path(parts.path), query=query))
