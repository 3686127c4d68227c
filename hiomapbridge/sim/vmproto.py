"""OpenIPMI's "VM" serial protocol, as QEMU's ``ipmi-bmc-extern`` speaks it.

Sans-IO: :class:`Decoder` turns received bytes into events, the ``encode_*``
functions build the bytes to send. Nothing here touches a socket or a clock.

The facts (QEMU 7.2 ``hw/ipmi/ipmi_bmc_extern.c``, wire reference 11):

* A byte stream with three special bytes: ``0xA0`` ends a message, ``0xA1``
  ends a control command, ``0xAA`` escapes the next byte. An escaped byte is
  sent as ``byte | 0x10`` after the ``0xAA`` and decoded by clearing bit 4
  (so ``0xA0`` travels as ``AA B0``, ``0xA1`` as ``AA B1``, ``0xAA`` as
  ``AA BA``).
* A message is ``[msgid, netfn << 2 | lun, cmd, (cc,) data..., checksum]``:
  QEMU's request to the BMC carries no completion code, the BMC's response
  does. The checksum is the two's complement of the sum of the other bytes
  (the whole message sums to zero mod 256). ``msgid`` is QEMU's own counter
  (not the BT seq): a response must echo it, and QEMU ignores one that does
  not match the request it waits for.
* A control command is ``[code, operand...]`` then ``0xA1``: QEMU sends
  VERSION (``0xFF``, operand 1) and CAPABILITIES (``0x08``, a flags byte)
  when the connection opens, and RESET (``0x04``) when the guest resets;
  the BMC sends ATTN / ATTN_IRQ (SMS_ATN), NOATTN, POWEROFF, RESET,
  GRACEFUL_SHUTDOWN, SEND_NMI, ENABLE_IRQ / DISABLE_IRQ.
* QEMU allows one request in flight, answers it itself with cc ``0xC3``
  after 4 s of virtual time and with ``0xD2`` while nothing is connected.
"""

from __future__ import annotations

import logging
from enum import IntEnum, IntFlag
from typing import Final

import attrs

log = logging.getLogger(__name__)

MSG_CHAR: Final = 0xA0
"""Ends a message."""
CMD_CHAR: Final = 0xA1
"""Ends a control command."""
ESCAPE_CHAR: Final = 0xAA
"""The next byte is escaped (sent with bit 4 set)."""
ESCAPE_BIT: Final = 0x10
SPECIAL: Final = frozenset((MSG_CHAR, CMD_CHAR, ESCAPE_CHAR))

PROTOCOL_VERSION: Final = 1

MAX_MESSAGE: Final = 1024
"""Decoded bytes kept per message before it is flagged as too long (QEMU's
own buffer is ``MAX_IPMI_MSG_SIZE + 2``, 302 bytes)."""

MIN_REQUEST: Final = 4  # msgid, netfn/lun, cmd, checksum
MIN_RESPONSE: Final = 5  # ... and cc


class Control(IntEnum):
    """VM control command codes."""

    NOATTN = 0x00
    ATTN = 0x01
    ATTN_IRQ = 0x02
    POWEROFF = 0x03
    RESET = 0x04
    ENABLE_IRQ = 0x05
    DISABLE_IRQ = 0x06
    SEND_NMI = 0x07
    CAPABILITIES = 0x08
    GRACEFUL_SHUTDOWN = 0x09
    VERSION = 0xFF


class Capability(IntFlag):
    """The CAPABILITIES flags byte (what the VM can do on request)."""

    POWER = 0x01
    RESET = 0x02
    IRQ = 0x04
    NMI = 0x08
    ATTN = 0x10
    GRACEFUL_SHUTDOWN = 0x20


# -- events -------------------------------------------------------------------


@attrs.frozen
class Message:
    """One checksummed message; ``payload`` excludes the checksum."""

    payload: bytes


@attrs.frozen
class ControlCommand:
    """One control command: ``code`` (see :class:`Control`) and any operand
    bytes that followed it."""

    code: int
    operand: bytes = b""

    @property
    def name(self) -> str:
        try:
            return Control(self.code).name
        except ValueError:
            return f"UNKNOWN({self.code:#04x})"


@attrs.frozen
class Garbled:
    """Bytes dropped: a bad checksum, a message too short or too long, or a
    terminator inside an escape. ``raw`` is what was decoded so far."""

    reason: str
    raw: bytes


Event = Message | ControlCommand | Garbled


@attrs.frozen
class Request:
    """A request as QEMU sends it (the host's IPMI request)."""

    msgid: int
    netfn: int
    lun: int
    cmd: int
    data: bytes = b""


@attrs.frozen
class Response:
    """A response as the BMC sends it; ``netfn`` is the response netfn."""

    msgid: int
    netfn: int
    lun: int
    cmd: int
    cc: int
    data: bytes = b""


# -- codec --------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero (mod 256)."""
    return -sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """``data`` with every special byte escaped."""
    out = bytearray()
    for byte in data:
        if byte in SPECIAL:
            out.append(ESCAPE_CHAR)
            out.append(byte | ESCAPE_BIT)
        else:
            out.append(byte)
    return bytes(out)


