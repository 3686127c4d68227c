"""``hiomapbridge-sim``: the flash bench's peers on the command line.

Subcommands are contributed by the simulator modules (each has an
``add_parser(subparsers)`` that sets ``func``), so this file only composes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .. import __version__
from ..dbus import resolve_bus
from ..systemd import setup_logging

log = logging.getLogger(__name__)


def start(args: argparse.Namespace, name: str) -> str | None:
    """What every subcommand does first: logging as ``name`` at
    ``--log-level``, then the address ``--bus`` names (None once the reason
    it is unusable is logged: exit with status 2)."""
    setup_logging(args.log_level, name)
    try:
        return resolve_bus(args.bus)
    except ValueError as exc:
        log.error("%s", exc)
        return None


def run_on_bus(
    args: argparse.Namespace,
    name: str,
    main: Callable[[str, argparse.Namespace], Awaitable[int]],
) -> int:
    """:func:`start`, then ``trio.run(main, address, args)``; 2 for a bad
    ``--bus``."""
    address = start(args, name)
    if address is None:
        return 2
    return trio.run(main, address, args)


def print_row(row: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (what the sims report)."""
    print(json.dumps(row), flush=True)


def build_parser() -> argparse.ArgumentParser:
    from . import btbridged, bthost, hiomapd, host, ipmid, qemu

    parser = argparse.ArgumentParser(
        prog="hiomapbridge-sim",
        description=(
            "Real peers for hiomapbridge on an ordinary Linux box: a hiomapd "
            "emulator serving a flash file, a btbridged stand-in, and a host "
            "HIOMAP client (behaving like skiboot) on top of it."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    hiomapd.add_parser(sub)
    btbridged.add_parser(sub)
    host.add_parser(sub)
    bthost.add_parser(sub)
    ipmid.add_parser(sub)
    qemu.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
