"""``--host bt:PATH`` over the unix-socket seam: the bridge owns the BT
interface, answers what it owns, forwards the rest to ipmid, and merges
ipmid's events with its own.  Real private dbus-daemon, the host simulator
speaking raw BT frames, a fake ipmid, the hiomapd emulator; the bridge runs
in-process so that its counters can be read (tests/test_bt_daemon.py runs
it as a subprocess)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from jeepney import DBusAddress, new_method_call

from hiomapbridge import bt
from hiomapbridge.dbus import DBusError
from hiomapbridge.forward import MAX_IN_FLIGHT
from hiomapbridge.hiomap import Command, pack_request
from hiomapbridge.ipmi import (
    CMD_GET_BT_CAPABILITIES,
    HOSTIPMI_IFACE,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    NETFN_APP,
    event_record,
    parse_event_record,
)
from hiomapbridge.link_bt import RECONNECT_INTERVAL, BtLink
from hiomapbridge.sim.ipmid import CMD_GET_DEVICE_ID, DEVICE_ID, SEL_CMD_POWER

from .bridgeutil import GET_FLAGS, HIOMAP, READ_EVENT, connect, run_bridge, settle
from .btutil import bt_host, bt_stack, fake_ipmid, socket_dir

GET_DEVICE_ID = (NETFN_APP, CMD_GET_DEVICE_ID)
GET_CAPS = (NETFN_APP, CMD_GET_BT_CAPABILITIES)
CHASSIS_CONTROL = (0x00, 0x02)


async def test_forwarded_commands_get_ipmid_s_bytes_on_the_system_channel(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path) as s:
        assert s.ipmid is not None
        with trio.fail_after(10):
            resp = await s.host.transact(*GET_DEVICE_ID, lun=2)
            assert (resp.cc, resp.data) == (0, DEVICE_ID)
            assert (resp.netfn, resp.lun, resp.cmd) == (0x07, 2, CMD_GET_DEVICE_ID)
            resp = await s.host.transact(*CHASSIS_CONTROL, b"\x00")
            assert resp.cc == 0
        assert s.ipmid.chassis_controls == [0]
        call = s.ipmid.calls[0]
        assert (call.netfn, call.lun, call.cmd, call.data) == (0x06, 2, 0x01, b"")
        assert call.channel == 0x0F  # the bridge owns Ipmi.Channel.SMS
        assert call.options == {}
        assert call.sender == s.bridge.bridge.bus.unique_name
        assert s.host.violations == []


async def test_capabilities_are_answered_by_the_bridge(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path, bt_transaction_time=7) as s:
        with trio.fail_after(10):
            resp = await s.host.transact(*GET_CAPS)
        assert (resp.cc, resp.data) == (0, bytes([1, 0x3F, 0x3F, 7, 1]))
        assert s.ipmid is not None and s.ipmid.calls == []  # not forwarded


async def test_forwarding_failures(bus_address: str, tmp_path: Path) -> None:
    """Error reply and wrong signature: 0xFF; no reply within the deadline:
    0xC3; each logged and counted."""
    async with bt_stack(bus_address, tmp_path, ipmid_timeout=0.5) as s:
        assert s.ipmid is not None
        failures = s.bridge.bridge.forwarder
        assert failures is not None
        with trio.fail_after(10):
            s.ipmid.fail(*GET_DEVICE_ID)
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0xFF
            s.ipmid.bad_reply(*GET_DEVICE_ID)
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0xFF
            s.ipmid.wedge(*GET_DEVICE_ID)
            started = trio.current_time()
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0xC3
            assert trio.current_time() - started >= 0.5
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0  # recovered
        assert failures.failures.count == 3


async def test_absent_ipmid_answers_destination_unavailable(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path, with_ipmid=False) as s:
        with trio.fail_after(10):
            resp = await s.host.transact(*GET_DEVICE_ID)
            assert resp.cc == 0xD3
            # With nothing waiting, Read Event goes to ipmid too: 0xD3.
            assert (await s.host.transact(*READ_EVENT)).cc == 0xD3
            # HIOMAP does not need ipmid.
            info = await s.host.transact(
                *HIOMAP, pack_request(Command.GET_INFO, 1, b"\x02")
            )
            assert info.cc == 0


async def test_a_wedged_ipmid_never_holds_up_hiomap_and_vice_versa(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path, ipmid_timeout=1.0) as s:
        assert s.ipmid is not None
        s.ipmid.wedge(*GET_DEVICE_ID)
        s.hiomapd.set_fault("hang", "GetFlashInfo", 1)
        results: dict[str, tuple[int, float]] = {}

        async def ask(what: str, netfn: int, cmd: int, data: bytes = b"") -> None:
            resp = await s.host.transact(netfn, cmd, data)
            results[what] = (resp.cc, trio.current_time())

        with trio.fail_after(10):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "wedged", *GET_DEVICE_ID)
                nursery.start_soon(
                    ask, "hung", *HIOMAP, pack_request(Command.GET_FLASH_INFO, 1)
                )
                await s.host.wait_until(lambda: len(s.host.outstanding) == 2)
                # Both are pending (the seam is ordered: the bridge reads
                # them before what follows); each kind still flows past the
                # other, while neither has been answered.
                await ask("flags", *GET_FLAGS)
                await ask("caps", *GET_CAPS)
                await ask("chassis", *CHASSIS_CONTROL, b"\x01")
                assert "wedged" not in results and "hung" not in results
        assert results["flags"][0] == results["caps"][0] == results["chassis"][0] == 0
        assert results["wedged"][0] == 0xC3
        assert results["hung"][0] == 0xC3  # hiomapd's deadline (2.5 s default)
        assert results["wedged"][1] - started >= 1.0  # --ipmid-timeout


async def test_merged_events_bridge_first_then_ipmid(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path) as s:
        assert s.ipmid is not None
        with trio.fail_after(10):
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x00"
            await s.hiomapd.force_window_reset()  # the bridge's event: 0x83
            await s.host.wait_attention()
            s.ipmid.soft_off()  # ipmid's event: setAttention on the bridge
            await s.ipmid.wait_until(lambda: bool(s.ipmid and s.ipmid.attentions))
            await s.ipmid.wait_until(
                lambda: s.ipmid is not None and s.ipmid.attentions[-1].outcome == "ok"
            )
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x02"
            # Consume ipmid's SMS_ATN (its 0xB1 came before that answer).
            assert s.host.attention_pending
            await s.host.wait_attention()
            first = await s.host.transact(*READ_EVENT)
            assert first.data == event_record(0x83)  # 0x81 never ACKed, + WINDOW_RESET
            assert s.ipmid.events_waiting == 1
            # ipmid's event still waits: flags say so, and SMS_ATN comes again
            # (skiboot reads one record per SMS_ATN).
            await s.host.wait_attention()
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x02"
            second = await s.host.transact(*READ_EVENT)
            assert parse_event_record(second.data) == (SEL_CMD_POWER, 0x00)
            assert s.ipmid.events_waiting == 0
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x00"
            # Nothing waits on either side: Read Event goes to ipmid, which
            # answers a heartbeat; the bridge's queue is untouched.
            third = await s.host.transact(*READ_EVENT)
            assert parse_event_record(third.data) == (0xFF, 0)
        assert s.host.violations == []
        read_events = [c for c in s.ipmid.calls if c.cmd == 0x35]
        assert len(read_events) == 2  # the HIOMAP record never went to ipmid


async def test_set_attention_during_a_forwarded_read_keeps_ipmid_s_event(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path) as s:
        ipmid = s.ipmid
        forwarder = s.bridge.bridge.forwarder
        assert ipmid is not None and forwarder is not None
        with trio.fail_after(10):
            ipmid.soft_off()
            await s.host.wait_attention()
            assert forwarder.event_waiting
            ipmid.delay(1.0, *READ_EVENT)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.host.transact, *READ_EVENT)
                await ipmid.wait_until(lambda: any(c.cmd == 0x35 for c in ipmid.calls))
                # A new setAttention while that call is in flight ...
                ipmid.heartbeat()
                await ipmid.wait_until(lambda: len(ipmid.attentions) == 2)
                await ipmid.wait_until(lambda: ipmid.attentions[-1].outcome == "ok")
            # ... keeps ipmid's event waiting after the in-flight read returns.
            assert forwarder.event_waiting
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x02"


async def test_set_attention_is_served_to_ipmid_alone(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path) as s, connect(bus_address) as other:
        forwarder = s.bridge.bridge.forwarder
        assert forwarder is not None
        address = DBusAddress(
            HOSTIPMI_PATH, bus_name=HOSTIPMI_SERVICE, interface=HOSTIPMI_IFACE
        )
        with trio.fail_after(10):
            with pytest.raises(DBusError) as denied:
                await other.call(new_method_call(address, "setAttention"))
            assert denied.value.name == "org.freedesktop.DBus.Error.AccessDenied"
            with pytest.raises(DBusError) as unknown:
                await other.call(
                    new_method_call(
                        address, "sendMessage", "yyyyyay", (0, 7, 0, 1, 0, b"")
                    )
                )
            assert unknown.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
        assert forwarder.refused.count == 1
        assert not forwarder.event_waiting
        with trio.fail_after(10):  # a 0xB1 sent by mistake would precede this
            assert (await s.host.transact(*GET_FLAGS)).data == b"\x00"
        assert s.host.attention_count == 1  # only the start-up event's


async def test_bad_frames_are_answered_or_dropped_never_fatal(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(bus_address, tmp_path) as s:
        assert s.ipmid is not None
        link = s.bridge.bridge.link
        assert isinstance(link, BtLink)
        with trio.fail_after(10):
            await s.host.send_raw(b"\x02\x18\x09")  # too short: dropped
            # Length byte says 9, the frame has 5 bytes: cc 0xC7, header echoed.
            await s.host.send_raw(bytes([9, 0x06 << 2 | 1, 0x55, 0x01, 0xAA]))
            answer = await s.host.wait_raw()
            assert (answer.cc, answer.seq, answer.netfn, answer.lun, answer.cmd) == (
                0xC7,
                0x55,
                0x07,
                1,
                0x01,
            )
            # A response that does not fit the FIFO becomes 0xCA.
            s.ipmid.set_answer(0x0A, 0x23, 0, bytes(bt.MAX_RESPONSE_DATA + 1))
            assert (await s.host.transact(0x0A, 0x23)).cc == 0xCA
            s.ipmid.set_answer(0x0A, 0x24, 0, bytes(bt.MAX_RESPONSE_DATA))
            fits = await s.host.transact(0x0A, 0x24)
            assert (fits.cc, len(fits.data)) == (0, bt.MAX_RESPONSE_DATA)
            # Still serving.
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0
        assert s.bridge.bridge.oversized.count == 1
        assert link.dropped.count == 2
        assert s.host.violations == []


async def test_host_reconnect_re_announces_a_waiting_event(
    bus_address: str, tmp_path: Path
) -> None:
    # A long re-assertion interval: only the reconnect can announce it.
    async with bt_stack(bus_address, tmp_path, atn_interval=60) as s:
        with trio.fail_after(10):
            await s.host.disconnect()  # the host powered off
            # An event while it is away (the bridge waits 0.5 s before it
            # reconnects: the post lands first, by a wide margin).
            await s.hiomapd.force_window_reset()
            await settle(s.bridge, bus_address)  # the bridge has the signal
            assert s.host.connections == 1
            assert s.bridge.bridge.queue.waiting
            await s.host.wait_until(lambda: s.host.connections == 2)
            await s.host.wait_attention()  # announced again on the new link
            resp = await s.host.transact(*READ_EVENT)
            assert resp.data == event_record(0x83)
            await s.bridge.bridge.queue.wait_all_delivered()
        assert s.host.violations == []


async def test_ready_before_the_host_socket_exists(
    bus_address: str, tmp_path: Path
) -> None:
    """READY=1 does not wait for the host; the bridge keeps trying to
    connect and serves the host once it is there."""
    path = socket_dir() / "late.sock"
    async with (
        fake_ipmid(bus_address),
        run_bridge(bus_address, host=f"bt:{path}") as running,
    ):
        assert not path.exists()  # run_bridge returned: the bridge is ready
        with trio.fail_after(10):
            async with bt_host(path) as host:
                await host.wait_connected()
                resp = await host.transact(*GET_CAPS)
                assert resp.cc == 0
        assert running.bridge.link.peer().startswith("host socket")


async def test_forwarded_calls_in_flight_are_bounded(
    bus_address: str, tmp_path: Path
) -> None:
    """A wedged ipmid cannot make the bridge hold unbounded calls: past
    MAX_IN_FLIGHT waiting for ipmid, forwarded commands get NODE_BUSY."""
    async with bt_stack(bus_address, tmp_path, ipmid_timeout=1.0) as s:
        assert s.ipmid is not None
        s.ipmid.wedge(*GET_DEVICE_ID, count=None)
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await s.host.transact(*GET_DEVICE_ID)).cc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(MAX_IN_FLIGHT + 3):
                    nursery.start_soon(ask)
                await s.host.wait_until(lambda: len(answers) == 3)
                assert answers == [0xC0] * 3  # at once: nothing else answered
        assert sorted(answers) == [0xC0] * 3 + [0xC3] * MAX_IN_FLIGHT
        forwarder = s.bridge.bridge.forwarder
        assert forwarder is not None and forwarder.in_flight == 0


async def test_a_host_that_hangs_up_at_once_is_retried_at_the_interval(
    bus_address: str,
) -> None:
    """A peer that accepts and closes straight away costs one attempt per
    RECONNECT_INTERVAL, not a busy loop."""
    path = socket_dir() / "flappy.sock"
    accepted = 0
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await listener.bind(str(path))
    listener.listen(8)
    async with fake_ipmid(bus_address), run_bridge(bus_address, host=f"bt:{path}"):
        with trio.move_on_after(4 * RECONNECT_INTERVAL):  # the observation window
            while True:
                sock, _ = await listener.accept()
                accepted += 1
                sock.close()
    listener.close()
    assert 1 <= accepted <= 6  # about 4; a busy loop would make thousands


async def test_ipmid_exiting_during_a_call_answers_destination_unavailable(
    bus_address: str, tmp_path: Path
) -> None:
    async with bt_stack(
        bus_address, tmp_path, with_ipmid=False, ipmid_timeout=2.0
    ) as s:
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await s.host.transact(*GET_DEVICE_ID)).cc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async with fake_ipmid(bus_address) as ipmid:
                    ipmid.wedge(*GET_DEVICE_ID)
                    nursery.start_soon(ask)
                    await ipmid.wait_until(lambda: len(ipmid.calls) == 1)
                    started = trio.current_time()
                # ipmid exited (its connection closed) with the call unanswered
            assert answers == [0xD3]
            assert trio.current_time() - started < 2.0  # not the deadline
            assert (await s.host.transact(*GET_DEVICE_ID)).cc == 0xD3  # gone


async def test_hiomap_requests_of_a_host_that_left_never_reach_hiomapd(
    bus_address: str, tmp_path: Path
) -> None:
    """A request queued behind one at hiomapd, from a host that then powered
    off, is dropped: a window command must not change hiomapd's state for a
    host that is gone."""
    async with bt_stack(bus_address, tmp_path, hiomapd_timeout=0.5) as s:
        s.hiomapd.set_fault("hang", "GetFlashInfo", 1)
        with trio.fail_after(10):
            first = pack_request(Command.GET_FLASH_INFO, 1)
            queued = pack_request(Command.CREATE_READ_WINDOW, 2, b"\0\0\1\0")
            await s.host.send_raw(bt.encode_request(0x3A, 0, 0x10, 0x5A, first))
            await s.host.send_raw(bt.encode_request(0x3A, 0, 0x11, 0x5A, queued))
            await settle(s.bridge, bus_address)  # GetFlashInfo is at hiomapd
            assert ("GetFlashInfo", ()) in s.hiomapd.calls
            await s.host.disconnect()
            await s.host.wait_until(lambda: s.host.connections == 2)
            # The bridge saw the hang-up at once; the hung call times out
            # after 0.5 s, and then the queued request's turn comes. A new
            # request from the new host goes through.
            info = await s.host.transact(
                *HIOMAP, pack_request(Command.GET_INFO, 3, b"\2")
            )
            assert info.cc == 0
        assert not any(member == "CreateReadWindow" for member, _ in s.hiomapd.calls)
