"""The supervisor: opens the root nursery, starts every actor and the web server in order."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import structlog
import trio
from quart_trio import QuartTrio
from trio_util import AsyncValue

from actors.acknowledger import Acknowledger
from actors.backlog_monitor import BacklogMonitor
from actors.config_watcher import ConfigWatcher, ReloadRequest
from actors.dead_letter_writer import DeadLetterWriter
from actors.ingress import Ingress, PublishRequest
from actors.log_writer import DomainLogFiles, DomainLogLine, DomainLogRouter, LogWriter
from actors.stats import ForwardOutcome, StatsCollector
from actors.subscriber import Subscriber
from pipeline.config import Config
from pipeline.embedded_nats import EmbeddedNats
from pipeline.name_lookups import SharedLookups
from pipeline.nats_bridge import Delivery, open_jetstream
from pipeline.routes import Routes, open_routes
from web.app import create_app
from web.ingress import EventIngress
from web.server import HttpListener, ListenError, listen_http, serve_http

log = structlog.get_logger(component="supervisor")

# Requests waiting to be published: enough for a burst across a few batches;
# beyond that handlers wait, which is the back-pressure a client should feel.
PUBLISH_QUEUE_SIZE = 1024
# Deliveries waiting to be acked: many batches' worth, so forwarders rarely wait.
ACK_QUEUE_SIZE = 4096
# Log lines waiting to be written: a few seconds of a busy service, so a slow
# disk does not make the router drop lines at once.
LOG_QUEUE_SIZE = 16384
# Reload requests from the API: one at a time is applied; a few may queue.
RELOAD_QUEUE_SIZE = 8
# Outcomes waiting to be recorded: recording is cheap, so this only absorbs bursts.
OUTCOME_QUEUE_SIZE = 4096


async def run_service(
    config: Config,
    stopping: trio.Event,
    *,
    config_path: Path | None = None,
    domain_router: DomainLogRouter | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole service until ``stopping`` is set, then shut down in order.

    Reports the HTTP server's bound addresses once everything is ready. With
    ``config_path`` (the file ``config`` came from), routes follow that file's
    changes and POST /api/config/reload. With
    ``domain_router`` (the structlog processor of per-domain logging) the log
    writer runs first and stops last, so the records of the shutdown itself
    reach the files.
    """
    # Endpoints' names (and a NATS server's) looked up apart from trio's shared worker threads.
    trio.socket.set_custom_hostname_resolver(SharedLookups())
    # One holder of the routes for everything: the config watcher swaps them, the
    # log writer and the pipeline read them.
    routes = open_routes(config.endpoints_by_domain())
    if domain_router is None:
        await _run_pipeline(config, config_path, routes, stopping, None, task_status=task_status)
        return
    lines_send, lines_receive = trio.open_memory_channel[DomainLogLine](LOG_QUEUE_SIZE)
    writer = LogWriter(lines_receive, DomainLogFiles(config.logging.dir, config.logging), domain_router, routes)
    async with trio.open_nursery() as logging:
        await logging.start(writer.run)
        with lines_send:
            domain_router.attach(lines_send)
            try:
                await _run_pipeline(config, config_path, routes, stopping, writer, task_status=task_status)
            finally:
                domain_router.attach(None)


