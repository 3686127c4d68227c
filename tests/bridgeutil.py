"""Running the bridge in-process on a real bus, for integration tests.

The subprocess tests (test_daemon.py) use the real executable; these run
:func:`hiomapbridge.bridge.run` in the test's own trio loop so that trio's
testing tools can drive exact interleavings.  Signals are fed through a
memory channel instead of the kernel.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from jeepney import DBusAddress, new_method_call

from hiomapbridge import bridge
from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.ipmi import (
    CMD_CLEAR_MESSAGE_FLAGS,
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    NETFN_APP,
    NETFN_OEM_IBM,
)
from hiomapbridge.sim.btbridged import BtBridge

#: (netfn, cmd) of the host requests the tests send: ``bt.transact(*HIOMAP, data)``
GET_FLAGS = (NETFN_APP, CMD_GET_MESSAGE_FLAGS)
CLEAR_FLAGS = (NETFN_APP, CMD_CLEAR_MESSAGE_FLAGS)
READ_EVENT = (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
HIOMAP = (NETFN_OEM_IBM, CMD_HIOMAP)


@attrs.define
class RunningBridge:
    bridge: bridge.Bridge
    signals: trio.MemorySendChannel[int]
    done: trio.Event
    status: int | None = None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.signals.send_nowait(signum)

    async def wait(self) -> int:
        await self.done.wait()
        assert self.status is not None
        return self.status


@asynccontextmanager
async def run_bridge(
    address: str,
    bridge_class: type[bridge.Bridge] = bridge.Bridge,
    **config: object,
) -> AsyncIterator[RunningBridge]:
    """Run the bridge until the block ends (or it exits after a signal)."""
    send, receive = trio.open_memory_channel[int](16)
    ready: list[bridge.Bridge] = []
    started = trio.Event()
    done = trio.Event()
    holder: list[RunningBridge] = []

    def on_ready(b: bridge.Bridge) -> None:
        ready.append(b)
        started.set()

    async def runner() -> None:
        try:
            status = await bridge.run(
                bridge.Config(bus=address, **config),  # type: ignore[arg-type]
                receive,
                on_ready,
                bridge_class,
            )
            if holder:
                holder[0].status = status
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        with trio.fail_after(10):
            await started.wait()
        running = RunningBridge(ready[0], send, done)
        holder.append(running)
        yield running
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def run_btbridged(address: str, **options: object) -> AsyncIterator[BtBridge]:
    async with open_bus(address) as bus, trio.open_nursery() as nursery:
        bt = BtBridge(**options)  # type: ignore[arg-type]
        await nursery.start(bt.serve, bus)
        yield bt
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(address: str) -> AsyncIterator[Bus]:
    async with open_bus(address) as bus:
        yield bus


async def settle(running: RunningBridge, address: str) -> None:
    """Return once the bridge has dispatched every message the bus handed it
    before now: a Peer.Ping from a fresh connection is answered after them
    (the bus delivers to one connection in order)."""
    async with connect(address) as bus:
        with trio.fail_after(10):
            await bus.call(
                new_method_call(
                    DBusAddress(
                        "/",
                        bus_name=running.bridge.bus.unique_name,
                        interface="org.freedesktop.DBus.Peer",
                    ),
                    "Ping",
                )
            )


async def drain_startup(bt: BtBridge, running: RunningBridge) -> None:
    """Let the host fetch the event the bridge posts at start (0x81)."""
    with trio.fail_after(5):
        await bt.wait_attention()
        await bt.transact(*READ_EVENT)
        await running.bridge.queue.wait_all_delivered()
