"""The bench's C peers (bench/peers.c) keep the contracts the host-mode
comparison relies on: the btbridged stand-in speaks btbridged's D-Bus API
over the BT seam, answers only requests it holds, writes before it replies,
and times out a request after 1 s with cc 0xCE, as btbridged does; the
hiomapd stand-in answers the calls the bridge makes.

Real private dbus-daemon, the peers as real subprocesses.
"""

from __future__ import annotations

import importlib
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Message

from hiomapbridge.dbus import Bus, DBusError, open_bus
from hiomapbridge.hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_V2
from hiomapbridge.ipmi import HOSTIPMI_IFACE, HOSTIPMI_PATH, HOSTIPMI_SERVICE
from hiomapbridge.sim.process import run_service

from .test_bench import peers_buildable

BENCH = Path(__file__).resolve().parent.parent / "bench"


pytestmark = pytest.mark.skipif(
    not peers_buildable(), reason="bench/peers.c needs cc and libsystemd-dev"
)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    hostmodes: Any = importlib.import_module("hostmodes")
    binary = hostmodes.build_peers(tmp_path_factory.mktemp("peers"))
    assert isinstance(binary, Path), binary
    return binary


class Seam:
    """The host end: listens; the btbridged stand-in connects."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.sock: socket.socket | None = None

    def accept(self) -> None:
        self.listener.settimeout(5)
        self.sock, _ = self.listener.accept()
        self.sock.setblocking(False)

    def send(self, frame: bytes) -> None:
        assert self.sock is not None
        self.sock.send(frame)

    async def recv(self) -> bytes:
        assert self.sock is not None
        while True:
            try:
                return self.sock.recv(256)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@asynccontextmanager
async def btbridged(
    peers: Path, address: str, tmp_path: Path
) -> AsyncIterator[tuple[Seam, Bus, Signals]]:
    """The stand-in on the bus, its seam's host end, a client bus that
    records ReceivedMessage signals."""
    seam = Seam(tmp_path / "seam")
    try:
        async with run_service(
            "btbridged", [str(peers), "btbridged", address, str(tmp_path / "seam")],
            tmp_path,
        ) as service, open_bus(address) as bus:  # fmt: skip
            seam.accept()
            received = Signals()
            await bus.subscribe(
                HOSTIPMI_PATH, HOSTIPMI_IFACE, "ReceivedMessage", received.append
            )
            yield seam, bus, received
            assert service.process.returncode is None, service.log()
    finally:
        seam.close()


def send_message(seq: int, netfn: int, cmd: int, cc: int, data: bytes) -> Message:
    addr = DBusAddress(HOSTIPMI_PATH, HOSTIPMI_SERVICE, HOSTIPMI_IFACE)
    return new_method_call(
        addr, "sendMessage", "yyyyyay", (seq, netfn, 0, cmd, cc, data)
    )


class Signals(list[Message]):
    """Received signals, in order; :meth:`wait` for the n-th."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def append(self, msg: Message) -> None:
        super().append(msg)
        self._grew.set()
        self._grew = trio.Event()

    async def wait(self, count: int) -> None:
        with trio.fail_after(5):
            while len(self) < count:
                await self._grew.wait()


async def test_btbridged_peer_relays_a_request_and_its_response(
    peers: Path, bus_address: str, tmp_path: Path
) -> None:
    async with btbridged(peers, bus_address, tmp_path) as (seam, bus, received):
        seam.send(bytes((5, 0x3A << 2 | 1, 7, 0x5A, 0xAB, 0xCD)))
        await received.wait(1)
        assert received[0].body == (7, 0x3A, 1, 0x5A, b"\xab\xcd")
        with trio.fail_after(5):
            reply = await bus.call(send_message(7, 0x3B, 0x5A, 0, b"\x01\x02"))
            # The method return comes after the write: the frame is there.
            assert seam.sock is not None
            frame = seam.sock.recv(256)
        assert reply.body == (0,)
        assert frame == bytes((6, 0x3B << 2, 7, 0x5A, 0, 1, 2))


async def test_btbridged_peer_turns_set_attention_into_the_b1_packet(
    peers: Path, bus_address: str, tmp_path: Path
) -> None:
    async with btbridged(peers, bus_address, tmp_path) as (seam, bus, _):
        addr = DBusAddress(HOSTIPMI_PATH, HOSTIPMI_SERVICE, HOSTIPMI_IFACE)
        with trio.fail_after(5):
            reply = await bus.call(new_method_call(addr, "setAttention"))
            assert seam.sock is not None
            packet = seam.sock.recv(256)  # sent before the method return
        assert reply.body == (0,)
        assert packet == b"\xb1"


async def test_btbridged_peer_refuses_a_response_nobody_asked_for(
    peers: Path, bus_address: str, tmp_path: Path
) -> None:
    async with btbridged(peers, bus_address, tmp_path) as (_, bus, received):
        with trio.fail_after(5), pytest.raises(DBusError) as err:
            await bus.call(send_message(9, 0x3B, 0x5A, 0, b""))
        assert err.value.text == "No matching request"
        assert not received


async def test_btbridged_peer_times_out_an_unanswered_request(
    peers: Path, bus_address: str, tmp_path: Path
) -> None:
    async with btbridged(peers, bus_address, tmp_path) as (seam, bus, received):
        seam.send(bytes((3, 0x06 << 2, 4, 0x01)))
        await received.wait(1)
        start = trio.current_time()
        with trio.fail_after(5):
            frame = await seam.recv()
        # btbridged's 1 s timer (timerfd): cc 0xCE, netfn + 1, same seq.
        assert trio.current_time() - start > 0.5
        assert frame == bytes((4, 0x07 << 2, 4, 0x01, 0xCE))
        with trio.fail_after(5), pytest.raises(DBusError):
            await bus.call(send_message(4, 0x07, 0x01, 0, b""))


async def test_hiomapd_peer_answers_the_bridge_calls(
    peers: Path, bus_address: str, tmp_path: Path
) -> None:
    async with run_service(
        "hiomapd", [str(peers), "hiomapd", bus_address], tmp_path
    ), open_bus(bus_address) as bus:  # fmt: skip

        def call(member: str, signature: str = "", *args: Any) -> Message:
            addr = DBusAddress(HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_V2)
            return new_method_call(addr, member, signature, args)

        with trio.fail_after(5):
            window = await bus.call(call("CreateReadWindow", "qq", 2040, 100))
            info = await bus.call(call("GetFlashInfo"))
            props = await bus.call(
                new_method_call(
                    DBusAddress(
                        HIOMAPD_PATH, HIOMAPD_SERVICE, "org.freedesktop.DBus.Properties"
                    ),
                    "GetAll",
                    "s",
                    (IFACE_V2,),
                )
            )
        # Clipped to the end of the 2048-block flash; mapped at its offset.
        assert window.body == (2040, 8, 2040)
        assert info.body == (2048, 1)
        assert {k: v[1] for k, v in props.body[0].items()} == {
            "DaemonReady": True,
            "FlashControlLost": False,
            "WindowReset": False,
            "ProtocolReset": False,
        }
