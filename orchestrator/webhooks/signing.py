"""Standard Webhooks signing and verification, and the stable delivery ids they carry.

Every request carries ``webhook-id`` (the delivery id, the same on every retry, for the
receiver's de-duplication) and ``webhook-timestamp`` (this attempt's Unix seconds). With
one or more secrets (``whsec_`` + base64 key) it also carries ``webhook-signature``: one
``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")) per active key, so receivers
keep verifying while keys rotate. See https://www.standardwebhooks.com; only hashlib/hmac.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence

from asyncstore.orchestrator.webhooks.errors import WebhookVerificationError
from asyncstore.storage.errors import InvalidArgument

__all__ = [
    "SECRET_PREFIX",
    "decode_secret",
    "delivery_id",
    "generate_secret",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_...`` secret (the prefix is optional); ValueError if bad."""
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("a webhook secret must be 'whsec_' followed by base64") from None
    if not 1 <= len(key) <= 64:
        raise InvalidArgument(f"a webhook secret's key must be 1-64 bytes, got {len(key)}")
    return key


def generate_secret(nbytes: int = 24) -> str:
    """A new random ``whsec_`` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()


def delivery_id(*parts: str) -> str:
    """A delivery id: random with no parts, else derived from them (stable across retries)."""
    if not parts:
        return "msg_" + secrets.token_hex(12)
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return "msg_" + digest[:24]


def sign(msg_id: str, timestamp: int, body: bytes, keys: Iterable[bytes]) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` per key, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
        for key in keys
    )


def signature_headers(
    msg_id: str, body: bytes, keys: Sequence[bytes], *, timestamp: int | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (no signature without keys)."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
    if keys:
        headers["webhook-signature"] = sign(msg_id, ts, body, keys)
    return headers


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    tolerance_s: float = 300,
    *,
    now: float | None = None,
) -> str:
    """Check a received webhook; returns its ``webhook-id`` (use it to de-duplicate).

    ``secret`` is one ``whsec_`` secret or several (during rotation any of them may match).
    Raises ``WebhookVerificationError`` when a header is missing, the timestamp is more
    than ``tolerance_s`` away from ``now`` (replay protection), or no signature matches.
    Header names are case-insensitive.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    data = body.encode() if isinstance(body, str) else body
    wanted = [secret] if isinstance(secret, str) else list(secret)
    try:
        keys = [decode_secret(s) for s in wanted]
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    offered = [s.partition(",") for s in signatures.split()]
    for key in keys:
        expected = sign(msg_id, timestamp, data, [key]).partition(",")[2]
        for version, _, value in offered:
            if version == "v1" and hmac.compare_digest(expected.encode(), value.encode()):
                return msg_id
    raise WebhookVerificationError("no signature matches")
