"""The call-signal event: validation at the ingress, identity, and its NATS subject.

An event is any JSON object with a host-like ``domain``. Its fields are kept as
the client sent them; the ingress only adds ``event_id`` when the client did
not send one. The domain becomes one subject token through a reversible
escape, so dots, wildcards or spaces can never change a subject's shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic_core

MAX_DOMAIN_LENGTH = 253
MAX_EVENT_ID_LENGTH = 128
_DOMAIN = re.compile(r"[a-z0-9._-]{1,253}")
# Printable ASCII without whitespace: the id travels in the Nats-Msg-Id and
# Idempotency-Key headers.
_EVENT_ID = re.compile(r"[!-~]{1,128}")
# Characters that stand for themselves in a subject token; everything else is
# escaped as ~XX (its byte in hex), "~" included, so decoding is unambiguous.
_TOKEN_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPE = re.compile(r"~([0-9a-f]{2})")


class InvalidEvent(ValueError):
    """A request body that is not an acceptable event; ``str()`` says why, for the client."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN, Infinity or -Infinity)")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:40]} is too large for a double (RFC 8259 section 6)")
    return number


def parse_strict_json(data: bytes | str) -> Any:
    """``json.loads`` of what RFC 8259 allows: ``NaN``, ``Infinity``, ``-Infinity`` and
    numbers beyond a double (which would come back out as ``Infinity``) raise ``ValueError``.

    What it returns always serialises again as RFC 8259 JSON (``event_json``).
    """
    if isinstance(data, (bytes, bytearray)):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    elif data.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    try:
        return _STRICT_JSON.decode(data)
    except RecursionError:  # Python's parser recurses once a level: ~1,000 levels end it
        raise ValueError("arrays and objects nested too deeply to read") from None


# What json.loads does with these hooks, without building a decoder per call.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def normalize_domain(domain: object) -> str:
    """Return ``domain`` in lower case, or raise ``InvalidEvent`` if it is not host-like.

    Host-like: 1-253 letters, digits, ``.``, ``-`` and ``_``, where every
    dot-separated label is non-empty and holds at least one letter or digit.
    """
    if not isinstance(domain, str):
        raise InvalidEvent("domain must be a string")
    if not domain:
        raise InvalidEvent("domain must not be empty")
    # ASCII first: lower() maps some other characters to ASCII letters (KELVIN SIGN to "k").
    lowered = domain.lower() if domain.isascii() else ""
    if not _DOMAIN.fullmatch(lowered):
        raise InvalidEvent(f"domain must be 1-{MAX_DOMAIN_LENGTH} characters of letters, digits, '.', '-' or '_'")
    # Each dot-separated label needs a letter or digit (what is left once "-" and
    # "_" are stripped): "..", ".a", "a.", "_" or "-.vn" name no host.
    if not all(label.strip("-_") for label in lowered.split(".")):
        raise InvalidEvent(
            f"domain {domain!r} needs a letter or digit in every dot-separated label "
            "(no empty label, no label of only '-' or '_')"
        )
    return lowered


@dataclass(frozen=True, slots=True)
class AcceptedEvent:
    """An event that passed validation: what the ingress publishes."""

    event_id: str
    domain: str
    payload: bytes  # what is stored: the event as JSON
    fields: dict[str, Any]  # what identifies it in logs: see describe()
    event: dict[str, Any]  # the event as parsed, for the domain's log file
    # Deduplication id when it must differ from event_key() (a replay of a dead letter).
    message_id: str | None = None


def parse_event(body: bytes) -> AcceptedEvent:
    """Validate a POST /events body and give it its identity.

    The stored payload is the client's object with ``event_id`` set (the
    client's own when it sent a valid one, else a new UUID).
    """
    try:
        event = parse_strict_json(body)
    except ValueError as error:  # also a bad encoding, an integer of over 4,300 digits
        raise InvalidEvent(f"body is not valid JSON: {error}") from None
    if not isinstance(event, dict):
        raise InvalidEvent("body must be a JSON object")
    if "domain" not in event:
        raise InvalidEvent("domain is required")
    domain = normalize_domain(event["domain"])
    event_id = event.get("event_id")
    if event_id is None:
        event_id = event["event_id"] = str(uuid.uuid4())
    elif not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise InvalidEvent(f"event_id must be a string of 1-{MAX_EVENT_ID_LENGTH} printable characters without spaces")
    try:
        payload = event_json(event)
    except UnicodeEncodeError:  # "\ud800" is JSON's grammar, but no character: UTF-8 cannot carry it
        raise InvalidEvent(
            "body is not valid JSON: a string holds an unpaired surrogate (\\ud800-\\udfff), "
            "which no UTF-8 text can carry (RFC 8259 section 8.2)"
        ) from None
    return AcceptedEvent(event_id, domain, payload, describe(event) | {"domain": domain}, event)


