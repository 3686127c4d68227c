"""HIOMAP commands over IPMI: the seed's dispatch rules, sans-IO.

``Dispatcher.request`` turns IPMI request data into a ``HiomapCall`` (the
D-Bus method to invoke on hiomapd) or a ``Rejected`` (the completion code to
answer at once). ``encode_reply`` and ``encode_error`` turn hiomapd's answer
into the IPMI response. Wire reference sections 4 to 6 are the spec.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import Final, NamedTuple

import attrs

from hiomapbridge.ipmi import CompletionCode

HIOMAPD_SERVICE: Final = "xyz.openbmc_project.Hiomapd"
HIOMAPD_PATH: Final = "/xyz/openbmc_project/Hiomapd"
IFACE_PROTOCOL: Final = "xyz.openbmc_project.Hiomapd.Protocol"
IFACE_V2: Final = "xyz.openbmc_project.Hiomapd.Protocol.V2"


class Command(IntEnum):
    """HIOMAP command ids (byte 0 of the request data)."""

    RESET = 1
    GET_INFO = 2
    GET_FLASH_INFO = 3
    CREATE_READ_WINDOW = 4
    CLOSE_WINDOW = 5
    CREATE_WRITE_WINDOW = 6
    MARK_DIRTY = 7
    FLUSH = 8
    ACK = 9
    ERASE = 10


UNVERSIONED: Final = frozenset({Command.RESET, Command.GET_INFO, Command.ACK})
"""Commands exempt from the repeated-sequence-number rule."""

MIN_VERSION: Final = 2
"""The lowest GET_INFO version forwarded to hiomapd.  Over IPMI only v2 is
usable: hiomapd's D-Bus interface implements v2 and skiboot negotiates v2.
hiomapd answers a D-Bus ``GetInfo(1)`` with an error yet switches itself to
v1, after which its window calls return garbage and ``Erase`` crashes it;
version 0 it refuses anyway.  A deliberate departure from the seed (whose
GET_INFO handling carries "FIXME: Assumes v2!" and forwards any version)."""


@attrs.frozen
class _Spec:
    interface: str
    member: str
    signature: str  # D-Bus in-signature; also fixes the argument bytes
    reply_signature: str


_SPECS: Final[Mapping[Command, _Spec]] = {
    Command.RESET: _Spec(IFACE_PROTOCOL, "Reset", "", ""),
    Command.GET_INFO: _Spec(IFACE_PROTOCOL, "GetInfo", "y", "yyq"),
    Command.GET_FLASH_INFO: _Spec(IFACE_V2, "GetFlashInfo", "", "qq"),
    Command.CREATE_READ_WINDOW: _Spec(IFACE_V2, "CreateReadWindow", "qq", "qqq"),
    Command.CLOSE_WINDOW: _Spec(IFACE_V2, "CloseWindow", "y", ""),
    Command.CREATE_WRITE_WINDOW: _Spec(IFACE_V2, "CreateWriteWindow", "qq", "qqq"),
    Command.MARK_DIRTY: _Spec(IFACE_V2, "MarkDirty", "qq", ""),
    Command.FLUSH: _Spec(IFACE_V2, "Flush", "", ""),
    # The seed calls Ack on V2 (the spec table also lists it on Protocol).
    Command.ACK: _Spec(IFACE_V2, "Ack", "y", ""),
    Command.ERASE: _Spec(IFACE_V2, "Erase", "qq", ""),
}

# D-Bus basic type code -> little-endian struct code. Only y and q occur.
_STRUCT: Final[Mapping[str, str]] = {"y": "B", "q": "H"}


def _codes(signature: str) -> str:
    return "".join(_STRUCT[c] for c in signature)


@functools.cache
def _layout(signature: str) -> struct.Struct:
    return struct.Struct("<" + _codes(signature))


class HiomapCall(NamedTuple):
    """An accepted request: the hiomapd method to call and how to answer it
    (built per request: a named tuple is the cheapest immutable value).

    ``signature`` is the D-Bus in-signature of ``args``; ``reply_signature``
    is the out-signature ``encode_reply`` expects.
    """

    command: Command
    seq: int
    interface: str
    member: str
    signature: str
    args: tuple[int, ...]
    reply_signature: str


@attrs.frozen
class Rejected:
    """A request answered without calling hiomapd: cc, and why (for the log)."""

    cc: int
    reason: str


_Known = tuple[Command, _Spec, struct.Struct, bool]


def _known(byte: int) -> _Known | None:
    """What request byte 0 names: the command, its spec, its argument
    layout and whether the repeated-sequence rule applies; None if nothing."""
    try:
        command = Command(byte)
    except ValueError:
        return None
    spec = _SPECS[command]
    return command, spec, _layout(spec.signature), command not in UNVERSIONED


_BY_BYTE: Final[tuple[_Known | None, ...]] = tuple(map(_known, range(256)))


class Dispatcher:
    """Validates HIOMAP request data with the seed's rules, in the seed's order.

    Holds the only protocol state: the previous request's sequence number.
    Deliberate difference from the seed: before the first request there is no
    previous sequence number (the seed starts at 0 and so rejects a first
    versioned request with seq 0).
    """

    def __init__(self) -> None:
        self._last_seq: int | None = None

    @property
    def last_seq(self) -> int | None:
        """The remembered sequence number, or None before any request."""
        return self._last_seq

    def request(self, data: bytes) -> HiomapCall | Rejected:
        """Decode IPMI request data ``[cmd, seq, args...]``.

        Rules, in order: fewer than 2 bytes -> 0xC7; command 0 or above 10 ->
        0xC9; a versioned command (not RESET, GET_INFO, ACK) repeating the
        previous seq -> 0xCC; then the seq is remembered (even if the next
        rule fails); arguments too short -> 0xC7; GET_INFO below version 2 ->
        0xC9 (not forwarded: see :data:`MIN_VERSION`). Extra bytes are
        ignored. Never raises.
        """
        if len(data) < 2:
            return Rejected(
                CompletionCode.REQ_DATA_LEN_INVALID,
                f"request data too short ({len(data)} bytes)",
            )
        raw_cmd, seq = data[0], data[1]
        known = _BY_BYTE[raw_cmd]
        if known is None:
            return Rejected(
                CompletionCode.PARAM_OUT_OF_RANGE, f"unknown command {raw_cmd:#04x}"
            )
        command, spec, layout, versioned = known
        if versioned and seq == self._last_seq:
            return Rejected(
                CompletionCode.INVALID_FIELD,
                f"{command.name}: sequence number {seq} repeated",
            )
        self._last_seq = seq
        if len(data) - 2 < layout.size:
            return Rejected(
                CompletionCode.REQ_DATA_LEN_INVALID,
                f"{command.name}: {len(data) - 2} argument bytes, need {layout.size}",
            )
        args = layout.unpack_from(data, 2)
        if command is Command.GET_INFO and args[0] < MIN_VERSION:
            return Rejected(
                CompletionCode.PARAM_OUT_OF_RANGE,
                f"GET_INFO asks for version {args[0]}: only v{MIN_VERSION} is "
                "usable over IPMI; not forwarded (it would switch hiomapd to "
                "v1, where a later ERASE crashes it)",
            )
        return HiomapCall(
            command,
            seq,
            spec.interface,
            spec.member,
            spec.signature,
            args,
            spec.reply_signature,
        )


@functools.cache
def _response_layout(signature: str) -> struct.Struct:
    """``[cmd, seq]`` and then the reply's fields, as one layout."""
    return struct.Struct("<BB" + _codes(signature))


