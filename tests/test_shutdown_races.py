"""Shutdown ordering: every race and fault of issue 4, driven deterministically.

Each test drives one interleaving exactly and its docstring names the
mechanism in hiomapbridge that closes it (docs/shutdown-ordering.md explains
them).  Two rigs:

* in-process: :func:`run_bridge` runs :func:`hiomapbridge.bridge.run` in the
  test's own trio loop, with "signals" fed through a channel, so that
  ``wait_all_tasks_blocked`` and the btbridged stand-in's ``hold`` hook pin
  the bridge at an exact point;
* real: ``python -m hiomapbridge`` as a subprocess with its own
  NOTIFY_SOCKET, receiving real SIGTERM/SIGINT from the kernel.  STOPPING=1
  (sent first thing in the shutdown sequence) and the bridge's own log lines
  are the synchronisation points, never a sleep.

Peers share the test's private dbus-daemon: the hiomapd emulator (in-process
or as a subprocess), a scripted hiomapd where a test needs hiomapd to hang,
and the btbridged stand-in acting as the host.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hiomapbridge.bridge import Bridge
from hiomapbridge.hiomap import Command, pack_request
from hiomapbridge.hostq import Fetch, HostQueue
from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.btbridged import BtBridge, Transaction, requests
from hiomapbridge.sim.hiomapd import run_emulator
from hiomapbridge.sim.host import DAEMON_READY, PROTOCOL_RESET, run_host
from hiomapbridge.sim.privatebus import PrivateBus
from hiomapbridge.sim.process import Service, python_command, run_service

from .bridgeutil import (
    GET_FLAGS,
    HIOMAP,
    READ_EVENT,
    RunningBridge,
    connect,
    run_bridge,
    run_btbridged,
    settle,
)
from .scripted_hiomapd import HANG, scripted_hiomapd

is_read_event = requests(*READ_EVENT)

RESET_RECORD = event_record(0x01)

EMULATOR_OPTIONS = {"flash_size": 1 << 20, "window_size": 1 << 16}


# -- the ipmid behaviour, for teeth ----------------------------------------


class IpmidQueue(HostQueue):
    """ipmid's host-command queue: the completion fires when the event is
    *dequeued* for the host (phosphor::host::command::Manager::getNextCommand
    calls back before the data reaches the host), not when btbridged
    confirms the write.  Test-only."""

    def fetch(self) -> Fetch:
        fetch = super().fetch()
        self.delivered(fetch)
        return fetch


class IpmidBridge(Bridge):
    queue_class = IpmidQueue


# -- helpers ---------------------------------------------------------------


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll a condition that no event of ours announces (another process's
    state); the caller bounds the wait with ``trio.fail_after``."""
    while not condition():  # noqa: ASYNC110 (nothing to wait on: no event)
        await trio.sleep(0.005)


async def wait_for_log(service: Service, text: str) -> None:
    """Wait until the subprocess logged ``text`` (bounded by the caller)."""
    while text not in service.log():
        if service.process.returncode is not None:
            raise AssertionError(
                f"{service.name} exited ({service.process.returncode}) "
                f"before logging {text!r}:\n{service.log()}"
            )
        await trio.sleep(0.005)


@asynccontextmanager
async def bridge_process(
    address: str, directory: Path, *args: str
) -> AsyncIterator[Service]:
    """``python -m hiomapbridge`` as systemd would run it (Type=notify)."""
    argv = python_command(
        "hiomapbridge", "--bus", address, "--log-level", "debug", *args
    )
    async with run_service("hiomapbridge", argv, directory) as service:
        yield service


@asynccontextmanager
async def emulator_process(
    address: str, directory: Path, name: str = "hiomapd"
) -> AsyncIterator[Service]:
    """The hiomapd emulator as a real subprocess (for SIGKILL)."""
    argv = python_command(
        "hiomapbridge.sim",
        "hiomapd",
        "--bus", address,
        "--flash", str(directory / "flash.img"),
        "--lpc", str(directory / "lpc.img"),
        "--flash-size", "1M",
        "--window-size", "64K",
        "--log-level", "debug",
    )  # fmt: skip
    async with run_service(name, argv, directory) as service:
        yield service


