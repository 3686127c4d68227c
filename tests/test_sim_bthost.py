"""The host end of the ``bt:`` seam, driven by a raw SEQPACKET client that
stands in for the bridge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    NETFN_APP,
    NETFN_OEM_IBM,
    event_record,
)
from hiomapbridge.sim.btbridged import BtTimeout, NotServing, Response
from hiomapbridge.sim.bthost import BtHost, decode_response, encode_request
from hiomapbridge.sim.host import HostClient

LIMIT = 5.0  # bound on every wait


class FakeBridge:
    """The bridge's side of the seam: one SEQPACKET connection."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path) -> FakeBridge:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await sock.connect(os.fspath(path))
        return cls(sock)

    async def recv(self) -> bytes:
        with trio.fail_after(LIMIT):
            return await self.sock.recv(4096)

    async def request(self) -> tuple[int, int, int, int, bytes]:
        """The next request frame as (netfn, lun, seq, cmd, data)."""
        frame = await self.recv()
        assert frame[0] == len(frame) - 1
        return frame[1] >> 2, frame[1] & 3, frame[2], frame[3], frame[4:]

    async def send(self, packet: bytes) -> None:
        await self.sock.send(packet)

    async def answer(
        self, netfn: int, lun: int, seq: int, cmd: int, cc: int, data: bytes = b""
    ) -> None:
        body = bytes([(netfn | 1) << 2 | lun, seq, cmd, cc]) + data
        await self.send(bytes([len(body)]) + body)

    def close(self) -> None:
        self.sock.close()


