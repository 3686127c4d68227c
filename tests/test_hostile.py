"""Hostile bus clients and floods (issue 5): authentication, stray replies,
bounded backlogs, no silent loss, memory under a burst.

Complements test_bridge.py (which already shows that ReceivedMessage and
PropertiesChanged forged from a third connection are ignored and counted).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from jeepney import DBusAddress, HeaderFields, Message, MessageType, new_signal
from jeepney.low_level import Endianness, Header
from jeepney.low_level import Message as RawMessage

from hiomapbridge import bridge as bridge_mod
from hiomapbridge.bridge import HOSTIPMI_IFACE, HOSTIPMI_PATH, HOSTIPMI_SERVICE
from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.hiomap import HIOMAPD_PATH, IFACE_V2, Command, pack_request
from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.privatebus import SYSTEM_REPLY_POLICY, private_bus
from hiomapbridge.sim.process import python_command, run_service

from .bridgeutil import (
    GET_FLAGS,
    HIOMAP,
    READ_EVENT,
    connect,
    drain_startup,
    run_bridge,
    run_btbridged,
    settle,
)
from .scripted_hiomapd import HANG, scripted_hiomapd


def spy(bus: Bus) -> list[Message]:
    """Record every message the bridge's dispatch sees (wraps ``_dispatch``
    on this one instance; nothing else changes)."""
    seen: list[Message] = []
    original = bus._dispatch

    def recording(msg: Message) -> None:
        seen.append(msg)
        original(msg)

    bus._dispatch = recording  # type: ignore[method-assign]
    return seen


def received_message(
    seq: int, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
) -> Message:
    return new_signal(
        DBusAddress(HOSTIPMI_PATH, interface=HOSTIPMI_IFACE),
        "ReceivedMessage",
        "yyyyay",
        (seq, netfn, lun, cmd, data),
    )


def properties_changed(changed: dict[str, tuple[str, Any]]) -> Message:
    return new_signal(
        DBusAddress(HIOMAPD_PATH, interface="org.freedesktop.DBus.Properties"),
        "PropertiesChanged",
        "sa{sv}as",
        (IFACE_V2, changed, []),
    )


# -- authentication ---------------------------------------------------------------


async def test_bus_stamps_the_sender_a_forged_sender_field_is_overwritten(
    bus_address: str,
) -> None:
    """A client that writes btbridged's / hiomapd's unique name into the
    SENDER header field gains nothing: dbus-daemon overwrites the field with
    the true sender, so the bridge sees the forger and counts it."""
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
        connect(bus_address) as forger,
    ):
        await drain_startup(bt, running)
        seen = spy(running.bridge.bus)
        calls_before = len(hiomapd.calls)
        bt_name = running.bridge.btbridged.owner
        hiomapd_name = running.bridge.hiomapd.owner
        assert (
            bt_name
            and hiomapd_name
            and forger.unique_name
            not in (
                bt_name,
                hiomapd_name,
            )
        )
        request = received_message(9, *HIOMAP, pack_request(Command.RESET, 1))
        request.header.fields[HeaderFields.sender] = bt_name
        event = properties_changed({"DaemonReady": ("b", False)})
        event.header.fields[HeaderFields.sender] = hiomapd_name
        # also unicast, straight at the bridge
        direct = received_message(10, *GET_FLAGS)
        direct.header.fields[HeaderFields.sender] = bt_name
        direct.header.fields[HeaderFields.destination] = running.bridge.bus.unique_name
        for msg in (request, event, direct):
            await forger.send(msg)
        await settle(running, bus_address)
        await trio.testing.wait_all_tasks_blocked()
        forged = [
            m
            for m in seen
            if m.header.fields.get(HeaderFields.member)
            in ("ReceivedMessage", "PropertiesChanged")
        ]
        assert len(forged) == 3
        # the bus replaced the sender field: the bridge sees who really sent
        assert {m.header.fields[HeaderFields.sender] for m in forged} == {
            forger.unique_name
        }
        assert running.bridge.forged.count == 3
        assert len(hiomapd.calls) == calls_before
        assert not running.bridge.queue.waiting
        assert running.bridge.events == 0x81
        assert not [t for t in bt.transactions if t.seq in (9, 10)]


@pytest.fixture
def system_like_bus(tmp_path: Path) -> Iterator[str]:
    """A dbus-daemon with system.conf's rule for replies (unrequested
    method returns and errors are denied)."""
    with private_bus(tmp_path, SYSTEM_REPLY_POLICY, kind="system") as bus:
        yield bus.address


@attrs.define
class StrayOutcome:
    host_cc: int
    host_data: bytes
    reached_bridge: int
    refused: list[str]
    sprayed: int


async def _spray_stray_replies(address: str) -> StrayOutcome:
    """While the bridge waits on a hung hiomapd GetFlashInfo, a third
    connection sends a method return and an error for every reply_serial
    near the bridge's current one."""
    async with (
        scripted_hiomapd(address) as hiomapd,
        run_btbridged(address) as bt,
        run_bridge(address, hiomapd_timeout=1.0) as running,
        connect(address) as forger,
    ):
        await bt.wait_attention()
        await bt.transact(*READ_EVENT)
        hiomapd.replies["GetFlashInfo"] = HANG
        seen = spy(running.bridge.bus)
        target = running.bridge.bus.unique_name
        refused: list[str] = []
        original = forger._dispatch

        def catch(msg: Message) -> None:
            if msg.header.message_type == MessageType.error:
                refused.append(msg.header.fields.get(HeaderFields.error_name, ""))
            original(msg)

        forger._dispatch = catch  # type: ignore[method-assign]
        result: list[Any] = []
        sprayed = 0
        async with trio.open_nursery() as nursery:

            async def host() -> None:
                result.append(
                    await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 1))
                )

            nursery.start_soon(host)
            await hiomapd.wait_calls(1)
            serial = next(running.bridge.bus._conn.outgoing_serial)
            for guess in range(max(1, serial - 40), serial + 2):
                for kind in (MessageType.method_return, MessageType.error):
                    fields: dict[HeaderFields, Any] = {
                        HeaderFields.reply_serial: guess,
                        HeaderFields.destination: target,
                    }
                    if kind == MessageType.error:
                        fields[HeaderFields.error_name] = "System.Error.EBUSY"
                        fields[HeaderFields.signature] = "s"
                        body: tuple[Any, ...] = ("forged",)
                    else:
                        fields[HeaderFields.signature] = "qq"
                        body = (0x1234, 0x5678)
                    header = Header(Endianness.little, kind, 0, 1, 0, -1, fields)
                    await forger.send(RawMessage(header, body))
                    sprayed += 1
            await settle(running, address)
        reached = [
            m
            for m in seen
            if m.header.message_type in (MessageType.method_return, MessageType.error)
            and m.header.fields.get(HeaderFields.sender) == forger.unique_name
        ]
        # the bridge still serves afterwards
        hiomapd.replies["GetFlashInfo"] = ("qq", (0x4000, 1))
        after = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 2))
        assert (after.cc, after.data) == (0, b"\x03\x02\x00\x40\x01\x00")
        return StrayOutcome(
            result[0].cc, result[0].data, len(reached), refused, sprayed
        )


