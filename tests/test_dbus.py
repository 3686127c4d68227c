"""hiomapbridge.dbus on a real dbus-daemon: the bounds of its own I/O."""

from __future__ import annotations

import itertools
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from jeepney import DBusAddress, new_signal
from jeepney.low_level import Parser

from hiomapbridge import dbus as dbus_module
from hiomapbridge.dbus import Bus, BusClosed, open_bus
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


class RawConnection:
    """What Bus takes from jeepney's connection, over one end of a
    socketpair: the other end plays a bus gone wrong, sending bytes no
    dbus-daemon would (it validates every message it routes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.parser = Parser()
        self.unique_name = ":1.1"
        self.outgoing_serial = itertools.count(1)


SIGNALS = DBusAddress("/a", interface="b.c")


def unreadable(text: str, serial: int) -> bytes:
    """A framed signal whose string's length runs off the end of it."""
    frame = bytearray(new_signal(SIGNALS, "D", "s", (text,)).serialise(serial))
    length_at = len(frame) - len(text) - 5  # the u32 before the text and its NUL
    frame[length_at : length_at + 4] = b"\xff\xff\xff\x7f"
    return bytes(frame)


@asynccontextmanager
async def raw_bus() -> AsyncIterator[tuple[Bus, socket.socket, list[str]]]:
    """A Bus reading one end of a socketpair; yields it, the other end, and
    the string of every signal ``D`` it dispatched, in order."""
    ours, theirs = socket.socketpair()
    seen: list[str] = []
    with ours, theirs:
        async with trio.open_nursery() as nursery:
            bus = Bus(RawConnection(ours), nursery)
            bus.on_signal("/a", "b.c", "D", lambda msg: seen.append(msg.body[0]))
            nursery.start_soon(bus.run_receiver)
            yield bus, theirs, seen
            nursery.cancel_scope.cancel()
        bus.close_socket()


async def test_an_unreadable_message_is_dropped_and_counted() -> None:
    """A frame that neither our codec nor jeepney can read is logged,
    counted and skipped; the messages around it are dispatched."""
    good = new_signal(SIGNALS, "D", "s", ("x",))
    async with raw_bus() as (bus, theirs, seen):
        theirs.sendall(good.serialise(1) + unreadable("y", 2) + good.serialise(3))
        # The bytes are in our socket once sendall returns: when every task
        # is blocked, the receiver has read and handled them all.
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["x", "x"]
        assert bus.malformed.count == 1


async def test_messages_are_framed_however_the_reads_cut_them() -> None:
    """One message per read (parsed as read), several in one read, one cut
    across reads, and an unreadable one alone in its read: every message is
    dispatched once, in order, and the unreadable one is counted."""
    frames = [
        new_signal(SIGNALS, "D", "s", (str(i),)).serialise(i + 1) for i in range(6)
    ]
    cut = len(frames[3]) // 2
    async with raw_bus() as (bus, theirs, seen):
        for chunk in (
            frames[0],  # whole, alone
            frames[1] + frames[2],  # two at once
            frames[3][:cut],  # one across three reads
            frames[3][cut:-1],
            frames[3][-1:],
            unreadable("bad", 99),  # alone
            frames[4],  # whole, alone again
            frames[5][:16],  # a header's worth, then the rest
            frames[5][16:],
        ):
            theirs.sendall(chunk)
            await trio.testing.wait_all_tasks_blocked()
        assert seen == ["0", "1", "2", "3", "4", "5"]
        assert bus.malformed.count == 1
