"""The operator's JSON API: /api/events, /api/stats, /api/stream/messages."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from quart import request
from quart_trio import QuartTrio

from actors.stats import StatsCollector, rfc3339
from actors.subscriber import Subscriber
from pipeline.events import InvalidEvent, domain_subject, normalize_domain, subject_domain
from pipeline.nats_bridge import JetStream, NatsUnavailable

MAX_LIMIT = 1000
_EVENT_TYPES = ("successful", "failed", "all")


class BadQuery(ValueError):
    """A query parameter the API cannot use; ``str()`` tells the client which and why."""


def _limit(default: int) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw!r}")
    return limit


def _domain() -> str | None:
    raw = request.args.get("domain")
    if raw is None or raw == "":
        return None
    try:
        return normalize_domain(raw)
    except InvalidEvent as error:
        raise BadQuery(str(error)) from None


def register_api(app: QuartTrio, *, stats: StatsCollector, subscriber: Subscriber, jetstream: JetStream) -> None:
    @app.errorhandler(BadQuery)
    async def bad_query(error: BadQuery) -> tuple[dict[str, Any], int]:
        return {"status": "error", "error": str(error)}, 400

    @app.get("/api/events")
    async def events() -> dict[str, Any]:
        kind = request.args.get("type", "all")
        if kind not in _EVENT_TYPES:
            raise BadQuery(f"type must be one of {', '.join(_EVENT_TYPES)}, got {kind!r}")
        return stats.events(kind, _domain(), _limit(100))

    @app.get("/api/stats")
    async def statistics() -> dict[str, Any]:
        store = asdict(stats.statistics())
        flows = subscriber.statistics()
        for domain, in_flight in flows.in_flight_by_domain.items():
            if domain in store["domains"]:
                store["domains"][domain]["in_flight"] = in_flight
        return store | {"in_flight": flows.in_flight}

    @app.get("/api/stream/messages")
    async def stream_messages() -> tuple[dict[str, Any], int]:
        limit, domain = _limit(50), _domain()
        pattern = jetstream.config.subject_pattern
        subject = domain_subject(pattern, domain) if domain else None
        try:
            messages, total = await jetstream.newest_messages(limit, subject)
        except NatsUnavailable as error:
            return {"status": "error", "error": str(error)}, 503
        return {
            "messages": [
                {
                    "subject": message.subject,
                    "domain": subject_domain(pattern, message.subject),
                    "sequence": message.sequence,
                    "timestamp": rfc3339(message.stored_at),
                    "data": _parsed(message.data),
                }
                for message in messages
            ],
            "total": total,
        }, 200


def _parsed(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")
