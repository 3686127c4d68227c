"""The bridge in-process on a real private dbus-daemon, with scripted peers."""

from __future__ import annotations

import logging
import signal

import pytest
import trio
import trio.testing
from jeepney import DBusAddress, new_signal

from hiomapbridge.bridge import HOSTIPMI_IFACE, HOSTIPMI_PATH
from hiomapbridge.hiomap import (
    HIOMAPD_PATH,
    IFACE_PROTOCOL,
    IFACE_V2,
    Command,
    pack_request,
)
from hiomapbridge.ipmi import HEARTBEAT_RECORD, event_record
from hiomapbridge.sim.btbridged import Response

from .bridgeutil import (
    CLEAR_FLAGS,
    GET_FLAGS,
    HIOMAP,
    READ_EVENT,
    connect,
    drain_startup,
    run_bridge,
    run_btbridged,
    settle,
)
from .scripted_hiomapd import HANG, error, scripted_hiomapd


async def test_messaging_commands_idle(bus_address: str) -> None:
    async with run_btbridged(bus_address) as bt, run_bridge(bus_address):
        flags = await bt.transact(*GET_FLAGS)
        assert (flags.cc, flags.data, flags.netfn) == (0, b"\x00", 0x07)
        record = await bt.transact(*READ_EVENT)
        assert (record.cc, record.data) == (0, HEARTBEAT_RECORD)
        clear = await bt.transact(*CLEAR_FLAGS)
        assert (clear.cc, clear.data) == (0, b"")
        other = await bt.transact(0x0A, 0x44, b"\x01")
        assert (other.cc, other.data, other.netfn, other.cmd) == (0xC1, b"", 0x0B, 0x44)


async def test_no_reject_unknown_leaves_other_commands_alone(bus_address: str) -> None:
    async with (
        run_btbridged(bus_address, timeout=0.3) as bt,
        run_bridge(bus_address, reject_unknown=False),
    ):
        other = await bt.transact(0x0A, 0x44)
        assert other.cc == 0xCE  # btbridged's own timeout answer: we sent nothing
        assert (await bt.transact(*GET_FLAGS)).cc == 0


async def test_all_ten_commands_end_to_end(bus_address: str) -> None:
    """Every command reaches hiomapd with the right method and arguments, and
    the host gets the seed's bytes back."""
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address),
    ):
        cases = [
            (Command.RESET, b"", ("Protocol", "Reset", ()), b""),
            (
                Command.GET_INFO,
                b"\x02",
                ("Protocol", "GetInfo", (2,)),
                b"\x02\x0c\x1e\x00",
            ),
            (
                Command.GET_FLASH_INFO,
                b"",
                ("V2", "GetFlashInfo", ()),
                b"\x00\x40\x01\x00",
            ),
            (
                Command.CREATE_READ_WINDOW,
                b"\x20\x00\x10\x00",
                ("V2", "CreateReadWindow", (0x20, 0x10)),
                b"\xfe\x0f\x10\x00\x20\x00",
            ),
            (Command.CLOSE_WINDOW, b"\x01", ("V2", "CloseWindow", (1,)), b""),
            (
                Command.CREATE_WRITE_WINDOW,
                b"\x22\x00\x08\x00",
                ("V2", "CreateWriteWindow", (0x22, 0x08)),
                b"\xf0\x0f\x08\x00\x22\x00",
            ),
            (Command.MARK_DIRTY, b"\x01\x00\x02\x00", ("V2", "MarkDirty", (1, 2)), b""),
            (Command.FLUSH, b"", ("V2", "Flush", ()), b""),
            (Command.ACK, b"\x03", ("V2", "Ack", (3,)), b""),
            (Command.ERASE, b"\x03\x00\x01\x00", ("V2", "Erase", (3, 1)), b""),
        ]
        for seq, (command, args, (iface, member, dbus_args), payload) in enumerate(
            cases, start=1
        ):
            response = await bt.transact(*HIOMAP, pack_request(command, seq, args))
            assert response.cc == 0, command
            assert response.data == bytes([command, seq]) + payload
            got_iface, got_member, got_args = hiomapd.calls[-1]
            want_iface = IFACE_V2 if iface == "V2" else IFACE_PROTOCOL
            assert got_iface == want_iface, command
            assert (got_member, got_args) == (member, dbus_args)


async def test_hiomapd_errors_map_to_completion_codes(bus_address: str) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address),
    ):
        for seq, (name, cc) in enumerate(
            [
                ("System.Error.EBUSY", 0xC0),
                ("org.freedesktop.DBus.Error.AccessDenied", 0xD4),
                ("org.freedesktop.DBus.Error.InvalidArgs", 0xC9),
                ("org.freedesktop.DBus.Error.Timeout", 0xC3),
                ("System.Error.ENOSPC", 0xC4),
                ("org.freedesktop.DBus.Error.NotSupported", 0xC1),
                ("com.example.Whatever", 0xFF),
            ],
            start=1,
        ):
            hiomapd.replies["Flush"] = error(name)
            response = await bt.transact(*HIOMAP, pack_request(Command.FLUSH, seq))
            assert (response.cc, response.data) == (cc, b""), name


async def test_wrong_reply_signature_answers_ff(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address),
    ):
        hiomapd.replies["GetFlashInfo"] = ("qqq", (1, 2, 3))
        response = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 1))
        assert (response.cc, response.data) == (0xFF, b"")
        assert "unexpected reply" in caplog.text


