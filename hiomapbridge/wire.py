"""A fast D-Bus codec for the few message shapes on the bridge's hot path.

jeepney's generic codec walks a type tree for every message (about 35 µs
to parse or serialise a small message here); a bridged HIOMAP command
needs three parses and two serialisations.  This module does the same work
with precomputed layouts:

* :func:`decode` parses a whole little-endian message (any header fields
  of the basic types the spec allows) into the very ``jeepney.Message``
  jeepney's parser would build; bodies of the signatures on the hot path are
  unpacked with one ``struct`` call, others go to jeepney's body parser
  (cached per signature).  Each distinct header field array is read once
  and remembered (bounded), a leading reply serial apart.  It returns None
  for what it does not handle (big-endian, file descriptors), and the
  caller falls back to jeepney.
* :class:`CallTemplate` serialises method calls to a fixed (destination,
  path, interface, member, signature): the header fields are encoded once,
  so a call is one ``struct.pack`` plus its body bytes, byte-identical to
  ``new_method_call(...).serialise(serial)``; :class:`SignalTemplate` and
  :class:`ReturnTemplate` do the same for signals and method returns (the
  simulators' hot path).

jeepney still owns the connection (socket set-up, authentication, Hello);
tests/test_wire.py checks both directions against jeepney with hypothesis.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Final

from jeepney import Endianness, HeaderFields, Message, MessageType
from jeepney.low_level import Header, MessageFlag, parse_signature

_FIXED: Final = struct.Struct("<cBBBIII")  # endian, type, flags, version, ...
_U32: Final = struct.Struct("<I")
_SIZES_LE: Final = struct.Struct("<III")  # body length, serial, fields length
_SIZES_BE: Final = struct.Struct(">III")
_MAX_FIELD: Final = max(HeaderFields)

_FIELDS: Final[tuple[HeaderFields | None, ...]] = tuple(
    HeaderFields(code) if code in HeaderFields._value2member_map_ else None
    for code in range(_MAX_FIELD + 1)
)
_TYPES: Final[dict[int, MessageType]] = {t.value: t for t in MessageType}
_FLAGS: dict[int, MessageFlag] = {}


def message_size(buf: bytes | bytearray) -> int:
    """Total size of the message starting ``buf`` (which holds >= 16 bytes)."""
    layout = _SIZES_LE if buf[0] == 0x6C else _SIZES_BE  # 'l' little, 'B' big
    body_length, _serial, fields_length = layout.unpack_from(buf, 4)
    header = 16 + fields_length
    size: int = header + (-header % 8) + body_length
    return size


# -- bodies -------------------------------------------------------------------


BodyParser = Callable[[bytes, int], tuple[Any, ...]]


def _struct_body(fmt: str) -> BodyParser:
    layout = struct.Struct("<" + fmt)

    def parse(buf: bytes, pos: int) -> tuple[Any, ...]:
        return layout.unpack_from(buf, pos)

    return parse


def _bytes_after(fmt: str) -> BodyParser:
    """Fixed fields, then ``ay`` (its u32 length at the next 4-byte boundary)."""
    layout = struct.Struct("<" + fmt)
    length_at = -(-layout.size // 4) * 4

    def parse(buf: bytes, pos: int) -> tuple[Any, ...]:
        start = pos + length_at + 4
        (n,) = _U32.unpack_from(buf, pos + length_at)
        if start + n > len(buf):
            raise ValueError("array runs past the end of the message")
        return (*layout.unpack_from(buf, pos), buf[start : start + n])

    return parse


def _strings(count: int) -> BodyParser:
    def parse(buf: bytes, pos: int) -> tuple[Any, ...]:
        out = []
        for _ in range(count):
            pos += -pos % 4
            (n,) = _U32.unpack_from(buf, pos)
            end = pos + 4 + n
            if end >= len(buf) or buf[end] != 0:
                raise ValueError("bad string in message body")
            out.append(buf[pos + 4 : end].decode())
            pos = end + 1
        return tuple(out)

    return parse


_BODIES: dict[str, BodyParser] = {
    "": lambda buf, pos: (),
    "yyyyay": _bytes_after("BBBB"),
    "yyyyyay": _bytes_after("BBBBB"),
    "y": _struct_body("B"),
    "q": _struct_body("H"),
    "qq": _struct_body("HH"),
    "qqq": _struct_body("HHH"),
    "yyq": _struct_body("BBH"),
    "x": _struct_body("q"),
    "u": _struct_body("I"),
    "s": _strings(1),
    "sss": _strings(3),
}


def _body_parser(signature: str) -> BodyParser:
    parser = _BODIES.get(signature)
    if parser is None:
        body_type = parse_signature(list(f"({signature})"))

        def parser(buf: bytes, pos: int) -> tuple[Any, ...]:
            value: tuple[Any, ...] = body_type.parse_data(buf, pos, Endianness.little)[
                0
            ]
            return value

        if len(_BODIES) < 256:  # signatures come from peers: bound the cache
            _BODIES[signature] = parser
    return parser


# -- messages -------------------------------------------------------------------


class Malformed(ValueError):
    """A frame that is not a D-Bus message we can read."""


def parse(frame: bytes) -> Message:
    """One framed message: :func:`decode`, else jeepney's parser.  Raises
    :class:`Malformed`, and nothing else, for a frame neither can read
    (parsers of bad input raise IndexError, KeyError, struct.error...)."""
    try:
        return decode(frame) or Message.from_buffer(frame)
    except Exception as exc:
        raise Malformed(f"{type(exc).__name__}: {exc}") from exc


def decode(buf: bytes) -> Message | None:
    """Parse one complete message, exactly as jeepney would; None if this
    codec does not handle it (the caller then uses jeepney).  Malformed
    input raises (use :func:`parse` for one exception type), including a
    header field that runs past the header's declared length, which
    jeepney would read on into the padding (no bus routes such a message)."""
    if buf[0] != 0x6C:  # big-endian: leave it to jeepney
        return None
    _e, mtype, flags, version, body_length, serial, fields_length = _FIXED.unpack_from(
        buf
    )
    end = 16 + fields_length
    fields: dict[HeaderFields, Any] | None
    if fields_length >= 8 and buf[16:20] == _REPLY_SERIAL_FIELD:
        # A reply whose reply serial comes first, as sd-bus, jeepney and our
        # templates write it: the rest of its header repeats reply after
        # reply, so only the serial is read anew.
        rest = _cached_fields(buf[24:end])
        if rest is None:
            return None
        fields = {HeaderFields.reply_serial: _U32.unpack_from(buf, 20)[0]}
        fields.update(rest)
    else:
        fields = _cached_fields(buf[16:end])
        if fields is None:
            return None
        fields = fields.copy()
    body_at = end + (-end % 8)
    if body_at + body_length != len(buf):
        raise ValueError("message length does not match its header")
    signature = fields.get(HeaderFields.signature)
    body: tuple[Any, ...] = ()
    if signature is not None:
        body = _body_parser(signature)(buf, body_at)
    mflags = _FLAGS.get(flags)
    if mflags is None:
        mflags = _FLAGS[flags] = MessageFlag(flags)
    header = Header.__new__(Header)
    header.endianness = Endianness.little
    header.message_type = _TYPES[mtype]
    header.flags = mflags
    header.protocol_version = version
    header.body_length = body_length
    header.serial = serial
    header.fields = fields
    return Message(header, body)


_REPLY_SERIAL_FIELD: Final = b"\x05\x01u\x00"  # code 5, signature "u"
#: Header field arrays seen before, and what they hold (None: not ours to
#: read).  The hot messages (hiomapd's replies, btbridged's signals) repeat
#: theirs byte for byte.  Peers choose these bytes, so the cache is bounded
#: in entries and in the size of what it keeps.
_FIELDS_CACHE: dict[bytes, dict[HeaderFields, Any] | None] = {}
_FIELDS_CACHE_ENTRIES: Final = 256
_FIELDS_CACHE_MAX_BYTES: Final = 512


def _cached_fields(array: bytes) -> dict[HeaderFields, Any] | None:
    """:func:`_read_fields`, remembered (callers copy before they change it)."""
    try:
        return _FIELDS_CACHE[array]
    except KeyError:
        pass
    fields = _read_fields(array)
    if len(array) <= _FIELDS_CACHE_MAX_BYTES:
        if len(_FIELDS_CACHE) >= _FIELDS_CACHE_ENTRIES:
            _FIELDS_CACHE.clear()
        _FIELDS_CACHE[array] = fields
    return fields


def _read_fields(data: bytes) -> dict[HeaderFields, Any] | None:
    """The header fields in ``data``, an array that starts 8-aligned in its
    message; None if one is not of the basic types this codec reads.
    Malformed input raises."""
    end = len(data)
    pos = 0
    fields: dict[HeaderFields, Any] = {}
    while pos < end:
        pos += -pos % 8
        code, siglen, sig, nul = data[pos], data[pos + 1], data[pos + 2], data[pos + 3]
        if siglen != 1 or nul != 0 or code > _MAX_FIELD:
            return None
        pos += 4
        value: Any
        if sig == 0x73 or sig == 0x6F:  # 's', 'o'
            pos += -pos % 4
            (n,) = _U32.unpack_from(data, pos)
            stop = pos + 4 + n
            if data[stop] != 0:
                raise ValueError("string not NUL-terminated")
            value = data[pos + 4 : stop].decode()
            pos = stop + 1
        elif sig == 0x67:  # 'g'
            n = data[pos]
            if data[pos + 1 + n] != 0:
                raise ValueError("signature not NUL-terminated")
            value = data[pos + 1 : pos + 1 + n].decode()
            pos += n + 2
        elif sig == 0x75:  # 'u'
            pos += -pos % 4
            (value,) = _U32.unpack_from(data, pos)
            pos += 4
        else:
            return None
        field = _FIELDS[code]
        if field is None:
            return None
        fields[field] = value
    if pos != end or HeaderFields.unix_fds in fields:
        return None
    return fields


def _string_field(code: int, sig: str, value: str, pos: int) -> tuple[bytes, int]:
    """One header field (a struct, 8-aligned) holding a string-like value."""
    raw = value.encode()
    out = bytearray(b"\0" * (-pos % 8))
    out += bytes([code, 1, ord(sig), 0])
    if sig == "g":
        out += bytes([len(raw)]) + raw + b"\0"
    else:
        out += _U32.pack(len(raw)) + raw + b"\0"
    return bytes(out), pos + len(out)


def _addressed_fields(
    path: str,
    interface: str | None,
    member: str,
    destination: str | None,
    signature: str,
) -> tuple[bytes, int]:
    fields: list[tuple[int, str, str]] = [(1, "o", path)]
    if interface is not None:
        fields.append((2, "s", interface))
    fields.append((3, "s", member))
    if destination is not None:
        fields.append((6, "s", destination))
    if signature:
        fields.append((8, "g", signature))
    return _header_fields(fields)


class CallTemplate:
    """Method calls to one (destination, path, interface, member,
    signature): ``build(serial, body)`` is the serialised message, where
    ``body`` is the already-encoded body (see :func:`pack_fixed`)."""

    __slots__ = ("_fields", "_fields_length", "destination")

    def __init__(
        self,
        destination: str,
        path: str,
        interface: str | None,
        member: str,
        signature: str = "",
    ) -> None:
        self.destination = destination
        self._fields, self._fields_length = _addressed_fields(
            path, interface, member, destination, signature
        )

    def build(self, serial: int, body: bytes = b"", no_reply: bool = False) -> bytes:
        """The serialised call; ``no_reply`` sets NO_REPLY_EXPECTED."""
        start = (
            b"l\x01\x01\x01" if no_reply else b"l\x01\x00\x01"
        )  # LE, call, flags, v1
        return (
            _HEAD(start, len(body), serial, self._fields_length) + self._fields + body
        )


class SignalTemplate:
    """Signals from one (path, interface, member, signature), broadcast:
    ``build(serial, body)``."""

    __slots__ = ("_fields", "_fields_length")

    def __init__(
        self, path: str, interface: str, member: str, signature: str = ""
    ) -> None:
        self._fields, self._fields_length = _addressed_fields(
            path, interface, member, None, signature
        )

    def build(self, serial: int, body: bytes = b"") -> bytes:
        return (
            _HEAD(b"l\x04\x00\x01", len(body), serial, self._fields_length)  # signal
            + self._fields
            + body
        )


class ReturnTemplate:
    """Method returns with one signature to one destination:
    ``build(serial, reply_serial, body)``."""

    __slots__ = ("_after_serial", "_fields_length")

    def __init__(self, destination: str | None, signature: str = "") -> None:
        fields: list[tuple[int, str, str]] = []
        if destination is not None:
            fields.append((6, "s", destination))
        if signature:
            fields.append((8, "g", signature))
        # field 5 (reply serial, u32) comes first: 8 bytes at offset 16
        rest, rest_length = _header_fields(fields, pos=24)
        self._fields_length = 8 + rest_length
        self._after_serial = rest

    def build(self, serial: int, reply_serial: int, body: bytes = b"") -> bytes:
        return (
            _RETURN_HEAD(
                b"l\x02\x00\x01",  # little-endian, method return, no flags, v1
                len(body),
                serial,
                self._fields_length,
                b"\x05\x01u\x00",
                reply_serial,
            )
            + self._after_serial
            + body
        )


def _header_fields(
    fields: list[tuple[int, str, str]], pos: int = 16
) -> tuple[bytes, int]:
    """The header field array from ``pos`` on, padded to 8; and its unpadded
    length."""
    parts = []
    for code, sig, value in fields:
        part, pos = _string_field(code, sig, value, pos)
        parts.append(part)
    array = b"".join(parts)
    return array + b"\0" * (-pos % 8), len(array)


_HEAD: Final = struct.Struct("<4sIII").pack
_RETURN_HEAD: Final = struct.Struct("<4sIII4sI").pack


def pack_fixed(signature: str, values: tuple[int, ...]) -> bytes:
    """Body bytes for a signature of fixed-size integers (``y``, ``q``...)."""
    if not signature:
        return b""
    return _fixed_layout(signature).pack(*values)


@functools.cache
def _fixed_layout(signature: str) -> struct.Struct:
    return struct.Struct("<" + "".join("BHIq"["yqux".index(c)] for c in signature))


_RECEIVED_MESSAGE: Final = struct.Struct("<BBBBI")
_SEND_MESSAGE: Final = struct.Struct("<BBBBBxxxI")


def pack_received_message(
    seq: int, netfn: int, lun: int, cmd: int, data: bytes
) -> bytes:
    """Body of ``ReceivedMessage(y seq, y netfn, y lun, y cmd, ay data)``."""
    return _RECEIVED_MESSAGE.pack(seq, netfn, lun, cmd, len(data)) + data


def pack_send_message(
    seq: int, netfn: int, lun: int, cmd: int, cc: int, data: bytes
) -> bytes:
    """Body of ``sendMessage(y seq, y netfn, y lun, y cmd, y cc, ay data)``."""
    return _SEND_MESSAGE.pack(seq, netfn, lun, cmd, cc, len(data)) + data