async def test_stray_replies_refused_by_a_system_bus(system_like_bus: str) -> None:
    """With system.conf's reply rule (the system bus the daemon runs on),
    dbus-daemon refuses every reply it did not see requested: none reaches
    the bridge, the forger gets AccessDenied, the host gets the deadline's
    0xC3 and the next request is served."""
    outcome = await _spray_stray_replies(system_like_bus)
    assert outcome.reached_bridge == 0
    assert outcome.host_cc == 0xC3
    assert len(outcome.refused) == outcome.sprayed
    assert set(outcome.refused) == {"org.freedesktop.DBus.Error.AccessDenied"}


async def test_stray_replies_ignored_even_on_a_permissive_bus(
    bus_address: str,
) -> None:
    """On a bus that lets unrequested replies through, every forged reply
    reaches the bridge's dispatch, and none is taken for hiomapd's: a reply
    is accepted only from the connection the call went to (or the bus)."""
    outcome = await _spray_stray_replies(bus_address)
    assert outcome.reached_bridge == outcome.sprayed > 0
    assert outcome.host_cc == 0xC3, outcome


async def test_former_btbridged_owner_is_a_stranger(bus_address: str) -> None:
    """Once another connection owns org.openbmc.HostIpmi, requests from the
    previous owner are forged; a request from the new owner is served."""
    async with (
        run_btbridged(bus_address) as old,
        run_bridge(bus_address) as running,
    ):
        assert (await old.transact(*GET_FLAGS)).cc == 0
        async with run_btbridged(bus_address) as new:  # REPLACE_EXISTING
            await new.wait_until(lambda: True)
            with trio.fail_after(5):
                while running.bridge.btbridged.owner != new._bus.unique_name:  # type: ignore[union-attr]
                    await settle(running, bus_address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_expect_cannot_respond, old)
                await old.wait_until(lambda: bool(old.outstanding))
                await settle(running, bus_address)
                await trio.testing.wait_all_tasks_blocked()
                assert running.bridge.forged.count == 1
                assert (await new.transact(*GET_FLAGS)).cc == 0
                nursery.cancel_scope.cancel()


