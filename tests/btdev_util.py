"""Run ``tests/btdev/btdev_fuse.c``: a FUSE stand-in for ``/dev/ipmi-bt-host``.

The emulator is compiled on first use (``cc`` + ``pkg-config fuse3``) into a
per-user cache directory keyed by the source and the flags, so a session
compiles it at most once. When something it needs is missing (a compiler,
the libfuse3 headers, ``/dev/fuse``, the right to mount), :func:`skip_reason`
says what, and :func:`require` skips the test with that reason (or fails it
when ``HIOMAPBRIDGE_REQUIRE_BTDEV=1``, for a CI that must run them).

:func:`btdev` starts the emulator against a host socket that must already be
listening, waits for its ``ready`` line and, on exit, stops it and makes
sure the mount is gone. See ``tests/btdev/README.md`` for the device model.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio

SOURCE: Final = Path(__file__).resolve().parent / "btdev" / "btdev_fuse.c"
DEVICE_NAME: Final = "ipmi-bt-host"
BT_BMC_IOCTL_SMS_ATN: Final = 0xB100  # _IO(0xb1, 0x00)
SMS_ATN_PACKET: Final = b"\xb1"
HOST_BUSY: Final = b"B"
"""One-byte control packet from the host: set H_BUSY (responses not taken)."""
HOST_IDLE: Final = b"b"
"""One-byte control packet from the host: clear H_BUSY."""

READY_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
BUILD_TIMEOUT: Final = 120.0
REQUIRE_ENV: Final = "HIOMAPBRIDGE_REQUIRE_BTDEV"
MNT_DETACH: Final = 2


class Unavailable(Exception):
    """The emulator cannot run here; the message says why."""


def _run(argv: list[str], timeout: float = BUILD_TIMEOUT) -> str:
    """stdout of ``argv``; Unavailable with its stderr if it fails."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise Unavailable(f"{' '.join(argv)} failed ({done.returncode}): {tail}")
    return done.stdout


@functools.cache
def _build() -> Path | Unavailable:
    if not sys.platform.startswith("linux"):
        return Unavailable("FUSE emulation of the BT device needs Linux")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return Unavailable("no C compiler (cc) to build the BT device emulator")
    if shutil.which("pkg-config") is None:
        return Unavailable("pkg-config missing (apt-get install pkg-config)")
    try:
        flags = _run(["pkg-config", "--cflags", "--libs", "fuse3"]).split()
        version = _run(["pkg-config", "--modversion", "fuse3"]).strip()
    except Unavailable as exc:
        return Unavailable(
            f"libfuse3 headers missing (apt-get install libfuse3-dev): {exc}"
        )
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), version.encode(), *map(str.encode, flags)])
    ).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"hiomapbridge-btdev-{os.getuid()}"
    binary = cache / key / "btdev_fuse"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    scratch = binary.with_name(f".btdev_fuse.{os.getpid()}")
    try:
        _run([cc, "-O2", "-Wall", "-o", str(scratch), str(SOURCE), *flags])
    except Unavailable as exc:
        return exc
    os.replace(scratch, binary)  # atomic: a parallel build is harmless
    return binary


def binary() -> Path:
    """The compiled emulator; Unavailable if it cannot be built."""
    built = _build()
    if isinstance(built, Unavailable):
        raise built
    return built


