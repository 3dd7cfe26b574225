"""The command line: flags spelled as the original Go service spells them, then run."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from pathlib import Path
from typing import TextIO

import structlog
import trio

from actors.log_writer import DomainLogRouter
from pipeline import receiver
from pipeline.config import Config, ConfigError, load_config
from pipeline.embedded_nats import EmbeddedNatsError
from pipeline.log_setup import LEVELS, configure_logging
from pipeline.supervisor import run_service
from web.server import ListenError

log = structlog.get_logger(component="main")

# Python's default collection thresholds (700, 10, 10) scan the whole long-lived
# heap each time it grows by a quarter. With 3,000 domains at work that was a
# third of the service's CPU, in pauses of 0.3 s; with 20 domains, pauses of
# 54 ms (bench/RESULTS.md, "garbage collection thresholds"). Young objects get
# 50,000 allocations to die before they are scanned, so far fewer survive to be
# scanned again.
GC_THRESHOLDS = (50_000, 20, 10)

_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"0", "f", "false", "no", "off"}


def _boolean(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telephony-forwarder",
        description="Accept call-signal events over HTTP, store them in NATS JetStream, "
        "and forward each to every webhook endpoint of its domain. "
        "'telephony-forwarder receive --help': a webhook receiver for trying it out.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-config",
        "--config",
        type=Path,
        default=Path("config.yaml"),
        metavar="PATH",
        help="configuration file (default: config.yaml)",
    )
    parser.add_argument(
        "-log-level", "--log-level", choices=list(LEVELS), default="info", help="log level (default: info)"
    )
    parser.add_argument(
        "-log-file",
        "--log-file",
        default="",
        metavar="PATH",
        help="write the service log to this file (default: stdout)",
    )
    parser.add_argument(
        "-domain-logging",
        "--domain-logging",
        type=_boolean,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="also log each domain's events under logs/<domain>/ (default: true)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["receive"]:
        return receiver.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        for line in str(error).splitlines():
            print(f"telephony-forwarder: {line}", file=sys.stderr)
        return 2
    try:
        output: TextIO = open(args.log_file, "a", encoding="utf-8", buffering=1) if args.log_file else sys.stdout  # noqa: SIM115
    except OSError as error:
        print(f"telephony-forwarder: -log-file {args.log_file}: {error.strerror}", file=sys.stderr)
        return 2
    domain_router = DomainLogRouter() if args.domain_logging else None
    configure_logging(args.log_level, output, domain_router)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        trio.run(_run_until_signalled, config, args.config, domain_router)
    except BaseException as error:
        # The operator's errors say what to change in one line; anything else is a bug: the traceback.
        found = _operator_error(error)
        if found is None:
            raise
        print(f"telephony-forwarder: {found}", file=sys.stderr)
        return 2 if isinstance(found, ConfigError) else 1
    return 0


def _operator_error(error: BaseException) -> ConfigError | EmbeddedNatsError | ListenError | None:
    """The configuration, listening or embedded-server error inside ``error`` (nurseries wrap it in groups)."""
    if isinstance(error, ConfigError | EmbeddedNatsError | ListenError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _operator_error(inner)) is not None:
                return found
    return None


async def _run_until_signalled(config: Config, config_path: Path, domain_router: DomainLogRouter | None) -> None:
    stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    if not stopping.is_set():
                        log.info("Shutting down", signal=signal.Signals(signum).name)
                        stopping.set()
                    else:
                        log.warning("Second signal: stopping now", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await run_service(config, stopping, config_path=config_path, domain_router=domain_router)
            nursery.cancel_scope.cancel()
