"""Command line: ``hiomapbridge [options]`` (also ``python -m hiomapbridge``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__, bridge
from .dbus import BusClosed, resolve_bus
from .systemd import setup_logging

log = logging.getLogger("hiomapbridge")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _bus(text: str) -> str:
    try:
        return resolve_bus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiomapbridge",
        description=(
            "Bridge HIOMAP over IPMI between btbridged (org.openbmc.HostIpmi) "
            "and hiomapd (xyz.openbmc_project.Hiomapd). Host requests are "
            "relayed to hiomapd; hiomapd's events reach the host via SMS_ATN, "
            "and on SIGTERM/SIGINT the bridge exits only once the host has "
            "fetched PROTOCOL_RESET (or --shutdown-timeout passed)."
        ),
        epilog=(
            "Exit status: 0 after a shutdown by signal (also when the host "
            "never fetched the final event: that is logged); 1 when the bus "
            "connection is lost or start-up fails; 2 for bad options; 130 "
            "when a second SIGINT cut the shutdown short. Readiness is "
            "announced with READY=1 on $NOTIFY_SOCKET."
        ),
    )
    parser.add_argument(
        "--bus",
        type=_bus,
        default="system",
        metavar="system|session|ADDRESS",
        help="bus to use (default: system, honouring DBUS_SYSTEM_BUS_ADDRESS)",
    )
    parser.add_argument(
        "--hiomapd-timeout",
        type=_seconds,
        default=4.0,
        metavar="S",
        help="deadline for each hiomapd call; a miss answers cc 0xC3 (default 4)",
    )
    parser.add_argument(
        "--atn-interval",
        type=_seconds,
        default=3.0,
        metavar="S",
        help="re-assert SMS_ATN this often while an event waits (default 3)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="how long shutdown waits for the host to fetch events (default 5)",
    )
    parser.add_argument(
        "--no-reject-unknown",
        dest="reject_unknown",
        action="store_false",
        help="leave IPMI commands other than HIOMAP and the messaging commands "
        "unanswered (for hosts whose other commands another responder answers) "
        "instead of answering cc 0xC1",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        type=str.lower,
        help="log verbosity (default info; debug traces every request and event)",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


def _late_signal(signum: int, _frame: object) -> None:
    log.info("%s during exit ignored", signal.Signals(signum).name)


async def _main(config: bridge.Config) -> int:
    # Opened before connecting: from here on SIGTERM cannot kill us behind
    # the shutdown sequence's back.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        status = bridge.EXIT_FAILURE
        try:
            status = await bridge.run(config, signals)
        except* BusClosed as group:
            for exc in group.exceptions:
                log.error("%s; exiting so that systemd restarts us", exc)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "hiomapbridge")
    config = bridge.Config(
        bus=args.bus,
        hiomapd_timeout=args.hiomapd_timeout,
        atn_interval=args.atn_interval,
        shutdown_timeout=args.shutdown_timeout,
        reject_unknown=args.reject_unknown,
    )
    # trio restores these when its signal receiver closes; a signal arriving
    # after that must not turn a clean exit into "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _late_signal)
    signal.signal(signal.SIGINT, _late_signal)
    try:
        return trio.run(_main, config)
    except Exception:
        log.exception("fatal error")
        return bridge.EXIT_FAILURE
    finally:
        # Python resets its own handlers to SIG_DFL while the interpreter
        # shuts down; SIG_IGN survives that, so a signal arriving during the
        # very last moments cannot turn the exit status into "killed".
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