async def test_hung_hiomapd_times_out_and_messaging_still_answered(
    bus_address: str,
) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=0.5),
    ):
        hiomapd.replies["Flush"] = HANG
        async with trio.open_nursery() as nursery:
            result: list[Response] = []

            async def hung() -> None:
                result.append(
                    await bt.transact(*HIOMAP, pack_request(Command.FLUSH, 1))
                )

            nursery.start_soon(hung)
            await hiomapd.wait_calls(1)
            # hiomapd holds the HIOMAP worker; messaging must not wait for it
            flags = await bt.transact(*GET_FLAGS)
            assert flags.cc == 0 and not result
        hung_response = result[0]
        assert hung_response.cc == 0xC3
        # the next request is served
        hiomapd.replies["Flush"] = ("", ())
        response = await bt.transact(*HIOMAP, pack_request(Command.FLUSH, 2))
        assert (response.cc, response.data) == (0, bytes([Command.FLUSH, 2]))


async def test_hiomap_requests_reach_hiomapd_one_at_a_time(bus_address: str) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=5),
    ):
        hiomapd.replies["Flush"] = HANG
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bt.transact, *HIOMAP, pack_request(Command.FLUSH, 1))
            await hiomapd.wait_calls(1)
            nursery.start_soon(
                bt.transact, *HIOMAP, pack_request(Command.ERASE, 2, b"\0\0\1\0")
            )
            await bt.wait_until(lambda: len(bt.outstanding) == 2)
            await trio.testing.wait_all_tasks_blocked()
            assert [c[1] for c in hiomapd.calls] == ["Flush"]  # Erase waits its turn
            nursery.cancel_scope.cancel()


async def test_event_reaches_host_through_sms_atn(bus_address: str) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        # start-up: GetAll gave 0x81 and the host was told
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*GET_FLAGS)).data == b"\x02"
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)
        await running.bridge.queue.wait_all_delivered()
        assert (await bt.transact(*GET_FLAGS)).data == b"\x00"
        # a change: the host hears about it
        await hiomapd.emit(
            {"ProtocolReset": ("b", False), "FlashControlLost": ("b", True)}
        )
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0xC0)


async def test_bad_properties_ignored_and_logged(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        await bt.wait_attention()
        await bt.transact(*READ_EVENT)
        await hiomapd.emit(
            {
                "DaemonReady": ("s", "yes"),
                "Bogus": ("b", True),
                "WindowReset": ("b", True),
            }
        )
        await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x83)
        assert running.bridge.events == 0x83
        assert "DaemonReady" in caplog.text and "Bogus" in caplog.text


async def test_forged_signals_from_a_third_connection_are_ignored(
    bus_address: str,
) -> None:
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
        connect(bus_address) as forger,
    ):
        await drain_startup(bt, running)
        calls_before = len(hiomapd.calls)
        answered: list[object] = []

        async def record(msg: object) -> None:
            answered.append(msg)

        forger.export(HOSTIPMI_PATH, record)
        await forger.send(
            new_signal(
                DBusAddress(HOSTIPMI_PATH, interface=HOSTIPMI_IFACE),
                "ReceivedMessage",
                "yyyyay",
                (7, 0x3A, 0, 0x5A, pack_request(Command.RESET, 1)),
            )
        )
        await forger.send(
            new_signal(
                DBusAddress(HIOMAPD_PATH, interface="org.freedesktop.DBus.Properties"),
                "PropertiesChanged",
                "sa{sv}as",
                (IFACE_V2, {"DaemonReady": ("b", False)}, []),
            )
        )
        await settle(running, bus_address)
        await trio.testing.wait_all_tasks_blocked()
        assert running.bridge.forged.count == 2
        assert answered == []  # no sendMessage to the forger
        assert len(hiomapd.calls) == calls_before  # nothing reached hiomapd
        assert not running.bridge.queue.waiting  # nothing reached the host
        assert running.bridge.events == 0x81


async def test_hiomapd_vanishing_tells_host_protocol_reset(bus_address: str) -> None:
    async with (
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        async with scripted_hiomapd(bus_address):
            await bt.wait_attention()
            assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)
        # the connection is gone without a word: a crash
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x01)
        assert running.bridge.hiomapd.owner is None
        # and it comes back: GetAll again
        async with scripted_hiomapd(bus_address):
            with trio.fail_after(5):
                await bt.wait_attention()
            assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)


async def test_shutdown_waits_for_real_delivery(bus_address: str) -> None:
    async with (
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, shutdown_timeout=30) as running,
    ):
        hold = bt.hold(lambda tx: tx.cmd == 0x35)
        running.signal(signal.SIGTERM)
        with trio.fail_after(5):
            await bt.wait_attention()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bt.transact, *READ_EVENT)
            await hold.wait_held()
            await trio.testing.wait_all_tasks_blocked()
            assert not running.done.is_set()  # dequeued is not delivered
            hold.release()
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert running.bridge.queue.last_delivered == 0x01


async def test_shutdown_gives_up_after_deadline(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, shutdown_timeout=0.3) as running,
    ):
        running.signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await running.wait() == 0
        assert bt.attention_count >= 1
        assert "did not fetch event 0x01 (PROTOCOL_RESET)" in caplog.text


async def test_second_sigint_leaves_at_once(bus_address: str) -> None:
    async with (
        run_btbridged(bus_address),
        run_bridge(bus_address, shutdown_timeout=30) as running,
    ):
        running.signal(signal.SIGTERM)
        running.signal(signal.SIGTERM)  # repeated: shutdown goes on
        await trio.testing.wait_all_tasks_blocked()
        assert not running.done.is_set()
        running.signal(signal.SIGINT)
        with trio.fail_after(5):
            assert await running.wait() == 130