@asynccontextmanager
async def seam(
    tmp_path: Path, host_timeout: float = LIMIT
) -> AsyncIterator[tuple[BtHost, FakeBridge, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        bt = BtHost(tmp_path / "bt.sock", host_timeout=host_timeout)
        await nursery.start(bt.serve)
        bridge = await FakeBridge.connect(bt.path)
        with trio.fail_after(LIMIT):
            await bt.wait_connected()
        yield bt, bridge, nursery
        bridge.close()
        nursery.cancel_scope.cancel()


def test_codec() -> None:
    assert encode_request(0x3A, 0x5A, b"\x02\x01", seq=7, lun=2) == bytes(
        [5, 0x3A << 2 | 2, 7, 0x5A, 2, 1]
    )
    assert decode_response(bytes([5, 0x07 << 2 | 1, 9, 0x31, 0, 2])) == Response(
        cc=0, data=b"\x02", seq=9, netfn=7, lun=1, cmd=0x31
    )
    assert decode_response(b"\x03\x1c\x00\x31") is None
    assert len(encode_request(1, 2, bytes(60), seq=0)) == 64
    with pytest.raises(ValueError, match="64-byte"):
        encode_request(1, 2, bytes(61), seq=0)


async def test_one_packet_one_frame_and_response(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        results: list[Response] = []

        async def host() -> None:
            results.append(await bt.transact(NETFN_OEM_IBM, CMD_HIOMAP, b"\x02\x01"))

        nursery.start_soon(host)
        # One recv is exactly one frame, length byte included.
        assert await bridge.recv() == bytes(
            [5, NETFN_OEM_IBM << 2, 0, CMD_HIOMAP, 2, 1]
        )
        await bridge.answer(NETFN_OEM_IBM, 0, 0, CMD_HIOMAP, 0, b"\x02\x01\x02")
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bool(results))
        assert results == [
            Response(
                cc=0, data=b"\x02\x01\x02", seq=0, netfn=NETFN_OEM_IBM | 1, lun=0,
                cmd=CMD_HIOMAP,
            )
        ]  # fmt: skip
        tx = bt.transactions[0]
        assert tx.outcome == "delivered" and tx.delivered == results[0]
        assert tx.delivered_at is not None and tx.delivered_at.trio >= tx.sent.trio
        assert [f.direction for f in bt.frames] == ["h2b", "b2h"]
        assert bt.violations == []
        assert bt.summary()["outcomes"] == {"delivered": 1}
        (row,) = bt.timeline()
        assert (row["kind"], row["cc"], row["response"]) == ("request", 0, "020102")


async def test_outstanding_requests_matched_by_seq(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        got: dict[int, Response] = {}

        async def host(cmd: int) -> None:
            got[cmd] = await bt.transact(NETFN_APP, cmd, lun=1)

        nursery.start_soon(host, 0x01)
        first = await bridge.request()
        nursery.start_soon(host, 0x02)
        second = await bridge.request()
        assert first[2] != second[2]
        assert len(bt.outstanding) == 2
        # Answer out of order: each lands with its own transaction.
        await bridge.answer(second[0], second[1], second[2], second[3], 0, b"two")
        await bridge.answer(first[0], first[1], first[2], first[3], 0, b"one")
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: len(got) == 2)
        assert got[0x01].data == b"one" and got[0x02].data == b"two"
        assert got[0x01].lun == 1
        assert bt.violations == []
        assert bt.outstanding == []


async def test_seq_skips_outstanding_numbers(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        nursery.start_soon(bt.transact, NETFN_APP, 1)
        assert (await bridge.request())[2] == 0
        bt._next_seq = 0  # wrap onto the busy number
        nursery.start_soon(bt.transact, NETFN_APP, 1)
        assert (await bridge.request())[2] == 1


async def test_oversize_request_refused(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        with pytest.raises(ValueError):
            await bt.transact(NETFN_OEM_IBM, CMD_HIOMAP, bytes(61))
        assert bt.transactions == []
        nursery.start_soon(bt.transact, NETFN_OEM_IBM, CMD_HIOMAP, bytes(60))
        assert len(await bridge.recv()) == 64


async def test_attention_is_a_latch(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, _):
        await bridge.send(b"\xb1")
        await bridge.send(b"\xb1")
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bt.attention_count == 2)
        assert bt.attention_pending
        with trio.fail_after(LIMIT):
            await bt.wait_attention()
        assert not bt.attention_pending  # two raises, one wake-up
        assert [row["kind"] for row in bt.timeline()] == ["attention"] * 2
        with trio.move_on_after(0.05) as scope:
            await bt.wait_attention()
        assert scope.cancelled_caught
        assert bt.violations == []


async def test_violations_recorded_not_raised(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        got: list[Response] = []

        async def host() -> None:
            got.append(await bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS))

        nursery.start_soon(host)
        netfn, lun, seq, cmd, _ = await bridge.request()
        await bridge.send(b"\x03\x1c\x00")  # too short to be a response
        await bridge.send(bytes([4, 0x07 << 2, 0x77, 0x31, 0]))  # unknown seq
        # Wrong length byte and netfn not request|1, for the real request.
        await bridge.send(bytes([9, netfn << 2 | lun, seq, cmd, 0, 2]))
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bool(got))
        assert got[0].data == b"\x02"  # still delivered: the host took it
        assert len(bt.violations) == 4, bt.violations
        assert "short frame" in bt.violations[0]
        assert "matches no request" in bt.violations[1]
        assert "length byte 9" in bt.violations[2]
        assert "netfn" in bt.violations[3]
        assert [r.seq for r in bt.unmatched] == [0x77]
        # A second response for the same seq is unknown now.
        await bridge.answer(netfn, lun, seq, cmd, 0, b"\x02")
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: len(bt.violations) == 5)


async def test_oversized_response_is_a_violation(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        nursery.start_soon(bt.transact, NETFN_APP, 0x01)
        netfn, lun, seq, cmd, _ = await bridge.request()
        await bridge.answer(netfn, lun, seq, cmd, 0, bytes(60))  # 65-byte frame
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bool(bt.violations))
        assert "exceeds the 64-byte" in bt.violations[0]


async def test_raw_packets_and_their_responses(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, _):
        await bt.send_raw(b"\x02\x18")  # malformed: too short for a request
        assert await bridge.recv() == b"\x02\x18"
        await bt.send_raw(bytes([3, NETFN_APP << 2, 0x42, 0x01]))
        netfn, lun, seq, cmd, data = await bridge.request()
        assert (netfn, seq, cmd, data) == (NETFN_APP, 0x42, 0x01, b"")
        await bridge.answer(netfn, lun, seq, cmd, 0xC1)
        with trio.fail_after(LIMIT):
            resp = await bt.wait_raw()
        assert (resp.seq, resp.cc, resp.netfn) == (0x42, 0xC1, NETFN_APP | 1)
        assert bt.violations == []
        assert bt.transactions == []  # raw requests are not transactions


async def test_disconnect_and_reconnect(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        await bt.disconnect()
        assert not bt.connected
        assert await bridge.recv() == b""  # the bridge sees end of file
        again = await FakeBridge.connect(bt.path)
        with trio.fail_after(LIMIT):
            await bt.wait_connected()
        nursery.start_soon(bt.transact, NETFN_APP, 0x01)
        assert (await again.request())[3] == 0x01
        assert bt.connections == 2
        # The bridge going away itself is survived too.
        again.close()
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: not bt.connected)
        third = await FakeBridge.connect(bt.path)
        with trio.fail_after(LIMIT):
            await bt.wait_connected()
        await third.send(b"\xb1")
        with trio.fail_after(LIMIT):
            await bt.wait_attention()
        third.close()


async def test_new_connection_replaces_old(tmp_path: Path) -> None:
    async with seam(tmp_path) as (bt, bridge, nursery):
        newer = await FakeBridge.connect(bt.path)
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bt.connections == 2)
        assert await bridge.recv() == b""  # the old one was closed
        nursery.start_soon(bt.transact, NETFN_APP, 0x01)
        assert (await newer.request())[3] == 0x01
        assert {f.connection for f in bt.frames} == {2}
        newer.close()


