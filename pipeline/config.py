"""The configuration file: its pydantic models and the one function that loads it.

Every user error (missing file, bad YAML, wrong type, broken rule) becomes a
``ConfigError`` whose message is one line naming the file, the field and the
reason, so the CLI can print it without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.access import ApiKey, IngressAccess
from pipeline.events import normalize_domain
from pipeline.routes import Endpoint


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is one line for the operator."""


class ConfigUnreadable(ConfigError):
    """The configuration file is missing or cannot be read (as opposed to invalid)."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    max_body_size: ByteSize = ByteSize(1024 * 1024)
    # How long in-flight HTTP requests and forwards may take to finish on SIGTERM.
    shutdown_grace_seconds: float = Field(10.0, gt=0)


class NatsConfig(_Section):
    url: str = "embedded"
    stream_name: str = Field("call-signals", pattern=r"^[A-Za-z0-9_-]+$")
    subject_pattern: str = "call.signal.*"
    ack_wait_seconds: float = Field(10.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    # The stream is a work queue: an event leaves it once every endpoint took it
    # (or it became a dead letter). What waits longer than this (a domain with
    # no route, a service stopped for days) is removed.
    max_age_days: float = Field(7.0, gt=0)
    # Both streams reserve their size on disk up front; the defaults (with the
    # small advisory stream) fit in the storage JetStream gives itself on 8 GB of free disk.
    max_bytes: ByteSize = ByteSize(3 * 1024**3)
    # Events one domain may have waiting; beyond it only that domain's new events get 503.
    max_backlog_per_domain: int = Field(100_000, ge=1)
    # Events all domains without a route may have waiting together (anyone can
    # invent domains); beyond it, or once the stream is half full, their new
    # events get 503, so they never fill the stream routed tenants need. 0: none accepted.
    max_unrouted_backlog: int = Field(100_000, ge=0)
    # Events that used up max_deliveries are kept this long in the dead-letter stream.
    dead_letter_max_age_days: float = Field(30.0, gt=0)
    dead_letter_max_bytes: ByteSize = ByteSize(1024**3)
    # Copies of every stream and consumer on a cluster (1 on a single server).
    replicas: int = Field(1, ge=1, le=5)
    # Window in which a repeated event_id (a client's retry) is stored once.
    duplicate_window_seconds: float = Field(120.0, gt=0)
    publish_timeout_seconds: float = Field(5.0, gt=0)
    # A routed domain's consumer exists while events wait for it: created at the
    # first, deleted after this long with nothing to do (never while it holds
    # unacknowledged events). A forwarder fed from the ingress alone ends after as long.
    consumer_idle_seconds: float = Field(60.0, gt=0)
    # Embedded server only: where JetStream keeps its files, and whether it fsyncs
    # every write ("always") or on the server's default 2-minute interval.
    data_dir: Path = Path("data/nats")
    sync_always: bool = False

    @field_validator("url")
    @classmethod
    def _url_is_embedded_or_nats(cls, url: str) -> str:
        if url == "embedded":
            return url
        for server in url.split(","):
            if not server.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError('must be "embedded" or nats:// URLs (comma-separated for a cluster)')
        return url

    @field_validator("subject_pattern")
    @classmethod
    def _one_wildcard_token(cls, pattern: str) -> str:
        tokens = pattern.split(".")
        if tokens.count("*") != 1 or any(not t or t == ">" or " " in t for t in tokens):
            raise ValueError('must be dot-separated tokens with exactly one "*" for the domain, e.g. call.signal.*')
        return pattern

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"


class ForwardingConfig(_Section):
    # lean: one deadline for the whole request (connect, send, the whole answer);
    # httpx: the same number applies to each socket operation on its own.
    timeout_seconds: float = Field(3.0, gt=0)
    # lean: the service's own HTTP/1.1 keep-alive transport (pipeline/webhook_transport.py);
    # httpx: httpx.AsyncHTTPTransport (httpcore), kept for comparison and as the base for what the
    # lean one lacks (proxies, HTTP/2; neither is configured today).
    http_transport: Literal["lean", "httpx"] = "lean"
    # Events of one domain being forwarded at once; also how many the subscriber
    # fetches for that domain, so nothing waits in memory while ack_wait runs.
    max_in_flight_per_domain: int = Field(64, ge=1, le=10_000)


_SHA256 = r"^[0-9a-f]{64}$"


class ApiKeyConfig(_Section):
    name: str = Field(min_length=1)
    # SHA-256 of the key, hex: `printf %s KEY | sha256sum`. The key itself is never stored.
    sha256: str = Field(pattern=_SHA256)
    domains: tuple[str, ...] = Field(min_length=1)  # the domains it may post for; "*" for all

    @field_validator("domains")
    @classmethod
    def _valid_domains(cls, domains: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(domain if domain == "*" else normalize_domain(domain) for domain in domains)


class IngressConfig(_Section):
    # With no keys the ingress is open to anyone (a loud warning says so at start).
    api_keys: tuple[ApiKeyConfig, ...] = ()
    # Per-domain token bucket for POST /events, for each routed domain; 0 turns it off.
    rate_limit_per_second: float = Field(500.0, ge=0)
    rate_limit_burst: int = Field(1000, ge=1)
    # One token bucket shared by all domains without a route (a client can invent
    # any number of them): together they get one tenant's allowance. 0 turns it off.
    unrouted_rate_limit_per_second: float = Field(500.0, ge=0)
    unrouted_rate_limit_burst: int = Field(1000, ge=1)


class AdminConfig(_Section):
    # SHA-256 (hex) of the password for the dashboard and /api/* (basic auth with
    # any user name, or "Authorization: Bearer <password>"). Unset: loopback clients
    # only (behind a local reverse proxy that is everyone), with a warning.
    password_sha256: str | None = Field(None, pattern=_SHA256)
    # Serve the dashboard and /api/* on this host:port only (e.g. 127.0.0.1:8081),
    # and only POST /events and /health on server.host:port.
    listen: str | None = Field(None, pattern=r"^[^:\s]+:\d{1,5}$")


class StatsConfig(_Section):
    # The in-memory store behind /api/events: recent outcomes per domain and type,
    # and how many domains are kept (the least recently active is dropped first).
    max_events_per_domain: int = Field(1000, ge=1, le=100_000)
    max_domains: int = Field(100, ge=1, le=100_000)


class LoggingConfig(_Section):
    # Per-domain log files (on unless -domain-logging=false): logs/<domain>/<UTC day>.log
    dir: Path = Path("logs")
    max_file_size: ByteSize = ByteSize(500 * 1000**2)  # a day's file rolls to a numbered part at this size
    max_backups: int = Field(30, ge=1)  # closed files kept per domain (days and parts)
    max_age_days: int = Field(30, ge=1)  # files of older days are deleted
    compress: bool = True  # gzip closed files


def _http_url(url: HttpUrl) -> str:
    return str(url)


EndpointUrl = Annotated[HttpUrl, AfterValidator(_http_url)]


class EndpointConfig(_Section):
    """An endpoint: its URL, written alone, or ``{url, secret}`` for signed requests."""

    url: EndpointUrl
    # Requests to this endpoint carry Standard Webhooks signatures made with it.
    secret: str | None = Field(None, min_length=16)

    @model_validator(mode="before")
    @classmethod
    def _url_alone(cls, value: object) -> object:
        return {"url": value} if isinstance(value, str) else value


class Route(_Section):
    domain: str
    endpoints: list[EndpointConfig] = Field(min_length=1)

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, domain: str) -> str:
        return normalize_domain(domain)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    nats: NatsConfig = NatsConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    stats: StatsConfig = StatsConfig()
    logging: LoggingConfig = LoggingConfig()
    ingress: IngressConfig = IngressConfig()
    admin: AdminConfig = AdminConfig()
    routes: tuple[Route, ...] = ()

    @field_validator("routes")
    @classmethod
    def _unique_domains(cls, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        seen: set[str] = set()
        for route in routes:
            if route.domain in seen:
                raise ValueError(f"duplicate domain {route.domain!r}")
            seen.add(route.domain)
        return routes

    @model_validator(mode="after")
    def _ack_wait_exceeds_timeout(self) -> Config:
        if self.nats.ack_wait_seconds <= self.forwarding.timeout_seconds:
            raise ValueError(
                f"nats.ack_wait_seconds ({self.nats.ack_wait_seconds:g}) must exceed "
                f"forwarding.timeout_seconds ({self.forwarding.timeout_seconds:g}), "
                "or events are redelivered while still being forwarded"
            )
        return self

    def ingress_access(self) -> IngressAccess:
        return IngressAccess(
            {key.sha256: ApiKey(key.name, frozenset(key.domains)) for key in self.ingress.api_keys},
            rate_per_second=self.ingress.rate_limit_per_second,
            burst=self.ingress.rate_limit_burst,
            unrouted_rate_per_second=self.ingress.unrouted_rate_limit_per_second,
            unrouted_burst=self.ingress.unrouted_rate_limit_burst,
        )

    def endpoints_by_domain(self) -> dict[str, tuple[Endpoint, ...]]:
        return {
            route.domain: tuple(Endpoint(endpoint.url, endpoint.secret) for endpoint in route.endpoints)
            for route in self.routes
        }


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` with one line per problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigUnreadable(f"{path}: file not found") from None
    except UnicodeDecodeError as error:  # a legacy code page, an editor's "Unicode" (UTF-16)
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigUnreadable(f"{path}: cannot read: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as error:  # PyYAML builds dates and tagged values with Python's own constructors
        raise ConfigError(f"{path}: invalid YAML: {error} (quote the value if it is text)") from None
    if raw is None:
        # A truncated file (an editor's half-write, a `>` typo) is not "no routes": that is said explicitly.
        raise ConfigError(
            f'{path}: the file has no settings (empty, or only comments); a config without routes says "routes: []"'
        )
    if not isinstance(raw, dict):
        sections = ", ".join(Config.model_fields)
        raise ConfigError(f"{path}: the top level must be a mapping ({sections})")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        lines = []
        for problem in error.errors(include_url=False):
            field = _field_path(problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {field}: {message}" if field else f"{path}: {message}")
        raise ConfigError("\n".join(lines)) from None
