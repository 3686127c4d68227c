"""BT frames as the kernel's BT BMC device carries them (wire reference 8),
and the Get BT Interface Capabilities answer (wire reference 10).

Sans-IO: bytes in, values out.  The same frames travel over the ``bt:``
unix-socket seam, one frame per SOCK_SEQPACKET packet.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import attrs

#: ``BT_BMC_IOCTL_SMS_ATN = _IO(0xb1, 0x00)``: raise SMS_ATN towards the host.
BT_BMC_IOCTL_SMS_ATN: Final = (0xB1 << 8) | 0x00
#: What the bridge sends on the unix-socket seam where it would issue the
#: ioctl: one byte, shorter than any valid frame.
ATTENTION_PACKET: Final = b"\xb1"
#: The BT FIFO, in both directions; a frame (its length byte included) fits.
FIFO_SIZE: Final = 64
#: ``[len, netfn/lun, seq, cmd, cc]`` precede a response's data.
RESPONSE_HEADER: Final = 5
MAX_RESPONSE_DATA: Final = FIFO_SIZE - RESPONSE_HEADER
#: ``[len, netfn/lun, seq, cmd]`` precede a request's data.
REQUEST_HEADER: Final = 4

#: What the bridge advertises besides the transaction time: one outstanding
#: request, 64-byte buffers both ways (sizes are sent minus one), one retry.
OUTSTANDING_REQUESTS: Final = 1
CAPS_RETRIES: Final = 1


class Request(NamedTuple):
    """One host request read from the BT interface (built per request: a
    named tuple is the cheapest immutable value)."""

    netfn: int
    lun: int
    seq: int
    cmd: int
    data: bytes


@attrs.frozen
class BadLength:
    """A frame whose header is readable but whose length byte disagrees
    with its size (or that is longer than the FIFO): answered cc 0xC7 with
    the header's netfn, lun, seq, cmd."""

    netfn: int
    lun: int
    seq: int
    cmd: int
    length_byte: int
    size: int


@attrs.frozen
class TooShort:
    """A frame too short to carry netfn/lun, seq and cmd: dropped, logged."""

    size: int


def parse_request(frame: bytes) -> Request | BadLength | TooShort:
    """Decode one request frame ``[len, netfn<<2|lun, seq, cmd, data...]``.

    ``len`` counts the bytes after itself.  A frame longer than the FIFO
    cannot have come from a host: it counts as a bad length.  Never raises.
    """
    if len(frame) < REQUEST_HEADER:
        return TooShort(len(frame))
    length, netlun, seq, cmd = frame[0], frame[1], frame[2], frame[3]
    if length != len(frame) - 1 or len(frame) > FIFO_SIZE:
        return BadLength(netlun >> 2, netlun & 3, seq, cmd, length, len(frame))
    return Request(netlun >> 2, netlun & 3, seq, cmd, frame[REQUEST_HEADER:])


def encode_response(
    netfn: int, lun: int, seq: int, cmd: int, cc: int, data: bytes = b""
) -> bytes:
    """One response frame ``[len, netfn<<2|lun, seq, cmd, cc, data...]``.

    ``netfn`` is the response netfn (the request's ``| 1``).  Raises
    ValueError if it would not fit the FIFO: callers replace such a response
    (see :data:`MAX_RESPONSE_DATA`).
    """
    if len(data) > MAX_RESPONSE_DATA:
        raise ValueError(f"response data {len(data)} bytes > {MAX_RESPONSE_DATA}")
    return (
        bytes(
            (
                RESPONSE_HEADER - 1 + len(data),
                ((netfn & 0x3F) << 2) | (lun & 3),
                seq & 0xFF,
                cmd & 0xFF,
                cc & 0xFF,
            )
        )
        + data
    )


def encode_request(
    netfn: int, lun: int, seq: int, cmd: int, data: bytes = b""
) -> bytes:
    """One request frame, as a host writes it (simulators, tests)."""
    if REQUEST_HEADER + len(data) > FIFO_SIZE:
        raise ValueError(f"request data {len(data)} bytes do not fit the BT FIFO")
    return (
        bytes(
            (
                REQUEST_HEADER - 1 + len(data),
                ((netfn & 0x3F) << 2) | (lun & 3),
                seq & 0xFF,
                cmd & 0xFF,
            )
        )
        + data
    )


def capabilities(transaction_time: int) -> bytes:
    """Get BT Interface Capabilities response data (5 bytes).

    Outstanding requests, input and output buffer size minus one, the
    transaction time in whole seconds (1-255: the host times a request out,
    and retries it, after this long), retries.
    """
    if not 1 <= transaction_time <= 255:
        raise ValueError(f"transaction time {transaction_time} s is not 1-255")
    return bytes(
        (
            OUTSTANDING_REQUESTS,
            FIFO_SIZE - 1,
            FIFO_SIZE - 1,
            transaction_time,
            CAPS_RETRIES,
        )
    )