async def fetch(bt: BtBridge) -> bytes:
    """One host fetch after SMS_ATN: Get Message Flags, Read Event."""
    with trio.fail_after(5):
        await bt.wait_attention()
        flags = await bt.transact(*GET_FLAGS)
        assert flags.data == b"\x02", "SMS_ATN without an event waiting"
        record = await bt.transact(*READ_EVENT)
    assert record.cc == 0
    return record.data


async def take_initial_event(bt: BtBridge, running: RunningBridge | None) -> None:
    """Fetch the 0x81 hiomapd announced at start-up, and (in-process) wait
    until the bridge saw btbridged's confirmation."""
    assert await fetch(bt) == event_record(0x81)
    if running is not None:
        with trio.fail_after(5):
            await running.bridge.queue.wait_all_delivered()
        assert running.bridge.queue.last_delivered == 0x81


def read_events(bt: BtBridge) -> list[Transaction]:
    return [tx for tx in bt.transactions if is_read_event(tx)]


# -- race 1 ------------------------------------------------------------------


@pytest.mark.parametrize("hiomapd_stops", ["never", "after_sigterm"])
async def test_race1_sigterm_before_final_properties_changed(
    bus_address: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    hiomapd_stops: str,
) -> None:
    """Race 1 (the scheduler race): SIGTERM reaches the bridge before hiomapd's
    final PropertiesChanged ("after_sigterm"), or instead of it ("never":
    hiomapd is still serving when the bridge is told to stop).

    Closed by the shutdown sequence's step 3 (``Bridge.shut_down``): unless
    the last byte the host *received* is exactly PROTOCOL_RESET, the bridge
    posts 0x01 itself and waits for its delivery.  And by freezing hiomapd's
    events once ``shutting_down`` is set (``Bridge._post``): hiomapd's late
    signals (0x01, 0x81, 0x01 on a clean stop) never replace the final byte,
    so the host cannot be left on a stale DAEMON_READY.
    """
    caplog.set_level(logging.INFO)
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, shutdown_timeout=30) as running,
    ):
        await take_initial_event(bt, running)
        running.signal(signal.SIGTERM)
        await trio.testing.wait_all_tasks_blocked()
        assert running.bridge.shutting_down
        assert running.bridge.queue.waiting_byte == 0x01  # synthesised
        if hiomapd_stops == "after_sigterm":
            await emu.stop_cleanly()  # three PropertiesChanged, ReleaseName
            await settle(running, bus_address)
            assert running.bridge.hiomapd.owner is None
            assert "shutting down: not forwarding event 0x81" in caplog.text
            assert running.bridge.queue.waiting_byte == 0x01
        assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert running.bridge.queue.last_delivered == 0x01
        # the host never saw anything but 0x01 after the signal
        assert [tx.delivered.data for tx in read_events(bt) if tx.delivered] == [
            event_record(0x81),
            RESET_RECORD,
        ]
        assert "shutdown: the host holds PROTOCOL_RESET" in caplog.text


@pytest.mark.parametrize("hiomapd_stops", ["never", "after_sigterm"])
async def test_race1_real_sigterm(
    bus_address: str, tmp_path: Path, hiomapd_stops: str
) -> None:
    """Race 1 with the bridge as a real process and a real SIGTERM, sent
    before hiomapd stops (or while it keeps running).

    Closed by the signal receiver being opened before the bus connection
    (``cli._main``: SIGTERM is read by the shutdown sequence, never the
    default action) and by step 3 of the shutdown sequence posting 0x01;
    hiomapd's late events are frozen out (the "not forwarding" log line).
    """
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        bridge_process(bus_address, tmp_path, "--shutdown-timeout", "30") as bridge,
    ):
        await take_initial_event(bt, None)
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(5):
            await bridge.wait_notified("STOPPING=1")
            if hiomapd_stops == "after_sigterm":
                await emu.stop_cleanly()
                await wait_for_log(
                    bridge, "shutting down: not forwarding event 0x01 (PROTOCOL_RESET)"
                )
        assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await bridge.wait() == 0
        tx = read_events(bt)[-1]
        assert tx.delivered is not None and tx.delivered.data == RESET_RECORD
        assert tx.delivered_at is not None and bridge.exited_at is not None
        assert tx.delivered_at.trio <= bridge.exited_at
        log = bridge.log()
        assert "SIGTERM received: shutting down" in log
        assert "shutdown: telling the host PROTOCOL_RESET" in log
        assert "shutdown: the host holds PROTOCOL_RESET" in log


