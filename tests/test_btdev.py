"""The FUSE stand-in for ``/dev/ipmi-bt-host`` (tests/btdev), driven through
real syscalls on its file exactly as the bridge will drive the kernel
device: os.open / epoll / os.read / os.write / fcntl.ioctl, and trio's
wait_readable / wait_writable. The host is a raw SEQPACKET listener (and, in
the last test, the project's BtHost). Each test is skipped, with the reason,
where FUSE cannot be used (see btdev_util.skip_reason)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing

from hiomapbridge.ipmi import CMD_GET_BT_CAPABILITIES, NETFN_APP

from . import btdev_util
from .btdev_util import BT_BMC_IOCTL_SMS_ATN, HOST_BUSY, HOST_IDLE, BtDev

LIMIT = 5.0  # bound on every wait
T = TypeVar("T")


def request(seq: int, cmd: int = CMD_GET_BT_CAPABILITIES, data: bytes = b"") -> bytes:
    body = bytes([NETFN_APP << 2, seq, cmd]) + data
    return bytes([len(body)]) + body


def response(seq: int, cmd: int = CMD_GET_BT_CAPABILITIES, data: bytes = b"") -> bytes:
    body = bytes([(NETFN_APP | 1) << 2, seq, cmd, 0x00]) + data
    return bytes([len(body)]) + body


class RawHost:
    """The host end of the emulator's socket: one packet, one frame."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    @classmethod
    async def accept(cls, listener: socket.socket) -> RawHost:
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(listener)
        return cls(listener.accept()[0])

    def send(self, packet: bytes) -> None:
        assert self.sock.send(packet) == len(packet)

    async def recv(self) -> bytes:
        with trio.fail_after(LIMIT):
            while True:
                try:
                    return self.sock.recv(4096)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)

    def pending(self) -> bytes | None:
        """The next packet if one is already here, else None."""
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None


@attrs.define
class Rig:
    dev: BtDev
    host: RawHost

    @contextmanager
    def open(self, flags: int = os.O_RDWR) -> Iterator[int]:
        fd = os.open(self.dev.path, flags | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)


@pytest.fixture
def emulator() -> Path:
    """The emulator binary; skips (outside trio, so the reason shows) when
    FUSE cannot be used here."""
    return btdev_util.require()


@pytest.fixture
async def rig(emulator: Path, tmp_path: Path) -> AsyncIterator[Rig]:
    sock_path = tmp_path / "h.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(sock_path))
        listener.listen(1)
        listener.setblocking(False)
        async with btdev_util.btdev(tmp_path / "mnt", sock_path) as dev:
            host = await RawHost.accept(listener)
            yield Rig(dev, host)
            host.sock.close()
    assert not btdev_util.mounted(tmp_path / "mnt")


