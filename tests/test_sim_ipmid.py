"""The fake ipmid on a real private bus: execute, channels, host events, faults."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from jeepney import DBusAddress, HeaderFields, Message, new_method_call

from hiomapbridge.dbus import Bus, DBusError, open_bus
from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    HEARTBEAT_RECORD,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    NETFN_APP,
    sel_record,
)
from hiomapbridge.sim.ipmid import (
    CHANNEL_PREFIX,
    DEVICE_ID,
    INTERFACE,
    PATH,
    SERVICE,
    FakeIpmid,
)

LIMIT = 5.0
IPMID = DBusAddress(PATH, bus_name=SERVICE, interface=INTERFACE)
SMS = CHANNEL_PREFIX + ".SMS"
Reply = tuple[int, int, int, int, bytes]


async def execute(
    bus: Bus,
    netfn: int,
    cmd: int,
    data: bytes = b"",
    lun: int = 0,
    options: dict[str, tuple[str, Any]] | None = None,
) -> Reply:
    msg = new_method_call(
        IPMID, "execute", "yyyaya{sv}", (netfn, lun, cmd, data, options or {})
    )
    with trio.fail_after(LIMIT):
        reply = await bus.call(msg)
    assert reply.header.fields[HeaderFields.signature] == "yyyyay"
    netfn_r, lun_r, cmd_r, cc, payload = reply.body
    return netfn_r, lun_r, cmd_r, cc, bytes(payload)


async def own(bus: Bus, name: str) -> None:
    reply = await bus.bus_call("RequestName", "su", name, 4)  # DO_NOT_QUEUE
    assert reply.body[0] == 1


class StubHostIpmi:
    """``org.openbmc.HostIpmi``'s setAttention, counting calls."""

    def __init__(self, bus: Bus, error: str | None = None) -> None:
        self.bus = bus
        self.error = error
        self.calls = 0
        bus.export(HOSTIPMI_PATH, self._handle)

    async def _handle(self, msg: Message) -> None:
        assert msg.header.fields[HeaderFields.member] == "setAttention"
        self.calls += 1
        if self.error is not None:
            await self.bus.reply_error(msg, self.error, "refused")
        else:
            await self.bus.reply(msg, "x", 0)


@asynccontextmanager
async def bench(
    bus_address: str, **options: Any
) -> AsyncIterator[tuple[FakeIpmid, Bus, Bus, trio.Nursery]]:
    """ipmid, a caller owning Channel.SMS (the bridge) and one owning nothing."""
    async with (
        open_bus(bus_address) as ipmid_bus,
        open_bus(bus_address) as bridge,
        open_bus(bus_address) as other,
        trio.open_nursery() as nursery,
    ):
        await own(bridge, SMS)  # before ipmid starts: found by ListNames
        ipmid = FakeIpmid(**options)
        await nursery.start(ipmid.serve, ipmid_bus)
        yield ipmid, bridge, other, nursery
        nursery.cancel_scope.cancel()


async def test_execute_canned_answers(bus_address: str) -> None:
    async with bench(bus_address) as (ipmid, bridge, _other, _):
        assert await execute(bridge, NETFN_APP, 0x01, lun=2) == (
            NETFN_APP | 1, 2, 0x01, 0, DEVICE_ID,
        )  # fmt: skip
        assert len(DEVICE_ID) == 15
        assert await execute(bridge, 0x00, 0x02, b"\x02") == (0x01, 0, 0x02, 0, b"")
        assert ipmid.chassis_controls == [2]
        assert (await execute(bridge, 0x00, 0x02))[3] == 0xC7  # no control byte
        assert (await execute(bridge, 0x0A, 0x99))[3] == 0xC1
        ipmid.set_answer(0x0A, 0x99, 0x00, b"\x12\x34")
        assert await execute(bridge, 0x0A, 0x99) == (0x0B, 0, 0x99, 0, b"\x12\x34")
        ipmid.set_answer(0x2C, 0x01, handler=lambda call: (0xCC, call.data[::-1]))
        assert await execute(bridge, 0x2C, 0x01, b"\x01\x02") == (
            0x2D, 0, 0x01, 0xCC, b"\x02\x01",
        )  # fmt: skip
        await execute(bridge, NETFN_APP, 0x01, options={"rqSA": ("i", 0x20)})
        last = ipmid.calls[-1]
        assert last.options == {"rqSA": 0x20}
        assert last.sender == bridge.unique_name
        assert last.outcome == "answered" and last.cc == 0
        assert len(ipmid.calls) == 7


