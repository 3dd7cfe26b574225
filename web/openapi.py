"""The service's OpenAPI description, served at /openapi.json (and used by the schemathesis test)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "A JSON error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_JSON = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "records per list")
# A domain label: letters, digits, "-" and "_", with at least one letter or digit.
_LABEL = "[A-Za-z0-9_-]*[A-Za-z0-9][A-Za-z0-9_-]*"
_DOMAIN = _query("domain", {"type": "string"}, "only this domain")
_TYPE = _query("type", {"type": "string", "enum": ["successful", "failed", "all"]}, "outcome type")
_EVENT_ID = {"name": "event_id", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1}}
_LETTER_ID = {"name": "letter_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
# State-changing admin routes refuse "simple" requests, which any site can make a browser send.
_REQUESTED_WITH = {
    "name": "X-Requested-With",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,40}$"},
    "description": "any value (or send Content-Type: application/json instead); a request with an Origin "
    "header must come from this service's own origin",
}
# Every /api/* route: 401 without the admin password (when one is set), 403 for a
# non-loopback client without one, or a refused cross-site request.
_ADMIN = {"401": _ERROR, "403": _ERROR}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "telephony-forwarder",
        "version": "1",
        "description": "Call-signal events in, stored in NATS JetStream, forwarded to every webhook of their domain.",
    },
    "paths": {
        "/events": {
            "post": {
                "summary": "Accept a call-signal event",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}},
                },
                "responses": {
                    "202": {
                        "description": "Stored in JetStream",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                    },
                    **{code: _ERROR for code in ("400", "401", "403", "413", "415", "429", "500", "503")},
                },
            }
        },
        "/health": {"get": {"summary": "Service health", "responses": {"200": _JSON, "503": _JSON}}},
        "/api/events": {
            "get": {
                "summary": "Recent outcomes, by domain",
                "parameters": [_TYPE, _DOMAIN, _LIMIT],
                "responses": {"200": _JSON, "400": _ERROR, **_ADMIN},
            }
        },
        "/api/stats": {"get": {"summary": "Counters", "responses": {"200": _JSON, **_ADMIN}}},
        "/api/stream/messages": {
            "get": {
                "summary": "Newest messages of the stream",
                "parameters": [_DOMAIN, _LIMIT],
                "responses": {"200": _JSON, "400": _ERROR, "503": _ERROR, **_ADMIN},
            }
        },
        "/api/logs/domains": {"get": {"summary": "Domains with log files", "responses": {"200": _JSON, **_ADMIN}}},
        "/api/logs": {
            "get": {
                "summary": "A day's outcomes from a domain's log files",
                "parameters": [
                    _query("domain", {"type": "string"}, "sanitized domain"),
                    _query("date", {"type": "string", "format": "date"}, "YYYY-MM-DD (UTC)"),
                    _TYPE,
                    _LIMIT,
                    _query("offset", {"type": "integer", "minimum": 0, "maximum": 100000}, "records to skip"),
                ],
                "responses": {"200": _JSON, "400": _ERROR, "404": _ERROR, **_ADMIN},
            }
        },
        "/api/config/routes": {"get": {"summary": "Active routes", "responses": {"200": _JSON, **_ADMIN}}},
        "/api/config/reload": {
            "post": {
                "summary": "Reload the config file",
                "parameters": [_REQUESTED_WITH],
                "responses": {"200": _JSON, **{c: _ERROR for c in ("400", "409", "500", "503")}, **_ADMIN},
            }
        },
        "/api/dead-letters": {
            "get": {
                "summary": "Events that used up their deliveries",
                "parameters": [_DOMAIN, _EVENT_ID, _LIMIT],
                "responses": {"200": _JSON, "400": _ERROR, "503": _ERROR, **_ADMIN},
            }
        },
        "/api/dead-letters/{letter_id}/replay": {
            "post": {
                "summary": "Store a dead letter again for new attempts",
                "parameters": [_LETTER_ID, _REQUESTED_WITH],
                "responses": {"202": _JSON, "404": _ERROR, "503": _ERROR, **_ADMIN},
            }
        },
        "/api/dead-letters/{letter_id}": {
            "delete": {
                "summary": "Discard a dead letter",
                "parameters": [_LETTER_ID, _REQUESTED_WITH],
                "responses": {"200": _JSON, "404": _ERROR, "503": _ERROR, **_ADMIN},
            }
        },
    },
    "components": {
        "schemas": {
            "Event": {
                "type": "object",
                "required": ["domain"],
                "properties": {
                    "domain": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 253,
                        # A letter or digit in every dot-separated label (pipeline.events.normalize_domain).
                        "pattern": f"^{_LABEL}(\\.{_LABEL})*$",
                    },
                    "event_id": {"type": "string", "pattern": "^[!-~]{1,128}$"},
                    "call_id": {"type": "string"},
                    "direction": {"type": "string"},
                    "state": {"type": "string"},
                    "status": {"type": "string"},
                },
                "additionalProperties": True,
            },
            "Accepted": {
                "type": "object",
                "required": ["status", "event_id", "sequence"],
                "properties": {
                    "status": {"type": "string", "enum": ["accepted"]},
                    "event_id": {"type": "string"},
                    "sequence": {"type": "integer"},
                    "duplicate": {"type": "boolean"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string"},
                    "error": {"type": "string"},
                    "message": {"type": "string"},
                },
            },
        }
    },
}