# -- race 2 ------------------------------------------------------------------


async def test_race2_sigterm_after_properties_changed_before_delivery(
    bus_address: str, tmp_path: Path
) -> None:
    """Race 2: SIGTERM arrives after the bridge received a PropertiesChanged
    (the event is posted, SMS_ATN raised) but before the host fetched it.

    Closed by the signal being a message, not a death (the receiver opened
    first; here the channel run_bridge feeds), and by the shutdown
    sequence's step 2 (``queue.wait_all_delivered``): the waiting event is
    delivered first, then PROTOCOL_RESET, both confirmed by btbridged.
    """
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, shutdown_timeout=30) as running,
    ):
        await take_initial_event(bt, running)
        await emu.force_window_reset()
        byte = emu.events
        assert byte == 0x83
        with trio.fail_after(5):
            await bt.wait_until(lambda: bt.attention_pending)
        assert running.bridge.queue.waiting_byte == byte  # received, not delivered
        running.signal(signal.SIGTERM)
        await trio.testing.wait_all_tasks_blocked()
        assert running.bridge.shutting_down
        assert running.bridge.queue.waiting_byte == byte  # still first in line
        assert await fetch(bt) == event_record(byte)
        assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert running.bridge.queue.last_delivered == 0x01


async def test_race2_real_sigterm(bus_address: str, tmp_path: Path) -> None:
    """Race 2 with a real SIGTERM to the real process, sent once SMS_ATN for
    hiomapd's event was raised (so the bridge had received it).

    Closed by the signal receiver opened first and step 2 of the shutdown
    sequence (the event is delivered, then PROTOCOL_RESET)."""
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        bridge_process(bus_address, tmp_path, "--shutdown-timeout", "30") as bridge,
    ):
        await take_initial_event(bt, None)
        await emu.suspend_flash_control()
        byte = emu.events
        assert byte == 0xC1
        with trio.fail_after(5):
            await bt.wait_until(lambda: bt.attention_pending)
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(5):
            await bridge.wait_notified("STOPPING=1")
        assert await fetch(bt) == event_record(byte)
        assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await bridge.wait() == 0
        assert "shutdown: waiting for the host to fetch 0xc1" in bridge.log()


# -- race 3 (and the teeth) ----------------------------------------------------


@pytest.mark.parametrize("queue", ["hiomapbridge", "ipmid"])
async def test_race3_sigterm_after_dequeue_before_confirmation(
    bus_address: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    queue: str,
) -> None:
    """Race 3: hiomapd stopped first (as systemd orders it) and its final
    0x01 was posted; the host's Read Event Message Buffer was answered (the
    event is dequeued, ``sendMessage`` sent) but btbridged has not confirmed
    the write when SIGTERM arrives (the stand-in's ``hold`` parks the reply).

    Closed by completion only on btbridged's ``sendMessage`` reply
    (``Bridge._respond``'s callback calls ``HostQueue.delivered``; ``fetch``
    alone counts nothing): the bridge stays until the write is confirmed.

    Teeth: the "ipmid" variant runs the same interleaving with
    :class:`IpmidQueue` (completion at dequeue, ipmid's behaviour).  It
    PASSES BY DEMONSTRATING THE FAILURE: the bridge logs "the host holds
    PROTOCOL_RESET" and exits while the host has not received it.
    """
    caplog.set_level(logging.INFO)
    bridge_class = IpmidBridge if queue == "ipmid" else Bridge
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, bridge_class, shutdown_timeout=30) as running,
    ):
        await take_initial_event(bt, running)
        await emu.stop_cleanly()
        await settle(running, bus_address)
        assert running.bridge.queue.waiting_byte == 0x01
        hold = bt.hold(is_read_event)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await bt.wait_attention()
            assert (await bt.transact(*GET_FLAGS)).data == b"\x02"
            nursery.start_soon(bt.transact, *READ_EVENT)
            with trio.fail_after(5):
                (tx,) = await hold.wait_held()
            # dequeued and answered; btbridged has not written it yet
            running.signal(signal.SIGTERM)
            await trio.testing.wait_all_tasks_blocked()
            if queue == "ipmid":
                with trio.fail_after(5):
                    assert await running.wait() == 0
                # THE FAILURE: the bridge is gone, claiming delivery, while
                # the host has not received PROTOCOL_RESET.
                assert tx.delivered is None and hold.held == [tx]
                assert "shutdown: the host holds PROTOCOL_RESET" in caplog.text
                nursery.cancel_scope.cancel()
                return
            assert not running.done.is_set()
            assert running.bridge.queue.waiting_byte == 0x01
            hold.release()
        assert tx.delivered is not None and tx.delivered.data == RESET_RECORD
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert running.bridge.queue.last_delivered == 0x01


