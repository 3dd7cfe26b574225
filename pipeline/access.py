"""Who may post events for which domain, who may see the dashboard and API (and from where), and how fast."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ANY_DOMAIN = "*"
# Domains whose token buckets are remembered; the least recently used is forgotten
# (it starts again full), so invented domains cannot grow memory.
MAX_RATE_LIMITED_DOMAINS = 10_000


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    domains: frozenset[str]  # lower-case domains, or ANY_DOMAIN

    def allows(self, domain: str) -> bool:
        return ANY_DOMAIN in self.domains or domain in self.domains


@dataclass(frozen=True, slots=True)
class IngressAccess:
    """The ingress's API keys (by the SHA-256 of the key; keys themselves are never kept)."""

    keys: Mapping[str, ApiKey] = field(default_factory=dict)
    rate_per_second: float = 0.0  # per-domain limit of POST /events for routed domains; 0: none
    burst: int = 1
    # One limit shared by every domain without a route: anyone can invent domains.
    unrouted_rate_per_second: float = 0.0
    unrouted_burst: int = 1

    @property
    def open(self) -> bool:
        return not self.keys

    def key_for(self, authorization: str | None) -> ApiKey | None:
        """The key an ``Authorization: Bearer …`` header presents, if it is one of ours."""
        presented = _bearer(authorization)
        if presented is None:
            return None
        digest = sha256_hex(presented)
        for known, key in self.keys.items():
            if hmac.compare_digest(known, digest):
                return key
        return None


def admin_allows(authorization: str | None, password_sha256: str) -> bool:
    """``Authorization: Bearer <password>`` or HTTP basic auth (any user name) with the admin password."""
    presented = _bearer(authorization)
    if presented is None and authorization and authorization[:6].lower() == "basic ":
        try:
            presented = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")[2]
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
            return False
    return presented is not None and hmac.compare_digest(sha256_hex(presented), password_sha256)


def is_loopback(host: str | None) -> bool:
    """Whether a client address (the ASGI scope's ``client`` host) is this machine's loopback.

    127.0.0.0/8, ``::1`` and IPv4-mapped ``::ffff:127.x.y.z``; no address (a
    Unix socket, say) is not loopback. Forwarded-for headers are not consulted:
    anyone can send them.
    """
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def names_this_machine(host_header: str | None) -> bool:
    """Whether a request's ``Host`` names this machine as only this machine can be named:
    ``localhost`` (or a name under it), a loopback address, or this machine's host name.

    A page on another site whose name the attacker re-points to 127.0.0.1 (DNS
    rebinding) reaches a loopback address from a loopback client, with its own
    name in ``Host``.
    """
    try:
        host = urlsplit(f"//{host_header or ''}").hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".")
    return (
        host == "localhost" or host.endswith(".localhost") or is_loopback(host) or host == socket.gethostname().lower()
    )


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, default ports filled in; None if it is not http(s)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def cross_site_refusal(
    *, origin: str | None, content_type: str | None, requested_with: str | None, own_origin: str
) -> str | None:
    """Why a state-changing admin request is refused as possibly cross-site, or None to let it through.

    A page on another site can make a browser send a "simple" request (a form,
    a plain fetch) with the admin's cached basic auth attached. It cannot send
    a JSON content type or a custom header without a CORS preflight, which this
    service never grants, and cannot forge ``Origin``. ``own_origin``: the
    request's own scheme://host[:port], as its client addressed it.
    """
    if origin is not None:
        claimed = _origin(origin)
        if claimed is None or claimed != _origin(own_origin):
            return f"cross-site request refused: Origin {origin} is not this service's origin ({own_origin})"
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if requested_with is None and media_type != "application/json" and not media_type.endswith("+json"):
        return (
            "request refused as possibly cross-site: send Content-Type: application/json "
            "or an X-Requested-With header (any value) with POST and DELETE requests to /api/*"
        )
    return None


class DomainRateLimiter:
    """A token bucket per domain: ``rate`` events a second on average, bursts up to ``burst``."""

    @classmethod
    def following(cls, current: DomainRateLimiter, rate: float, burst: int) -> DomainRateLimiter:
        """``current`` while its settings are ``rate`` and ``burst``, else a new limiter with them (a reload)."""
        return current if (current.rate, current.burst) == (rate, burst) else cls(rate, burst)

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # domain → (tokens, when)

    def take(self, domain: str, now: float | None = None) -> float:
        """0 when the event may pass, else the seconds until it would."""
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(domain, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if len(self._buckets) >= MAX_RATE_LIMITED_DOMAINS:
            self._buckets.popitem(last=False)
        if tokens >= 1:
            self._buckets[domain] = (tokens - 1, now)
            return 0.0
        self._buckets[domain] = (tokens, now)
        return (1 - tokens) / self.rate
