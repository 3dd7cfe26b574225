"""The config watcher actor: file changes and reload requests in, new routes out."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
import trio
import trio_util
from trio_util import AsyncValue, periodic

from pipeline.access import IngressAccess
from pipeline.config import Config, ConfigError, ConfigUnreadable, load_config
from pipeline.nats_bridge import NatsUnavailable
from pipeline.routes import Routes

log = structlog.get_logger(component="config")

# How often the file is read. A change is applied once two reads in a row agree,
# so a file caught half-written is not applied: at most two intervals after the write.
POLL_SECONDS = 0.25
# What a reload applies; every other section needs a restart.
RELOADED_SECTIONS = ("routes", "ingress")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    status: int  # 200 applied, 400 invalid, 500 unreadable: the API answers with it
    message: str
    route_count: int


@dataclass(eq=False, slots=True)
class ReloadRequest:
    """A reload asked for through the API, waiting for its result."""

    done: trio.Event = field(default_factory=trio.Event)
    result: ReloadResult | None = None


@dataclass(frozen=True, slots=True)
class ActiveRoutes:
    routes: Routes
    loaded_at: datetime
    config_file: Path


class ConfigWatcher:
    """Keeps the routes in step with the config file, without a restart.

    In: changes of the file at ``path`` (read every ``POLL_SECONDS``, so edits
    in place, editors that rename a new file over the old one, and a file
    deleted then recreated are all seen), and ``ReloadRequest`` from
    POST /api/config/reload. A file that disappears is logged once; the
    routes stay until it returns. Out: the new routes, swapped whole into
    ``routes`` (readers see the old mapping or the new one, never a mix), and
    the ingress's API keys and rate limits into ``access``. The file is
    validated exactly as at start, and ``admit_routes`` makes room for the
    routed domains' consumers (or refuses); an invalid file leaves the old
    ones active. Only ``routes`` and ``ingress`` are applied; other changed
    sections get a warning that they need a restart. Reloads are serialised. Runs until
    ``stopping`` is set.
    """

    def __init__(
        self,
        path: Path,
        running: Config,
        routes: AsyncValue[Routes],
        access: AsyncValue[IngressAccess],
        requests: trio.MemoryReceiveChannel[ReloadRequest],
        stopping: trio.Event,
        *,
        admit_routes: Callable[[int], Awaitable[None]],
    ) -> None:
        self._path = path
        self._admit_routes = admit_routes
        self._stopping = stopping
        self._running = running
        self._routes = routes
        self._access = access
        self._requests = requests
        self._lock = trio.Lock()
        self._applied_digest: bytes | None = None
        self._unreadable = False  # the file was missing or unreadable at the last read (already logged)
        self.active = ActiveRoutes(routes.value, datetime.now(UTC), path)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._applied_digest = await self._digest()
        with self._requests:
            task_status.started()
            await trio_util.wait_any(self._watch, self._answer_requests, self._stopping.wait)

    async def _digest(self) -> bytes | None:
        try:
            content = await trio.Path(self._path).read_bytes()
        except OSError as error:
            # Missing for now (deleted, about to be recreated): keep the old routes, and say so once.
            if not self._unreadable:
                self._unreadable = True
                if isinstance(error, FileNotFoundError):
                    log.warning("Config file missing; keeping the current routes", config_file=str(self._path))
                else:
                    log.warning(
                        "Config file unreadable; keeping the current routes",
                        config_file=str(self._path),
                        reason=error.strerror,
                    )
            return None
        self._unreadable = False
        return hashlib.sha256(content).digest()

    async def _watch(self) -> None:
        previous = self._applied_digest
        async for _ in periodic(POLL_SECONDS):
            current = await self._digest()
            if current is not None and current == previous and current != self._applied_digest:
                async with self._lock:
                    result = await self._reload()
                if result.status == 200:
                    log.info("Config auto-reloaded successfully", route_count=result.route_count)
                if result.status != 503:  # NATS out of reach: this version is tried again at the next poll
                    self._applied_digest = current  # an invalid version is reported once, not every poll
            previous = current

    async def _answer_requests(self) -> None:
        async for request in self._requests:
            async with self._lock:
                request.result = await self._reload()
                if request.result.status != 503:  # else the watcher tries the file again
                    self._applied_digest = await self._digest()
            request.done.set()
            if request.result.status == 200:
                log.info("Config reloaded on request", route_count=request.result.route_count)

    async def _reload(self) -> ReloadResult:
        try:
            config = await trio.to_thread.run_sync(load_config, self._path)
        except ConfigUnreadable as error:
            log.error("Config reload failed; keeping the active routes", reason=str(error))
            return ReloadResult(500, str(error), len(self.active.routes))
        except ConfigError as error:
            log.error("Config reload rejected; keeping the active routes", reason=str(error))
            return ReloadResult(400, str(error), len(self.active.routes))
        try:
            await self._admit_routes(len(config.routes))
        except (ConfigError, NatsUnavailable) as error:
            log.error("Config reload rejected; keeping the active routes", reason=str(error))
            return ReloadResult(400 if isinstance(error, ConfigError) else 503, str(error), len(self.active.routes))
        self._warn_about_unapplied(config)
        routes = config.endpoints_by_domain()
        self._access.value = config.ingress_access()
        self._routes.value = routes
        self.active = ActiveRoutes(routes, datetime.now(UTC), self._path)
        return ReloadResult(200, "Configuration reloaded successfully", len(routes))

    def _warn_about_unapplied(self, config: Config) -> None:
        changed = [
            section
            for section in type(config).model_fields
            if section not in RELOADED_SECTIONS and getattr(config, section) != getattr(self._running, section)
        ]
        if changed:
            log.warning(
                "Config changes outside routes are not applied until a restart",
                sections=changed,
                config_file=str(self._path),
            )
