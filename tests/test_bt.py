"""BT frames and the capabilities answer (hiomapbridge.bt), sans-IO."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge import bt


def test_request_frame_decodes() -> None:
    frame = bytes([6, 0x3A << 2 | 1, 0x17, 0x5A, 0x02, 0x05, 0x02])
    parsed = bt.parse_request(frame)
    assert type(parsed) is bt.Request  # a named tuple equals a plain tuple too
    assert parsed == bt.Request(0x3A, 1, 0x17, 0x5A, b"\x02\x05\x02")


@pytest.mark.parametrize("frame", [b"", b"\x03", b"\x03\x18", b"\x03\x18\x01"])
def test_frames_without_netfn_seq_cmd_are_too_short(frame: bytes) -> None:
    assert bt.parse_request(frame) == bt.TooShort(len(frame))


def test_length_byte_disagreeing_with_the_frame_is_bad_length() -> None:
    frame = bytes([9, 0x06 << 2, 0x44, 0x01, 0xAA])
    assert bt.parse_request(frame) == bt.BadLength(0x06, 0, 0x44, 0x01, 9, 5)


def test_a_frame_longer_than_the_fifo_is_bad_length() -> None:
    data = bytes(bt.FIFO_SIZE)  # 4 + 64 bytes: cannot have come through the FIFO
    frame = bt.encode_request(0x06, 0, 1, 0x01, b"") + data
    frame = bytes([len(frame) - 1]) + frame[1:]
    assert isinstance(bt.parse_request(frame), bt.BadLength)


def test_response_frame_layout() -> None:
    assert bt.encode_response(0x3B, 2, 0x17, 0x5A, 0x00, b"\x02\x05") == bytes(
        [6, 0x3B << 2 | 2, 0x17, 0x5A, 0x00, 0x02, 0x05]
    )


def test_response_that_does_not_fit_the_fifo_is_refused() -> None:
    bt.encode_response(0x07, 0, 1, 0x35, 0, bytes(bt.MAX_RESPONSE_DATA))  # fits
    with pytest.raises(ValueError):
        bt.encode_response(0x07, 0, 1, 0x35, 0, bytes(bt.MAX_RESPONSE_DATA + 1))
    assert bt.MAX_RESPONSE_DATA + bt.RESPONSE_HEADER == bt.FIFO_SIZE == 64


@given(
    st.integers(0, 0x3F),
    st.integers(0, 3),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=bt.FIFO_SIZE - bt.REQUEST_HEADER),
)
def test_request_round_trip(
    netfn: int, lun: int, seq: int, cmd: int, data: bytes
) -> None:
    frame = bt.encode_request(netfn, lun, seq, cmd, data)
    assert len(frame) <= bt.FIFO_SIZE
    parsed = bt.parse_request(frame)
    assert type(parsed) is bt.Request
    assert parsed == bt.Request(netfn, lun, seq, cmd, data)


@given(st.binary(max_size=300))
def test_any_bytes_get_a_defined_result(frame: bytes) -> None:
    result = bt.parse_request(frame)
    assert isinstance(result, bt.Request | bt.BadLength | bt.TooShort)
    if isinstance(result, bt.Request):
        assert len(frame) <= bt.FIFO_SIZE
        assert frame[0] == len(frame) - 1


def test_capabilities_answer() -> None:
    # 1 outstanding request, 64-byte buffers (sent minus one), 3 s, 1 retry.
    assert bt.capabilities(3) == bytes([1, 0x3F, 0x3F, 3, 1])


@pytest.mark.parametrize("seconds", [0, 256])
def test_capabilities_transaction_time_is_one_byte_of_seconds(seconds: int) -> None:
    with pytest.raises(ValueError):
        bt.capabilities(seconds)


def test_sms_atn_ioctl_number_is_IO_0xb1_0() -> None:
    # _IO(type, nr) = (type << 8) | nr, direction and size zero.
    assert bt.BT_BMC_IOCTL_SMS_ATN == 0xB100
    assert bt.ATTENTION_PACKET == b"\xb1"
    assert len(bt.ATTENTION_PACKET) < bt.REQUEST_HEADER  # never a valid frame
