"""Faulty peers over a real bus (issue 5), using the hiomapd emulator's
fault hooks and the btbridged stand-in's hooks.

test_bridge.py already covers, with the scripted hiomapd: a hung call
(0xC3, messaging still answered), a wrong reply signature, the error-name
table, bad property types, and hiomapd vanishing and returning.  These add
the emulator's real protocol behind the faults, timing, and btbridged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from hiomapbridge import link_btbridged
from hiomapbridge.hiomap import Command, pack_request, window_args
from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.btbridged import BtBridge, Response, requests
from hiomapbridge.sim.hiomapd import run_emulator

from .bridgeutil import (
    GET_FLAGS,
    HIOMAP,
    READ_EVENT,
    drain_startup,
    run_bridge,
    run_btbridged,
)

DEADLINE = 0.5


async def get_info(bt: BtBridge, seq: int) -> Response:
    return await bt.transact(*HIOMAP, pack_request(Command.GET_INFO, seq, b"\x02"))


async def test_hiomapd_never_replies_cc_c3_inside_the_deadline(
    bus_address: str, tmp_path: Path
) -> None:
    """The emulator swallows GetFlashInfo: the host gets 0xC3 after the
    deadline and well before btbridged's own 5 s, and the next request is
    served with the emulator's real answer."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=DEADLINE) as running,
    ):
        await drain_startup(bt, running)
        assert (await get_info(bt, 1)).cc == 0
        emu.set_fault("hang", "GetFlashInfo", 1)
        start = trio.current_time()
        hung = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 2))
        took = trio.current_time() - start
        assert (hung.cc, hung.data) == (0xC3, b"")
        assert DEADLINE <= took < DEADLINE + 1.0 < 5.0
        ok = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 3))
        assert ok.cc == 0 and ok.data[:2] == b"\x03\x03"