async def test_request_waits_in_fifo_until_a_bridge_connects(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        bt = BtHost(tmp_path / "bt.sock", host_timeout=LIMIT)
        await nursery.start(bt.serve)
        got: list[Response] = []

        async def host() -> None:
            got.append(await bt.transact(NETFN_APP, 0x01))

        nursery.start_soon(host)
        await trio.testing.wait_all_tasks_blocked()
        assert bt.frames == [] and len(bt.outstanding) == 1
        bridge = await FakeBridge.connect(bt.path)
        netfn, lun, seq, cmd, _ = await bridge.request()
        await bridge.answer(netfn, lun, seq, cmd, 0, b"ok")
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bool(got))
        assert got[0].data == b"ok"
        bridge.close()
        nursery.cancel_scope.cancel()


async def test_no_bridge_times_out_then_late_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        bt = BtHost(tmp_path / "bt.sock", host_timeout=3.0)
        await nursery.start(bt.serve)
        start = trio.current_time()
        with pytest.raises(BtTimeout):
            await bt.transact(NETFN_APP, 0x01)
        assert trio.current_time() - start == pytest.approx(3.0)
        assert bt.transactions[0].outcome == "abandoned"
        nursery.cancel_scope.cancel()


async def test_late_response_after_abandon(tmp_path: Path) -> None:
    async with seam(tmp_path, host_timeout=0.2) as (bt, bridge, _):
        with pytest.raises(BtTimeout):
            await bt.transact(NETFN_APP, 0x01)
        netfn, lun, seq, cmd, _ = await bridge.request()
        await bridge.answer(netfn, lun, seq, cmd, 0)
        with trio.fail_after(LIMIT):
            await bt.wait_until(lambda: bool(bt.late))
        assert bt.late[0].seq == seq and bt.violations == []


async def test_transact_needs_serve(tmp_path: Path) -> None:
    with pytest.raises(NotServing):
        await BtHost(tmp_path / "bt.sock").transact(NETFN_APP, 0x01)


async def test_stale_socket_replaced_other_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "bt.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(os.fspath(path))
    stale.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(BtHost(path).serve)
        nursery.cancel_scope.cancel()
    assert not path.exists()  # removed again on the way out
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await BtHost(path).serve()


async def test_skiboot_like_host_runs_over_it(tmp_path: Path) -> None:
    """sim.host's client fetches an event over BtHost unchanged."""
    async with seam(tmp_path) as (bt, bridge, nursery):
        host = HostClient(bt, tmp_path / "lpc")
        await nursery.start(host.run)
        await bridge.send(b"\xb1")
        netfn, lun, seq, cmd, _ = await bridge.request()
        assert (netfn, cmd) == (NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        await bridge.answer(netfn, lun, seq, cmd, 0, b"\x02")
        netfn, lun, seq, cmd, _ = await bridge.request()
        assert (netfn, cmd) == (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        await bridge.answer(netfn, lun, seq, cmd, 0, event_record(0x81))
        with trio.fail_after(LIMIT):
            events = await host.wait_events(1)
        assert events[0].data == 0x81
        assert bt.violations == []


def test_cli_watch(tmp_path: Path) -> None:
    """``hiomapbridge-sim bthost --socket PATH watch --count 1`` prints the
    event a bridge raises over the seam."""
    path = tmp_path / "bt.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiomapbridge.sim", "bthost", "--socket", str(path),
         "watch", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        async def bridge() -> None:
            with trio.fail_after(LIMIT):
                while True:
                    try:
                        fake = await FakeBridge.connect(path)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        await trio.sleep(0.02)  # polling for the process to listen
            await fake.send(b"\xb1")
            netfn, lun, seq, cmd, _ = await fake.request()
            await fake.answer(netfn, lun, seq, cmd, 0, b"\x02")
            netfn, lun, seq, cmd, _ = await fake.request()
            await fake.answer(netfn, lun, seq, cmd, 0, event_record(0x80))
            fake.close()

        trio.run(bridge)
        out, err = proc.communicate(timeout=LIMIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "event 0x80 DAEMON_READY" in out
