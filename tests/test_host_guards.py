"""What the bridge does for the host in btbridged mode beyond relaying:
the v1 guard that keeps hiomapd out of its crashing v1 mode, and the Get BT
Interface Capabilities answer that keeps skiboot from retrying requests the
bridge is still working on (the timing budget)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from hiomapbridge import bridge
from hiomapbridge.hiomap import Command, pack_request, window_args
from hiomapbridge.ipmi import CMD_GET_BT_CAPABILITIES, NETFN_APP
from hiomapbridge.sim.hiomapd import run_emulator

from .bridgeutil import HIOMAP, run_bridge, run_btbridged


async def test_get_info_v1_never_reaches_hiomapd(
    bus_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GET_INFO v1 is answered 0xC9 by the bridge and logged; hiomapd stays
    in v2, so what would follow in v1 (garbage flash info, an ERASE that
    crashes it) does not happen."""
    caplog.set_level(logging.INFO, "hiomapbridge")
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address),
    ):
        with trio.fail_after(10):
            v2 = await bt.transact(*HIOMAP, pack_request(Command.GET_INFO, 1, b"\x02"))
            assert v2.cc == 0
            v1 = await bt.transact(*HIOMAP, pack_request(Command.GET_INFO, 2, b"\x01"))
            assert (v1.cc, v1.data) == (0xC9, b"")
            assert hiomapd.version == 2
            info = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 3))
            assert info.cc == 0
            size, erase = int.from_bytes(info.data[2:4], "little"), info.data[4:6]
            assert size > 0 and erase != b"\x00\x02"  # not v1's garbage
            window = await bt.transact(
                *HIOMAP,
                pack_request(Command.CREATE_WRITE_WINDOW, 4, window_args(0, 1)),
            )
            assert window.cc == 0
            erased = await bt.transact(
                *HIOMAP, pack_request(Command.ERASE, 5, window_args(0, 1))
            )
            assert erased.cc == 0
        assert not hiomapd.crashed
        assert "GET_INFO asks for version 1" in caplog.text


async def test_capabilities_answered_in_btbridged_mode(bus_address: str) -> None:
    config = bridge.Config()
    async with run_btbridged(bus_address) as bt, run_bridge(bus_address):
        with trio.fail_after(10):
            caps = await bt.transact(NETFN_APP, CMD_GET_BT_CAPABILITIES)
        assert caps.cc == 0
        assert caps.netfn == NETFN_APP | 1
        outstanding, inbuf, outbuf, seconds, retries = caps.data
        assert (outstanding, inbuf, outbuf, retries) == (1, 0x3F, 0x3F, 1)
        assert seconds == config.bt_transaction_time
        # The budget: skiboot waits longer than the bridge's deadline, and
        # btbridged (5 s) longer than that.
        assert config.hiomapd_timeout < seconds < 5