async def test_channel_from_caller(bus_address: str) -> None:
    channels = {"INTRABMC": 8, "SMS": 15, "eth0": 1}
    async with (
        bench(bus_address, channels=channels) as (ipmid, bridge, other, _),
        open_bus(bus_address) as lan,
    ):
        await execute(bridge, NETFN_APP, 0x01)
        await execute(other, NETFN_APP, 0x01)
        # Owned after ipmid started: the NameOwnerChanged reaches ipmid
        # before our call does, so the very first call is on channel 1.
        await own(lan, CHANNEL_PREFIX + ".eth0")
        await execute(lan, NETFN_APP, 0x01)
        assert [c.channel for c in ipmid.calls] == [15, 8, 1]
        assert [c.sender for c in ipmid.calls] == [
            bridge.unique_name, other.unique_name, lan.unique_name,
        ]  # fmt: skip
        # A name the channel table does not know: still INTRABMC.
        await own(other, CHANNEL_PREFIX + ".ipmi_kcs3")
        await execute(other, NETFN_APP, 0x01)
        assert ipmid.calls[-1].channel == 8
        # Losing the name loses the channel.
        await lan.bus_call("ReleaseName", "s", CHANNEL_PREFIX + ".eth0")
        await execute(lan, NETFN_APP, 0x01)
        assert ipmid.calls[-1].channel == 8
        # Read Event Message Buffer: system interface only.
        rd = (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        assert (await execute(other, *rd))[3] == 0xC1
        assert await execute(bridge, *rd) == (0x07, 0, 0x35, 0, HEARTBEAT_RECORD)
        # Without INTRABMC in the table an unmapped caller has no channel.
        del ipmid.channels["INTRABMC"]
        assert (await execute(other, NETFN_APP, 0x01))[3] == 0xD3
        assert ipmid.calls[-1].channel is None


async def test_host_events_and_set_attention(bus_address: str) -> None:
    async with bench(bus_address) as (ipmid, bridge, _other, _):
        stub = StubHostIpmi(bridge)
        await own(bridge, HOSTIPMI_SERVICE)
        soft_off = ipmid.soft_off()
        with trio.fail_after(LIMIT):
            await ipmid.wait_attentions(1)
        assert ipmid.attentions[0].outcome == "ok" and stub.calls == 1
        heartbeat = ipmid.heartbeat()  # queued behind: no second SMS_ATN yet
        assert ipmid.events_waiting == 2 and len(ipmid.attentions) == 1
        # Upstream Get Message Flags says nothing is waiting.
        flags = await execute(bridge, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        assert flags[3:] == (0, b"\x00")
        rd = (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        assert (await execute(bridge, *rd))[4] == sel_record(0x04, 0x00)
        assert soft_off.outcome == "delivered"
        # SMS_ATN was re-asserted for the heartbeat before that reply came.
        assert stub.calls == 2 and ipmid.attentions[1].outcome == "ok"
        assert (await execute(bridge, *rd))[4] == sel_record(0xFF, 0x00)
        assert heartbeat.outcome == "delivered" and ipmid.events_waiting == 0
        assert (await execute(bridge, *rd))[4] == HEARTBEAT_RECORD  # empty queue
        assert stub.calls == 2


async def test_message_flags_from_queue(bus_address: str) -> None:
    async with bench(bus_address, message_flags="queue") as (ipmid, bridge, _o, _):
        StubHostIpmi(bridge)
        await own(bridge, HOSTIPMI_SERVICE)
        flags = (NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        assert (await execute(bridge, *flags))[4] == b"\x00"
        ipmid.soft_off()
        assert (await execute(bridge, *flags))[4] == b"\x02"


async def test_set_attention_failures_recorded(bus_address: str) -> None:
    async with bench(bus_address, ack_timeout=None) as (ipmid, bridge, _other, _):
        ipmid.soft_off()  # nobody owns org.openbmc.HostIpmi
        with trio.fail_after(LIMIT):
            await ipmid.wait_attentions(1)
        unknown = "org.freedesktop.DBus.Error.ServiceUnknown"
        assert ipmid.attentions[0].outcome == unknown
        StubHostIpmi(bridge, error="org.openbmc.error")
        await own(bridge, HOSTIPMI_SERVICE)
        rd = (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        ipmid.heartbeat()  # second in the queue: re-asserted after the read
        assert (await execute(bridge, *rd))[4] == sel_record(0x04, 0x00)
        assert ipmid.attentions[1].outcome == "org.openbmc.error"


async def test_ack_timeout_drops_the_queue(bus_address: str) -> None:
    async with bench(bus_address, ack_timeout=0.1) as (ipmid, bridge, _other, _):
        StubHostIpmi(bridge)
        await own(bridge, HOSTIPMI_SERVICE)
        first, second = ipmid.soft_off(), ipmid.heartbeat()
        with trio.fail_after(LIMIT):
            await ipmid.wait_until(lambda: ipmid.events_waiting == 0)
        assert (first.outcome, second.outcome) == ("timed_out", "timed_out")
        rd = (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        assert (await execute(bridge, *rd))[4] == HEARTBEAT_RECORD


async def test_faults(bus_address: str) -> None:
    async with bench(bus_address) as (ipmid, bridge, _other, nursery):
        wedge = ipmid.wedge(netfn=NETFN_APP, cmd=0x01)
        results: list[Reply] = []

        async def wedged() -> None:
            results.append(await execute(bridge, NETFN_APP, 0x01))

        nursery.start_soon(wedged)
        with trio.fail_after(LIMIT):
            await ipmid.wait_until(lambda: bool(wedge.matched))
        assert ipmid.calls[0].outcome == "wedged"
        # Only matching calls, and only once: the next ones are answered.
        assert (await execute(bridge, 0x0A, 0x99))[3] == 0xC1
        assert (await execute(bridge, NETFN_APP, 0x01))[3] == 0
        assert results == []  # the wedged call is still unanswered

        ipmid.delay(0.1)
        start = trio.current_time()
        assert (await execute(bridge, NETFN_APP, 0x01))[3] == 0
        assert trio.current_time() - start >= 0.1

        ipmid.fail(name="org.example.Broken", text="nope")
        with pytest.raises(DBusError) as err:
            await execute(bridge, NETFN_APP, 0x01)
        assert err.value.name == "org.example.Broken"
        assert ipmid.calls[-1].outcome == "error"
        ipmid.calls.clear()

        ipmid.bad_reply()
        msg = new_method_call(
            IPMID, "execute", "yyyaya{sv}", (NETFN_APP, 0, 0x01, b"", {})
        )
        with trio.fail_after(LIMIT):
            reply = await bridge.call(msg)
        assert reply.header.fields[HeaderFields.signature] == "yyyy"
        assert reply.body == (NETFN_APP | 1, 0, 0x01, 0)
        assert [c.outcome for c in ipmid.calls] == ["bad_reply"]
        with pytest.raises(ValueError):
            ipmid.bad_reply(signature="s")
        ipmid.bad_reply(signature="s", body=("junk",))
        with trio.fail_after(LIMIT):
            reply = await bridge.call(msg)
        assert reply.body == ("junk",)


async def test_wrong_execute_signature(bus_address: str) -> None:
    async with bench(bus_address) as (ipmid, bridge, _other, _):
        msg = new_method_call(IPMID, "execute", "yyyay", (6, 0, 1, b""))
        with pytest.raises(DBusError) as err, trio.fail_after(LIMIT):
            await bridge.call(msg)
        assert err.value.name == "org.freedesktop.DBus.Error.InvalidArgs"
        assert ipmid.calls == []


async def test_absent_then_stopped_then_restarted(bus_address: str) -> None:
    async with open_bus(bus_address) as ipmid_bus, open_bus(bus_address) as bridge:
        with pytest.raises(DBusError) as err:
            await execute(bridge, NETFN_APP, 0x01)  # never started
        assert err.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
        ipmid = FakeIpmid()
        async with trio.open_nursery() as nursery:
            await nursery.start(ipmid.serve, ipmid_bus)
            assert (await execute(bridge, NETFN_APP, 0x01))[3] == 0
            with trio.fail_after(LIMIT):
                await ipmid.stop()
        with pytest.raises(DBusError) as err:
            await execute(bridge, NETFN_APP, 0x01)
        assert err.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
        async with trio.open_nursery() as nursery:
            await nursery.start(ipmid.serve, ipmid_bus)  # an ipmid restart
            assert (await execute(bridge, NETFN_APP, 0x01))[3] == 0
            nursery.cancel_scope.cancel()
        assert len(ipmid.calls) == 2


def test_queue_event_needs_serve() -> None:
    with pytest.raises(RuntimeError):
        FakeIpmid().soft_off()


async def test_cli(bus_address: str) -> None:
    """``hiomapbridge-sim ipmid`` prints a JSON line per call and SMS_ATN."""
    async with open_bus(bus_address) as bridge:
        stub = StubHostIpmi(bridge)
        await own(bridge, HOSTIPMI_SERVICE)
        await own(bridge, CHANNEL_PREFIX + ".eth0")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hiomapbridge.sim", "ipmid", "--bus", bus_address,
             "--channel", "eth0=1", "--soft-off-after", "0"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        stdout = proc.stdout
        assert stdout is not None
        buffer = b""

        async def next_line() -> dict[str, Any]:
            nonlocal buffer
            while b"\n" not in buffer:
                chunk = await stdout.receive_some()
                assert chunk, "ipmid exited"
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            row: dict[str, Any] = json.loads(line)
            return row

        try:
            with trio.fail_after(LIMIT):
                row = await next_line()
                assert (row["kind"], row["outcome"]) == ("setAttention", "ok")
                assert stub.calls == 1
                await execute(bridge, NETFN_APP, 0x01)
                row = await next_line()
            assert row["kind"] == "execute" and row["sender"] == bridge.unique_name
            assert row["channel"] == 1 and row["cc"] == 0
            assert row["response"] == DEVICE_ID.hex()
        finally:
            proc.terminate()
            with trio.fail_after(LIMIT):
                assert await proc.wait() == 0