async def _expect_cannot_respond(bt: Any) -> None:
    await bt.transact(*GET_FLAGS)


async def test_bad_signature_from_the_real_owner_is_rejected_and_counted(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Even the genuine btbridged / hiomapd cannot crash the bridge with a
    malformed signal: it is counted in ``rejected_signals`` and logged."""
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        await bt.wait_attention()
        await bt.transact(*READ_EVENT)
        assert bt._bus is not None
        bad = [
            new_signal(
                DBusAddress(HOSTIPMI_PATH, interface=HOSTIPMI_IFACE),
                "ReceivedMessage",
                "yyyy",
                (1, 0x3A, 0, 0x5A),
            ),
            new_signal(
                DBusAddress(HOSTIPMI_PATH, interface=HOSTIPMI_IFACE),
                "ReceivedMessage",
                "s",
                ("hello",),
            ),
        ]
        for msg in bad:
            await bt._bus.send(msg)
        await hiomapd.bus.send(
            new_signal(
                DBusAddress(HIOMAPD_PATH, interface="org.freedesktop.DBus.Properties"),
                "PropertiesChanged",
                "s",
                (IFACE_V2,),  # matches the bus-side arg0 rule, lacks the rest
            )
        )
        await settle(running, bus_address)
        assert running.bridge.rejected_signals.count == 3
        assert "bad signature" in caplog.text
        assert running.bridge.events == 0x81
        assert (await bt.transact(*GET_FLAGS)).cc == 0


# -- bounded backlogs: nothing lost silently -----------------------------------------


@attrs.define
class FloodPeer:
    """Owns org.openbmc.HostIpmi; answers every sendMessage and setAttention
    at once and records them."""

    bus: Bus
    responses: list[tuple[int, int, int, int, int, bytes]] = attrs.field(factory=list)
    attentions: int = 0
    _change: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, msg: Message) -> None:
        member = msg.header.fields.get(HeaderFields.member)
        if member == "sendMessage":
            seq, netfn, lun, cmd, cc, data = msg.body
            self.responses.append((seq, netfn, lun, cmd, cc, bytes(data)))
        elif member == "setAttention":
            self.attentions += 1
        self._change.set()
        self._change = trio.Event()
        await self.bus.reply(msg, "x", 0)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._change.wait()

    async def send(self, msg: Message) -> None:
        await self.bus.send(msg)


@asynccontextmanager
async def flood_peer(address: str) -> AsyncIterator[FloodPeer]:
    async with open_bus(address) as bus:
        peer = FloodPeer(bus)
        bus.export(HOSTIPMI_PATH, peer.handle)
        await bus.bus_call("RequestName", "su", HOSTIPMI_SERVICE, 4)
        yield peer


async def test_hiomap_backlog_overflow_is_answered_counted_and_logged(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Our dispatch has no buffer that can overflow silently: each
    ReceivedMessage is handled synchronously in wire order.  With hiomapd
    hung, one HIOMAP request waits at hiomapd and HIOMAP_BACKLOG behind it;
    the rest are answered NODE_BUSY at once, counted and logged, while
    messaging commands are still answered.  Every request is accounted for."""
    overflow = 20
    hiomap_total = bridge_mod.HIOMAP_BACKLOG + 1 + overflow
    flags = 30
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        flood_peer(bus_address) as peer,
        run_bridge(bus_address, hiomapd_timeout=30) as running,
    ):
        hiomapd.replies["GetInfo"] = HANG
        b = running.bridge
        for i in range(hiomap_total):
            await peer.send(received_message(i & 0xFF, *HIOMAP, b"\x02\x00\x02"))
        for i in range(flags):
            await peer.send(received_message(i & 0xFF, *GET_FLAGS))
        with trio.fail_after(10):
            await peer.wait_until(lambda: len(peer.responses) == overflow + flags)
        await settle(running, bus_address)
        await trio.testing.wait_all_tasks_blocked()
        assert b.stats.requests == hiomap_total + flags  # none lost
        ccs = [r[4] for r in peer.responses]
        assert ccs.count(0xC0) == overflow  # HIOMAP backlog full: NODE_BUSY
        assert ccs.count(0x00) == flags
        assert b.overflow.count == overflow
        assert "HIOMAP backlog full" in caplog.text
        assert len(hiomapd.calls) == 1  # the rest wait their turn


