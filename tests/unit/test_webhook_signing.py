"""Standard Webhooks signing: the spec's test vector and interoperability with the
``standardwebhooks`` reference package, both ways, with key rotation."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as RefError

from asyncstore.orchestrator.webhooks import WebhookVerificationError, generate_secret, sign, verify
from asyncstore.orchestrator.webhooks.signing import decode_secret, delivery_id, signature_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_spec_test_vector() -> None:
    assert sign(MSG_ID, TIMESTAMP, BODY, [decode_secret(SECRET)]) == EXPECTED
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": EXPECTED,
    }
    assert verify(BODY, headers, SECRET, now=TIMESTAMP + 10) == MSG_ID


def test_reference_package_verifies_our_signatures() -> None:
    secret = generate_secret()
    body = b'{"events": [{"event": "on_error"}]}'
    headers = signature_headers(delivery_id(), body, [decode_secret(secret)])
    assert Webhook(secret).verify(body, headers) == {"events": [{"event": "on_error"}]}
    with pytest.raises(RefError):
        Webhook(secret).verify(body + b" ", headers)


def test_we_verify_the_reference_package_signatures() -> None:
    secret = generate_secret()
    now = time.time()
    from datetime import UTC, datetime

    signature = Webhook(secret).sign(MSG_ID, datetime.fromtimestamp(now, UTC), BODY.decode())
    headers = {
        "Webhook-Id": MSG_ID,
        "Webhook-Timestamp": str(int(now)),
        "Webhook-Signature": signature,
    }
    assert verify(BODY, headers, secret) == MSG_ID


def test_rotation_sends_one_signature_per_key_and_each_verifies() -> None:
    old, new = generate_secret(), generate_secret()
    headers = signature_headers(MSG_ID, BODY, [decode_secret(old), decode_secret(new)])
    parts = headers["webhook-signature"].split(" ")
    assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
    for secret in (old, new):
        assert verify(BODY, headers, secret) == MSG_ID
        Webhook(secret).verify(BODY, headers)
    assert verify(BODY, headers, [generate_secret(), new]) == MSG_ID


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"webhook-timestamp": str(TIMESTAMP - 301)}, "tolerance"),
        ({"webhook-signature": "v1,AAAA"}, "no signature"),
        ({"webhook-signature": EXPECTED.replace("v1", "v2")}, "no signature"),
        ({"webhook-id": ""}, "missing"),
    ],
)
def test_verify_rejects(change: dict[str, str], reason: str) -> None:
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": EXPECTED,
        **change,
    }
    with pytest.raises(WebhookVerificationError, match=reason):
        verify(BODY, headers, SECRET, now=TIMESTAMP)


def test_tampered_body_and_wrong_secret_are_rejected() -> None:
    headers = signature_headers(MSG_ID, BODY, [decode_secret(SECRET)])
    with pytest.raises(WebhookVerificationError):
        verify(BODY + b"x", headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, generate_secret())


def test_delivery_ids_are_stable_for_the_same_parts() -> None:
    assert delivery_id("a", "b") == delivery_id("a", "b") != delivery_id("a", "c")
    assert delivery_id() != delivery_id()


def test_bad_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        decode_secret("whsec_not base64!")
