"""atheris harness: HIOMAP request decoding and response encoding.

Feeds ``Dispatcher.request`` a sequence of arbitrary request data (the
dispatcher keeps the previous sequence number, so order matters), then
``encode_reply`` an arbitrary signature and body built from the input, and
``encode_error`` an arbitrary name.  No exception may escape; every answer
must be one the wire reference allows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hiomapbridge.hiomap import (
    Dispatcher,
    HiomapCall,
    Rejected,
    encode_error,
    encode_reply,
)

CCS = {0x00, 0xC0, 0xC1, 0xC3, 0xC4, 0xC7, 0xC9, 0xCB, 0xCC, 0xD4, 0xFF}
SIGNATURES = ["", "y", "q", "qq", "qqq", "yyq", "u", "s", "yy", "qqqq", "b", "x"]


class Input:
    """A tiny FuzzedDataProvider that works with or without atheris."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def value(self, depth: int = 0) -> Any:
        kind = self.byte() % 9
        if kind == 0:
            return int.from_bytes(self.take(2), "little")
        if kind == 1:
            return self.byte()
        if kind == 2:
            return -self.byte()
        if kind == 3:
            return bool(self.byte() & 1)
        if kind == 4:
            return self.take(self.byte() % 8).decode("latin-1")
        if kind == 5:
            return None
        if kind == 6:
            return 1 << (self.byte() % 80)
        if kind == 7 and depth < 3:
            return tuple(self.value(depth + 1) for _ in range(self.byte() % 4))
        return float(self.byte())


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    dispatcher = Dispatcher()
    for _ in range(inp.byte() % 4 + 1):
        request = inp.take(inp.byte() % 12)
        plan = dispatcher.request(request)
        if isinstance(plan, Rejected):
            assert plan.cc in CCS, plan
            continue
        assert isinstance(plan, HiomapCall)
        assert plan.command == request[0] and plan.seq == request[1]
        assert dispatcher.last_seq == request[1]
        signature = SIGNATURES[inp.byte() % len(SIGNATURES)]
        body: Any = tuple(inp.value() for _ in range(inp.byte() % 5))
        if inp.byte() == 0xFF:
            body = inp.value()  # not even a tuple
        cc, response = encode_reply(plan, signature, body)
        assert cc in (0x00, 0xFF)
        if cc:
            assert response == b""
        else:
            assert response[:2] == bytes([plan.command, plan.seq])
            assert len(response) <= 2 + 6
    name = inp.take(inp.byte() % 48).decode("utf-8", "replace")
    assert encode_error(name) in CCS


def fuzz_main(one_input: Callable[[bytes], None]) -> None:
    """Run ``one_input`` under atheris with this process's arguments (every
    harness's ``__main__``)."""
    import atheris  # type: ignore[import-untyped]

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    fuzz_main(test_one_input)