# -- a flood against the real executable -------------------------------------------

FLOOD = 10_000
RSS_GROWTH_LIMIT = 16 << 20


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


@attrs.define
class FloodResult:
    sent: int
    answered: int
    ok: int
    busy: int
    rss_before: int
    rss_after: int
    log: str


async def _flood(address: str, tmp_path: Path) -> FloodResult:
    async with (
        scripted_hiomapd(address) as hiomapd,
        flood_peer(address) as peer,
        run_service(
            "hiomapbridge",
            python_command(
                "hiomapbridge", "--bus", address, "--log-level", "info",
                "--atn-interval", "30", "--shutdown-timeout", "1",
            ),
            tmp_path,
        ) as service,
    ):  # fmt: skip
        pid = service.process.pid
        # warm up: one of each kind answered, the start-up event fetched
        await peer.send(received_message(1, *GET_FLAGS))
        await peer.send(received_message(2, *HIOMAP, b"\x02\x01\x02"))
        await peer.send(received_message(3, *READ_EVENT))
        with trio.fail_after(10):
            await peer.wait_until(lambda: len(peer.responses) >= 3)
        before = rss(pid)
        peer.responses.clear()
        seen_attentions = peer.attentions
        # the burst: 10,000 requests and 10,000 PropertiesChanged, interleaved
        for i in range(FLOOD):
            if i % 2:
                req = received_message(i & 0xFF, *GET_FLAGS)
            else:
                req = received_message(i & 0xFF, *HIOMAP, b"\x02\x07\x02")
            await peer.send(req)
            ready = bool(i % 2) or i == FLOOD - 2
            await hiomapd.emit(
                {
                    "FlashControlLost": ("b", bool(i % 3 == 0)),
                    "DaemonReady": ("b", ready),
                }
            )

        # afterwards: still serving.  A HIOMAP marker answered cc 0 went
        # through the (FIFO) HIOMAP backlog, so everything before it is done.
        def marker_answer() -> int | None:
            for r in peer.responses:
                if r[2] == 3:  # lun 3: only the marker
                    return r[4]
            return None

        with trio.fail_after(60):
            while True:
                peer.responses[:] = [r for r in peer.responses if r[2] != 3]
                await peer.send(received_message(0xEE, *HIOMAP, b"\x02\xee\x02", 3))
                # a marker's own answer may be dropped past the response
                # backlog (that is allowed, and logged): then ask again
                with trio.move_on_after(2):
                    await peer.wait_until(lambda: marker_answer() is not None)
                if marker_answer() == 0:
                    break
            # the newest event state reaches the host with one fetch
            await peer.wait_until(lambda: peer.attentions > seen_attentions)
        await peer.send(received_message(0xEF, *READ_EVENT, b"", 2))
        with trio.fail_after(10):
            await peer.wait_until(
                lambda: any(r[2] == 2 and r[3] == 0x35 for r in peer.responses)
            )
        record = next(r[5] for r in peer.responses if r[2] == 2 and r[3] == 0x35)
        # last emission: i = 9999: FlashControlLost = (9999 % 3 == 0) True,
        # DaemonReady True
        assert record == event_record(0xC1), record.hex()
        after = rss(pid)
        flood = [r for r in peer.responses if r[2] == 0 and r[3] in (0x31, 0x5A)]
        service.signal()
        with trio.fail_after(20):
            await service.wait()
        return FloodResult(
            FLOOD,
            len(flood),
            sum(1 for r in flood if r[4] == 0),
            sum(1 for r in flood if r[4] == 0xC0),
            before,
            after,
            service.log(),
        )


