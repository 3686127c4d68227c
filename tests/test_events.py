from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge.events import ACKABLE, PROPERTY_BITS, Event, describe, fold


def test_bits() -> None:
    assert int(Event.PROTOCOL_RESET) == 0x01
    assert int(Event.WINDOW_RESET) == 0x02
    assert int(Event.FLASH_CONTROL_LOST) == 0x40
    assert int(Event.DAEMON_READY) == 0x80
    assert ACKABLE == Event.PROTOCOL_RESET | Event.WINDOW_RESET == 0x03
    assert dict(PROPERTY_BITS) == {
        "DaemonReady": 0x80,
        "FlashControlLost": 0x40,
        "WindowReset": 0x02,
        "ProtocolReset": 0x01,
    }


@pytest.mark.parametrize(
    ("before", "changed", "after"),
    [
        (0x00, {"DaemonReady": ("b", True), "ProtocolReset": ("b", True)}, 0x81),
        (0x81, {"ProtocolReset": ("b", False)}, 0x80),
        (0x80, {"FlashControlLost": ("b", True)}, 0xC0),
        (0xC0, {"FlashControlLost": ("b", False)}, 0x80),
        (0x80, {"WindowReset": ("b", True)}, 0x82),
        (0x83, {"DaemonReady": ("b", False)}, 0x03),
        (0x81, {"DaemonReady": ("b", True)}, 0x81),  # setting a set bit
        (0x00, {"WindowReset": ("b", False)}, 0x00),  # clearing a clear bit
        (0x81, {}, 0x81),
    ],
)
def test_fold_sets_and_clears(
    before: int, changed: dict[str, tuple[str, object]], after: int
) -> None:
    result = fold(before, changed)
    assert result.byte == after
    assert result.ignored == ()


def test_fold_hiomapd_clean_stop_sequence() -> None:
    byte = 0x80
    for changed in (
        {"DaemonReady": ("b", False)},
        {"DaemonReady": ("b", True), "ProtocolReset": ("b", True)},
        {"DaemonReady": ("b", False), "ProtocolReset": ("b", True)},
    ):
        byte = fold(byte, changed).byte
    assert byte == 0x01


def test_fold_ignores_unknown_names_and_keeps_the_rest() -> None:
    result = fold(0x00, {"Bogus": ("b", True), "DaemonReady": ("b", True)})
    assert result.byte == 0x80
    assert len(result.ignored) == 1
    assert "Bogus" in result.ignored[0]
    assert "unknown" in result.ignored[0]


@pytest.mark.parametrize(
    "variant",
    [("y", 1), ("b", 1), ("b", 0), ("s", "true"), ("i", True), ("b", None), "x", ()],
)
def test_fold_ignores_non_booleans(variant: Any) -> None:
    result = fold(0x81, {"DaemonReady": variant, "WindowReset": ("b", True)})
    assert result.byte == 0x83
    assert len(result.ignored) == 1
    assert "DaemonReady" in result.ignored[0]
    assert "boolean" in result.ignored[0]


def test_fold_masks_to_a_byte() -> None:
    assert fold(0x1FF, {"DaemonReady": ("b", False)}).byte == 0x7F


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=3),
)
_variants = st.one_of(
    st.tuples(st.sampled_from(["b", "y", "s", "v", ""]), _values),
    st.tuples(_values),
    st.tuples(st.text(max_size=3), _values, _values),
    _values,
)
_names = st.one_of(st.sampled_from(sorted(PROPERTY_BITS)), st.text(max_size=12))


@given(st.integers(0, 255), st.dictionaries(_names, _variants, max_size=6))
def test_fold_never_raises(byte: int, changed: dict[str, Any]) -> None:
    result = fold(byte, changed)
    assert 0 <= result.byte <= 0xFF
    counted = sum(
        1
        for name, v in changed.items()
        if name in PROPERTY_BITS
        and isinstance(v, tuple)
        and len(v) == 2
        and v[0] == "b"
        and isinstance(v[1], bool)
    )
    assert len(result.ignored) == len(changed) - counted
    # Bits nobody mentioned validly are untouched.
    touched = 0
    for name, v in changed.items():
        if name in PROPERTY_BITS and isinstance(v, tuple) and len(v) == 2:
            if v[0] == "b" and isinstance(v[1], bool):
                touched |= PROPERTY_BITS[name]
                assert bool(result.byte & PROPERTY_BITS[name]) is v[1]
    assert result.byte & ~touched == byte & ~touched


@pytest.mark.parametrize(
    ("byte", "text"),
    [
        (0x81, "0x81 (DAEMON_READY|PROTOCOL_RESET)"),
        (0x00, "0x00 (none)"),
        (0x01, "0x01 (PROTOCOL_RESET)"),
        (0xC3, "0xc3 (DAEMON_READY|FLASH_CONTROL_LOST|WINDOW_RESET|PROTOCOL_RESET)"),
        (0x84, "0x84 (DAEMON_READY|0x04)"),
    ],
)
def test_describe(byte: int, text: str) -> None:
    assert describe(byte) == text