def encode_message(payload: bytes) -> bytes:
    """A message on the wire: escaped payload and checksum, then ``0xA0``."""
    return escape(payload + bytes([checksum(payload)])) + bytes([MSG_CHAR])


def encode_control(code: int, operand: bytes = b"") -> bytes:
    """A control command on the wire: escaped code and operand, then ``0xA1``."""
    return escape(bytes([code & 0xFF]) + operand) + bytes([CMD_CHAR])


def _check_byte(name: str, value: int, limit: int = 0xFF) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} out of range 0..{limit}")


def encode_request(request: Request) -> bytes:
    """What QEMU sends for a host request (for tests and fakes)."""
    _check_byte("msgid", request.msgid)
    _check_byte("netfn", request.netfn, 0x3F)
    _check_byte("lun", request.lun, 3)
    _check_byte("cmd", request.cmd)
    return encode_message(
        bytes([request.msgid, request.netfn << 2 | request.lun, request.cmd])
        + request.data
    )


def encode_response(response: Response) -> bytes:
    """What the BMC sends back: ``msgid`` must be the request's."""
    _check_byte("msgid", response.msgid)
    _check_byte("netfn", response.netfn, 0x3F)
    _check_byte("lun", response.lun, 3)
    _check_byte("cmd", response.cmd)
    _check_byte("cc", response.cc)
    return encode_message(
        bytes(
            [
                response.msgid,
                response.netfn << 2 | response.lun,
                response.cmd,
                response.cc,
            ]
        )
        + response.data
    )


def parse_request(message: Message) -> Request | None:
    """A decoded message as a request from QEMU (None: too short)."""
    p = message.payload
    if len(p) < MIN_REQUEST - 1:
        return None
    return Request(p[0], p[1] >> 2, p[1] & 3, p[2], p[3:])


def parse_response(message: Message) -> Response | None:
    """A decoded message as a response from the BMC (None: too short)."""
    p = message.payload
    if len(p) < MIN_RESPONSE - 1:
        return None
    return Response(p[0], p[1] >> 2, p[1] & 3, p[2], p[3], p[4:])


@attrs.define
class Decoder:
    """Incremental decoder: ``feed(bytes)`` returns the events completed.

    Follows QEMU's own receiver: an escape applies to the next ordinary
    byte; a terminator inside an escape drops what was gathered; a message
    shorter than ``min_message`` bytes (checksum included) or with a bad
    checksum is dropped (returned as :class:`Garbled` and logged). An empty
    control command (``0xA1`` alone) is ignored.
    """

    min_message: int = MIN_REQUEST
    max_message: int = MAX_MESSAGE
    _buf: bytearray = attrs.field(factory=bytearray)
    _escape: bool = False
    _too_long: bool = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for byte in data:
            if byte == MSG_CHAR:
                event = self._end_message()
            elif byte == CMD_CHAR:
                event = self._end_control()
            elif byte == ESCAPE_CHAR:
                self._escape = True
                continue
            else:
                if self._escape:
                    byte &= ~ESCAPE_BIT
                    self._escape = False
                if len(self._buf) >= self.max_message:
                    self._too_long = True
                else:
                    self._buf.append(byte)
                continue
            if event is not None:
                if isinstance(event, Garbled):
                    log.warning(
                        "VM protocol: dropped %s (%s)", event.raw.hex(), event.reason
                    )
                events.append(event)
        return events

    @property
    def pending(self) -> bytes:
        """Decoded bytes of an unfinished message or command."""
        return bytes(self._buf)

    def _take(self) -> tuple[bytes, bool, bool]:
        raw, escape, too_long = bytes(self._buf), self._escape, self._too_long
        self._buf.clear()
        self._escape = self._too_long = False
        return raw, escape, too_long

    def _end_message(self) -> Event | None:
        raw, escape, too_long = self._take()
        if escape:
            return Garbled("message ended inside an escape", raw)
        if too_long:
            return Garbled(f"message longer than {self.max_message} bytes", raw)
        if len(raw) < self.min_message:
            return Garbled(f"message shorter than {self.min_message} bytes", raw)
        if sum(raw) & 0xFF:
            return Garbled("bad checksum", raw)
        return Message(raw[:-1])

    def _end_control(self) -> Event | None:
        raw, escape, too_long = self._take()
        if escape:
            return Garbled("control command ended inside an escape", raw)
        if too_long:
            return Garbled("control command too long", raw)
        if not raw:
            return None
        return ControlCommand(raw[0], raw[1:])


__all__ = [
    "CMD_CHAR",
    "ESCAPE_CHAR",
    "MSG_CHAR",
    "PROTOCOL_VERSION",
    "Capability",
    "Control",
    "ControlCommand",
    "Decoder",
    "Event",
    "Garbled",
    "Message",
    "Request",
    "Response",
    "checksum",
    "encode_control",
    "encode_message",
    "encode_request",
    "encode_response",
    "escape",
    "parse_request",
    "parse_response",
]
