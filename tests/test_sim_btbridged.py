"""The btbridged stand-in over a real private bus, against a bridge-like peer."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import pytest
import trio
import trio.testing
from jeepney import DBusAddress, Message, new_method_call

from hiomapbridge.dbus import Bus, DBusError, open_bus
from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    NETFN_APP,
    NETFN_OEM_IBM,
)
from hiomapbridge.sim.btbridged import (
    ERROR_NAME,
    INTERFACE,
    PATH,
    SERVICE,
    TIMEOUT_ERROR_NAME,
    BtBridge,
    BtTimeout,
    requests,
)

BTBRIDGED = DBusAddress(PATH, bus_name=SERVICE, interface=INTERFACE)


@attrs.frozen
class Received:
    seq: int
    netfn: int
    lun: int
    cmd: int
    data: bytes


class Peer:
    """Acts like the bridge: receives ReceivedMessage, answers sendMessage."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.send, self.received = trio.open_memory_channel[Received](math.inf)

    def _on_signal(self, msg: Message) -> None:
        seq, netfn, lun, cmd, data = msg.body
        self.send.send_nowait(Received(seq, netfn, lun, cmd, bytes(data)))

    async def next(self) -> Received:
        with trio.fail_after(5):
            return await self.received.receive()

    async def answer(
        self, req: Received, cc: int = 0, data: bytes = b"", seq: int | None = None
    ) -> int:
        msg = new_method_call(
            BTBRIDGED,
            "sendMessage",
            "yyyyyay",
            (
                req.seq if seq is None else seq,
                req.netfn | 1,
                req.lun,
                req.cmd,
                cc,
                data,
            ),
        )
        reply = await self.bus.call(msg)
        result: int = reply.body[0]
        return result

    async def set_attention(self) -> int:
        reply = await self.bus.call(new_method_call(BTBRIDGED, "setAttention"))
        result: int = reply.body[0]
        return result


@asynccontextmanager
async def bench(
    bus_address: str, bt_timeout: float = 5.0, host_timeout: float = 6.0
) -> AsyncIterator[tuple[BtBridge, Peer]]:
    async with (
        open_bus(bus_address) as bmc_bus,
        open_bus(bus_address) as peer_bus,
        trio.open_nursery() as nursery,
    ):
        bt = BtBridge(timeout=bt_timeout, host_timeout=host_timeout)
        await nursery.start(bt.serve, bmc_bus)
        peer = Peer(peer_bus)
        await peer_bus.subscribe(PATH, INTERFACE, "ReceivedMessage", peer._on_signal)
        yield bt, peer
        nursery.cancel_scope.cancel()