def poll_now(fd: int) -> int:
    """The device's poll mask right now (a real poll(2), timeout 0)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    events = p.poll(0)
    return events[0][1] if events else 0


async def epoll_wait(ep: select.epoll) -> list[tuple[int, int]]:
    """One bounded epoll_wait, off the trio thread."""
    return await trio.to_thread.run_sync(ep.poll, LIMIT)


async def in_thread(fn: Callable[[int, Any], T], fd: int, arg: Any) -> T:
    """``fn(fd, arg)``, a call that may block in the emulator, in a thread;
    abandoned if the bound hits (it then ends with ENOTCONN when the
    emulator stops)."""
    with trio.fail_after(LIMIT):
        return await trio.to_thread.run_sync(fn, fd, arg, abandon_on_cancel=True)


async def test_file_looks_like_the_device(rig: Rig) -> None:
    assert os.listdir(rig.dev.mountdir) == ["ipmi-bt-host"]
    assert oct(os.stat(rig.dev.path).st_mode & 0o777) == "0o600"
    with rig.open() as fd:
        with pytest.raises(OSError) as seek:
            os.lseek(fd, 0, os.SEEK_SET)
        assert seek.value.errno == errno.ESPIPE


async def test_second_open_is_busy_until_the_first_closes(rig: Rig) -> None:
    with rig.open():
        for flags in (os.O_RDWR, os.O_RDONLY, os.O_RDWR | os.O_NONBLOCK):
            with pytest.raises(OSError) as busy:
                os.open(rig.dev.path, flags)
            assert busy.value.errno == errno.EBUSY
    # close() has queued the release before open() is sent: no race.
    for _ in range(3):
        with rig.open():
            pass


async def test_one_frame_per_read(rig: Rig) -> None:
    first, second = request(1), request(2, 0x5A, b"\x02\x01")
    rig.host.send(first)
    rig.host.send(second)
    with rig.open() as fd:
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(fd)
        assert os.read(fd, 256) == first
        assert os.read(fd, 256) == second
        assert poll_now(fd) == select.POLLOUT  # nothing more to read


async def test_read_is_cut_to_the_buffer_and_the_rest_lost(rig: Rig) -> None:
    long = request(1, data=b"ABCDEFGH")
    rig.host.send(long)
    rig.host.send(request(2))
    with rig.open() as fd:
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(fd)
        # bt_bmc_read: len = count - 1; the length byte is returned unchanged.
        assert os.read(fd, 4) == long[:4]
        assert os.read(fd, 256) == request(2)


async def test_epoll_wakes_when_a_request_arrives(rig: Rig) -> None:
    with rig.open() as fd, select.epoll() as ep:
        ep.register(fd, select.EPOLLIN)
        assert ep.poll(0) == []
        rig.host.send(request(7))
        # Only a wake-up (fuse_lowlevel_notify_poll) puts it on the ready list.
        assert await epoll_wait(ep) == [(fd, select.EPOLLIN)]
        assert os.read(fd, 256) == request(7)
        assert ep.poll(0) == []


async def test_pollout_follows_host_busy(rig: Rig) -> None:
    with rig.open() as fd, select.epoll() as ep:
        assert poll_now(fd) == select.POLLOUT
        rig.host.send(HOST_BUSY)
        rig.host.send(request(1))  # handled in order: busy is set once it shows
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(fd)
        assert poll_now(fd) == select.POLLIN
        ep.register(fd, select.EPOLLOUT)
        assert ep.poll(0) == []
        rig.host.send(HOST_IDLE)
        assert await epoll_wait(ep) == [(fd, select.EPOLLOUT)]
        assert poll_now(fd) == select.POLLIN | select.POLLOUT


async def test_each_write_is_one_packet_and_short_ones_fail(rig: Rig) -> None:
    frames = [response(1), response(2, data=bytes(range(30)))]
    with rig.open() as fd:
        for frame in frames:
            assert os.write(fd, frame) == len(frame)
        assert [await rig.host.recv(), await rig.host.recv()] == frames
        for short in (b"\x03\x1c\x01\x36", b"\x01"):
            with pytest.raises(OSError) as bad:
                os.write(fd, short)
            assert bad.value.errno == errno.EINVAL
        assert os.write(fd, response(3)) == len(response(3))
        assert await rig.host.recv() == response(3)  # nothing came in between


async def test_sms_atn_ioctl_and_no_other(rig: Rig) -> None:
    with rig.open() as fd:
        assert fcntl.ioctl(fd, BT_BMC_IOCTL_SMS_ATN) == 0
        assert await rig.host.recv() == btdev_util.SMS_ATN_PACKET
        with pytest.raises(OSError) as other:
            fcntl.ioctl(fd, 0xB101)  # bt_bmc_ioctl: -EINVAL, not -ENOTTY
        assert other.value.errno == errno.EINVAL
        os.write(fd, response(1))
        assert await rig.host.recv() == response(1)


async def test_read_waits_even_with_o_nonblock(rig: Rig) -> None:
    # The driver's read sleeps in wait_event_interruptible whatever the flags.
    with rig.open(os.O_RDWR | os.O_NONBLOCK) as fd:
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await in_thread(os.read, fd, 256))

            nursery.start_soon(reader)
            with trio.fail_after(LIMIT):
                await rig.dev.wait_event("read-blocked")
            assert got == []
            rig.host.send(request(3))
        assert got == [request(3)]


async def test_write_waits_while_the_host_is_busy(rig: Rig) -> None:
    with rig.open(os.O_RDWR | os.O_NONBLOCK) as fd:
        rig.host.send(HOST_BUSY)
        rig.host.send(request(1))
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(fd)
        assert os.read(fd, 256) == request(1)
        async with trio.open_nursery() as nursery:
            wrote: list[int] = []

            async def writer() -> None:
                wrote.append(await in_thread(os.write, fd, response(1)))

            nursery.start_soon(writer)
            with trio.fail_after(LIMIT):
                await rig.dev.wait_event("write-blocked")
            assert wrote == [] and rig.host.pending() is None
            rig.host.send(HOST_IDLE)
        assert wrote == [len(response(1))]
        assert await rig.host.recv() == response(1)


async def test_trio_wait_readable_and_writable(rig: Rig) -> None:
    """The bridge's way: wait for readiness on the fd, then one syscall."""
    with rig.open(os.O_RDWR | os.O_NONBLOCK) as fd:
        async with trio.open_nursery() as nursery:
            readable = trio.Event()

            async def wait_readable() -> None:
                await trio.lowlevel.wait_readable(fd)
                readable.set()

            nursery.start_soon(wait_readable)
            await trio.testing.wait_all_tasks_blocked()
            assert not readable.is_set()
            rig.host.send(request(9))
            with trio.fail_after(LIMIT):
                await readable.wait()
        assert os.read(fd, 256) == request(9)
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_writable(fd)
        os.write(fd, response(9))
        assert await rig.host.recv() == response(9)

        rig.host.send(HOST_BUSY)
        rig.host.send(request(10))
        with trio.fail_after(LIMIT):
            await trio.lowlevel.wait_readable(fd)
        async with trio.open_nursery() as nursery:
            writable = trio.Event()

            async def wait_writable() -> None:
                await trio.lowlevel.wait_writable(fd)
                writable.set()

            nursery.start_soon(wait_writable)
            await trio.testing.wait_all_tasks_blocked()
            assert not writable.is_set()
            rig.host.send(HOST_IDLE)
            with trio.fail_after(LIMIT):
                await writable.wait()