async def test_flood_against_the_real_daemon(
    bus_address: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """10,000 ReceivedMessage and 10,000 PropertiesChanged in one burst at the
    bridge as a real subprocess: every request is answered (cc 0, or 0xC0 past
    the HIOMAP backlog);
    RSS grows less than 16 MiB; the newest event reaches the host in one
    fetch; the daemon keeps serving and exits cleanly."""
    result = await _flood(bus_address, tmp_path)
    growth = result.rss_after - result.rss_before
    record_property("rss_before", result.rss_before)
    record_property("rss_after", result.rss_after)
    record_property("answered", result.answered)
    print(
        f"flood: sent {result.sent}, answered {result.answered} "
        f"(ok {result.ok}, busy {result.busy}), "
        f"RSS {result.rss_before / 2**20:.1f} -> {result.rss_after / 2**20:.1f} MiB "
        f"(+{growth / 2**20:.2f} MiB)"
    )
    assert growth < RSS_GROWTH_LIMIT
    assert result.ok + result.busy == result.answered == result.sent
    assert "Traceback" not in result.log


async def test_every_overflow_in_a_burst_reaches_the_log(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a burst of overflows, the total reaches the log (rate-limited
    lines are flushed with their count), at the latest on shutdown."""
    caplog.set_level(logging.INFO)
    extra = 37
    async with (
        scripted_hiomapd(bus_address) as hiomapd,
        flood_peer(bus_address) as peer,
        run_bridge(bus_address, hiomapd_timeout=30) as running,
    ):
        hiomapd.replies["GetInfo"] = HANG
        for i in range(bridge_mod.HIOMAP_BACKLOG + 1 + extra):
            await peer.send(received_message(i & 0xFF, *HIOMAP, b"\x02\x00\x02"))
        await settle(running, bus_address)
        assert running.bridge.overflow.count == extra
        running.signal()
        with trio.fail_after(10):
            await running.wait()
    assert re.search(rf"\b{extra}\b.*NODE_BUSY", caplog.text), (
        "the total number of requests answered NODE_BUSY is never logged"
    )