async def test_received_message_and_response(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        results: list[object] = []

        async def host() -> None:
            results.append(
                await bt.transact(NETFN_OEM_IBM, CMD_HIOMAP, b"\x02\x01\x02")
            )

        nursery.start_soon(host)
        req = await peer.next()
        assert req == Received(0, NETFN_OEM_IBM, 0, CMD_HIOMAP, b"\x02\x01\x02")
        assert await peer.answer(req, 0, b"\x02\x01\x02\x0c\x00\x00") == 0
        # sendMessage returned only after the host had the response.
        assert len(results) == 1
        resp = results[0]
        assert resp.cc == 0 and resp.data == b"\x02\x01\x02\x0c\x00\x00"  # type: ignore[attr-defined]
        assert resp.netfn == NETFN_OEM_IBM | 1  # type: ignore[attr-defined]
        tx = bt.transactions[0]
        assert tx.outcome == "delivered"
        assert tx.delivered_at is not None and tx.delivered_at.trio >= tx.sent.trio


async def test_seq_increments_and_skips_outstanding(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        nursery.start_soon(bt.transact, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        first = await peer.next()
        bt._next_seq = first.seq  # force a wrap onto the busy number
        nursery.start_soon(bt.transact, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        second = await peer.next()
        assert (first.seq, second.seq) == (0, 1)
        bt._next_seq = 0xFF
        nursery.start_soon(bt.transact, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        third = await peer.next()
        nursery.start_soon(bt.transact, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        fourth = await peer.next()
        assert (third.seq, fourth.seq) == (0xFF, 2)  # 0 and 1 are still busy
        for req in (first, second, third, fourth):
            await peer.answer(req, 0, b"\x00")


async def test_unknown_seq_is_an_error(bus_address: str) -> None:
    async with bench(bus_address) as (_bt, peer):
        req = Received(7, NETFN_APP, 0, CMD_GET_MESSAGE_FLAGS, b"")
        with pytest.raises(DBusError) as info:
            await peer.answer(req)
        assert info.value.name == ERROR_NAME
        assert info.value.text == "No matching request"


async def test_answered_seq_cannot_be_answered_twice(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        nursery.start_soon(bt.transact, NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        req = await peer.next()
        await peer.answer(req, 0, b"\x02")
        with pytest.raises(DBusError, match="No matching request"):
            await peer.answer(req, 0, b"\x02")


async def test_timeout_answers_host_with_ce_and_late_answer_fails(
    bus_address: str,
) -> None:
    async with bench(bus_address, bt_timeout=0.2) as (bt, peer):
        with trio.fail_after(5):
            resp = await bt.transact(NETFN_OEM_IBM, CMD_HIOMAP, b"\x09\x01\x03")
        assert resp.cc == 0xCE and resp.data == b""
        assert resp.netfn == NETFN_OEM_IBM | 1 and resp.cmd == CMD_HIOMAP
        assert bt.transactions[0].outcome == "timed_out"
        req = await peer.next()
        with pytest.raises(DBusError, match="No matching request"):
            await peer.answer(req)


async def test_held_response_times_out_with_etimedout(bus_address: str) -> None:
    async with (
        bench(bus_address, bt_timeout=0.3) as (bt, peer),
        trio.open_nursery() as n,
    ):
        bt.hold()
        results: list[object] = []

        async def host() -> None:
            results.append(await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS))

        n.start_soon(host)
        req = await peer.next()
        with pytest.raises(DBusError) as info:
            await peer.answer(req, 0, b"\x02")
        assert info.value.name == TIMEOUT_ERROR_NAME
        await bt.wait_until(lambda: bt.transactions[0].delivered is not None)
        assert bt.transactions[0].outcome == "timed_out"
        assert bt.transactions[0].delivered.cc == 0xCE  # type: ignore[union-attr]


async def test_set_attention(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer):
        assert not bt.attention_pending
        assert await peer.set_attention() == 0
        assert await peer.set_attention() == 0
        assert bt.attention_count == 2
        assert bt.attentions[0].at.trio <= bt.attentions[1].at.trio
        with trio.fail_after(5):
            await bt.wait_attention()  # two raises latch once
        assert not bt.attention_pending
        with trio.move_on_after(0.05):
            await bt.wait_attention()
            pytest.fail("attention consumed twice")
        bt.attention_error = ("org.freedesktop.DBus.Error.IOError", "ioctl failed")
        with pytest.raises(DBusError, match="IOError"):
            await peer.set_attention()
        assert bt.attention_count == 2


async def test_hold_release(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        hold = bt.hold(requests(NETFN_APP, CMD_GET_MESSAGE_FLAGS))
        results: list[object] = []
        replies: list[int] = []
        replied = trio.Event()

        async def host() -> None:
            results.append(await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS))

        async def answer(req: Received) -> None:
            replies.append(await peer.answer(req, 0, b"\x02"))
            replied.set()

        nursery.start_soon(host)
        req = await peer.next()
        nursery.start_soon(answer, req)
        with trio.fail_after(5):
            (tx,) = await hold.wait_held()
        await trio.testing.wait_all_tasks_blocked()
        # Held: the host has nothing, the caller has no reply.
        assert results == [] and replies == []
        assert hold.held == [tx] and tx.response is not None
        hold.release()
        # The reply follows delivery; a later request passes (hold released).
        with trio.fail_after(5):
            await replied.wait()
        assert replies == [0]
        assert results[0].data == b"\x02"  # type: ignore[attr-defined]
        nursery.start_soon(host)
        req2 = await peer.next()
        assert await peer.answer(req2, 0, b"\x00") == 0


async def test_drop_ok_and_error(bus_address: str) -> None:
    async with bench(bus_address, host_timeout=0.3) as (bt, peer):
        errors: list[BaseException] = []

        async def host() -> None:
            try:
                await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS)
            except BtTimeout as exc:
                errors.append(exc)

        replies: tuple[Literal["ok", "error"], ...] = ("ok", "error")
        for reply in replies:
            bt.drop(reply=reply)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(host)
                req = await peer.next()
                if reply == "ok":
                    assert await peer.answer(req, 0, b"\x02") == 0
                else:
                    with pytest.raises(DBusError, match="IOError"):
                        await peer.answer(req, 0, b"\x02")
            assert bt.transactions[-1].outcome == "dropped"
        assert len(errors) == 2


async def test_fail_keeps_request_and_delay(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        bt.fail(text="nope")
        results: list[object] = []

        async def host() -> None:
            results.append(await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS))

        nursery.start_soon(host)
        req = await peer.next()
        with pytest.raises(DBusError, match="nope"):
            await peer.answer(req, 0, b"\x01")
        assert results == []
        hook = bt.delay(0.1)
        start = trio.current_time()
        assert await peer.answer(req, 0, b"\x02") == 0  # retried: accepted
        assert trio.current_time() - start >= 0.1
        assert hook.matched and results[0].data == b"\x02"  # type: ignore[attr-defined]
        assert bt.transactions[0].send_message_calls == 2


async def test_unknown_method_is_answered(bus_address: str) -> None:
    async with bench(bus_address) as (_bt, peer):
        with pytest.raises(DBusError, match="UnknownMethod"):
            await peer.bus.call(new_method_call(BTBRIDGED, "bogus"))


async def test_request_too_long_and_response_truncated(bus_address: str) -> None:
    async with bench(bus_address) as (bt, peer), trio.open_nursery() as nursery:
        with pytest.raises(ValueError):
            await bt.transact(NETFN_APP, 1, bytes(61))
        results: list[object] = []

        async def host() -> None:
            results.append(await bt.transact(NETFN_APP, 1, bytes(60)))

        nursery.start_soon(host)
        req = await peer.next()
        await peer.answer(req, 0, bytes(100))
        assert len(results[0].data) == 59  # type: ignore[attr-defined]


async def test_host_woken_at_teardown_is_cancelled_not_refused(
    bus_address: str,
) -> None:
    """An SMS_ATN latched in the same tick as the teardown wakes the host's
    task before the cancellation reaches it: its next transact must end in
    Cancelled, not NotServing (a flaky end-to-end failure, once)."""
    for _ in range(20):  # trio picks the order of the two woken tasks
        async with open_bus(bus_address) as bus:
            bt = BtBridge()
            async with trio.open_nursery() as nursery:
                await nursery.start(bt.serve, bus)

                async def host(bt: BtBridge) -> None:
                    await bt.wait_attention()
                    await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS)

                nursery.start_soon(host, bt)
                await trio.testing.wait_all_tasks_blocked()
                bt._attention_latched = True
                bt._changed()
                nursery.cancel_scope.cancel()
