"""hiomapbridge.dbus on a real dbus-daemon: the bounds of its own I/O."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from jeepney import DBusAddress, new_signal

from hiomapbridge import dbus as dbus_module
from hiomapbridge.dbus import BusClosed, open_bus
from hiomapbridge.sim.privatebus import PrivateBus


async def test_a_bus_that_stops_reading_is_a_lost_bus(
    dbus: PrivateBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dbus-daemon stopped, what the socket does not take queues up to
    MAX_UNSENT; past it the connection counts as lost: the sender gets
    BusClosed and so does the block holding the connection (nothing grows
    without bound, nothing hangs)."""
    monkeypatch.setattr(dbus_module, "MAX_UNSENT", 256 * 1024)
    payload = b"x" * 4096
    signal_to = DBusAddress("/t", interface="t.T")
    sent = 0
    with pytest.RaisesGroup(BusClosed, flatten_subgroups=True):
        async with open_bus(dbus.address) as bus:
            os.kill(dbus.process.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(10):
                    while True:
                        bus.send_nowait(new_signal(signal_to, "S", "ay", (payload,)))
                        sent += len(payload)
                        await trio.lowlevel.checkpoint()
            finally:
                os.kill(dbus.process.pid, signal.SIGCONT)
    assert sent <= 256 * 1024 + 4 * 1024 * 1024  # the bound plus what the kernel took
