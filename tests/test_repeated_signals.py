"""Real hiomapd repeats properties in PropertiesChanged (every Ack sends
WindowReset and ProtocolReset, GetInfo re-sends every set bit, a repeated
WindowReset is sent again): the bridge folds values, so a signal that leaves
the event byte as the host already holds it, or as it already waits, costs
the host nothing: no setAttention, no new event generation, no extra fetch.

The bridge runs in-process with the btbridged stand-in and the hiomapd
emulator (which sends what real hiomapd sends) on a private bus.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from hiomapbridge.hiomap import Command, pack_request
from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.btbridged import BtBridge
from hiomapbridge.sim.hiomapd import Emulator, run_emulator

from .bridgeutil import (
    HIOMAP,
    READ_EVENT,
    RunningBridge,
    drain_startup,
    run_bridge,
    run_btbridged,
    settle,
)
from .test_sim_hiomapd import SMALL, Client, client


@attrs.define
class Stack:
    address: str
    emu: Emulator
    bt: BtBridge
    running: RunningBridge
    watcher: Client  # sees every PropertiesChanged hiomapd sends
    seq: int = 0

    async def hiomap(self, command: Command, args: bytes = b"") -> None:
        self.seq += 1
        with trio.fail_after(5):
            response = await self.bt.transact(
                *HIOMAP, pack_request(command, self.seq, args)
            )
        assert response.cc == 0, (command, response)

    async def signal(self) -> dict[str, bool]:
        return await self.watcher.signal()

    async def settled(self) -> tuple[int, int, bool]:
        """(setAttention calls, posted generation, an event waiting) once the
        bridge has handled everything sent to it so far."""
        await settle(self.running, self.address)
        queue = self.running.bridge.queue
        return self.bt.attention_count, queue.posted_generation, queue.waiting

    async def fetch(self, byte: int) -> None:
        """The host takes SMS_ATN and fetches exactly ``byte``."""
        with trio.fail_after(5):
            await self.bt.wait_attention()
            record = await self.bt.transact(*READ_EVENT)
            assert record.data == event_record(byte)
            await self.running.bridge.queue.wait_all_delivered()


@asynccontextmanager
async def stack(address: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with (
        client(address) as watcher,
        run_emulator(address, tmp_path, **SMALL) as emu,
        run_btbridged(address) as bt,
        run_bridge(address, atn_interval=3600.0) as running,
    ):
        await watcher.signal()  # the emulator's start-up
        await drain_startup(bt, running)  # 0x81 reached the host
        yield Stack(address, emu, bt, running, watcher)


async def test_repeated_ack_signals_cost_no_host_traffic(
    bus_address: str, tmp_path: Path
) -> None:
    async with stack(bus_address, tmp_path) as s:
        await s.hiomap(Command.ACK, b"\x03")
        assert await s.signal() == {"WindowReset": False, "ProtocolReset": False}
        await s.fetch(0x80)  # a change: one event
        before = await s.settled()
        assert before[2] is False
        transactions = len(s.bt.transactions)
        posted = s.running.bridge.stats.events_posted

        # The same Ack again: hiomapd re-sends both properties, unchanged.
        await s.hiomap(Command.ACK, b"\x03")
        assert await s.signal() == {"WindowReset": False, "ProtocolReset": False}
        # GetInfo re-sends the set bit (DaemonReady true), unchanged.
        await s.hiomap(Command.GET_INFO, b"\x02")
        assert await s.signal() == {"DaemonReady": True}
        await s.hiomap(Command.ACK, b"\x01")
        assert await s.signal() == {"ProtocolReset": False}

        assert await s.settled() == before
        assert not s.bt.attention_pending
        # Only the three HIOMAP requests went over BT: no event fetch.
        assert len(s.bt.transactions) == transactions + 3
        assert s.running.bridge.queue.delivered_generation == before[1]
        # The exit report's "posted N events" counts none of the repeats.
        assert s.running.bridge.stats.events_posted == posted


async def test_repeated_signals_while_an_event_waits_add_nothing(
    bus_address: str, tmp_path: Path
) -> None:
    async with stack(bus_address, tmp_path) as s:
        await s.hiomap(Command.ACK, b"\x03")
        await s.signal()
        await s.fetch(0x80)
        attentions, generation, _ = await s.settled()

        await s.emu.force_window_reset()
        assert await s.signal() == {"WindowReset": True}
        assert await s.settled() == (attentions + 1, generation + 1, True)
        # While 0x82 waits unfetched: WindowReset true again, a GetInfo's
        # re-announcement and an Ack of ProtocolReset only (all unchanged).
        await s.emu.force_window_reset()
        assert await s.signal() == {"WindowReset": True}
        await s.hiomap(Command.GET_INFO, b"\x02")
        assert await s.signal() == {"DaemonReady": True, "WindowReset": True}
        await s.hiomap(Command.ACK, b"\x01")
        assert await s.signal() == {"ProtocolReset": False}
        assert await s.settled() == (attentions + 1, generation + 1, True)

        await s.fetch(0x82)  # one fetch delivers it
        assert await s.settled() == (attentions + 1, generation + 1, False)
        assert not s.bt.attention_pending

        # Delivered: the same repeats again cost nothing.
        await s.emu.force_window_reset()
        assert await s.signal() == {"WindowReset": True}
        await s.hiomap(Command.GET_INFO, b"\x02")
        assert await s.signal() == {"DaemonReady": True, "WindowReset": True}
        assert await s.settled() == (attentions + 1, generation + 1, False)
        assert not s.bt.attention_pending
