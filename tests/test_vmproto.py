"""The VM protocol codec (QEMU ipmi-bmc-extern), byte for byte."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge.sim import vmproto as vm

byte = st.integers(0, 0xFF)
payloads = st.binary(max_size=80)


def test_constants_match_qemu() -> None:
    assert (vm.MSG_CHAR, vm.CMD_CHAR, vm.ESCAPE_CHAR) == (0xA0, 0xA1, 0xAA)
    assert int(vm.Control.VERSION) == 0xFF
    assert [
        vm.Control.NOATTN,
        vm.Control.ATTN,
        vm.Control.ATTN_IRQ,
        vm.Control.POWEROFF,
        vm.Control.RESET,
        vm.Control.ENABLE_IRQ,
        vm.Control.DISABLE_IRQ,
        vm.Control.SEND_NMI,
        vm.Control.CAPABILITIES,
        vm.Control.GRACEFUL_SHUTDOWN,
    ] == list(range(10))
    assert vm.Capability(0x3F) == (
        vm.Capability.POWER
        | vm.Capability.RESET
        | vm.Capability.IRQ
        | vm.Capability.NMI
        | vm.Capability.ATTN
        | vm.Capability.GRACEFUL_SHUTDOWN
    )


def test_escape_sets_bit_4_after_aa() -> None:
    assert vm.escape(bytes([0xA0, 0xA1, 0xAA, 0xB0, 0x00])) == bytes(
        [0xAA, 0xB0, 0xAA, 0xB1, 0xAA, 0xBA, 0xB0, 0x00]
    )


def test_checksum_makes_the_message_sum_to_zero() -> None:
    assert vm.checksum(b"") == 0
    assert vm.checksum(bytes([0x01])) == 0xFF
    assert vm.checksum(bytes([0x00, 0xE8, 0x5A, 0x09, 0x01, 0x03])) == (
        -(0xE8 + 0x5A + 0x09 + 0x01 + 0x03) & 0xFF
    )


def test_request_as_qemu_sends_it() -> None:
    """msgid 0, netfn 0x3A lun 0, cmd 0x5A, HIOMAP ACK: what skiboot sent
    first under QEMU 7.2 (captured)."""
    wire = vm.encode_request(vm.Request(0, 0x3A, 0, 0x5A, bytes([9, 1, 3])))
    body = bytes([0x00, 0xE8, 0x5A, 0x09, 0x01, 0x03])
    assert wire == body + bytes([vm.checksum(body), 0xA0])
    (event,) = vm.Decoder().feed(wire)
    assert isinstance(event, vm.Message)
    assert vm.parse_request(event) == vm.Request(0, 0x3A, 0, 0x5A, b"\x09\x01\x03")


def test_response_layout() -> None:
    wire = vm.encode_response(vm.Response(7, 0x01, 0, 0x02, 0x00))
    body = bytes([7, 0x04, 0x02, 0x00])
    assert wire == body + bytes([vm.checksum(body), 0xA0])
    decoder = vm.Decoder(min_message=vm.MIN_RESPONSE)
    (event,) = decoder.feed(wire)
    assert isinstance(event, vm.Message)
    assert vm.parse_response(event) == vm.Response(7, 1, 0, 2, 0, b"")


def test_special_bytes_in_a_message_are_escaped() -> None:
    # msgid 0xA0 and a checksum that is itself special must both travel escaped
    request = vm.Request(0xA0, 0x2A, 2, 0xAA, bytes([0xA1]))
    wire = vm.encode_request(request)
    assert wire.count(0xA0) == 1 and wire.endswith(b"\xa0")
    assert 0xA1 not in wire
    (event,) = vm.Decoder().feed(wire)
    assert isinstance(event, vm.Message)
    assert vm.parse_request(event) == request


def test_control_commands() -> None:
    assert vm.encode_control(vm.Control.ATTN_IRQ) == b"\x02\xa1"
    assert vm.encode_control(vm.Control.VERSION, b"\x01") == b"\xff\x01\xa1"
    assert vm.encode_control(0xAA) == b"\xaa\xba\xa1"
    assert vm.Decoder().feed(b"\xff\x01\xa1\x08\x3f\xa1\xaa\xba\xa1") == [
        vm.ControlCommand(0xFF, b"\x01"),
        vm.ControlCommand(0x08, b"\x3f"),
        vm.ControlCommand(0xAA),
    ]
    assert vm.ControlCommand(0x04).name == "RESET"
    assert vm.ControlCommand(0x42).name == "UNKNOWN(0x42)"


def test_an_empty_control_command_is_ignored() -> None:
    assert vm.Decoder().feed(b"\xa1\xa1") == []


def test_bad_checksum_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    wire = bytearray(vm.encode_request(vm.Request(1, 6, 0, 0x31)))
    wire[-2] ^= 0x01
    decoder = vm.Decoder()
    events = decoder.feed(bytes(wire))
    assert events == [vm.Garbled("bad checksum", bytes(wire[:-1]))]
    assert "bad checksum" in caplog.text
    # the decoder is clean again afterwards
    good = vm.encode_request(vm.Request(2, 6, 0, 0x31))
    assert [type(e) for e in decoder.feed(good)] == [vm.Message]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x01\x02\xa0", "shorter"),
        (b"\x01\x18\x31\xaa\xa0", "inside an escape"),
        (b"\x01\xaa\xa1", "inside an escape"),
    ],
)
def test_malformed_input_is_dropped(wire: bytes, reason: str) -> None:
    (event,) = vm.Decoder().feed(wire)
    assert isinstance(event, vm.Garbled)
    assert reason in event.reason


def test_too_long_message_is_dropped() -> None:
    decoder = vm.Decoder(max_message=8)
    (event,) = decoder.feed(vm.encode_message(bytes(range(1, 20))))
    assert isinstance(event, vm.Garbled) and "longer" in event.reason


def test_out_of_range_fields_are_refused() -> None:
    with pytest.raises(ValueError):
        vm.encode_request(vm.Request(0, 0x40, 0, 0))
    with pytest.raises(ValueError):
        vm.encode_response(vm.Response(0, 1, 4, 0, 0))


requests = st.builds(
    vm.Request,
    msgid=byte,
    netfn=st.integers(0, 0x3F),
    lun=st.integers(0, 3),
    cmd=byte,
    data=payloads,
)
responses = st.builds(
    vm.Response,
    msgid=byte,
    netfn=st.integers(0, 0x3F),
    lun=st.integers(0, 3),
    cmd=byte,
    cc=byte,
    data=payloads,
)
controls = st.builds(vm.ControlCommand, code=byte, operand=st.binary(max_size=3))


@given(requests)
def test_request_round_trip(request: vm.Request) -> None:
    wire = vm.encode_request(request)
    assert wire.count(vm.MSG_CHAR) == 1 and vm.CMD_CHAR not in wire
    (event,) = vm.Decoder().feed(wire)
    assert isinstance(event, vm.Message)
    assert vm.parse_request(event) == request


@given(responses)
def test_response_round_trip(response: vm.Response) -> None:
    (event,) = vm.Decoder(min_message=vm.MIN_RESPONSE).feed(
        vm.encode_response(response)
    )
    assert isinstance(event, vm.Message)
    assert vm.parse_response(event) == response


@given(
    st.lists(st.one_of(requests, controls), max_size=8),
    st.lists(st.integers(1, 7), min_size=1, max_size=40),
)
def test_stream_split_anywhere(
    items: list[vm.Request | vm.ControlCommand], cuts: list[int]
) -> None:
    """Any mix of messages and commands, fed in arbitrary pieces, decodes to
    the same items in order."""
    wire = b"".join(
        vm.encode_request(i)
        if isinstance(i, vm.Request)
        else vm.encode_control(i.code, i.operand)
        for i in items
    )
    decoder = vm.Decoder()
    events: list[vm.Event] = []
    pos = 0
    for cut in itertools.cycle(cuts):
        if pos >= len(wire):
            break
        events += decoder.feed(wire[pos : pos + cut])
        pos += cut
    decoded = [vm.parse_request(e) if isinstance(e, vm.Message) else e for e in events]
    assert decoded == items
    assert decoder.pending == b""


@given(payloads, st.integers(0, 200), byte)
def test_any_corrupted_byte_is_detected_or_harmless(
    payload: bytes, where: int, flip: int
) -> None:
    """Changing one payload byte never yields a different valid message."""
    body = bytes([1, 0x18, 0x31]) + payload
    corrupt = bytearray(body)
    index = where % len(corrupt)
    corrupt[index] = flip
    wire = vm.escape(bytes(corrupt) + bytes([vm.checksum(body)])) + b"\xa0"
    (event,) = vm.Decoder().feed(wire)
    if bytes(corrupt) == body:
        assert event == vm.Message(body)
    else:
        assert isinstance(event, vm.Garbled) and event.reason == "bad checksum"
