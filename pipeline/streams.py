"""The JetStream streams the service keeps: their names, subjects and settings, and what a refusal means.

Plain descriptions (nats-py's config types, no connection): the NATS bridge
creates and updates the streams from them.
"""

from __future__ import annotations

from nats.js import api
from nats.js.errors import APIError

from pipeline.config import ConfigError, NatsConfig
from pipeline.events import MAX_DOMAIN_LENGTH, MAX_EVENT_ID_LENGTH, bounded_token

# nats-server 2.15's default consumer limit per stream; the event stream's is
# set explicitly, never below this, and raised with the routes.
MIN_CONSUMER_LIMIT = 1000
# The advisories of events JetStream gave up on are small (~250 bytes): this
# holds hundreds of thousands while no dead-letter writer runs.
ADVISORY_STREAM_BYTES = 64 * 1024**2
# The longest tokens of what the ingress accepts (each character escaped at most to 3).
_MAX_DOMAIN_TOKEN = 3 * MAX_DOMAIN_LENGTH
_MAX_EVENT_ID_TOKEN = 3 * MAX_EVENT_ID_LENGTH
# JetStream's refusals of a stream that the operator can act on.
_ERR_INSUFFICIENT_STORAGE = 10047
_ERR_REPLICAS_NOT_SUPPORTED = 10074
# A cluster with fewer servers than the replicas asked for (or one still meeting its peers).
ERR_NO_SUITABLE_PEERS = 10005  # "no suitable peers for placement"


class StreamSetupError(ConfigError):
    """The streams cannot be set up as configured; ``str()`` is one line naming what to change."""


def consumer_limit(routed_domains: int) -> int:
    """The event stream's consumer limit for ``routed_domains`` (one consumer each), with room to grow."""
    return max(MIN_CONSUMER_LIMIT, 2 * routed_domains)


def retention_mismatch(config: api.StreamConfig, existing: api.RetentionPolicy) -> StreamSetupError:
    """A stream made with another retention: JetStream cannot change it, and the service never does silently."""
    assert config.retention is not None
    return StreamSetupError(
        f"stream {config.name!r} has {existing.value} retention (made by an earlier version) and "
        f"JetStream cannot change it to {config.retention.value}: let it deliver what it holds, then "
        "delete it (embedded server: remove nats.data_dir) or set nats.stream_name to a new name"
    )


class Streams:
    """The three streams of one configured ``stream_name``.

    ``<name>``: the events, a work queue with a backlog quota per domain;
    ``<name>-dead-letters``: events that used up their deliveries;
    ``<name>-given-up``: JetStream's advisories of the events it stopped delivering.
    """

    def __init__(self, config: NatsConfig) -> None:
        self._config = config
        self.events = config.stream_name
        self.dead_letters = f"{config.stream_name}-dead-letters"
        self.given_up = f"{config.stream_name}-given-up"

    def dead_letter_subject(self, domain: str = "*", event_id: str | None = None) -> str:
        """``dead-letters.<stream>.<domain token>.<event_id token>`` (wildcards where not given).

        A token longer than any the ingress accepts makes (a message stored by something else) is
        cut and hashed: a subject over nats-server's 4 KiB command line would end the connection.
        """
        domain_part = domain if domain == "*" else bounded_token(domain, _MAX_DOMAIN_TOKEN)
        event_part = "*" if event_id is None else bounded_token(event_id, _MAX_EVENT_ID_TOKEN)
        return f"dead-letters.{self.events}.{domain_part}.{event_part}"

    def configs(self, consumer_limit: int) -> dict[str, api.StreamConfig]:
        """Each stream's config, by the config key that sizes it."""
        nats_config = self._config
        return {
            "nats.max_bytes": api.StreamConfig(
                name=self.events,
                subjects=[nats_config.subject_pattern],
                storage=api.StorageType.FILE,
                # An event leaves once acknowledged; history lives in /api/events and the log files.
                retention=api.RetentionPolicy.WORK_QUEUE,
                # Full, the stream refuses new events; it never deletes waiting ones. One
                # domain is one subject, so a domain over its quota refuses only its own.
                discard=api.DiscardPolicy.NEW,
                max_msgs_per_subject=nats_config.max_backlog_per_domain,
                discard_new_per_subject=True,
                max_age=nats_config.max_age_days * 86400,
                max_bytes=int(nats_config.max_bytes),
                max_consumers=consumer_limit,
                duplicate_window=nats_config.duplicate_window_seconds,
                num_replicas=nats_config.replicas,
            ),
            "nats.dead_letter_max_bytes": api.StreamConfig(
                name=self.dead_letters,
                subjects=[f"dead-letters.{self.events}.>"],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                max_age=nats_config.dead_letter_max_age_days * 86400,
                max_bytes=int(nats_config.dead_letter_max_bytes),
                duplicate_window=nats_config.duplicate_window_seconds,
                num_replicas=nats_config.replicas,
            ),
            "nats.max_bytes (and the 64 MiB advisory stream)": api.StreamConfig(
                name=self.given_up,
                # JetStream says here when it stops delivering an event, whether or not
                # an instance is running to hear it.
                subjects=[f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.events}.*"],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.WORK_QUEUE,
                max_age=nats_config.max_age_days * 86400,
                max_bytes=ADVISORY_STREAM_BYTES,
                num_replicas=nats_config.replicas,
            ),
        }

    def setup_error(self, key: str, config: api.StreamConfig, error: APIError) -> StreamSetupError:
        """What JetStream's refusal of ``config`` (sized by ``key``) means for the operator, in one line."""
        if error.err_code == _ERR_INSUFFICIENT_STORAGE:
            setting = key.split()[0]
            return StreamSetupError(
                f"{key}: JetStream has too little storage for stream {config.name!r} "
                f"({int(config.max_bytes or 0):,} bytes, reserved up front): lower {setting} or free disk"
            )
        if error.err_code == _ERR_REPLICAS_NOT_SUPPORTED:
            return StreamSetupError(
                f"nats.replicas: {self._config.replicas} replicas need a NATS cluster; this server runs alone"
            )
        if error.err_code == ERR_NO_SUITABLE_PEERS:
            return StreamSetupError(
                f"nats.replicas: the NATS cluster has no {self._config.replicas} servers to hold stream "
                f"{config.name!r} ({error.description}): lower nats.replicas or add servers"
            )
        return StreamSetupError(f"stream {config.name!r}: JetStream refused it: {error.description}")
