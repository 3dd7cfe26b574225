"""The operator's JSON API: events, stats, the stream, the log files, and the routes."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import trio
from quart import request
from quart_trio import QuartTrio

from actors.backlog_monitor import BacklogMonitor
from actors.config_watcher import ConfigWatcher, ReloadRequest
from actors.log_writer import LogWriter
from actors.stats import StatsCollector, rfc3339
from actors.subscriber import Subscriber
from pipeline.domain_logs import domain_directory, logged_domains, read_day
from pipeline.events import (
    AcceptedEvent,
    InvalidEvent,
    describe,
    domain_subject,
    event_json,
    normalize_domain,
    parse_strict_json,
    subject_domain,
)
from pipeline.nats_bridge import JetStream, NatsUnavailable, StoredMessage
from pipeline.routes import Routes

MAX_LIMIT = 1000
# A reload reads and validates one small file; longer means the watcher is stuck or stopping.
RELOAD_TIMEOUT_SECONDS = 10
# /api/logs pages back at most this far (it keeps offset + limit records in memory).
MAX_OFFSET = 100_000
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
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


def _offset() -> int:
    raw = request.args.get("offset", "0")
    # ASCII digits, few enough to read: "²" is a digit to isdigit(), not to int().
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_OFFSET))) or int(raw) > MAX_OFFSET:
        raise BadQuery(f"offset must be a whole number from 0 to {MAX_OFFSET}, got {raw!r}")
    return int(raw)


def _date() -> str:
    raw = request.args.get("date")
    if raw is None or raw == "":
        return datetime.now(UTC).date().isoformat()
    try:
        if not _DATE.fullmatch(raw):
            raise ValueError
        return date.fromisoformat(raw).isoformat()
    except ValueError:
        raise BadQuery(f"date must be YYYY-MM-DD, got {raw!r}") from None


def _event_type() -> str:
    kind = request.args.get("type", "all")
    if kind not in _EVENT_TYPES:
        raise BadQuery(f"type must be one of {', '.join(_EVENT_TYPES)}, got {kind!r}")
    return kind


def _domain() -> str | None:
    raw = request.args.get("domain")
    if raw is None or raw == "":
        return None
    try:
        return normalize_domain(raw)
    except InvalidEvent as error:
        raise BadQuery(str(error)) from None


def register_api(
    app: QuartTrio,
    *,
    stats: StatsCollector,
    subscriber: Subscriber,
    backlog: BacklogMonitor,
    jetstream: JetStream,
    log_writer: LogWriter | None,
    logs_dir: Path,
    config_watcher: ConfigWatcher | None,
    reload_requests: trio.MemorySendChannel[ReloadRequest],
) -> None:
    @app.errorhandler(BadQuery)
    async def bad_query(error: BadQuery) -> tuple[dict[str, Any], int]:
        return {"status": "error", "error": str(error)}, 400

    @app.get("/api/events")
    async def events() -> dict[str, Any]:
        return stats.events(_event_type(), _domain(), _limit(100))

    @app.get("/api/stats")
    async def statistics() -> dict[str, Any]:
        return service_statistics(stats, subscriber, backlog, log_writer)

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

    async def list_logged_domains() -> dict[str, Any]:
        domains = await trio.to_thread.run_sync(logged_domains, logs_dir)
        return {"domains": [asdict(domain) for domain in domains]}

    @app.get("/api/logs/domains")
    async def logs_domains() -> dict[str, Any]:
        return await list_logged_domains()

    @app.get("/api/logs")
    async def logs() -> tuple[dict[str, Any], int]:
        requested = request.args.get("domain")
        if not requested:
            return await list_logged_domains(), 200
        day, kind, offset, limit = _date(), _event_type(), _offset(), _limit(100)
        directory = await trio.to_thread.run_sync(domain_directory, logs_dir, requested)
        if directory is None:
            return {"status": "error", "error": f"no log files for domain {requested!r}"}, 404
        page = await trio.to_thread.run_sync(lambda: read_day(directory, day, kind=kind, offset=offset, limit=limit))
        return page | {"domain": directory.name, "date": day}, 200

    @app.get("/api/dead-letters")
    async def dead_letters() -> tuple[dict[str, Any], int]:
        limit, domain, event_id = _limit(100), _domain(), request.args.get("event_id") or None
        subject = jetstream.streams.dead_letter_subject(domain or "*", event_id) if domain or event_id else None
        try:
            messages, total = await jetstream.newest_messages(limit, subject, dead_letters=True)
        except NatsUnavailable as error:
            return {"status": "error", "error": str(error)}, 503
        letters = []
        for message in messages:
            letter = _parsed(message.data)
            if isinstance(letter, dict):
                letters.append({"id": message.sequence} | letter)
        return {"dead_letters": letters, "total": total}, 200

    async def find_dead_letter(letter_id: int) -> tuple[StoredMessage | None, tuple[dict[str, Any], int] | None]:
        try:
            letter = await jetstream.find_dead_letter(letter_id) if 0 < letter_id < 2**63 else None
        except NatsUnavailable as error:
            return None, ({"status": "error", "error": str(error)}, 503)
        if letter is None:
            return None, ({"status": "error", "error": f"no dead letter with id {letter_id}"}, 404)
        return letter, None

    @app.post("/api/dead-letters/<int:letter_id>/replay")
    async def replay_dead_letter(letter_id: int) -> tuple[dict[str, Any], int]:
        letter, failure = await find_dead_letter(letter_id)
        if letter is None:
            return failure
        envelope = json.loads(letter.data)
        event = {key: value for key, value in envelope["event"].items() if key != "delivery_attempt"}
        replayed = AcceptedEvent(
            event_id=envelope["event_id"],
            domain=envelope["domain"],
            payload=event_json(event),
            fields=describe(event) | {"domain": envelope["domain"]},
            event=event,
            # One id per dead letter: the replay is not deduplicated away, a retried replay is.
            message_id=f"replay:{jetstream.streams.dead_letters}:{letter.sequence}",
        )
        [outcome] = await jetstream.publish_batch([replayed])
        if isinstance(outcome, Exception):
            return {"status": "error", "error": f"not replayed: {outcome or type(outcome).__name__}"}, 503
        subscriber.wake(replayed.domain)
        await jetstream.delete_dead_letter(letter.sequence)
        return {
            "status": "replayed",
            "id": letter_id,
            "event_id": replayed.event_id,
            "sequence": outcome.sequence,
        }, 202

    @app.delete("/api/dead-letters/<int:letter_id>")
    async def discard_dead_letter(letter_id: int) -> tuple[dict[str, Any], int]:
        letter, failure = await find_dead_letter(letter_id)
        if letter is None:
            return failure
        try:
            await jetstream.delete_dead_letter(letter.sequence)
        except NatsUnavailable as error:
            return {"status": "error", "error": str(error)}, 503
        return {"status": "deleted", "id": letter_id}, 200

    @app.post("/api/config/reload")
    async def reload_config() -> tuple[dict[str, Any], int]:
        if config_watcher is None:
            return {"status": "error", "message": "the service was started without a config file"}, 409
        reload = ReloadRequest()
        with trio.move_on_after(RELOAD_TIMEOUT_SECONDS):
            await reload_requests.send(reload)
            await reload.done.wait()
        if reload.result is None:
            return {"status": "error", "message": "the reload did not finish; try again"}, 503
        if reload.result.status != 200:
            return {"status": "error", "message": reload.result.message}, reload.result.status
        return {"status": "success", "message": reload.result.message, "routes": reload.result.route_count}, 200

    @app.get("/api/config/routes")
    async def active_routes() -> dict[str, Any]:
        if config_watcher is None:
            routes = subscriber.routes()
            return {"routes": _route_list(routes), "route_count": len(routes), "loaded_at": None, "config_file": None}
        active = config_watcher.active
        return {
            "routes": _route_list(active.routes),
            "route_count": len(active.routes),
            "loaded_at": rfc3339(active.loaded_at),
            "config_file": str(active.config_file),
        }


def service_statistics(
    stats: StatsCollector, subscriber: Subscriber, backlog: BacklogMonitor, log_writer: LogWriter | None
) -> dict[str, Any]:
    """The body of /api/stats (also pushed to the live dashboard)."""
    store = asdict(stats.statistics())
    flows = subscriber.statistics()
    waiting = backlog.report()
    for domain, in_flight in flows.in_flight_by_domain.items():
        if domain in store["domains"]:
            store["domains"][domain]["in_flight"] = in_flight
    for domain, count in waiting.get("domains", {}).items():
        if domain in store["domains"]:
            store["domains"][domain]["backlog"] = count
    dropped = log_writer.health().dropped_lines if log_writer is not None else 0
    unconsumable = {
        "count": flows.unconsumable,
        "examples": {domain: asdict(failure) for domain, failure in flows.unconsumable_examples.items()},
    }
    return store | {
        "in_flight": flows.in_flight,
        "consuming_domains": flows.consuming,
        "log_lines_dropped": dropped,
        "backlog": waiting,
        "unconsumable": unconsumable,
    }


def _route_list(routes: Routes) -> list[dict[str, Any]]:
    return [
        {
            "domain": domain,
            "endpoints": [endpoint.url for endpoint in endpoints],
            "signed_endpoints": [endpoint.url for endpoint in endpoints if endpoint.secret],
        }
        for domain, endpoints in sorted(routes.items())
    ]


def _parsed(data: bytes) -> Any:
    try:
        return parse_strict_json(data)
    except ValueError:  # not JSON, or a NaN stored by an older version: shown as text
        return data.decode(errors="replace")