async def test_wedged_hiomapd_each_request_times_out_messaging_unaffected(
    bus_address: str, tmp_path: Path
) -> None:
    """A stalled emulator (every call waits): each HIOMAP request is answered
    0xC3 in turn, never stacking beyond one deadline each, Get Message Flags
    is answered meanwhile, and once un-stalled the bridge serves again."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=DEADLINE) as running,
    ):
        await drain_startup(bt, running)
        assert (await get_info(bt, 1)).cc == 0
        emu.set_fault("stall", "")
        for seq in (2, 3):
            start = trio.current_time()
            response = await bt.transact(
                *HIOMAP,
                pack_request(Command.CREATE_READ_WINDOW, seq, window_args(0, 1)),
            )
            assert response.cc == 0xC3
            assert trio.current_time() - start < DEADLINE + 1.0
            assert (await bt.transact(*GET_FLAGS)).cc == 0
        emu.set_fault("clear")
        # the emulator now processes the stalled calls late; their replies
        # arrive for calls the bridge gave up on and are ignored
        with trio.fail_after(5):
            while (await get_info(bt, 4)).cc != 0:
                pass


@pytest.mark.parametrize(
    ("fault", "cc"),
    [
        ("wrong-signature", 0xFF),
        ("error:com.example.NotInAnyTable", 0xFF),
        ("error:org.freedesktop.DBus.Error.NotInTheTable", 0xFF),
        ("error:System.Error.ENOTANERRNO", 0xFF),
        ("error:System.Error.ENODEV", 0xCB),
    ],
)
async def test_bad_hiomapd_answers(
    bus_address: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    cc: int,
) -> None:
    """Wrong signatures and error names outside every table give 0xFF, are
    logged, and leave the bridge serving."""
    caplog.set_level(logging.INFO, logger="hiomapbridge")
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=2) as running,
    ):
        await drain_startup(bt, running)
        assert (await get_info(bt, 1)).cc == 0
        emu.set_fault(fault, "GetFlashInfo", 1)
        response = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 2))
        assert (response.cc, response.data) == (cc, b"")
        if fault == "wrong-signature":
            assert "unexpected reply" in caplog.text
        else:
            assert fault.removeprefix("error:") in caplog.text
        ok = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 3))
        assert ok.cc == 0


async def test_properties_of_the_wrong_type_from_the_emulator(
    bus_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every non-boolean shape is ignored (counted, logged); the well-typed
    property in the same signal still applies."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu,
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        await drain_startup(bt, running)
        await emu.emit_properties(
            {
                "DaemonReady": ("u", 0),
                "ProtocolReset": ("s", "true"),
                "FlashControlLost": ("ay", b"\x01"),
                "WindowReset": ("b", True),
            }
        )
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x83)
        assert running.bridge.rejected_signals.count >= 1
        for name in ("DaemonReady", "ProtocolReset", "FlashControlLost"):
            assert name in caplog.text


async def test_hiomapd_dies_mid_request_then_restarts(
    bus_address: str, tmp_path: Path
) -> None:
    """hiomapd crashes while the bridge waits on it: the bus answers the
    pending call NoReply (0xC3, not the full deadline), the host is told
    PROTOCOL_RESET, requests while it is gone get 0xFF (ServiceUnknown), and
    a restarted hiomapd is re-read (0x81 reaches the host) and serves."""
    async with (
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address, hiomapd_timeout=4.0) as running,
    ):
        async with run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu:
            await drain_startup(bt, running)
            assert (await get_info(bt, 1)).cc == 0
            emu.set_fault("hang", "Flush", 1)
            async with trio.open_nursery() as nursery:
                result: list[Response] = []

                async def host() -> None:
                    result.append(
                        await bt.transact(*HIOMAP, pack_request(Command.FLUSH, 2))
                    )

                nursery.start_soon(host)
                with trio.fail_after(5):
                    while not any(c[0] == "Flush" for c in emu.calls):
                        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                start = trio.current_time()
                await emu.crash()
            assert result[0].cc == 0xC3
            assert trio.current_time() - start < 2.0  # not the 4 s deadline
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x01)
        gone = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 3))
        assert (gone.cc, gone.data) == (0xFF, b"")
        async with run_emulator(bus_address, tmp_path / "second", flash_size=1 << 20):
            with trio.fail_after(5):
                await bt.wait_attention()
            assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)
            assert (await get_info(bt, 4)).cc == 0


async def test_hiomapd_clean_stop_mid_session(bus_address: str, tmp_path: Path) -> None:
    """A clean hiomapd stop (three PropertiesChanged) leaves the host with
    exactly PROTOCOL_RESET (0x01), fetched once."""
    async with (
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        async with run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu:
            await drain_startup(bt, running)
            await emu.stop_cleanly()
        with trio.fail_after(5):
            await bt.wait_attention()
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x01)
        await running.bridge.queue.wait_all_delivered()
        assert running.bridge.events == 0x01


# -- btbridged ---------------------------------------------------------------------


async def test_send_message_error_event_stays_waiting(
    bus_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """btbridged rejects the sendMessage carrying an event: the event is not
    counted delivered, SMS_ATN is raised again, and the next fetch delivers
    it.  A rejected plain response is logged and the bridge serves on."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20),
        run_btbridged(bus_address, timeout=0.5) as bt,
        run_bridge(bus_address) as running,
    ):
        with trio.fail_after(5):
            await bt.wait_attention()
        hook = bt.fail(requests(*READ_EVENT))
        first = await bt.transact(*READ_EVENT)
        assert first.cc == 0xCE  # btbridged answered the host itself
        await hook.wait_matched()
        assert running.bridge.queue.waiting  # not delivered
        with trio.fail_after(5):
            await bt.wait_attention()  # raised again at once
        assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)
        await running.bridge.queue.wait_all_delivered()
        bt.fail(requests(*GET_FLAGS))
        assert (await bt.transact(*GET_FLAGS)).cc == 0xCE
        assert (await bt.transact(*GET_FLAGS)).cc == 0