def _probe() -> None:
    """Mount once for real: the only way to learn that mounting is allowed."""
    path = binary()
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        raise Unavailable(f"/dev/fuse unusable: {exc}") from exc
    os.close(fd)
    with tempfile.TemporaryDirectory(prefix="btdev-probe-") as tmp:
        mountdir = Path(tmp) / "mnt"
        mountdir.mkdir()
        sock_path = Path(tmp) / "host.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            listener.bind(str(sock_path))
            listener.listen(1)
            proc = subprocess.Popen(
                [str(path), str(mountdir), str(sock_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
                # "ready", or EOF when it failed (nothing: it hangs)
                line = proc.stdout.readline() if ready else b"(no ready line)"
                if line.strip() != b"ready":
                    proc.kill()
                    _, err = proc.communicate(timeout=STOP_TIMEOUT)
                    raise Unavailable(
                        "cannot mount a FUSE file system here: "
                        + err.decode(errors="replace").strip()
                    )
                if not (mountdir / DEVICE_NAME).exists():
                    raise Unavailable("FUSE mounted, but the device file is missing")
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                unmount(mountdir)


@functools.cache
def skip_reason() -> str | None:
    """Why the emulator cannot run here, or None if it can (checked once)."""
    try:
        _probe()
    except Unavailable as exc:
        return f"BT device emulator unavailable: {exc}"
    return None


def require() -> Path:
    """The emulator binary, or skip the calling test (fail it under
    ``HIOMAPBRIDGE_REQUIRE_BTDEV=1``) with the reason it cannot run."""
    reason = skip_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)")
        pytest.skip(reason)
    return binary()


def mounted(mountdir: Path) -> bool:
    """Whether anything is mounted on ``mountdir`` (per /proc/self/mountinfo)."""
    target = os.path.realpath(mountdir)
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4]
            decoded = point.encode().decode("unicode_escape")  # \040 etc.
            if decoded == target:
                return True
    return False


def unmount(mountdir: Path) -> None:
    """Lazily unmount ``mountdir`` if it is still mounted (a killed emulator
    leaves a dead mount behind): fusermount3 if present, else umount2."""
    if not mounted(mountdir):
        return
    tool = shutil.which("fusermount3")
    if tool is not None:
        done = subprocess.run(
            [tool, "-u", "-z", str(mountdir)],
            capture_output=True,
            timeout=STOP_TIMEOUT,
            check=False,
        )
        if done.returncode == 0:
            return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountdir), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: no longer a mount point
            raise OSError(err, f"umount2 {mountdir}: {os.strerror(err)}")


@attrs.define
class BtDev:
    """A running emulator: ``path`` is the device file to open."""

    mountdir: Path
    process: trio.Process
    log_path: Path
    events: list[str] = attrs.field(factory=list)
    """Lines from the emulator's stdout, in order ("ready", "read-blocked",
    "write-blocked", "host-closed")."""
    closed: bool = False
    """The emulator's stdout ended (it exited)."""
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def path(self) -> Path:
        return self.mountdir / DEVICE_NAME

    def _event(self, line: str | None) -> None:
        if line is None:
            self.closed = True
        else:
            self.events.append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_event(self, name: str, count: int = 1) -> None:
        """Wait until the emulator has printed ``name`` ``count`` times in
        all; RuntimeError if it exits first."""
        while self.events.count(name) < count:
            if self.closed:
                raise RuntimeError(
                    f"btdev_fuse exited before {name!r} x{count}:\n{self.log()}"
                )
            await self._changed.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def _read_events(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._event(line.decode(errors="replace"))
        self._event(None)


async def _stop(dev: BtDev) -> int:
    """SIGTERM, bounded wait, SIGKILL if needed; then no mount is left."""
    with trio.CancelScope(shield=True):
        if dev.process.returncode is None:
            dev.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await dev.process.wait()
            if dev.process.returncode is None:
                dev.process.kill()
                await dev.process.wait()
        await trio.to_thread.run_sync(unmount, dev.mountdir)
    code = dev.process.returncode
    assert code is not None
    return code


@asynccontextmanager
async def btdev(
    mountdir: str | os.PathLike[str],
    hostsock: str | os.PathLike[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
) -> AsyncIterator[BtDev]:
    """Mount the emulated device on ``mountdir`` (created if missing),
    connected to the host simulator listening on ``hostsock``; yield once it
    said ``ready``. Its stderr goes to ``log_path`` (default: beside
    ``mountdir``). Leaving the block stops it and unmounts; RuntimeError if
    it had not exited cleanly by itself (a crash, say)."""
    path = binary()
    mount = Path(mountdir)
    await trio.Path(mount).mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path is not None else mount.with_suffix(".log")
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [str(path), str(mount), os.fspath(hostsock)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    dev = BtDev(mount, process, log)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(dev._read_events, process.stdout)
            with trio.fail_after(READY_TIMEOUT):
                await dev.wait_event("ready")
            yield dev
            early = dev.process.returncode
            if early is not None:
                raise RuntimeError(
                    f"btdev_fuse exited by itself ({early}):\n{dev.log()}"
                )
            code = await _stop(dev)
            if code != 0:
                raise RuntimeError(f"btdev_fuse stopped with {code}:\n{dev.log()}")
    finally:
        await _stop(dev)


__all__ = [
    "BT_BMC_IOCTL_SMS_ATN",
    "DEVICE_NAME",
    "HOST_BUSY",
    "HOST_IDLE",
    "SMS_ATN_PACKET",
    "BtDev",
    "Unavailable",
    "binary",
    "btdev",
    "mounted",
    "require",
    "skip_reason",
    "unmount",
]