async def test_race3_failed_bt_write_is_fetched_again(
    bus_address: str, tmp_path: Path
) -> None:
    """Race 3, worse case: the held write then fails (btbridged's request
    timer fires: the host gets 0xCE, ``sendMessage`` a Timeout error).

    Closed by completion only on a *successful* ``sendMessage`` reply:
    ``HostQueue.failed`` keeps PROTOCOL_RESET waiting and re-asserts SMS_ATN,
    the host fetches it again, and only then does the bridge exit."""
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address, timeout=0.5) as bt,
        run_bridge(bus_address, shutdown_timeout=30) as running,
    ):
        await take_initial_event(bt, running)
        await emu.stop_cleanly()
        hold = bt.hold(is_read_event)
        with trio.fail_after(5):
            await bt.wait_attention()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bt.transact, *READ_EVENT)
            (tx,) = await hold.wait_held()
            running.signal(signal.SIGTERM)
        # the host's request timed out: btbridged answered it 0xCE
        assert tx.outcome == "timed_out" and tx.delivered is not None
        assert tx.delivered.cc == 0xCE
        assert not running.done.is_set()
        assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await running.wait() == 0


async def test_race3_real_sigterm(bus_address: str, tmp_path: Path) -> None:
    """Race 3 with a real SIGTERM to the real process while btbridged holds
    the Read Event response carrying 0x01.

    Closed by completion on the ``sendMessage`` reply: the bridge's log says
    it is still waiting for the host to fetch 0x01 although the record was
    already dequeued and sent, and it exits only after the confirmation."""
    async with (
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS) as emu,
        run_btbridged(bus_address) as bt,
        bridge_process(bus_address, tmp_path, "--shutdown-timeout", "30") as bridge,
    ):
        await take_initial_event(bt, None)
        await emu.stop_cleanly()
        hold = bt.hold(is_read_event)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await bt.wait_attention()
            nursery.start_soon(bt.transact, *READ_EVENT)
            with trio.fail_after(5):
                (tx,) = await hold.wait_held()
                bridge.signal(signal.SIGTERM)
                await bridge.wait_notified("STOPPING=1")
                await wait_for_log(
                    bridge, "shutdown: waiting for the host to fetch 0x01"
                )
            assert bridge.process.returncode is None
            hold.release()
        with trio.fail_after(5):
            assert await bridge.wait() == 0
        assert tx.delivered is not None and tx.delivered.data == RESET_RECORD
        assert tx.delivered_at is not None and bridge.exited_at is not None
        assert tx.delivered_at.trio <= bridge.exited_at


# -- 4: hung hiomapd -------------------------------------------------------------


