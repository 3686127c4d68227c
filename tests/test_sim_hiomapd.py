"""The hiomapd emulator, driven as a D-Bus client over a private bus."""

from __future__ import annotations

import os
import signal
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from jeepney import DBusAddress, HeaderFields, Message, new_method_call

from hiomapbridge.dbus import Bus, DBusError, open_bus
from hiomapbridge.hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_PROTOCOL, IFACE_V2
from hiomapbridge.sim.hiomapd import IFACE_CONTROL, Emulator, parse_fault, run_emulator
from hiomapbridge.sim.hiomapd_core import Config, dbus_error_name

PROPS = "org.freedesktop.DBus.Properties"
ERR = "org.freedesktop.DBus.Error."
KIB = 1024
# 256 KiB of flash, 64 KiB windows: 16 blocks of 4 KiB per window.
SMALL = {"flash_size": 256 * KIB, "window_size": 64 * KIB, "window_count": 2}

Signal = dict[str, tuple[str, Any]]
# hiomapd's start-up signal: every property, 0x81.
START = {
    "FlashControlLost": False,
    "DaemonReady": True,
    "WindowReset": False,
    "ProtocolReset": True,
}


@attrs.define
class Client:
    bus: Bus
    signals: trio.MemoryReceiveChannel[Signal]

    async def message(self, msg: Message) -> Message:
        with trio.fail_after(5):
            return await self.bus.call(msg)

    async def call(
        self, member: str, signature: str = "", *args: Any, iface: str = IFACE_V2
    ) -> tuple[Any, ...]:
        address = DBusAddress(HIOMAPD_PATH, HIOMAPD_SERVICE, iface)
        msg = new_method_call(address, member, signature or None, args)
        return tuple((await self.message(msg)).body)

    async def error(
        self, member: str, signature: str = "", *args: Any, iface: str = IFACE_V2
    ) -> str:
        with pytest.raises(DBusError) as info:
            await self.call(member, signature, *args, iface=iface)
        return info.value.name

    async def signal(self) -> dict[str, Any]:
        """The next PropertiesChanged, as {name: value}."""
        with trio.fail_after(5):
            changed = await self.signals.receive()
        return {name: value for name, (_sig, value) in changed.items()}

    def no_signal_pending(self) -> bool:
        try:
            self.signals.receive_nowait()
        except trio.WouldBlock:
            return True
        return False

    async def negotiate(self, version: int = 2) -> tuple[Any, ...]:
        info = await self.call("GetInfo", "y", version)
        await self.signal()  # GetInfo re-announces the set bits
        return info


@asynccontextmanager
async def client(bus_address: str) -> AsyncIterator[Client]:
    send, receive = trio.open_memory_channel[Signal](100)
    async with open_bus(bus_address) as bus:

        def on_changed(msg: Message) -> None:
            assert msg.header.fields[HeaderFields.signature] == "sa{sv}as"
            iface, changed, invalidated = msg.body
            assert (iface, invalidated) == (IFACE_V2, [])
            send.send_nowait(changed)

        await bus.subscribe(HIOMAPD_PATH, PROPS, "PropertiesChanged", on_changed)
        yield Client(bus, receive)


@asynccontextmanager
async def started(
    bus_address: str, tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[Emulator, Client]]:
    """An emulator and a client that has seen its start event."""
    async with client(bus_address) as c:
        async with run_emulator(bus_address, tmp_path, **{**SMALL, **config}) as emu:
            assert await c.signal() == START
            yield emu, c


