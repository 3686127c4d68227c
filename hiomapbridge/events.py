"""HIOMAP BMC event bits and hiomapd's PropertiesChanged (wire reference 5, 7).

hiomapd reports each event bit as a boolean property; ``fold`` applies a
PropertiesChanged payload to the cached event byte. Pure and total.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import IntFlag
from typing import Final

import attrs


class Event(IntFlag):
    """Bits of the HIOMAP BMC event byte."""

    PROTOCOL_RESET = 0x01
    WINDOW_RESET = 0x02
    FLASH_CONTROL_LOST = 0x40
    DAEMON_READY = 0x80


ACKABLE: Final = 0x03
"""The bits a host ACK may clear (PROTOCOL_RESET | WINDOW_RESET)."""

PROPERTY_BITS: Final[Mapping[str, int]] = {
    "DaemonReady": Event.DAEMON_READY,
    "FlashControlLost": Event.FLASH_CONTROL_LOST,
    "WindowReset": Event.WINDOW_RESET,
    "ProtocolReset": Event.PROTOCOL_RESET,
}


@attrs.frozen
class Folded:
    """The new event byte, and one log line per property that was ignored."""

    byte: int
    ignored: tuple[str, ...]


def fold(byte: int, changed: Mapping[str, tuple[str, object]]) -> Folded:
    """Apply a PropertiesChanged ``a{sv}`` (jeepney: name -> (sig, value)).

    A known property set to a boolean (signature ``b``, a real bool) sets its
    bit on True and clears it on False. Unknown names and anything that is
    not a boolean are ignored and reported. The result is masked to 8 bits.
    Never raises, whatever a peer sent.
    """
    ignored: list[str] = []
    for name, variant in changed.items():
        bit = PROPERTY_BITS.get(name) if isinstance(name, str) else None
        if bit is None:
            ignored.append(f"unknown property {name!r}")
            continue
        if not (
            isinstance(variant, tuple)
            and len(variant) == 2
            and variant[0] == "b"
            and isinstance(variant[1], bool)
        ):
            ignored.append(f"property {name!r} is not a boolean: {variant!r:.80}")
            continue
        byte = byte | bit if variant[1] else byte & ~bit
    return Folded(byte & 0xFF, tuple(ignored))


@functools.lru_cache(maxsize=256)
def describe(byte: int) -> str:
    """For logs: ``0x81 (DAEMON_READY|PROTOCOL_RESET)``, ``0x00 (none)``.
    Cached: log calls evaluate it on the hot path even when not logging."""
    names = [e.name for e in sorted(Event, reverse=True) if byte & e and e.name]
    rest = byte & ~sum(Event)
    if rest:
        names.append(f"{rest:#04x}")
    return f"{byte:#04x} ({'|'.join(names) or 'none'})"
