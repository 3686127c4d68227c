"""The hiomapd emulator behaves as real hiomapd (mboxd, file backend) does.

Each test pins one behaviour measured on hiomapd (wire reference section 5)
or read from its sources (protocol.c, transport_dbus.c, windows.c,
control.c, mboxd.c, file/backend.c of openbmc/hiomapd), driving the
emulator as a D-Bus client over a private bus, as the bridge does.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from hiomapbridge.hiomap import IFACE_PROTOCOL
from hiomapbridge.sim.hiomapd import IFACE_CONTROL, add_parser

from .test_sim_hiomapd import (
    CLEAN_EXIT,
    ERR,
    KIB,
    START,
    Client,
    client,
    name_owner,
    pattern,
    started,
)

DENIED = ERR + "AccessDenied"
INVALID = ERR + "InvalidArgs"
IO_ERROR = ERR + "IOError"
UNKNOWN_METHOD = ERR + "UnknownMethod"
NO_REPLY = ERR + "NoReply"  # the bus's answer when the callee vanished
QEMU_PNOR = 0x0C000000


async def assert_crashed(c: Client, member: str, sig: str, *args: Any) -> None:
    """``member`` kills hiomapd: no reply (the bus answers NoReply once the
    connection is gone), no PropertiesChanged, the name has no owner."""
    assert await c.error(member, sig, *args) == NO_REPLY
    assert await name_owner(c.bus) is None
    assert c.no_signal_pending()


# -- 1. the write window's bounds -----------------------------------------------


async def test_mark_dirty_and_erase_past_the_window_are_access_denied(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        # No window at all: AccessDenied (EPERM); closing nothing is fine.
        for member, sig, args in [
            ("MarkDirty", "qq", (0, 1)),
            ("Erase", "qq", (0, 1)),
            ("Flush", "", ()),
        ]:
            assert await c.error(member, sig, *args) == DENIED
        await c.call("CloseWindow", "y", 0)
        assert await c.call("CreateWriteWindow", "qq", 0, 1) == (0, 16, 0)
        # Past the window's 16 blocks: AccessDenied (EACCES), not InvalidArgs.
        assert await c.error("MarkDirty", "qq", 15, 2) == DENIED
        assert await c.error("MarkDirty", "qq", 16, 1) == DENIED
        assert await c.error("Erase", "qq", 16, 1) == DENIED
        assert await c.error("Erase", "qq", 0, 17) == DENIED
        # Exactly the window is fine.
        await c.call("MarkDirty", "qq", 0, 16)
        await c.call("Erase", "qq", 15, 1)
        assert emu.read_lpc(15 * 4096, 4096) == b"\xff" * 4096
        assert c.no_signal_pending()


# -- 2. windows at and past the flash end ----------------------------------------


async def test_window_at_the_flash_end_is_io_error_past_it_invalid_args(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):  # 64 blocks of flash
        await c.negotiate()
        assert await c.call("CreateReadWindow", "qq", 63, 1) == (0, 16, 48)
        # Exactly the end: the file backend reads nothing, EIO.
        assert await c.error("CreateReadWindow", "qq", 64, 1) == IO_ERROR
        assert emu.current_window is None  # the old window was closed first
        # Inside the window-size region that starts at the end: the same.
        assert await c.error("CreateReadWindow", "qq", 79, 1) == IO_ERROR
        assert await c.error("CreateWriteWindow", "qq", 64, 1) == IO_ERROR
        # A region starting past the end: EINVAL.
        assert await c.error("CreateReadWindow", "qq", 80, 1) == INVALID
        assert await c.error("CreateWriteWindow", "qq", 0xFFFF, 1) == INVALID
        assert await c.error("Flush") == DENIED
        # The failed mappings left the cache alone: slot 0 still holds 48.
        assert await c.call("CreateReadWindow", "qq", 0, 1) == (16, 16, 0)
        assert await c.call("CreateReadWindow", "qq", 50, 1) == (0, 16, 48)


# -- 3. suspended flash control gates nothing over D-Bus ---------------------------


async def test_suspended_flash_control_refuses_nothing_over_dbus(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await emu.suspend_flash_control()
        assert await c.signal() == {"FlashControlLost": True}
        assert await c.call("CreateReadWindow", "qq", 0, 1) == (0, 16, 0)
        assert await c.call("GetFlashInfo") == (64, 1)
        assert await c.call("CreateWriteWindow", "qq", 16, 1) == (16, 16, 16)
        emu.write_lpc(16 * 4096, b"W" * 4096)
        await c.call("MarkDirty", "qq", 0, 1)
        await c.call("Erase", "qq", 1, 1)
        await c.call("Flush")
        assert emu.read_flash(16 * 4096, 4096) == b"W" * 4096
        await c.call("CloseWindow", "y", 0)
        await c.call("Reset")
        assert await c.call("GetInfo", "y", 2) == (2, 12, 0)
        assert await c.signal() == {
            "FlashControlLost": True,
            "DaemonReady": True,
            "ProtocolReset": True,
        }
        assert emu.events == 0xC1
        assert c.no_signal_pending()


# -- 4. no "negotiate first" rule; what the first GetInfo sets up ---------------


async def test_after_reset_commands_work_without_a_new_get_info(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("CreateReadWindow", "qq", 20, 1)
        await c.call("Reset", iface=IFACE_PROTOCOL)
        assert emu.current_window is None
        assert await c.call("GetFlashInfo") == (64, 1)
        assert await c.call("CreateReadWindow", "qq", 20, 1) == (0, 16, 16)
        assert await c.call("CreateWriteWindow", "qq", 40, 1) == (16, 16, 32)
        await c.call("MarkDirty", "qq", 0, 1)
        await c.call("Flush")
        assert c.no_signal_pending()  # a host-requested reset tells nobody


async def test_before_the_first_get_info_a_window_crashes_hiomapd(
    bus_address: str, tmp_path: Path
) -> None:
    """hiomapd starts at v2 but allocates the dirty bytemaps in GetInfo: the
    calls that do not touch them work; mapping a window writes one: SIGSEGV."""
    async with started(bus_address, tmp_path) as (emu, c):
        assert await c.call("GetFlashInfo") == (64, 1)
        await c.call("Ack", "y", 0x03)
        assert await c.signal() == {"WindowReset": False, "ProtocolReset": False}
        await c.call("Reset")
        await c.call("CloseWindow", "y", 0)
        assert await c.error("Flush") == DENIED
        # Failing before the mapping is fine ...
        assert await c.error("CreateReadWindow", "qq", 64, 1) == IO_ERROR
        assert await c.error("CreateReadWindow", "qq", 80, 1) == INVALID
        # ... a mapping is not.
        await assert_crashed(c, "CreateReadWindow", "qq", 0, 1)
        assert emu.crashed


async def test_get_info_forgets_the_dirty_marks_of_the_open_window(
    bus_address: str, tmp_path: Path
) -> None:
    """Every GetInfo re-allocates the bytemaps: an open write window stays
    open, but what was marked dirty is not flushed (protocol.c)."""
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("CreateWriteWindow", "qq", 0, 1)
        emu.write_lpc(0, b"D" * 4096)
        await c.call("MarkDirty", "qq", 0, 1)
        await c.negotiate()
        assert emu.current_window is not None and emu.current_window.write
        await c.call("Flush")
        assert emu.read_flash(0, 4096) == b"\xff" * 4096


# -- 5. GetInfo(1): an error, yet hiomapd is in v1 --------------------------------


async def test_get_info_v1_fails_unknown_method_yet_switches_to_v1(
    bus_address: str, tmp_path: Path
) -> None:
    flash = random.Random(1).randbytes(32 << 20)
    (tmp_path / "flash.img").write_bytes(flash)
    config = {"flash_size": 1, "window_size": 1 << 20, "window_count": 4}
    async with started(bus_address, tmp_path, **config) as (emu, c):
        assert await c.negotiate() == (2, 12, 8)
        await c.call("CreateReadWindow", "qq", 0x100, 1)
        assert await c.error("GetInfo", "y", 1, iface=IFACE_PROTOCOL) == UNKNOWN_METHOD
        # It re-announced the set bits through v1's event mask: ProtocolReset.
        assert await c.signal() == {"ProtocolReset": True}
        assert emu.version == 1
        assert emu.current_window is None  # the version change dropped it
        # v1's GetFlashInfo reply read as v2's: 32 MiB is 0x0200_0000 bytes.
        assert await c.call("GetFlashInfo") == (0, 0x200)
        # Windows: the right LPC address, size and offset uninitialised.
        emu.core.garbage = random.Random(7)
        stack = random.Random(7)
        lpc, size, offset = await c.call("CreateReadWindow", "qq", 0x123, 1)
        assert (size, offset) == (stack.getrandbits(16), stack.getrandbits(16))
        assert lpc == 0  # the cache's first slot
        window = emu.current_window
        assert window is not None and window.flash_offset == 0x123 * 4096  # exact
        assert emu.read_lpc(0, 16) == flash[0x123000:0x123010]
        lpc, _size, _offset = await c.call("CreateReadWindow", "qq", 0x456, 1)
        assert lpc == 0x100  # the second 1 MiB slot, in 4 KiB blocks
        assert emu.read_lpc(1 << 20, 16) == flash[0x456000:0x456010]
        # Events go through v1's mask: FlashControlLost is not emitted.
        await emu.suspend_flash_control()
        await c.call("Ack", "y", 0x03)
        assert await c.signal() == {"ProtocolReset": False}
        assert emu.events == 0xC0
        # GetInfo(2) restores v2.
        assert await c.call("GetInfo", "y", 2) == (2, 12, 8)
        assert await c.signal() == {"FlashControlLost": True, "DaemonReady": True}
        assert await c.call("GetFlashInfo") == (0x2000, 1)
        assert await c.call("CreateReadWindow", "qq", 0x123, 1) == (0, 0x100, 0x100)


async def test_erase_under_v1_crashes_hiomapd(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        assert await c.error("GetInfo", "y", 1) == UNKNOWN_METHOD
        assert await c.signal() == {"ProtocolReset": True}
        await c.call("CreateWriteWindow", "qq", 0, 1)
        await assert_crashed(c, "Erase", "qq", 0, 1)
        assert emu.crashed


async def test_mark_dirty_under_v1_reads_an_uninitialised_size(
    bus_address: str, tmp_path: Path
) -> None:
    """v1's MarkDirty takes a flash block offset and a byte count the D-Bus
    transport never fills in (it writes v2's field)."""
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.error("GetInfo", "y", 1)
        await c.signal()
        await c.call("CreateWriteWindow", "qq", 20, 1)  # v1: exactly block 20

        class Stack(random.Random):
            def getrandbits(self, k: int) -> int:
                return 2 * 4096 - 1  # rounds up to 2 blocks

        emu.core.garbage = Stack()
        emu.write_lpc(0, b"ABC" * 4096)
        assert await c.error("MarkDirty", "qq", 19, 0) == INVALID  # before it
        await c.call("MarkDirty", "qq", 21, 0)  # blocks 21 and 22
        await c.call("Flush")
        flash = emu.read_flash(20 * 4096, 4 * 4096)
        assert flash == b"\xff" * 4096 + (b"ABC" * 4096)[4096:12288] + b"\xff" * 4096


# -- 6. SIGHUP is a protocol reset ----------------------------------------------------


async def test_protocol_reset_signals_and_keeps_serving(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        await c.negotiate()
        await c.call("Ack", "y", 0x03)
        await c.signal()
        await c.call("CreateWriteWindow", "qq", 0, 1)
        emu.write_lpc(0, b"lost")
        await c.call("MarkDirty", "qq", 0, 1)
        await c.call("ProtocolReset", iface=IFACE_CONTROL)
        assert await c.signal() == {"DaemonReady": False}
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        assert emu.events == 0x81
        assert emu.current_window is None
        assert emu.read_flash(0, 4) == b"\xff" * 4  # dropped, not flushed
        assert emu.read_lpc(0, 4) == b"\xff" * 4  # the LPC space reloaded
        assert await name_owner(c.bus) is not None
        assert await c.call("CreateReadWindow", "qq", 0, 1) == (0, 16, 0)
        assert c.no_signal_pending()


# -- 7. what each PropertiesChanged carries -------------------------------------------


async def test_each_operation_sends_every_property_of_its_mask(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):  # start: all four
        await c.call("Ack", "y", 0x03)
        assert await c.signal() == {"WindowReset": False, "ProtocolReset": False}
        await c.call("Ack", "y", 0x03)  # nothing was set: sent all the same
        assert await c.signal() == {"WindowReset": False, "ProtocolReset": False}
        await c.call("Ack", "y", 0x02)
        assert await c.signal() == {"WindowReset": False}
        await c.call("Ack", "y", 0x80)  # masked to nothing: no signal
        # GetInfo re-emits exactly the set bits, unchanged.
        assert await c.call("GetInfo", "y", 2) == (2, 12, 0)
        assert await c.signal() == {"DaemonReady": True}
        await emu.force_window_reset()
        assert await c.signal() == {"WindowReset": True}
        await emu.force_window_reset()  # already set: emitted again
        assert await c.signal() == {"WindowReset": True}
        await emu.suspend_flash_control()
        assert await c.signal() == {"FlashControlLost": True}
        assert await c.call("GetInfo", "y", 2) == (2, 12, 0)
        assert await c.signal() == {
            "FlashControlLost": True,
            "DaemonReady": True,
            "WindowReset": True,
        }
        await emu.stop_cleanly()
        # The clean stop: three in a row; the last carries all four, with the
        # bits hiomapd leaves alone (FlashControlLost, WindowReset) as they are.
        assert [await c.signal() for _ in range(3)] == [
            *CLEAN_EXIT[:2],
            {**CLEAN_EXIT[2], "FlashControlLost": True, "WindowReset": True},
        ]
        assert emu.events == 0x43
    assert c.no_signal_pending()


# -- 8. versions ----------------------------------------------------------------------


async def test_get_info_v3_is_answered_as_v2_v0_is_invalid(
    bus_address: str, tmp_path: Path
) -> None:
    async with started(bus_address, tmp_path) as (emu, c):
        assert await c.error("GetInfo", "y", 0) == INVALID
        assert c.no_signal_pending()  # failed before re-announcing
        assert await c.call("GetInfo", "y", 3) == (2, 12, 0)
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        assert await c.call("GetInfo", "y", 0xFF) == (2, 12, 0)
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        assert emu.version == 2


# -- LPC base and the direct map (QEMU's linear PNOR) ----------------------------------


async def test_lpc_base_offsets_every_window(bus_address: str, tmp_path: Path) -> None:
    async with started(bus_address, tmp_path, lpc_base=QEMU_PNOR) as (_emu, c):
        await c.negotiate()
        assert await c.call("CreateReadWindow", "qq", 17, 1) == (0xC000, 16, 16)
        assert await c.call("CreateWriteWindow", "qq", 40, 1) == (0xC010, 16, 32)


async def test_direct_map_points_the_host_at_base_plus_flash_offset(
    bus_address: str, tmp_path: Path
) -> None:
    flash = pattern(256 * KIB)
    (tmp_path / "flash.img").write_bytes(flash)
    config = {"lpc_base": QEMU_PNOR, "direct_map": True}
    async with started(bus_address, tmp_path, **config) as (emu, c):
        await c.negotiate()
        # One window, the whole flash: flash offset X is at LPC 0x0C000000 + X.
        assert await c.call("CreateReadWindow", "qq", 17, 1) == (0xC000, 64, 0)
        assert await c.call("CreateReadWindow", "qq", 63, 1) == (0xC000, 64, 0)
        assert emu.read_lpc(0, len(flash)) == flash
        assert (tmp_path / "lpc.img").stat().st_size == len(flash)
        # Writes go through the same window.
        assert await c.call("CreateWriteWindow", "qq", 50, 1) == (0xC000, 64, 0)
        emu.write_lpc(50 * 4096, b"Q" * 4096)
        await c.call("MarkDirty", "qq", 50, 1)
        await c.call("Flush")
        assert emu.read_flash(50 * 4096, 4096) == b"Q" * 4096
        # The flash end behaves as without it.
        assert await c.error("CreateReadWindow", "qq", 64, 1) == IO_ERROR
        assert await c.error("CreateReadWindow", "qq", 65, 1) == INVALID


async def test_direct_map_must_fit_the_lpc_space(
    bus_address: str, tmp_path: Path
) -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(ValueError, match="28-bit"), flatten_subgroups=True
    ):
        async with started(
            bus_address, tmp_path, lpc_base=0x0FFC0000 + 4096, direct_map=True
        ):
            pass  # pragma: no cover


def test_cli_options_reach_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    add_parser(subparsers)
    args = parser.parse_args(
        "hiomapd --flash f --lpc l --lpc-base 0x0C000000 --direct-map".split()
    )
    assert (args.lpc_base, args.direct_map) == (QEMU_PNOR, True)
    args = parser.parse_args(["hiomapd", "--flash", "f", "--lpc", "l"])
    assert (args.lpc_base, args.direct_map) == (0, False)
    help_text = subparsers.choices["hiomapd"].format_help()
    assert "--lpc-base" in help_text and "--direct-map" in help_text
    assert "--no-v1-reply" not in help_text


# -- the emulator as a process: SIGHUP, SIGSEGV ----------------------------------------


@asynccontextmanager
async def emulator_process(
    bus_address: str, tmp_path: Path, *options: str
) -> AsyncIterator[tuple[trio.Process, Client]]:
    """``hiomapbridge-sim hiomapd`` as a real process, and a client that has
    seen its start-up signal."""
    cmd = [
        sys.executable, "-m", "hiomapbridge.sim", "hiomapd", "--bus", bus_address,
        "--flash", str(tmp_path / "flash.img"), "--lpc", str(tmp_path / "lpc.img"),
        "--flash-size", "256K", "--window-size", "64K", "--window-count", "2",
        "--log-level", "debug", *options,
    ]  # fmt: skip
    with (tmp_path / "sim.log").open("wb") as log:
        async with client(bus_address) as c:
            proc = await trio.lowlevel.open_process(cmd, stderr=log, cwd=tmp_path)
            try:
                with trio.fail_after(20):
                    assert await c.signal() == START
                yield proc, c
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def test_sighup_is_a_protocol_reset_not_an_exit(
    bus_address: str, tmp_path: Path
) -> None:
    async with emulator_process(
        bus_address, tmp_path, "--lpc-base", "0x0C000000", "--direct-map"
    ) as (proc, c):
        assert await c.negotiate() == (2, 12, 0)
        assert await c.call("CreateReadWindow", "qq", 5, 1) == (0xC000, 64, 0)
        proc.send_signal(signal.SIGHUP)
        assert await c.signal() == {"DaemonReady": False}
        assert await c.signal() == {"DaemonReady": True, "ProtocolReset": True}
        assert proc.returncode is None
        assert await c.call("GetFlashInfo") == (64, 1)
        proc.send_signal(signal.SIGTERM)
        assert [await c.signal() for _ in range(3)] == CLEAN_EXIT
        with trio.fail_after(10):
            assert await proc.wait() == 0


async def test_a_crash_ends_the_process_with_sigsegv(
    bus_address: str, tmp_path: Path
) -> None:
    async with emulator_process(bus_address, tmp_path) as (proc, c):
        assert await c.error("GetInfo", "y", 1) == UNKNOWN_METHOD
        assert await c.signal() == {"ProtocolReset": True}
        await c.call("CreateWriteWindow", "qq", 0, 1)
        await assert_crashed(c, "Erase", "qq", 0, 1)
        with trio.fail_after(10):
            assert await proc.wait() == -signal.SIGSEGV
        assert not any(name.startswith("core") for name in os.listdir(tmp_path))