async def test_only_event_records_and_late_responses_ask_for_a_reply(
    bus_address: str, tmp_path: Path
) -> None:
    """sendMessage wants btbridged's method return for an event record (its
    delivery) but not for a response sent at once: btbridged cannot have
    timed that request out, and the reply's wake-up would cost a third of
    the bridge's CPU per command."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20),
        run_btbridged(bus_address) as bt,
        run_bridge(bus_address) as running,
    ):
        await drain_startup(bt, running)
        await bt.transact(*GET_FLAGS)
        await get_info(bt, 1)
        await bt.transact(0x06, 0x01)  # unknown: answered 0xC1
        fetched = [tx for tx in bt.transactions if (tx.netfn, tx.cmd) == READ_EVENT]
        others = [tx for tx in bt.transactions if (tx.netfn, tx.cmd) != READ_EVENT]
        assert [tx.reply_expected for tx in fetched] == [True]
        assert [tx.reply_expected for tx in others] == [False, False, False]


async def test_late_response_refused_by_btbridged_is_logged(
    bus_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hiomapd takes longer than btbridged's request timeout: btbridged
    answers the host 0xCE itself, the bridge's late response asks for a
    reply, gets "No matching request", and says so; it serves on."""
    caplog.set_level(logging.INFO)
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu,
        run_btbridged(bus_address, timeout=0.5) as bt,
        run_bridge(bus_address) as running,
    ):
        await drain_startup(bt, running)
        emu.set_fault("delay:1.0", "GetFlashInfo", 1)
        late = await bt.transact(*HIOMAP, pack_request(Command.GET_FLASH_INFO, 1))
        assert late.cc == 0xCE  # from btbridged, at its 0.5 s timeout
        with trio.fail_after(5):
            await bt.wait_until(lambda: bt.unmatched == [late.seq])
        # The refusal went out before this request's signal: the bridge has
        # handled it by the time it answers.
        assert (await get_info(bt, 2)).cc == 0
        assert "sendMessage for" in caplog.text
        assert "No matching request" in caplog.text


async def test_send_message_never_returns_bridge_keeps_serving(
    bus_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """btbridged sits on the sendMessage carrying an event and never replies:
    the bridge does not wait for it; HIOMAP and messaging requests are served
    meanwhile; after SEND_REPLY_WITHIN the event counts as not delivered and
    SMS_ATN is raised again."""
    monkeypatch.setattr(link_btbridged, "SEND_REPLY_WITHIN", 0.5)
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20),
        run_btbridged(bus_address, timeout=30) as bt,
        run_bridge(bus_address) as running,
    ):
        with trio.fail_after(5):
            await bt.wait_attention()
        hold = bt.hold(requests(*READ_EVENT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bt.transact, *READ_EVENT)
            await hold.wait_held()
            assert (await get_info(bt, 1)).cc == 0
            assert (await bt.transact(*GET_FLAGS)).data == b"\x02"
            with trio.fail_after(5):
                await bt.wait_attention()  # the unanswered send gave up
            assert running.bridge.queue.waiting
            assert (await bt.transact(*READ_EVENT)).data == event_record(0x81)
            await running.bridge.queue.wait_all_delivered()
            hold.release()  # a late reply to a call we gave up: ignored
        assert (await bt.transact(*GET_FLAGS)).data == b"\x00"


async def test_btbridged_owner_changes_mid_delivery(
    bus_address: str, tmp_path: Path
) -> None:
    """While the old btbridged holds the event's sendMessage, a new one takes
    the name: the bridge re-raises SMS_ATN towards the new owner, whose host
    fetches the event; the old owner's late success changes nothing."""
    async with (
        run_emulator(bus_address, tmp_path, flash_size=1 << 20),
        run_btbridged(bus_address, timeout=30) as old,
        run_bridge(bus_address) as running,
    ):
        with trio.fail_after(5):
            await old.wait_attention()
        hold = old.hold(requests(*READ_EVENT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.transact, *READ_EVENT)
            await hold.wait_held()
            async with run_btbridged(bus_address, timeout=30) as new:
                with trio.fail_after(5):
                    await new.wait_attention()
                assert running.bridge.btbridged.owner != old._bus.unique_name  # type: ignore[union-attr]
                assert (await new.transact(*READ_EVENT)).data == event_record(0x81)
                await running.bridge.queue.wait_all_delivered()
                hold.release()
                await trio.testing.wait_all_tasks_blocked()
                assert running.bridge.queue.last_delivered == 0x81
                assert (await new.transact(*GET_FLAGS)).data == b"\x00"
            nursery.cancel_scope.cancel()