def encode_reply(
    call: HiomapCall, signature: str, body: tuple[object, ...]
) -> tuple[int, bytes]:
    """hiomapd's method return -> ``(cc, response data)``, as the seed packs it.

    Success data is ``[cmd, seq, payload...]``, multi-byte fields
    little-endian. A signature other than ``call.reply_signature`` or a value
    that does not fit its D-Bus type gives ``(0xFF, b"")``. Never raises.

    GET_INFO always packs the v2 layout ``[version, block_size_shift,
    timeout le16]``, as the seed does: no version below 2 is ever forwarded
    (see :data:`MIN_VERSION`).
    """
    if (
        signature != call.reply_signature
        or not isinstance(body, tuple)
        or len(body) != len(signature)
    ):
        return _FAILED
    for value in body:
        if not isinstance(value, int) or isinstance(value, bool):
            return _FAILED
    try:  # struct refuses what does not fit its field
        data = _response_layout(signature).pack(call.command, call.seq, *body)
    except struct.error:
        return _FAILED
    return _OK, data


_OK: Final = int(CompletionCode.OK)
_FAILED: Final = (int(CompletionCode.UNSPECIFIED), b"")


# sd-bus's fixed table (wire reference 6); System.Error.<NAME> handled apart.
_DBUS_ERRORS: Final[Mapping[str, int]] = {
    "NoMemory": errno.ENOMEM,
    "ServiceUnknown": errno.EHOSTUNREACH,
    "NameHasNoOwner": errno.ENXIO,
    "NoReply": errno.ETIMEDOUT,
    "Timeout": errno.ETIMEDOUT,
    "TimedOut": errno.ETIMEDOUT,
    "IOError": errno.EIO,
    "BadAddress": errno.EADDRNOTAVAIL,
    "NotSupported": errno.EOPNOTSUPP,
    "LimitsExceeded": errno.ENOBUFS,
    "AccessDenied": errno.EACCES,
    "AuthFailed": errno.EACCES,
    "NoServer": errno.EHOSTDOWN,
    "NoNetwork": errno.ENONET,
    "AddressInUse": errno.EADDRINUSE,
    "Disconnected": errno.ECONNRESET,
    "InvalidArgs": errno.EINVAL,
    "InvalidSignature": errno.EINVAL,
    "FileNotFound": errno.ENOENT,
    "FileExists": errno.EEXIST,
    "UnknownMethod": errno.EBADR,
    "UnknownObject": errno.EBADR,
    "UnknownInterface": errno.EBADR,
    "UnknownProperty": errno.EBADR,
    "PropertyReadOnly": errno.EROFS,
    "UnixProcessIdUnknown": errno.ESRCH,
    "InconsistentMessage": errno.EBADMSG,
    "MatchRuleInvalid": errno.EINVAL,
    "MatchRuleNotFound": errno.ENOENT,
    "ObjectPathInUse": errno.EBUSY,
    "Failed": errno.EACCES,
}
_DBUS_ERROR_PREFIX: Final = "org.freedesktop.DBus.Error."
_SYSTEM_ERROR_PREFIX: Final = "System.Error."

