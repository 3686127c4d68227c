"""``--host bt:DEVICE`` through real syscalls: the bridge, as a subprocess,
opens the FUSE stand-in for ``/dev/ipmi-bt-host`` (tests/btdev), which
behaves as the kernel's bt-bmc driver does (one opener; one frame per
read/write; read and write block whatever O_NONBLOCK says, so the bridge
must poll first; the SMS_ATN ioctl).  The host simulator sits behind it.
This is as close to the driver as a machine without the hardware allows;
see README "Testing the device path" for what it does not cover."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio

from hiomapbridge.hiomap import Command, pack_request
from hiomapbridge.ipmi import CMD_GET_BT_CAPABILITIES, NETFN_APP, event_record
from hiomapbridge.sim.hiomapd import run_emulator
from hiomapbridge.sim.process import run_service

from . import btdev_util
from .bridgeutil import GET_FLAGS, HIOMAP, READ_EVENT
from .btutil import bt_host, fake_ipmid, socket_dir
from .test_daemon import bridge_argv

LIMIT = 15.0


async def test_bridge_on_the_device_from_start_to_sigterm(
    bus_address: str, tmp_path: Path
) -> None:
    btdev_util.require()
    sockets = socket_dir()
    async with (
        bt_host(sockets / "host.sock") as host,
        btdev_util.btdev(sockets / "mnt", host.path) as dev,
        run_emulator(bus_address, tmp_path / "hiomapd", flash_size=1 << 20) as hiomapd,
        fake_ipmid(bus_address) as ipmid,
        run_service(
            "bridge",
            bridge_argv(bus_address, "--host", f"bt:{dev.path}"),
            tmp_path,
        ) as bridge,
    ):
        with trio.fail_after(LIMIT):
            # The start-up event arrives through the SMS_ATN ioctl.
            await host.wait_attention()
            assert (await host.transact(*GET_FLAGS)).data == b"\x02"
            assert (await host.transact(*READ_EVENT)).data == event_record(0x81)
            caps = await host.transact(NETFN_APP, CMD_GET_BT_CAPABILITIES)
            assert (caps.cc, caps.data) == (0, bytes([1, 0x3F, 0x3F, 3, 1]))
            info = await host.transact(
                *HIOMAP, pack_request(Command.GET_INFO, 1, b"\x02")
            )
            assert (info.cc, info.data[:3]) == (0, b"\x02\x01\x02")
            device_id = await host.transact(NETFN_APP, 0x01)
            assert device_id.cc == 0 and ipmid.calls[-1].channel == 0x0F
            # A second bridge is refused (the names, then the device are taken).
            async with run_service(
                "second",
                bridge_argv(bus_address, "--host", f"bt:{dev.path}"),
                tmp_path,
                wait_ready=False,
            ) as second:
                assert await second.wait() == 1
            assert "is btbridged or another bridge running?" in second.log()
            # SIGTERM: PROTOCOL_RESET goes out through the device first.
            await hiomapd.force_window_reset()
            await host.wait_attention()
            bridge.signal(signal.SIGTERM)
            await bridge.wait_notified("STOPPING=1")
            assert bridge.process.returncode is None  # waits for the host
            resp = await host.transact(*READ_EVENT)
            fetched = trio.current_time()
            if resp.data != event_record(0x01):  # the window reset came first
                await host.wait_attention()
                resp = await host.transact(*READ_EVENT)
                fetched = trio.current_time()
            assert resp.data == event_record(0x01)
            assert await bridge.wait() == 0
        assert bridge.exited_at is not None and bridge.exited_at - fetched < 2.0
        assert host.violations == []
        assert "the host holds PROTOCOL_RESET" in bridge.log()


async def test_a_device_another_process_holds_exits_1(
    bus_address: str, tmp_path: Path
) -> None:
    """The driver allows one opener: the bridge says who to suspect."""
    btdev_util.require()
    sockets = socket_dir()
    async with (
        bt_host(sockets / "host.sock") as host,
        btdev_util.btdev(sockets / "mnt", host.path) as dev,
    ):
        fd = os.open(dev.path, os.O_RDWR | os.O_NONBLOCK)  # btbridged, say
        try:
            async with run_service(
                "bridge",
                bridge_argv(bus_address, "--host", f"bt:{dev.path}"),
                tmp_path,
                wait_ready=False,
            ) as bridge:
                with trio.fail_after(LIMIT):
                    assert await bridge.wait() == 1
        finally:
            os.close(fd)
        assert "another process has it open" in bridge.log()
        assert "Traceback" not in bridge.log()