async def test_a_gone_host_takes_no_more_responses(rig: Rig) -> None:
    with rig.open() as fd:
        rig.host.sock.close()
        with trio.fail_after(LIMIT):
            await rig.dev.wait_event("host-closed")
        # Into the FIFO, B2H_ATN set, never cleared: no POLLOUT any more.
        assert os.write(fd, response(1)) == len(response(1))
        assert poll_now(fd) == 0


async def test_stopping_the_emulator_kills_open_fds(
    emulator: Path, tmp_path: Path
) -> None:
    sock_path = tmp_path / "h.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(sock_path))
        listener.listen(1)
        async with btdev_util.btdev(tmp_path / "mnt", sock_path) as dev:
            fd = os.open(dev.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            assert dev.process.returncode == 0
            assert not btdev_util.mounted(dev.mountdir)
            with pytest.raises(OSError) as gone:
                os.read(fd, 256)
            assert gone.value.errno == errno.ENOTCONN
        finally:
            # The fd is closed all the same; FUSE's flush reports ENOTCONN.
            with suppress(OSError):
                os.close(fd)


async def test_bthost_drives_the_device(emulator: Path, tmp_path: Path) -> None:
    """The project's BtHost on the far side: the same seam format."""
    from hiomapbridge.sim.bthost import BtHost

    async with trio.open_nursery() as nursery:
        bt = BtHost(tmp_path / "bt.sock", host_timeout=LIMIT)
        await nursery.start(bt.serve)
        async with btdev_util.btdev(tmp_path / "mnt", bt.path) as dev:
            with trio.fail_after(LIMIT):
                await bt.wait_connected()
            fd = os.open(dev.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:

                async def responder() -> None:
                    await trio.lowlevel.wait_readable(fd)
                    frame = os.read(fd, 256)
                    await trio.lowlevel.wait_writable(fd)
                    body = bytes([frame[1] | 4, frame[2], frame[3], 0]) + b"\x01\x3f"
                    os.write(fd, bytes([len(body)]) + body)

                nursery.start_soon(responder)
                answer = await bt.transact(NETFN_APP, CMD_GET_BT_CAPABILITIES)
                assert (answer.cc, answer.data) == (0, b"\x01\x3f")
                assert fcntl.ioctl(fd, BT_BMC_IOCTL_SMS_ATN) == 0
                with trio.fail_after(LIMIT):
                    await bt.wait_attention()
                assert bt.violations == []
            finally:
                os.close(fd)
        nursery.cancel_scope.cancel()
