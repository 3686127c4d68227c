from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge import ipmi
from hiomapbridge.ipmi import CompletionCode


def test_constants() -> None:
    assert (ipmi.NETFN_APP, ipmi.NETFN_OEM_IBM) == (0x06, 0x3A)
    assert ipmi.CMD_CLEAR_MESSAGE_FLAGS == 0x30
    assert ipmi.CMD_GET_MESSAGE_FLAGS == 0x31
    assert ipmi.CMD_READ_EVENT_MESSAGE_BUFFER == 0x35
    assert ipmi.CMD_HIOMAP == 0x5A
    assert (ipmi.SEL_CMD_HIOMAP_EVENT, ipmi.SEL_CMD_HEARTBEAT) == (0x0F, 0xFF)
    assert ipmi.MESSAGE_FLAG_EVENT_BUFFER_FULL == 0x02


def test_completion_codes() -> None:
    assert {cc.name: int(cc) for cc in CompletionCode} == {
        "OK": 0x00,
        "NODE_BUSY": 0xC0,
        "INVALID_COMMAND": 0xC1,
        "TIMEOUT": 0xC3,
        "OUT_OF_SPACE": 0xC4,
        "REQ_DATA_LEN_INVALID": 0xC7,
        "PARAM_OUT_OF_RANGE": 0xC9,
        "CANNOT_RETURN_DATA": 0xCA,
        "SENSOR_INVALID": 0xCB,
        "INVALID_FIELD": 0xCC,
        "CANNOT_RESPOND": 0xCE,
        "DESTINATION_UNAVAILABLE": 0xD3,
        "INSUFFICIENT_PRIVILEGE": 0xD4,
        "UNSPECIFIED": 0xFF,
    }


@pytest.mark.parametrize(
    ("request_netfn", "expected"), [(0x06, 0x07), (0x3A, 0x3B), (0x07, 0x07)]
)
def test_response_netfn(request_netfn: int, expected: int) -> None:
    assert ipmi.response_netfn(request_netfn) == expected


def test_event_record_bytes() -> None:
    assert ipmi.event_record(0x81) == bytes.fromhex(
        "5555c0 00000000000000 3a 0f 81 ffffff"
    )


def test_heartbeat_record_bytes() -> None:
    assert ipmi.HEARTBEAT_RECORD == bytes.fromhex(
        "5555c0 00000000000000 3a ff 00 ffffff"
    )


@pytest.mark.parametrize(("command", "data"), [(-1, 0), (0, -1), (0x100, 0), (0, 256)])
def test_sel_record_rejects_out_of_range(command: int, data: int) -> None:
    with pytest.raises(ValueError):
        ipmi.sel_record(command, data)


@given(st.integers(0, 255))
def test_event_record_round_trips(data: int) -> None:
    record = ipmi.event_record(data)
    assert len(record) == 16
    assert ipmi.parse_event_record(record) == (ipmi.SEL_CMD_HIOMAP_EVENT, data)


def test_parse_heartbeat() -> None:
    assert ipmi.parse_event_record(ipmi.HEARTBEAT_RECORD) == (0xFF, 0)


@pytest.mark.parametrize(
    "record",
    [
        b"",
        ipmi.event_record(1)[:15],
        ipmi.event_record(1) + b"\x00",
        b"\x55\x54" + ipmi.event_record(1)[2:],
        b"\x54\x55" + ipmi.event_record(1)[2:],
        b"\x55\x55\x02" + ipmi.event_record(1)[3:],
    ],
)
def test_parse_event_record_drops_what_skiboot_drops(record: bytes) -> None:
    assert ipmi.parse_event_record(record) is None


def test_parse_ignores_timestamp_and_manufacturer_bytes() -> None:
    record = bytearray(ipmi.event_record(0x40))
    record[3:10] = b"\x01\x02\x03\x04\x05\x06\x07"
    assert ipmi.parse_event_record(bytes(record)) == (0x0F, 0x40)


@given(st.binary(max_size=32))
def test_parse_event_record_never_raises(record: bytes) -> None:
    result = ipmi.parse_event_record(record)
    assert result is None or (len(record) == 16 and result == (record[11], record[12]))


def test_message_flags() -> None:
    assert ipmi.message_flags(True) == b"\x02"
    assert ipmi.message_flags(False) == b"\x00"
