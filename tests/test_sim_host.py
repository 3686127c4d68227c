"""The skiboot-like host client against a scripted BMC peer on a real bus."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from jeepney import DBusAddress, Message, new_method_call

from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.hiomap import Command
from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    HEARTBEAT_RECORD,
    NETFN_APP,
    NETFN_OEM_IBM,
    event_record,
)
from hiomapbridge.sim.btbridged import INTERFACE, PATH, SERVICE
from hiomapbridge.sim.host import (
    CommandFailed,
    DeviceGone,
    Host,
    ProtocolError,
    TryAgain,
    run_host,
)

BTBRIDGED = DBusAddress(PATH, bus_name=SERVICE, interface=INTERFACE)
SHIFT = 12
BS = 1 << SHIFT
FLASH_BLOCKS = 64


@attrs.define
class HiomapRequest:
    cmd: int
    seq: int
    args: bytes


class FakeBmc:
    """Answers host requests like bridge + hiomapd would, with canned data.

    Flash is a bytearray; windows map flash blocks 1:1 into the LPC file
    (lpc address == flash block), limited to ``max_window`` blocks.
    """

    def __init__(self, bus: Bus, nursery: trio.Nursery, lpc: Path) -> None:
        self.bus = bus
        self.nursery = nursery
        self.lpc = lpc
        self.flash = bytearray(bytes(range(256)) * (FLASH_BLOCKS * BS // 256))
        lpc.write_bytes(bytes(len(self.flash)))
        self.max_window = 4
        self.requests: list[HiomapRequest] = []
        self.ipmi: list[tuple[int, int]] = []
        self.pending_event: int | None = None
        self.record_override: bytes | None = None
        self.cc_override: dict[tuple[int, int], int] = {}  # (netfn, cmd|hiomap)
        self.seq_skew = 0
        self.window: tuple[int, int] | None = None  # (first block, blocks)

    def on_signal(self, msg: Message) -> None:
        self.nursery.start_soon(self.answer, *msg.body)

    def hiomap_log(self) -> list[tuple[str, bytes]]:
        return [(Command(r.cmd).name, r.args) for r in self.requests]

    async def raise_event(self, byte: int) -> None:
        self.pending_event = byte
        await self.bus.call(new_method_call(BTBRIDGED, "setAttention"))

    async def answer(
        self, seq: int, netfn: int, lun: int, cmd: int, data: bytes
    ) -> None:
        cc, out = self.respond(netfn, cmd, bytes(data))
        msg = new_method_call(
            BTBRIDGED, "sendMessage", "yyyyyay", (seq, netfn | 1, lun, cmd, cc, out)
        )
        await self.bus.call(msg)

    def respond(self, netfn: int, cmd: int, data: bytes) -> tuple[int, bytes]:
        self.ipmi.append((netfn, cmd))
        key = (netfn, data[0] if cmd == CMD_HIOMAP and data else cmd)
        if key in self.cc_override:
            if cmd == CMD_HIOMAP:
                self.requests.append(HiomapRequest(data[0], data[1], data[2:]))
            return self.cc_override[key], b""
        if (netfn, cmd) == (NETFN_APP, CMD_GET_MESSAGE_FLAGS):
            return 0, bytes([0x02 if self.pending_event is not None else 0])
        if (netfn, cmd) == (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER):
            if self.record_override is not None:
                return 0, self.record_override
            byte, self.pending_event = self.pending_event, None
            return 0, HEARTBEAT_RECORD if byte is None else event_record(byte)
        assert (netfn, cmd) == (NETFN_OEM_IBM, CMD_HIOMAP)
        hcmd, hseq, args = data[0], data[1], data[2:]
        self.requests.append(HiomapRequest(hcmd, hseq, args))
        head = bytes([hcmd, (hseq + self.seq_skew) & 0xFF])
        if hcmd == Command.GET_INFO:
            return 0, head + struct.pack("<BBH", 2, SHIFT, 5)
        if hcmd == Command.GET_FLASH_INFO:
            return 0, head + struct.pack("<HH", FLASH_BLOCKS, 1)
        if hcmd in (Command.CREATE_READ_WINDOW, Command.CREATE_WRITE_WINDOW):
            first, size = struct.unpack("<HH", args[:4])
            size = min(size, self.max_window)
            self.window = (first, size)
            with self.lpc.open("r+b") as f:
                f.seek(first * BS)
                f.write(self.flash[first * BS : (first + size) * BS])
            return 0, head + struct.pack("<HHH", first, size, first)
        if hcmd in (Command.MARK_DIRTY, Command.ERASE):
            assert self.window is not None
            rel, size = struct.unpack("<HH", args[:4])
            start = (self.window[0] + rel) * BS
            if hcmd == Command.ERASE:
                self.flash[start : start + size * BS] = b"\xff" * (size * BS)
                with self.lpc.open("r+b") as f:
                    f.seek(start)
                    f.write(b"\xff" * (size * BS))
            else:
                with self.lpc.open("rb") as f:
                    f.seek(start)
                    self.flash[start : start + size * BS] = f.read(size * BS)
        return 0, head


@asynccontextmanager
async def bench(
    bus_address: str, tmp_path: Path, start: bool = True, **options: Any
) -> AsyncIterator[tuple[Host, FakeBmc]]:
    lpc = tmp_path / "lpc"
    async with open_bus(bus_address) as bus, trio.open_nursery() as nursery:
        fake = FakeBmc(bus, nursery, lpc)
        await bus.subscribe(PATH, INTERFACE, "ReceivedMessage", fake.on_signal)
        async with run_host(bus_address, lpc, start=False, **options) as host:
            if start:
                with trio.fail_after(5):
                    await host.start()
            yield host, fake
        nursery.cancel_scope.cancel()


async def test_start_up_sequence(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        assert [(r.cmd, r.seq, r.args) for r in fake.requests] == [
            (Command.ACK, 1, b"\x03"),
            (Command.GET_INFO, 2, b"\x02"),
            (Command.GET_FLASH_INFO, 3, b""),
        ]
        assert host.version == 2 and host.block_size_shift == SHIFT
        assert host.timeout == 5
        assert host.flash_size == FLASH_BLOCKS * BS and host.erase_size == BS


async def test_read_honours_small_windows_and_reuses(
    bus_address: str, tmp_path: Path
) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        fake.requests.clear()
        with trio.fail_after(5):
            data = await host.read(0x800, 6 * BS)
        assert data == bytes(fake.flash[0x800 : 0x800 + 6 * BS])
        # 0x800..0x6800 is blocks 0..6 (7 blocks); windows of at most 4.
        assert fake.hiomap_log() == [
            ("CREATE_READ_WINDOW", struct.pack("<HH", 0, 7)),
            ("CREATE_READ_WINDOW", struct.pack("<HH", 4, 3)),
        ]
        # Inside the current window: no command at all.
        assert await host.read(5 * BS, 100) == bytes(fake.flash[5 * BS : 5 * BS + 100])
        assert len(fake.requests) == 2
        assert [r.seq for r in fake.requests] == [4, 5]


async def test_write_erase_flush(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        fake.requests.clear()
        payload = b"\xa5" * (BS + 10)
        with trio.fail_after(5):
            await host.write(2 * BS + 16, payload)
        assert fake.flash[2 * BS + 16 : 3 * BS + 26] == payload
        assert fake.hiomap_log() == [
            ("CREATE_WRITE_WINDOW", struct.pack("<HH", 2, 2)),
            ("MARK_DIRTY", struct.pack("<HH", 0, 2)),
            ("FLUSH", b""),
        ]
        fake.requests.clear()
        await host.erase(3 * BS, BS)  # inside the open write window
        assert fake.hiomap_log() == [
            ("ERASE", struct.pack("<HH", 1, 1)),
            ("FLUSH", b""),
        ]
        assert fake.flash[3 * BS : 4 * BS] == b"\xff" * BS
        assert await host.flush() is True
        assert fake.hiomap_log()[-1] == ("FLUSH", b"")
        await host.read(0, 16)  # read window replaces the write window
        assert await host.flush() is False


async def test_seq_wraps(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        host.seq = 254
        await host.get_flash_info()
        await host.get_flash_info()
        await host.get_flash_info()
        assert [r.seq for r in fake.requests[-3:]] == [255, 0, 1]


async def test_bad_responses(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        fake.cc_override[(NETFN_OEM_IBM, Command.CREATE_READ_WINDOW)] = 0xC9
        with pytest.raises(CommandFailed) as info:
            await host.read(0, 16)
        assert info.value.cc == 0xC9
        del fake.cc_override[(NETFN_OEM_IBM, Command.CREATE_READ_WINDOW)]
        fake.seq_skew = 1
        with pytest.raises(ProtocolError, match="unmatched sequence"):
            await host.read(0, 16)
        resp = await host.raw(NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        assert resp.cc == 0 and resp.data == b"\x00"


async def event(host: Host, fake: FakeBmc, byte: int) -> None:
    n = len(host.events)
    await fake.raise_event(byte)
    with trio.fail_after(5):
        await host.wait_until(lambda: len(host.events) > n)


async def test_sms_atn_flow_and_protocol_reset(
    bus_address: str, tmp_path: Path
) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        await host.read(0, 16)
        fake.ipmi.clear()
        fake.requests.clear()
        await event(host, fake, 0x81)
        assert fake.ipmi == [
            (NETFN_APP, CMD_GET_MESSAGE_FLAGS),
            (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER),
        ]
        (ev,) = host.events
        assert (ev.command, ev.data, ev.state) == (0x0F, 0x81, 0x81)
        assert ev.trio_time <= trio.current_time()
        assert fake.requests == []  # nothing until the next flash operation
        await host.read(0, 16)
        assert fake.hiomap_log() == [
            ("ACK", b"\x01"),
            ("GET_INFO", b"\x02"),
            ("GET_FLASH_INFO", b""),
            ("CREATE_READ_WINDOW", struct.pack("<HH", 0, 1)),
        ]
        assert host.state == 0x80


async def test_window_reset_recreates_window(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        await host.read(0, 16)
        fake.requests.clear()
        await event(host, fake, 0x82)
        await event(host, fake, 0x80)  # reset bits stick until ACKed
        assert host.state == 0x82
        await host.read(0, 16)
        assert fake.hiomap_log() == [
            ("ACK", b"\x02"),
            ("CREATE_READ_WINDOW", struct.pack("<HH", 0, 1)),
        ]


async def test_ack_failure_restores_reset_bits(
    bus_address: str, tmp_path: Path
) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        await event(host, fake, 0x82)
        fake.cc_override[(NETFN_OEM_IBM, Command.ACK)] = 0xFF
        with pytest.raises(CommandFailed):
            await host.read(0, 16)
        assert host.state == 0x82
        del fake.cc_override[(NETFN_OEM_IBM, Command.ACK)]
        await host.read(0, 16)
        assert host.state == 0x80


async def test_flash_control_lost_raises(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        await host.read(0, 16)
        fake.requests.clear()
        await event(host, fake, 0xC0)
        with pytest.raises(TryAgain):
            await host.read(0, 16)  # even inside the current window
        assert fake.requests == []
        await event(host, fake, 0x80)
        assert await host.read(0, 16) == bytes(fake.flash[:16])


async def test_flash_control_lost_waits(bus_address: str, tmp_path: Path) -> None:
    async with (
        bench(bus_address, tmp_path, flash_lost="wait") as (host, fake),
        trio.open_nursery() as nursery,
    ):
        await event(host, fake, 0xC0)
        got: list[bytes] = []
        done = trio.Event()

        async def reader() -> None:
            got.append(await host.read(BS, 16))
            done.set()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await event(host, fake, 0x80)
        with trio.fail_after(5):
            await done.wait()
        assert got == [bytes(fake.flash[BS : BS + 16])]


async def test_daemon_gone_sends_nothing(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        await host.read(0, 16)
        fake.requests.clear()
        await event(host, fake, 0x01)  # hiomapd's clean exit
        for op in (host.read(0, 16), host.write(0, b"x"), host.erase(0, BS)):
            with pytest.raises(DeviceGone):
                await op
        with pytest.raises(DeviceGone):
            await host.get_info()
        assert fake.requests == []  # not even ACK
        assert host.state == 0x01
        await event(host, fake, 0x81)
        await host.read(0, 16)
        assert [name for name, _ in fake.hiomap_log()] == [
            "ACK",
            "GET_INFO",
            "GET_FLASH_INFO",
            "CREATE_READ_WINDOW",
        ]


async def test_event_fetch_edge_cases(bus_address: str, tmp_path: Path) -> None:
    async with bench(bus_address, tmp_path) as (host, fake):
        # Flags without the buffer bit: no Read Event Message Buffer.
        fake.ipmi.clear()
        await host.bt.wait_until(lambda: not host.bt.attention_pending)
        assert await host.fetch_event() is None
        assert fake.ipmi == [(NETFN_APP, CMD_GET_MESSAGE_FLAGS)]
        # A heartbeat record is recorded and changes nothing.
        fake.pending_event = None
        fake.record_override = HEARTBEAT_RECORD
        await event(host, fake, 0x00)
        assert host.events[-1].command == 0xFF and host.state == 0x80
        # A record with the wrong id is dropped.
        fake.record_override = b"\x00\x00\xc0" + bytes(7) + b"\x3a\x0f\x00\xff\xff\xff"
        await event(host, fake, 0x00)
        assert host.events[-1].command is None and host.state == 0x80
        # An error answer is dropped silently.
        fake.cc_override[(NETFN_APP, CMD_GET_MESSAGE_FLAGS)] = 0xC0
        n = len(host.fetch_errors)
        await fake.raise_event(0x00)
        with trio.fail_after(5):
            await host.wait_until(lambda: len(host.fetch_errors) > n)
        assert host.state == 0x80