def event_json(event: dict[str, Any]) -> bytes:
    """``event`` as stored and forwarded: compact JSON in UTF-8.

    pydantic-core's encoder, a sixth of ``json.dumps``'s time. An event read
    by ``parse_strict_json`` holds no NaN or infinity, so what it writes is
    always RFC 8259 JSON. A string with an unpaired surrogate raises
    ``UnicodeEncodeError``.
    """
    try:
        return pydantic_core.to_json(event)
    except pydantic_core.PydanticSerializationError:
        # Nested deeper than pydantic-core goes (~250 levels; Python's parser takes
        # ~1,000), or an unpaired surrogate, which json.dumps names.
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def event_key(domain: str, event_id: str) -> str:
    """``domain:event_id``: unique across tenants, which may choose the same event_id.

    JetStream deduplicates on it (``Nats-Msg-Id``), and backends get it as
    ``Idempotency-Key`` and ``webhook-id``. A domain never contains ``:``.
    """
    return f"{domain}:{event_id}"


@functools.lru_cache(maxsize=4096)  # the routed domains, and a few others; each event needs its domain's
def domain_token(domain: str) -> str:
    """Encode ``domain`` as one subject token: ``a.b-c`` → ``a~2eb-c``."""
    return "".join(c if c in _TOKEN_SAFE else f"~{ord(c):02x}" for c in domain)


def token_domain(token: str) -> str:
    """Invert ``domain_token``."""
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), token)


def domain_subject(subject_pattern: str, domain: str) -> str:
    """The subject of ``domain``'s events: the pattern's ``*`` replaced by its token."""
    return subject_pattern.replace("*", domain_token(domain), 1)


def subject_domain(subject_pattern: str, subject: str) -> str | None:
    """The domain a subject of ``subject_pattern`` belongs to, or None if it is not one."""
    pattern_tokens = subject_pattern.split(".")
    tokens = subject.split(".")
    if len(tokens) != len(pattern_tokens):
        return None
    index = pattern_tokens.index("*")
    if any(t != p for t, p in zip(tokens, pattern_tokens, strict=True) if p != "*"):
        return None
    return token_domain(tokens[index])


def bounded_token(text: str, limit: int) -> str:
    """``domain_token(text)``, or when longer than ``limit`` its start and a hash: readable, unique, bounded."""
    token = domain_token(text)
    if len(token) <= limit:
        return token
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"{token[:80]}-{digest}"


def consumer_name(domain: str) -> str:
    """The durable consumer of ``domain``: readable when short, hashed when it would be too long."""
    return f"forward-{bounded_token(domain, 120)}"


_IDENTIFYING = ("event_id", "call_id", "domain", "direction", "state", "status")
MAX_SHOWN_NESTING = 16


def describe(event: dict[str, Any]) -> dict[str, Any]:
    """The fields that identify an event in logs and the operator's views.

    Callers replace ``domain`` with its normalized (lower-case) form. A field
    nested deeper than ``MAX_SHOWN_NESTING`` levels is shown as a note instead:
    every log record of the event carries these fields, and JSON encoders give
    up at a few hundred levels (the event itself is stored and forwarded whole).
    """
    return {name: _shown(event.get(name)) for name in _IDENTIFYING}


def _shown(value: Any) -> Any:
    if isinstance(value, (dict, list)) and not _nested_within(value, MAX_SHOWN_NESTING):
        return f"(nested more than {MAX_SHOWN_NESTING} levels deep: see the event)"
    return value


def _nested_within(value: Any, levels: int) -> bool:
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return True
    return levels > 0 and all(_nested_within(item, levels - 1) for item in value)


def outcome_record(
    fields: dict[str, Any],
    *,
    at: str | None,
    delivery_attempt: Any,
    errors: dict[str, str] | None = None,
    max_deliveries: Any = None,
    will_retry: Any = None,
) -> dict[str, Any]:
    """One forwarding attempt as /api/events and /api/logs show it.

    ``errors`` None means it succeeded; ``at`` is its RFC 3339 time.
    """
    record = {key: fields.get(key) for key in ("call_id", "domain", "direction", "state", "status", "event_id")}
    if errors is None:
        return record | {"forwarded_at": at, "delivery_attempt": delivery_attempt}
    return record | {
        "failed_at": at,
        "error": "; ".join(f"{endpoint}: {error}" for endpoint, error in errors.items()),
        "errors": errors,
        "delivery_attempt": delivery_attempt,
        "max_deliveries": max_deliveries,
        "will_retry": will_retry,
    }
