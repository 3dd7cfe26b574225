"""structlog, configured once: JSON lines to stdout or to the -log-file."""

from __future__ import annotations

import logging
from typing import TextIO

import structlog

from actors.log_writer import DomainLogRouter

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def configure_logging(
    level: str, output: TextIO, domain_router: DomainLogRouter | None = None, *, cache_loggers: bool = True
) -> None:
    """Send every structlog record at ``level`` or above to ``output`` as one JSON line.

    With ``domain_router``, records about an event go to the per-domain files
    instead (warnings and errors to both). ``cache_loggers=False`` lets a later
    ``configure`` (tests) reach loggers already used.
    """
    routing = [domain_router] if domain_router is not None else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("msg"),
            *routing,
            _without_payload,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(output),
        cache_logger_on_first_use=cache_loggers,
    )


def _without_payload(logger: object, method_name: str, record: dict) -> dict:
    # The full event (with customers' phone numbers) goes to domain files only.
    record.pop("payload", None)
    return record
