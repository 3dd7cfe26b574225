"""Signed webhooks, as Standard Webhooks (standardwebhooks.com) specifies them.

Each forwarded request to an endpoint with a secret carries ``webhook-id``
(``domain:event_id``), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,`` + base64 of HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``). A secret
written ``whsec_<base64>`` is used as those bytes; any other secret as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

# A receiver rejects timestamps further than this from its clock (replays).
TOLERANCE_SECONDS = 300


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str | None:
    """None when ``headers`` sign ``body`` with ``secret`` recently enough, else what is wrong."""
    message_id, stamp, signatures = (headers.get(f"webhook-{name}") for name in ("id", "timestamp", "signature"))
    if not (message_id and stamp and signatures):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        timestamp = int(stamp)
    except ValueError:
        return "webhook-timestamp is not a number"
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE_SECONDS:
        return "webhook-timestamp too far from now (a replay?)"
    expected = signature(secret, message_id, timestamp, body)
    if any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        return None
    return "signature does not match"