def pattern(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


# -- D-Bus object -------------------------------------------------------------


async def test_properties_get_getall_set(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        assert emu.events == 0x81
        (props,) = await c.call("GetAll", "s", IFACE_V2, iface=PROPS)
        assert props == {
            "DaemonReady": ("b", True),
            "FlashControlLost": ("b", False),
            "WindowReset": ("b", False),
            "ProtocolReset": ("b", True),
        }
        assert await c.call("GetAll", "s", IFACE_PROTOCOL, iface=PROPS) == ({},)
        assert await c.call("Get", "ss", IFACE_V2, "DaemonReady", iface=PROPS) == (
            ("b", True),
        )
        assert (
            await c.error("Get", "ss", IFACE_V2, "Nope", iface=PROPS)
            == ERR + "UnknownProperty"
        )
        assert (
            await c.error(
                "Set", "ssv", IFACE_V2, "DaemonReady", ("b", False), iface=PROPS
            )
            == ERR + "PropertyReadOnly"
        )
        assert (
            await c.error("GetAll", "s", "no.such.Iface", iface=PROPS)
            == ERR + "UnknownInterface"
        )


async def test_introspection_peer_unknown_method_invalid_args(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (_emu, c):
        introspectable = "org.freedesktop.DBus.Introspectable"
        (xml,) = await c.call("Introspect", iface=introspectable)
        root = ET.fromstring(xml)
        ifaces = {i.get("name"): i for i in root.findall("interface")}
        assert {IFACE_PROTOCOL, IFACE_V2, PROPS, IFACE_CONTROL} <= set(ifaces)
        v2 = ifaces[IFACE_V2]
        assert {p.get("name") for p in v2.findall("property")} == {
            "DaemonReady",
            "FlashControlLost",
            "WindowReset",
            "ProtocolReset",
        }
        assert {m.get("name") for m in v2.findall("method")} == {
            "Reset", "GetInfo", "GetFlashInfo", "CreateReadWindow", "CloseWindow",
            "CreateWriteWindow", "MarkDirty", "Flush", "Ack", "Erase",
        }  # fmt: skip
        get_info = ifaces[IFACE_PROTOCOL].find("method[@name='GetInfo']")
        assert get_info is not None
        assert [(a.get("type"), a.get("direction")) for a in get_info] == [
            ("y", "in"), ("y", "out"), ("y", "out"), ("q", "out"),
        ]  # fmt: skip
        address = DBusAddress("/xyz", HIOMAPD_SERVICE, introspectable)
        reply = await c.message(new_method_call(address, "Introspect"))
        child = ET.fromstring(reply.body[0]).find("node")
        assert child is not None and child.get("name") == "openbmc_project"

        peer = "org.freedesktop.DBus.Peer"
        assert await c.call("Ping", iface=peer) == ()
        (machine_id,) = await c.call("GetMachineId", iface=peer)
        assert len(machine_id) == 32

        assert await c.error("Bogus") == ERR + "UnknownMethod"
        assert await c.error("Flush", iface="no.such.Iface") == ERR + "UnknownMethod"
        assert await c.error("GetInfo", "q", 2) == ERR + "InvalidArgs"
        assert await c.error("CreateReadWindow", "q", 2) == ERR + "InvalidArgs"
        assert (
            await c.error("Reset", "y", 1, iface=IFACE_PROTOCOL) == ERR + "InvalidArgs"
        )
        # A call without an interface field finds the member.
        address = DBusAddress(HIOMAPD_PATH, HIOMAPD_SERVICE)
        reply = await c.message(new_method_call(address, "GetInfo", "y", (2,)))
        assert reply.body[0] == 2


def test_error_names_follow_sd_bus() -> None:
    import errno

    assert dbus_error_name(errno.EPERM) == ERR + "AccessDenied"
    assert dbus_error_name(errno.EINVAL) == ERR + "InvalidArgs"
    assert dbus_error_name(errno.ETIMEDOUT) == ERR + "Timeout"
    assert dbus_error_name(errno.EBUSY) == "System.Error.EBUSY"
    assert dbus_error_name(errno.ENOSPC) == "System.Error.ENOSPC"
    assert dbus_error_name(errno.ENODEV) == "System.Error.ENODEV"
    assert dbus_error_name(errno.EPROTO) == "System.Error.EPROTO"


# -- negotiation and events ---------------------------------------------------------


async def test_get_info_negotiates_and_reannounces(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path, timeout=7) as (emu, c):
        assert emu.version == 2  # hiomapd starts at its highest version
        assert await c.error("GetInfo", "y", 0) == ERR + "InvalidArgs"
        assert c.no_signal_pending()
        assert await c.call("GetInfo", "y", 3) == (2, 12, 7)
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        assert await c.call("GetFlashInfo") == (64, 1)
        assert await c.call("GetInfo", "y", 2, iface=IFACE_PROTOCOL) == (2, 12, 7)
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        await c.call("Reset", iface=IFACE_PROTOCOL)
        assert emu.version == 2


async def test_block_size_shift_and_default_timeout(
    bus_address: str, tmp_path: Path
) -> None:
    config = {"block_size_shift": 16, "window_size": 1 << 20, "flash_size": 4 << 20}
    async with started(bus_address, tmp_path, **config) as (_emu, c):
        assert await c.negotiate() == (2, 16, 8)  # hiomapd: 8 s per MiB of window
        assert await c.call("GetFlashInfo") == (64, 1)
        assert await c.call("CreateReadWindow", "qq", 17, 1) == (0, 16, 16)


async def test_ack_clears_only_ackable_bits_and_emits_its_mask(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.call("Ack", "y", 0x01, iface=IFACE_PROTOCOL)
        assert await c.signal() == {"ProtocolReset": False}
        await c.call("Ack", "y", 0xC3)  # nothing ackable left; high bits ignored
        assert await c.signal() == {"WindowReset": False, "ProtocolReset": False}
        assert emu.events == 0x80
        await c.call("ForceWindowReset", iface=IFACE_CONTROL)
        assert await c.signal() == {"WindowReset": True}
        await c.call("Ack", "y", 0x02)
        assert await c.signal() == {"WindowReset": False}
        await c.call("Ack", "y", 0x00)  # an empty mask: nothing to emit
        assert c.no_signal_pending()
    async with started(bus_address, tmp_path / "strict", strict_ack=True) as (emu, c):
        assert await c.error("Ack", "y", 0x81) == ERR + "InvalidArgs"
        assert emu.events == 0x81


# -- windows ------------------------------------------------------------------


async def test_read_window_maps_the_aligned_region(
    bus_address: str, tmp_path: Path
) -> None:
    flash = pattern(256 * KIB)
    (tmp_path / "flash.img").write_bytes(flash)
    async with started(bus_address, tmp_path, flash_size=1) as (emu, c):
        await c.negotiate()
        assert await c.call("GetFlashInfo") == (64, 1)  # the existing file's size
        # Block 17 lies in the second 64 KiB region; the size is only a hint.
        assert await c.call("CreateReadWindow", "qq", 17, 40) == (0, 16, 16)
        assert emu.read_lpc(0, 64 * KIB) == flash[64 * KIB : 128 * KIB]
        # The next window goes to the other cache slot, at LPC block 16.
        assert await c.call("CreateReadWindow", "qq", 63, 1) == (16, 16, 48)
        assert emu.read_lpc(64 * KIB, 64 * KIB) == flash[192 * KIB :]
        # At the flash end: EIO; past it: EINVAL; no window remains active.
        assert await c.error("CreateReadWindow", "qq", 64, 1) == ERR + "IOError"
        assert emu.current_window is None
        assert await c.error("CreateReadWindow", "qq", 80, 1) == ERR + "InvalidArgs"
        assert await c.error("Flush") == ERR + "AccessDenied"
        await c.call("CloseWindow", "y", 0)  # closing nothing is fine


async def test_window_cache_hit_and_lru_eviction(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        assert await c.call("CreateReadWindow", "qq", 0, 1) == (0, 16, 0)
        emu.write_lpc(0, b"cached")  # not flushed: lives only in the cache
        assert await c.call("CreateReadWindow", "qq", 16, 1) == (16, 16, 16)
        assert await c.call("CreateReadWindow", "qq", 5, 1) == (0, 16, 0)  # a hit
        assert emu.read_lpc(0, 6) == b"cached"
        # Slot 1 (flash block 16) is now the oldest and is evicted.
        assert await c.call("CreateReadWindow", "qq", 32, 1) == (16, 16, 32)
        await c.call("CloseWindow", "y", 1)  # SHORT_LIFETIME: first to go
        assert await c.call("CreateReadWindow", "qq", 48, 1) == (16, 16, 48)
        assert emu.read_flash(0, 6) == b"\xff" * 6


async def test_write_window_reaches_flash_only_on_flush(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        assert await c.call("CreateWriteWindow", "qq", 20, 1) == (0, 16, 16)
        emu.write_lpc(4 * 4096, b"A" * 4096)  # window block 4 = flash block 20
        emu.write_lpc(6 * 4096, b"B" * 4096)  # written but never marked dirty
        await c.call("MarkDirty", "qq", 4, 1)
        assert emu.read_flash(20 * 4096, 4096) == b"\xff" * 4096
        await c.call("Flush")
        assert emu.read_flash(20 * 4096, 4096) == b"A" * 4096
        assert emu.read_flash(22 * 4096, 4096) == b"\xff" * 4096

        # CloseWindow flushes implicitly.
        emu.write_lpc(0, b"C" * 4096)
        await c.call("MarkDirty", "qq", 0, 1)
        await c.call("CloseWindow", "y", 0)
        assert emu.read_flash(16 * 4096, 4096) == b"C" * 4096

        # So does opening another window over a dirty write window.
        assert await c.call("CreateWriteWindow", "qq", 0, 0) == (16, 16, 0)
        emu.write_lpc(64 * KIB + 15 * 4096, b"D" * 4096)
        await c.call("MarkDirty", "qq", 15, 1)
        await c.call("CreateReadWindow", "qq", 0, 1)
        assert emu.read_flash(15 * 4096, 4096) == b"D" * 4096


async def test_erase_fills_ff_and_flushes(bus_address: str, tmp_path: Path) -> None:
    (tmp_path / "flash.img").write_bytes(b"\x00" * (256 * KIB))
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        assert await c.call("CreateWriteWindow", "qq", 0, 16) == (0, 16, 0)
        await c.call("Erase", "qq", 2, 3)
        assert emu.read_lpc(2 * 4096, 3 * 4096) == b"\xff" * (3 * 4096)
        assert emu.read_lpc(0, 2 * 4096) == b"\x00" * (2 * 4096)
        assert emu.read_flash(2 * 4096, 4096) == b"\x00" * 4096
        await c.call("Flush")
        flash = emu.read_flash()
        assert flash[2 * 4096 : 5 * 4096] == b"\xff" * (3 * 4096)
        assert flash[: 2 * 4096] + flash[5 * 4096 :] == b"\x00" * (244 * KIB)


async def test_write_management_needs_a_write_window(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (_emu, c):
        await c.negotiate()
        denied = ERR + "AccessDenied"
        assert await c.error("MarkDirty", "qq", 0, 1) == denied
        assert await c.error("Erase", "qq", 0, 1) == denied
        assert await c.error("Flush") == denied
        await c.call("CreateReadWindow", "qq", 0, 1)
        assert await c.error("MarkDirty", "qq", 0, 1) == denied
        assert await c.error("Erase", "qq", 0, 1) == denied
        await c.call("CreateWriteWindow", "qq", 0, 1)
        # Past the window's end: EACCES, AccessDenied too.
        assert await c.error("MarkDirty", "qq", 15, 2) == denied
        assert await c.error("Erase", "qq", 16, 1) == denied
        assert await c.error("MarkDirty", "qq", 0xFFFF, 0xFFFF) == denied
        await c.call("MarkDirty", "qq", 0, 16)


async def test_reset_drops_windows_without_flushing(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("CreateWriteWindow", "qq", 0, 1)
        emu.write_lpc(0, b"lost")
        await c.call("MarkDirty", "qq", 0, 1)
        await c.call("Reset", iface=IFACE_PROTOCOL)
        assert emu.current_window is None
        assert emu.read_flash(0, 4) == b"\xff" * 4
        assert await c.error("Flush") == ERR + "AccessDenied"  # no window now
        assert c.no_signal_pending()  # host-requested: no event


async def assert_swallowed(c: Client, member: str, *args: Any) -> None:
    """``member`` gets no reply: a call sent after it (calls are processed
    in order) is answered while it is still waiting."""
    sig = "y" * len(args)
    done = False

    async def first() -> None:
        nonlocal done
        await c.call(member, sig, *args)
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        await c.call("Ping", iface="org.freedesktop.DBus.Peer")
        assert not done
        nursery.cancel_scope.cancel()


# -- flash control and the control interface -------------------------------------------


async def test_suspend_and_resume(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("CreateReadWindow", "qq", 0, 1)
        await c.call("SuspendFlashControl", iface=IFACE_CONTROL)
        assert await c.signal() == {"FlashControlLost": True}
        await c.call("SuspendFlashControl", iface=IFACE_CONTROL)  # already: quiet
        # hiomapd's D-Bus transport serves everything while suspended.
        assert await c.call("CreateReadWindow", "qq", 16, 1) == (16, 16, 16)
        assert await c.call("GetFlashInfo") == (64, 1)
        await c.call("Ack", "y", 0x01)
        assert await c.signal() == {"ProtocolReset": False}
        assert await c.call("GetInfo", "y", 2) == (2, 12, 0)
        assert await c.signal() == {"FlashControlLost": True, "DaemonReady": True}
        await c.call("ResumeFlashControl", iface=IFACE_CONTROL)
        assert await c.signal() == {"FlashControlLost": False}
        assert emu.current_window is not None  # not modified: window kept
        # Resume "modified": the cache is dropped, WindowReset raised.
        await emu.suspend_flash_control()
        assert await c.signal() == {"FlashControlLost": True}
        await c.call("ResumeFlashControlModified", iface=IFACE_CONTROL)
        assert await c.signal() == {"WindowReset": True}
        assert await c.signal() == {"FlashControlLost": False}
        assert emu.current_window is None
        assert c.no_signal_pending()


async def test_force_window_reset(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("CreateWriteWindow", "qq", 0, 1)
        await emu.force_window_reset()
        assert await c.signal() == {"WindowReset": True}
        assert emu.current_window is None
        assert emu.events == 0x83


async def test_fault_error_and_wrong_signature(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.call(
            "SetFault", "ssu", "error:System.Error.ETIMEDOUT", "GetInfo", 1,
            iface=IFACE_CONTROL,
        )  # fmt: skip
        assert await c.error("GetInfo", "y", 2) == "System.Error.ETIMEDOUT"
        assert await c.negotiate() == (2, 12, 0)  # count 1: used up

        emu.set_fault("wrong-signature", "GetFlashInfo")  # until cleared
        address = DBusAddress(HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_V2)
        for _ in range(2):
            reply = await c.message(new_method_call(address, "GetFlashInfo"))
            assert reply.header.fields[HeaderFields.signature] == "uu"
            assert reply.body == (64, 1)
        assert await c.error("Flush") == ERR + "AccessDenied"  # not matched
        await c.call("SetFault", "ssu", "clear", "", 0, iface=IFACE_CONTROL)
        assert await c.call("GetFlashInfo") == (64, 1)

        emu.set_fault("wrong-signature", "", 1)
        reply = await c.message(new_method_call(address, "Ack", "y", (0,)))
        assert reply.header.fields[HeaderFields.signature] == "s"

        bad = await c.error("SetFault", "ssu", "explode", "", 0, iface=IFACE_CONTROL)
        assert bad == ERR + "InvalidArgs"
        assert [m for m, _ in emu.calls] == [
            "GetInfo", "GetInfo", "GetFlashInfo", "GetFlashInfo", "Flush",
            "GetFlashInfo", "Ack",
        ]  # fmt: skip


async def test_fault_hang_swallows_calls(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        emu.set_fault("hang", "GetInfo", 1)
        await assert_swallowed(c, "GetInfo", 2)
        assert c.no_signal_pending()  # not processed: nothing re-announced
        assert await c.negotiate() == (2, 12, 0)


async def test_fault_stall_blocks_until_cleared(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("SetFault", "ssu", "stall", "GetFlashInfo", 1, iface=IFACE_CONTROL)
        results: list[tuple[Any, ...]] = []

        async def call(member: str) -> None:
            results.append(await c.call(member))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "GetFlashInfo")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "GetFlashInfo")
            await trio.testing.wait_all_tasks_blocked()
            # A control call is served at once and proves both calls arrived.
            await c.call("EmitProperties", "a{sv}", {}, iface=IFACE_CONTROL)
            await c.signal()
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            assert [m for m, _ in emu.calls] == ["GetInfo", "GetFlashInfo"]
            await c.call("SetFault", "ssu", "clear", "", 0, iface=IFACE_CONTROL)
        assert results == [(64, 1), (64, 1)]


async def test_emit_properties_sends_anything(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        changed = {"DaemonReady": ("s", "yes"), "Bogus": ("u", 7)}
        await c.call("EmitProperties", "a{sv}", changed, iface=IFACE_CONTROL)
        assert await c.signal() == {"DaemonReady": "yes", "Bogus": 7}
        await emu.emit_properties({"WindowReset": ("b", True)})
        assert await c.signal() == {"WindowReset": True}
        assert emu.events == 0x81  # the state is untouched


def test_parse_fault() -> None:
    assert parse_fault("clear") is None
    fault = parse_fault("delay:0.5", "Flush", 2)
    assert fault is not None and (fault.mode, fault.delay, fault.remaining) == (
        "delay",
        0.5,
        2,
    )
    for bad in ["nope", "error:", "error:nodots", "delay:x", "delay:-1"]:
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Config(tmp_path / "f", tmp_path / "l", window_size=3 * 4096)
    with pytest.raises(ValueError):
        Config(tmp_path / "f", tmp_path / "l", block_size_shift=11)
    with pytest.raises(ValueError):
        Config(tmp_path / "f", tmp_path / "l", window_size=4096, block_size_shift=16)
    with pytest.raises(ValueError, match="block size"):
        Config(tmp_path / "f", tmp_path / "l", lpc_base=0x800)
    with pytest.raises(ValueError, match="28-bit"):
        Config(tmp_path / "f", tmp_path / "l", lpc_base=0x0F900000)  # + 8 MiB
    Config(tmp_path / "f", tmp_path / "l", lpc_base=0x0F800000)  # fits exactly
    # Under direct_map the window space is the flash, checked once it is open.
    Config(tmp_path / "f", tmp_path / "l", lpc_base=0x0F900000, direct_map=True)


# -- stopping --------------------------------------------------------------


async def name_owner(bus: Bus) -> str | None:
    try:
        reply = await bus.bus_call("GetNameOwner", "s", HIOMAPD_SERVICE)
    except DBusError:
        return None
    owner: str = reply.body[0]
    return owner


CLEAN_EXIT = [
    {"DaemonReady": False},
    {"DaemonReady": True, "ProtocolReset": True},
    {
        "FlashControlLost": False,
        "DaemonReady": False,
        "WindowReset": False,
        "ProtocolReset": True,
    },
]


async def test_clean_exit_sequence(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.call("Ack", "y", 0x01)
        assert await c.signal() == {"ProtocolReset": False}
        await emu.suspend_flash_control()
        assert await c.signal() == {"FlashControlLost": True}
        await emu.stop_cleanly()
        # hiomapd leaves FlashControlLost as it was: the final state is 0x41.
        assert [await c.signal() for _ in range(3)] == [
            *CLEAN_EXIT[:2],
            {**CLEAN_EXIT[2], "FlashControlLost": True},
        ]
        assert emu.events == 0x41
        assert await name_owner(c.bus) is None
        await emu.stop_cleanly()  # idempotent
    assert c.no_signal_pending()


async def test_crash_emits_nothing(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await emu.crash()
        assert await name_owner(c.bus) is None
        assert c.no_signal_pending()


async def test_name_already_owned(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path / "a"):
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="already owned"),
            flatten_subgroups=True,
        ):
            async with run_emulator(bus_address, tmp_path, **SMALL):
                pass  # pragma: no cover


async def test_cli_subprocess_ready_and_sigterm(
    bus_address: str, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    script = (
        "import sys, argparse; from hiomapbridge.sim import hiomapd; "
        "p=argparse.ArgumentParser(); s=p.add_subparsers(); hiomapd.add_parser(s); "
        "a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    cmd = [
        sys.executable, "-c", script, "hiomapd", "--bus", bus_address,
        "--flash", str(tmp_path / "flash.img"), "--lpc", str(tmp_path / "lpc.img"),
        "--flash-size", "256K", "--window-size", "64K", "--window-count", "2",
        "--log-level", "debug",
    ]  # fmt: skip
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with sock, (tmp_path / "sim.log").open("wb") as log:
        async with client(bus_address) as c:
            proc = await trio.lowlevel.open_process(cmd, env=env, stderr=log)
            try:
                with trio.fail_after(20):
                    while (await sock.recv(4096)) != b"READY=1":
                        pass  # pragma: no cover
                owner = await name_owner(c.bus)
                assert owner is not None
                assert await c.signal() == START
                assert await c.call("GetInfo", "y", 2) == (2, 12, 0)
                await c.signal()
                proc.send_signal(signal.SIGTERM)
                assert [await c.signal() for _ in range(3)] == CLEAN_EXIT
                with trio.fail_after(10):
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert (await sock.recv(4096)) == b"STOPPING=1"