async def test_sigterm_while_hiomap_request_waits_on_hung_hiomapd(
    bus_address: str,
) -> None:
    """4. SIGTERM while a HIOMAP request waits on a hung hiomapd.

    Closed by the split workers: Get Message Flags and Read Event Message
    Buffer are answered by the messaging worker, never queued behind the
    HIOMAP worker's hung call, so the host fetches PROTOCOL_RESET at once;
    the shutdown sequence does not wait for HIOMAP requests, and leaving the
    bridge nursery cancels the hung call (btbridged answers the host 0xCE).
    """
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address, timeout=1.0) as bt,
        run_bridge(bus_address, shutdown_timeout=30, hiomapd_timeout=30) as running,
    ):
        await take_initial_event(bt, running)
        hiomapd.replies["Flush"] = HANG
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bt.transact, *HIOMAP, pack_request(Command.FLUSH, 1))
            with trio.fail_after(5):
                await hiomapd.wait_calls(1)
            (flush,) = [tx for tx in bt.transactions if tx.cmd == HIOMAP[1]]
            started = trio.current_time()
            running.signal(signal.SIGTERM)
            assert await fetch(bt) == RESET_RECORD
            with trio.fail_after(5):
                assert await running.wait() == 0
            assert trio.current_time() - started < 5  # not hiomapd_timeout
        assert flush.send_message_calls == 0  # the bridge never answered it
        assert flush.outcome == "timed_out"
        assert flush.delivered is not None and flush.delivered.cc == 0xCE


# -- 5: the host never fetches ------------------------------------------------------


@pytest.mark.parametrize("hiomapd", ["absent", "present"])
async def test_host_never_fetches_deadline(
    bus_address: str, tmp_path: Path, hiomapd: str
) -> None:
    """5. The host never fetches: the bridge exits (status 0) once
    ``--shutdown-timeout`` passed, logging the byte the host never got:
    0x01 when nothing else waited, 0x81 when hiomapd's start-up event was
    never fetched either.

    Closed by the deadline: ``trio.move_on_after(shutdown_timeout)`` around
    steps 2-3 of the shutdown sequence, then the "did not fetch" error line.
    """
    timeout = 0.5
    want = (
        "0x01 (PROTOCOL_RESET)"
        if hiomapd == "absent"
        else "0x81 (DAEMON_READY|PROTOCOL_RESET)"
    )
    async with (
        run_btbridged(bus_address) as bt,
        run_emulator(bus_address, tmp_path / "hiomapd", **EMULATOR_OPTIONS)
        if hiomapd == "present"
        else connect(bus_address),
        bridge_process(
            bus_address, tmp_path, "--shutdown-timeout", str(timeout)
        ) as bridge,
    ):
        sent = trio.current_time()
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(timeout + 5):
            assert await bridge.wait() == 0
        elapsed = trio.current_time() - sent
        assert timeout <= elapsed < timeout + 1.0
        assert bt.attention_count >= 1  # it asked; the host never came
        assert (
            f"shutdown: the host did not fetch event {want} within {timeout}s; "
            "exiting anyway" in bridge.log()
        )


# -- 6: repeated signals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        (signal.SIGTERM, signal.SIGTERM, 0),
        (signal.SIGTERM, signal.SIGINT, 130),
        (signal.SIGINT, signal.SIGINT, 130),
    ],
    ids=["sigterm-sigterm", "sigterm-sigint", "sigint-sigint"],
)
async def test_repeated_signals_real_process(
    bus_address: str,
    tmp_path: Path,
    first: signal.Signals,
    second: signal.Signals,
    status: int,
) -> None:
    """6. A repeated SIGTERM during shutdown changes nothing: the shutdown
    goes on and ends with the host holding PROTOCOL_RESET, exit 0.  A SIGINT
    during shutdown (Ctrl-C twice) leaves at once with exit status 130.

    Closed by ``run()``'s ``more_signals`` task, which keeps reading the
    still-open signal receiver during the shutdown sequence, and by
    ``cli.main`` ignoring signals after the receiver closes (a signal
    pending at that moment must not turn exit 0 into 143).
    """
    async with (
        run_btbridged(bus_address) as bt,
        bridge_process(bus_address, tmp_path, "--shutdown-timeout", "30") as bridge,
    ):
        bridge.signal(first)
        with trio.fail_after(5):
            await bridge.wait_notified("STOPPING=1")
            await bt.wait_until(lambda: bt.attention_pending)
        bridge.signal(second)
        if status == 0:
            with trio.fail_after(5):
                await wait_for_log(bridge, "SIGTERM during shutdown: already")
            bridge.signal(second)  # and again
            assert await fetch(bt) == RESET_RECORD
        with trio.fail_after(5):
            assert await bridge.wait() == status
        log = bridge.log()
        if status == 0:
            assert log.count("SIGTERM during shutdown: already shutting down") >= 1
            assert "shutdown: the host holds PROTOCOL_RESET" in log
        else:
            assert "second SIGINT: leaving at once" in log
            assert "holds PROTOCOL_RESET" not in log


