"""atheris harness: folding PropertiesChanged into the event byte.

``fold`` gets whatever jeepney could hand the bridge and more: any mapping
keys and values, variants of any shape, any starting byte.  No exception
may escape; the result is a byte, set bits come only from known boolean
properties, and every other entry is reported as ignored.
"""

from __future__ import annotations

from typing import Any

from hiomapbridge.events import PROPERTY_BITS, describe, fold

try:
    from fuzz.fuzz_requests import Input, fuzz_main
except ImportError:  # run as a script from fuzz/
    from fuzz_requests import (  # type: ignore[no-redef,import-not-found]
        Input,
        fuzz_main,
    )

NAMES = [*PROPERTY_BITS, "Bogus", "", "daemonready"]
SIGS = ["b", "s", "y", "u", "v", "ab", "(b)", ""]


def variant(inp: Input) -> Any:
    shape = inp.byte() % 6
    if shape == 0:
        return (SIGS[inp.byte() % len(SIGS)], inp.value())
    if shape == 1:
        return ("b", bool(inp.byte() & 1))
    if shape == 2:
        return ("b", inp.value())
    if shape == 3:
        return inp.value()
    if shape == 4:
        return tuple(inp.value() for _ in range(inp.byte() % 4))
    return ["b", True]


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    base = int.from_bytes(inp.take(2), "little") - (1 << 15)
    changed: dict[Any, Any] = {}
    for _ in range(inp.byte() % 6):
        key: Any = NAMES[inp.byte() % len(NAMES)]
        if inp.byte() == 0:
            key = inp.value()
            try:
                hash(key)
            except TypeError:
                continue
        changed[key] = variant(inp)
    folded = fold(base, changed)
    assert 0 <= folded.byte <= 0xFF
    applied = 0
    for name, var in changed.items():
        if (
            isinstance(name, str)
            and name in PROPERTY_BITS
            and isinstance(var, tuple)
            and len(var) == 2
            and var[0] == "b"
            and isinstance(var[1], bool)
        ):
            applied += 1
            bit = PROPERTY_BITS[name]
            assert bool(folded.byte & bit) == var[1]
    assert len(folded.ignored) == len(changed) - applied
    describe(folded.byte)


if __name__ == "__main__":
    fuzz_main(test_one_input)
