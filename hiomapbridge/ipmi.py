"""IPMI constants, completion codes and the OEM SEL record (wire reference 3).

Pure data and byte layouts; nothing here performs I/O.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# btbridged's D-Bus API (wire reference section 2).
HOSTIPMI_SERVICE: Final = "org.openbmc.HostIpmi"
HOSTIPMI_PATH: Final = "/org/openbmc/HostIpmi/1"
HOSTIPMI_IFACE: Final = "org.openbmc.HostIpmi"

NETFN_APP: Final = 0x06
NETFN_OEM_IBM: Final = 0x3A

CMD_CLEAR_MESSAGE_FLAGS: Final = 0x30
CMD_GET_MESSAGE_FLAGS: Final = 0x31
CMD_READ_EVENT_MESSAGE_BUFFER: Final = 0x35
CMD_GET_BT_CAPABILITIES: Final = 0x36
CMD_HIOMAP: Final = 0x5A

SEL_CMD_HIOMAP_EVENT: Final = 0x0F
SEL_CMD_HEARTBEAT: Final = 0xFF

MESSAGE_FLAG_EVENT_BUFFER_FULL: Final = 0x02

SEL_RECORD_ID: Final = 0x5555
SEL_RECORD_TYPE_OEM: Final = 0xC0
SEL_RECORD_LEN: Final = 16


class CompletionCode(IntEnum):
    """IPMI completion codes used by the bridge and its peers."""

    OK = 0x00
    NODE_BUSY = 0xC0
    INVALID_COMMAND = 0xC1
    TIMEOUT = 0xC3
    OUT_OF_SPACE = 0xC4
    REQ_DATA_LEN_INVALID = 0xC7
    PARAM_OUT_OF_RANGE = 0xC9
    SENSOR_INVALID = 0xCB
    CANNOT_RETURN_DATA = 0xCA  # the response does not fit the BT FIFO
    INVALID_FIELD = 0xCC
    CANNOT_RESPOND = 0xCE  # btbridged answers this itself on its 5 s timeout
    DESTINATION_UNAVAILABLE = 0xD3  # ipmid is not on the bus
    INSUFFICIENT_PRIVILEGE = 0xD4
    UNSPECIFIED = 0xFF


def response_netfn(netfn: int) -> int:
    """The response netfn for request ``netfn`` (``netfn | 1``)."""
    return netfn | 1


def sel_record(command: int, data: int) -> bytes:
    """The 16-byte OEM SEL record carrying ``command`` and ``data``.

    Layout: id ``0x55 0x55``, type ``0xC0``, seven zero bytes (timestamp and
    manufacturer id), netfn ``0x3A``, command, data, ``0xFF 0xFF 0xFF``.
    Raises ValueError unless both values fit in a byte.
    """
    if not (0 <= command <= 0xFF and 0 <= data <= 0xFF):
        raise ValueError(f"SEL command/data out of byte range: {command}, {data}")
    return (
        bytes([0x55, 0x55, SEL_RECORD_TYPE_OEM])
        + bytes(7)
        + bytes([NETFN_OEM_IBM, command, data, 0xFF, 0xFF, 0xFF])
    )


def event_record(data: int) -> bytes:
    """The SEL record delivering HIOMAP BMC event byte ``data`` to the host."""
    return sel_record(SEL_CMD_HIOMAP_EVENT, data)


HEARTBEAT_RECORD: Final = sel_record(SEL_CMD_HEARTBEAT, 0)
"""What Read Event Message Buffer answers when no event is waiting."""


def parse_event_record(record: bytes) -> tuple[int, int] | None:
    """The host's view of a SEL record, as skiboot reads it.

    Returns ``(command, data)`` (bytes 11 and 12), or None unless the record
    is exactly 16 bytes with id ``0x5555`` and type ``0xC0``.
    """
    if len(record) != SEL_RECORD_LEN:
        return None
    if int.from_bytes(record[0:2], "little") != SEL_RECORD_ID:
        return None
    if record[2] != SEL_RECORD_TYPE_OEM:
        return None
    return record[11], record[12]


def message_flags(event_waiting: bool) -> bytes:
    """Get Message Flags response data: Event Buffer Full exactly while waiting."""
    return bytes([MESSAGE_FLAG_EVENT_BUFFER_FULL if event_waiting else 0])
