"""Command line: ``hiomapbridge [options]`` (also ``python -m hiomapbridge``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__, bridge, timing
from .dbus import BusClosed, resolve_bus
from .hostlink import HostLinkError
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


def _whole_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a whole number of seconds: {text!r}"
        ) from None
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"must be 1-255 seconds: {text!r}")
    return value


def _host(text: str) -> str:
    if text == "btbridged" or (text.startswith("bt:") and len(text) > 3):
        return text
    raise argparse.ArgumentTypeError(f"expected 'btbridged' or 'bt:PATH', not {text!r}")


def _channel(text: str) -> str:
    # One element of a D-Bus well-known name.
    if text and text[0].isalpha() and all(c.isalnum() or c in "_-" for c in text):
        return text
    raise argparse.ArgumentTypeError(f"not a valid channel name: {text!r}")


def _bus(text: str) -> str:
    try:
        return resolve_bus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = bridge.Config()
    parser = argparse.ArgumentParser(
        prog="hiomapbridge",
        description=(
            "Bridge HIOMAP over IPMI between the host and hiomapd "
            "(xyz.openbmc_project.Hiomapd). Host requests are relayed to "
            "hiomapd; hiomapd's events reach the host via SMS_ATN, and on "
            "SIGTERM/SIGINT the bridge exits only once the host has fetched "
            "PROTOCOL_RESET (or --shutdown-timeout passed). The host is reached "
            "through btbridged's D-Bus API (--host btbridged), or through the BT "
            "interface itself (--host bt:PATH), where every IPMI command the "
            "bridge does not own is forwarded to ipmid."
        ),
        epilog=(
            "Timing budget: --hiomapd-timeout and --ipmid-timeout must be shorter "
            "than --bt-transaction-time (what the host is told to wait before it "
            "retries), which in btbridged mode must be shorter than btbridged's "
            "own 5 s; a set that breaks this exits 2. "
            "Exit status: 0 after a shutdown by signal (also when the host "
            "never fetched the final event: that is logged); 1 when the bus "
            "connection is lost, the BT device cannot be opened or start-up "
            "fails; 2 for bad options; 130 when a second SIGINT cut the "
            "shutdown short. Readiness is announced with READY=1 on "
            "$NOTIFY_SOCKET."
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
        "--host",
        type=_host,
        default=defaults.host,
        metavar="btbridged|bt:PATH",
        help="how the host is reached: btbridged's D-Bus API (default), or "
        "bt:PATH, the BT interface itself: PATH is the kernel BT BMC device "
        "(/dev/ipmi-bt-host) or a unix SOCK_SEQPACKET socket to connect to "
        "(simulators); the bridge then owns org.openbmc.HostIpmi and forwards "
        "every command it does not own to ipmid",
    )
    parser.add_argument(
        "--hiomapd-timeout",
        type=_seconds,
        default=defaults.hiomapd_timeout,
        metavar="S",
        help="deadline for each hiomapd call; a miss answers cc 0xC3 "
        f"(default {defaults.hiomapd_timeout:g})",
    )
    parser.add_argument(
        "--ipmid-timeout",
        type=_seconds,
        default=defaults.ipmid_timeout,
        metavar="S",
        help="bt: mode: deadline for each command forwarded to ipmid; a miss "
        f"answers cc 0xC3 (default {defaults.ipmid_timeout:g})",
    )
    parser.add_argument(
        "--bt-transaction-time",
        type=_whole_seconds,
        default=defaults.bt_transaction_time,
        metavar="N",
        help="whole seconds advertised in Get BT Interface Capabilities: the "
        "host retries a request after this long (default "
        f"{defaults.bt_transaction_time})",
    )
    parser.add_argument(
        "--ipmi-channel",
        type=_channel,
        default=defaults.ipmi_channel,
        metavar="NAME",
        help="bt: mode: own xyz.openbmc_project.Ipmi.Channel.NAME so that ipmid "
        "treats forwarded commands as coming from the channel channel_config.json "
        f"names NAME (default {defaults.ipmi_channel}: OpenBMC's name for the "
        "system interface, channel 15)",
    )
    parser.add_argument(
        "--atn-interval",
        type=_seconds,
        default=defaults.atn_interval,
        metavar="S",
        help="re-assert SMS_ATN this often while an event waits "
        f"(default {defaults.atn_interval:g})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=defaults.shutdown_timeout,
        metavar="S",
        help="how long shutdown waits for the host to fetch events "
        f"(default {defaults.shutdown_timeout:g})",
    )
    parser.add_argument(
        "--no-reject-unknown",
        dest="reject_unknown",
        action="store_false",
        help="btbridged mode: leave IPMI commands other than HIOMAP, the "
        "messaging commands and Get BT Interface Capabilities unanswered (for "
        "hosts whose other commands another responder answers) instead of "
        "answering cc 0xC1",
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
        except* (BusClosed, HostLinkError) as group:
            for exc in _leaves(group):
                log.error("%s; exiting so that systemd restarts us", exc)
        return status


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = bridge.Config(
        bus=args.bus,
        host=args.host,
        hiomapd_timeout=args.hiomapd_timeout,
        ipmid_timeout=args.ipmid_timeout,
        bt_transaction_time=args.bt_transaction_time,
        ipmi_channel=args.ipmi_channel,
        atn_interval=args.atn_interval,
        shutdown_timeout=args.shutdown_timeout,
        reject_unknown=args.reject_unknown,
    )
    if config.bt_path is not None and not config.reject_unknown:
        parser.error(
            "--no-reject-unknown applies to btbridged mode only: in bt: mode "
            "every command the bridge does not own goes to ipmid"
        )
    broken = timing.violations(config)
    if broken:
        parser.error("timing budget broken: " + "; ".join(broken))
    setup_logging(args.log_level, "hiomapbridge")
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