# -- 7: hiomapd SIGKILLed and restarted --------------------------------------------


async def test_hiomapd_killed_and_restarted(bus_address: str, tmp_path: Path) -> None:
    """7. hiomapd (the emulator as a real process) is SIGKILLed, so it never
    emits its final PropertiesChanged, then restarted.  The host (skiboot's
    client from sim/host.py) gets PROTOCOL_RESET with DAEMON_READY clear
    (0x01), then DAEMON_READY|PROTOCOL_RESET (0x81), and re-negotiates.

    Closed by ``Bridge._hiomapd_changed``: hiomapd's name losing its owner
    while DAEMON_READY was set is a crash, so the bridge posts 0x01 itself;
    a new owner triggers ``GetAll`` (the hiomapd watcher), whose 0x81 is
    posted.  The host's ACK/GET_INFO/GET_FLASH_INFO then reach the new
    hiomapd."""
    workdir = tmp_path / "hiomapd"
    workdir.mkdir()
    async with emulator_process(bus_address, workdir, "hiomapd-1") as first:
        async with (
            run_bridge(bus_address, shutdown_timeout=5),
            run_host(bus_address, workdir / "lpc.img") as host,
        ):
            before = await host.read(0, 4096)
            assert before == (workdir / "flash.img").read_bytes()[:4096]
            # the ACK at start-up cleared PROTOCOL_RESET: wait for that 0x80
            with trio.fail_after(5):
                await host.wait_until(
                    lambda: host.hiomap_events[-1].data == DAEMON_READY
                )
            seen = len(host.hiomap_events)
            first.process.kill()  # SIGKILL: no final PropertiesChanged
            with trio.fail_after(5):
                assert await first.wait() == -signal.SIGKILL
                await host.wait_until(lambda: len(host.hiomap_events) > seen)
            assert host.hiomap_events[seen].data == PROTOCOL_RESET
            assert host.state & PROTOCOL_RESET and not host.state & DAEMON_READY
            async with emulator_process(bus_address, workdir, "hiomapd-2"):
                with trio.fail_after(5):
                    await host.wait_until(lambda: len(host.hiomap_events) > seen + 1)
                data = [e.data for e in host.hiomap_events[seen:]]
                assert data[:2] == [PROTOCOL_RESET, DAEMON_READY | PROTOCOL_RESET]
                renegotiated = len(host.bt.transactions)
                with trio.fail_after(10):
                    assert await host.read(0, 4096) == before
                commands = [
                    tx.data[0]
                    for tx in host.bt.transactions[renegotiated:]
                    if tx.cmd == HIOMAP[1]
                ]
                assert commands[:3] == [
                    Command.ACK,
                    Command.GET_INFO,
                    Command.GET_FLASH_INFO,
                ]
                assert host.version == 2


# -- 8: btbridged restarted ----------------------------------------------------------