async def _run_pipeline(
    config: Config,
    config_path: Path | None,
    routes: AsyncValue[Routes],
    stopping: trio.Event,
    log_writer: LogWriter | None,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """The HTTP addresses bound first (a port in use ends the start before NATS is touched), then the pipeline."""
    listeners = _listen(config)
    try:
        await _run_listening(config, config_path, routes, stopping, log_writer, listeners, task_status=task_status)
    finally:
        for listener in listeners:
            listener.close()


def _listen(config: Config) -> list[HttpListener]:
    """The public address, and the admin surface's when it has its own (``admin.listen``), bound."""
    public = listen_http(config.server)
    if config.admin.listen is None:
        return [public]
    host, _, port = config.admin.listen.rpartition(":")
    try:
        return [public, listen_http(config.server.model_copy(update={"host": host, "port": int(port)}))]
    except ListenError:
        public.close()
        raise


async def _run_listening(
    config: Config,
    config_path: Path | None,
    routes: AsyncValue[Routes],
    stopping: trio.Event,
    log_writer: LogWriter | None,
    listeners: list[HttpListener],
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Shutdown order: the HTTP server stops accepting and finishes its requests;
    the ingress publishes what it was given; the subscriber stops fetching and
    the forwarders finish their in-flight events (bounded by the grace period);
    the acknowledger sends the last acks; NATS is drained; the embedded server
    stops last.
    """
    ready = False

    async def end_start_if_stopping() -> None:
        # A signal before the service is ready ends the start where it is (waiting for an
        # unreachable NATS, setting up streams): nothing was accepted yet. Once it is ready,
        # stopping is the orderly shutdown below.
        await stopping.wait()
        if not ready:
            log.info("Stopping before the service was ready")
            root.cancel_scope.cancel()

    async with trio.open_nursery() as root:
        root.start_soon(end_start_if_stopping)
        if config.nats.embedded:
            embedded = EmbeddedNats(config.nats.data_dir, sync_always=config.nats.sync_always)
            url = await root.start(embedded.run)
        else:
            url = config.nats.url
        async with open_jetstream(config.nats, url, len(config.routes)) as jetstream:
            access = AsyncValue(config.ingress_access())
            _warn_if_open(config)
            publish_send, publish_receive = trio.open_memory_channel[PublishRequest](PUBLISH_QUEUE_SIZE)
            acks_send, acks_receive = trio.open_memory_channel[Delivery](ACK_QUEUE_SIZE)
            outcomes_send, outcomes_receive = trio.open_memory_channel[ForwardOutcome](OUTCOME_QUEUE_SIZE)
            stats = StatsCollector(
                outcomes_receive,
                max_per_domain=config.stats.max_events_per_domain,
                max_domains=config.stats.max_domains,
            )
            subscriber = Subscriber(jetstream, routes, acks_send, outcomes_send, config, stopping)
            backlog = BacklogMonitor(jetstream, routes, stopping, subscriber.begin_reading)
            reload_send, reload_receive = trio.open_memory_channel[ReloadRequest](RELOAD_QUEUE_SIZE)
            watcher = None
            if config_path is not None:
                watcher = ConfigWatcher(
                    config_path, config, routes, access, reload_receive, stopping, admit_routes=jetstream.admit_routes
                )
            async with trio.open_nursery() as actors:
                if watcher is not None:
                    await actors.start(watcher.run)
                await actors.start(stats.run)
                await actors.start(DeadLetterWriter(jetstream, stats.last_failure, stopping).run)
                await actors.start(Acknowledger(jetstream, acks_receive).run)
                # Before the backlog monitor: its first reading wakes the domains with events waiting.
                await actors.start(subscriber.run)
                await actors.start(backlog.run)
                ingress = Ingress(jetstream, publish_receive, routes, subscriber.storing, subscriber.stored)
                await actors.start(ingress.run)
                make_app = partial(
                    create_app,
                    config,
                    jetstream=jetstream,
                    publish_requests=publish_send,
                    publish_now=ingress.publish_now,
                    stats=stats,
                    subscriber=subscriber,
                    backlog=backlog,
                    log_writer=log_writer,
                    config_watcher=watcher,
                    reload_requests=reload_send,
                    access=access,
                    routes=routes,
                    stopping=stopping,
                )
                binds = await actors.start(_serve_until_stopped, make_app, listeners, stopping, publish_send)
                ready = True
                log.info("Service ready", listening=binds, routes=len(config.routes), nats=url)
                task_status.started(binds)
        root.cancel_scope.cancel()
    log.info("Service stopped")


async def _serve_until_stopped(
    make_app: Callable[..., QuartTrio | EventIngress],
    listeners: list[HttpListener],
    stopping: trio.Event,
    publish_send: trio.MemorySendChannel[PublishRequest],
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Serve the HTTP side: on one address, or the admin surface on its own (``admin.listen``)."""
    # The HTTP handlers are the only senders to the ingress: once the servers
    # have finished their last requests, closing this end lets the ingress drain and stop.
    with publish_send:
        if len(listeners) == 1:
            await serve_http(make_app(surface="all"), listeners[0], stopping, task_status=task_status)
            return
        public_listener, admin_listener = listeners
        async with trio.open_nursery() as servers:
            public = await servers.start(serve_http, make_app(surface="public"), public_listener, stopping)
            admin = await servers.start(serve_http, make_app(surface="admin"), admin_listener, stopping)
            task_status.started(public + admin)


def _warn_if_open(config: Config) -> None:
    if not config.ingress.api_keys:
        log.warning(
            "INGRESS IS OPEN: no ingress.api_keys configured, anyone who reaches POST /events can post for any domain"
        )
    if config.admin.password_sha256 is None:
        log.warning(
            "DASHBOARD AND API ANSWER LOOPBACK ONLY: no admin.password_sha256 configured; "
            "other clients get 403, and behind a reverse proxy on this machine every client looks like loopback"
        )