# errno names known to this platform, aliases included (ENOTSUP, EAGAIN...).
_ERRNO_BY_NAME: Final[Mapping[str, int]] = {
    name: value
    for name in dir(errno)
    if name.startswith("E") and isinstance(value := getattr(errno, name), int)
}

_CC_BY_ERRNO: Final[Mapping[int, CompletionCode]] = {
    0: CompletionCode.OK,
    errno.EBUSY: CompletionCode.NODE_BUSY,
    errno.ENOTSUP: CompletionCode.INVALID_COMMAND,
    errno.EOPNOTSUPP: CompletionCode.INVALID_COMMAND,
    errno.ETIMEDOUT: CompletionCode.TIMEOUT,
    errno.ENOSPC: CompletionCode.OUT_OF_SPACE,
    errno.EINVAL: CompletionCode.PARAM_OUT_OF_RANGE,
    errno.ENODEV: CompletionCode.SENSOR_INVALID,
    errno.EPERM: CompletionCode.INSUFFICIENT_PRIVILEGE,
    errno.EACCES: CompletionCode.INSUFFICIENT_PRIVILEGE,
}


def errno_for_error_name(name: str) -> int:
    """A D-Bus error name -> errno, by sd-bus's rules; unknown names -> EIO."""
    if name.startswith(_SYSTEM_ERROR_PREFIX):
        return _ERRNO_BY_NAME.get(name.removeprefix(_SYSTEM_ERROR_PREFIX), errno.EIO)
    if name.startswith(_DBUS_ERROR_PREFIX):
        return _DBUS_ERRORS.get(name.removeprefix(_DBUS_ERROR_PREFIX), errno.EIO)
    return errno.EIO


def cc_for_errno(err: int) -> int:
    """The seed's errno -> completion code table; anything else -> 0xFF."""
    return int(_CC_BY_ERRNO.get(err, CompletionCode.UNSPECIFIED))


def encode_error(error_name: str) -> int:
    """A D-Bus error reply's name -> the completion code to answer with."""
    return cc_for_errno(errno_for_error_name(error_name))


# Host side: building requests and reading responses (simulators, tests).


def pack_request(command: int, seq: int, args: bytes = b"") -> bytes:
    """IPMI request data ``[command, seq, args...]``."""
    return bytes([command, seq]) + args


def window_args(offset_blocks: int, size_blocks: int) -> bytes:
    """Arguments of CREATE_*_WINDOW, MARK_DIRTY and ERASE: two le16 fields."""
    return struct.pack("<HH", offset_blocks, size_blocks)


def unpack_response(data: bytes) -> tuple[int, int, bytes]:
    """Success response data -> ``(command, seq, payload)``."""
    if len(data) < 2:
        raise ValueError(f"response data too short ({len(data)} bytes)")
    return data[0], data[1], data[2:]


@attrs.frozen
class InfoV1:
    """GET_INFO payload, v1 layout (window sizes in blocks)."""

    version: int
    read_window_size: int
    write_window_size: int


@attrs.frozen
class InfoV2:
    """GET_INFO payload, v2 layout (timeout in seconds)."""

    version: int
    block_size_shift: int
    timeout: int


@attrs.frozen
class FlashInfo:
    """GET_FLASH_INFO payload, in blocks."""

    flash_size: int
    erase_size: int


@attrs.frozen
class Window:
    """CREATE_*_WINDOW payload, in blocks."""

    lpc_address: int
    size: int
    offset: int


def _unpack(fmt: str, payload: bytes) -> tuple[int, ...]:
    layout = struct.Struct(fmt)
    if len(payload) != layout.size:
        raise ValueError(f"payload is {len(payload)} bytes, expected {layout.size}")
    return tuple(layout.unpack(payload))


def unpack_get_info(payload: bytes) -> InfoV1 | InfoV2:
    """GET_INFO payload: v1 layout if the version byte is 1, else v2."""
    if payload[:1] == b"\x01":
        return InfoV1(*_unpack("<BHH", payload))
    return InfoV2(*_unpack("<BBH", payload))


def unpack_flash_info(payload: bytes) -> FlashInfo:
    """GET_FLASH_INFO payload: flash size, erase size (le16 each)."""
    return FlashInfo(*_unpack("<HH", payload))


def unpack_window(payload: bytes) -> Window:
    """CREATE_*_WINDOW payload: lpc address, size, offset (le16 each)."""
    return Window(*_unpack("<HHH", payload))