@pytest.mark.parametrize("how", ["gap", "takeover", "gap-during-shutdown"])
async def test_btbridged_restart_reannounces_waiting_event(
    bus_address: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """8. btbridged restarts (org.openbmc.HostIpmi changes owner) while an
    event waits: "gap" (the old one exits, a new one appears later),
    "takeover" (the new one replaces the old directly), "gap-during-shutdown"
    (the same while the bridge waits for the host to fetch 0x01).

    Closed by ``NameOwner`` tracking btbridged's unique name and
    ``Bridge._btbridged_changed`` -> ``HostQueue.kick``: SMS_ATN is asserted
    again at once for the new owner (``--atn-interval`` is 30 s here, so the
    periodic re-assertion cannot be what the test sees), and requests are
    accepted only from the new owner."""
    caplog.set_level(logging.INFO)
    async with (
        scripted_hiomapd(bus_address),
        run_bridge(bus_address, atn_interval=30, shutdown_timeout=30) as running,
    ):
        want = 0x81
        async with run_btbridged(bus_address) as old:
            with trio.fail_after(5):
                await old.wait_attention()  # 0x81 announced, never fetched
            if how == "gap-during-shutdown":
                running.signal(signal.SIGTERM)
                assert await fetch_after_attention(old) == event_record(0x81)
                with trio.fail_after(5):
                    await old.wait_attention()  # now PROTOCOL_RESET waits
                want = 0x01
            if how == "takeover":
                async with run_btbridged(bus_address) as new:
                    with trio.fail_after(5):
                        await new.wait_attention()
                    assert new.attentions[0].sender == running.bridge.bus.unique_name
                    assert await fetch_after_attention(new) == event_record(want)
                assert "btbridged restarted; re-announcing any waiting event" in (
                    caplog.text
                )
                assert old.attention_count == 1
                return
        with trio.fail_after(5):
            await eventually(lambda: running.bridge.btbridged.owner is None)
        assert running.bridge.queue.waiting_byte == want
        async with run_btbridged(bus_address) as new:
            with trio.fail_after(5):
                await new.wait_attention()
            assert running.bridge.btbridged.owner == new._bus.unique_name  # type: ignore[union-attr]
            assert await fetch_after_attention(new) == event_record(want)
            if how == "gap-during-shutdown":
                with trio.fail_after(5):
                    assert await running.wait() == 0
            else:
                with trio.fail_after(5):
                    await running.bridge.queue.wait_all_delivered()
            assert running.bridge.queue.last_delivered == want


async def fetch_after_attention(bt: BtBridge) -> bytes:
    """The fetch half of :func:`fetch` (SMS_ATN already consumed)."""
    with trio.fail_after(5):
        flags = await bt.transact(*GET_FLAGS)
        assert flags.data == b"\x02"
        record = await bt.transact(*READ_EVENT)
    assert record.cc == 0
    return record.data


# -- 9: dbus-daemon killed ------------------------------------------------------------


async def test_dbus_daemon_killed_bridge_exits_nonzero(
    dbus: PrivateBus, tmp_path: Path
) -> None:
    """9. The dbus-daemon dies: the real bridge exits with status 1 within a
    second, so systemd's Restart=on-failure brings it back with the bus.

    Closed by ``Bus.run_receiver`` turning EOF into ``BusClosed``, which
    cancels everything under ``open_bus``; ``cli._main`` maps it to
    EXIT_FAILURE with the log line "...; exiting so that systemd restarts
    us"."""
    async with bridge_process(dbus.address, tmp_path) as bridge:
        killed = trio.current_time()
        dbus.kill()
        with trio.fail_after(1.0):
            status = await bridge.wait()
        assert status == 1
        assert bridge.exited_at is not None
        assert bridge.exited_at - killed < 1.0
        assert "exiting so that systemd restarts us" in bridge.log()


async def test_sigterm_storm_during_exit_keeps_status_zero(
    bus_address: str, tmp_path: Path
) -> None:
    """6, the exit window: SIGTERM repeated until the process is gone must
    not turn a clean shutdown into "killed by SIGTERM".  The host is absent
    and the deadline short, so the bridge leaves at once; SIGTERMs keep
    coming every 0.5 ms, so some land after the signal receiver closed,
    including during interpreter finalisation (reproduces 20 runs out of 20)."""
    async with bridge_process(bus_address, tmp_path, "--shutdown-timeout", "0.05") as b:
        b.signal(signal.SIGTERM)
        with trio.fail_after(5):
            await b.wait_notified("STOPPING=1")
            while b.process.returncode is None:
                try:
                    b.signal(signal.SIGTERM)
                except ProcessLookupError:
                    break
                await trio.sleep(0.0005)
            status = await b.wait()
        assert status == 0, f"exit status {status}\n{b.log()}"
