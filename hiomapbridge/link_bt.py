"""The host through the BT interface itself: ``--host bt:PATH``.

PATH is either the kernel's BT BMC character device (``/dev/ipmi-bt-host``,
driver ``drivers/char/ipmi/bt-bmc.c``) or a unix socket that the bridge
connects to with SOCK_SEQPACKET (simulators, emulator adapters).  Both carry
the same frames (:mod:`hiomapbridge.bt`), one per read/write or packet:

* device: one ``read()`` is one request, one ``write()`` one response; the
  write returning means the driver put the bytes in the FIFO for the host,
  which is this mode's "delivered".  The driver's read and write wait for
  the hardware themselves whatever ``O_NONBLOCK`` says, so every read and
  write happens only after ``poll`` said it would not block.  SMS_ATN is
  ``ioctl(BT_BMC_IOCTL_SMS_ATN)``.  A device that cannot be opened, or that
  fails, ends the bridge with exit status 1 so that systemd restarts it.
* socket: a successful ``send()`` is "delivered"; SMS_ATN is the one-byte
  packet ``0xB1``.  A missing socket or a peer that goes away (the host
  powered off) is logged and retried every ``RECONNECT_INTERVAL`` (0.5 s);
  waiting events are announced again as soon as the host is back.

A PATH that is a socket, or that does not exist and is not under ``/dev/``,
is taken for the socket seam; anything else is opened as the device.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import stat
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from . import bt
from .dbus import BusClosed
from .hostlink import (
    HostGone,
    HostLinkError,
    HostRequest,
    Outcome,
    not_started,
    nothing,
)
from .ipmi import CompletionCode, response_netfn
from .ratelimit import RateLimitedLog

log = logging.getLogger("hiomapbridge")

#: How often a missing or closed socket seam is tried again.
RECONNECT_INTERVAL = 0.5
#: Bytes asked of one read: more than a frame can be, so that an oversized
#: one shows as such instead of being cut to size.
READ_SIZE = 256
#: Responses waiting for the medium to take them; past this the host is not
#: reading and further responses fail at once (logged), so memory stays
#: bounded.
MAX_UNSENT = 256


class _Medium(Protocol):
    def fileno(self) -> int: ...
    def read(self) -> bytes: ...
    def write(self, frame: bytes) -> None: ...
    def raise_attention(self) -> None: ...
    def close(self) -> None: ...


class _Device:
    """The kernel BT BMC device: reads and writes only once poll says so."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise HostLinkError(_open_failure(path, exc)) from exc
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN | select.POLLOUT)

    def fileno(self) -> int:
        return self.fd

    def _ready(self, event: int) -> bool:
        return any(ev & event for _fd, ev in self._poll.poll(0))

    def read(self) -> bytes:
        # The driver's read waits for the host's next request: never call it
        # unless poll says a request is there.
        if not self._ready(select.POLLIN):
            raise BlockingIOError
        data = os.read(self.fd, READ_SIZE)
        if not data:
            raise OSError(errno.EIO, "the device returned end of file")
        return data

    def write(self, frame: bytes) -> None:
        # The driver's write waits for the host to drain the previous
        # response: never call it unless poll says it will not wait.
        if not self._ready(select.POLLOUT):
            raise BlockingIOError
        written = os.write(self.fd, frame)
        if written != len(frame):
            raise OSError(errno.EIO, f"short write ({written} of {len(frame)} bytes)")

    def raise_attention(self) -> None:
        fcntl.ioctl(self.fd, bt.BT_BMC_IOCTL_SMS_ATN)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


class _Seam:
    """One connection of the SOCK_SEQPACKET seam."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)  # a full listen backlog is EAGAIN, not a wait
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes:
        data = self.sock.recv(READ_SIZE)
        if not data:
            raise EOFError("the host closed the connection")
        return data

    def write(self, frame: bytes) -> None:
        sent = self.sock.send(frame)
        if sent != len(frame):  # a SEQPACKET send is all or nothing
            raise OSError(errno.EIO, f"short send ({sent} of {len(frame)} bytes)")

    def raise_attention(self) -> None:
        self.write(bt.ATTENTION_PACKET)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def _open_failure(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        hint = "it does not exist (is the bt-bmc driver loaded?)"
    elif exc.errno == errno.EBUSY:
        hint = "another process has it open (is btbridged still running?)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied (see the unit's DeviceAllow= and the device's group)"
    else:
        hint = os.strerror(exc.errno or errno.EIO)
    return f"cannot open the BT device {path}: {hint}"


def is_socket_path(path: str) -> bool:
    """Whether ``bt:PATH`` means the socket seam rather than the device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return not os.path.abspath(path).startswith("/dev/")
    except OSError:
        return False
    return stat.S_ISSOCK(mode)


class BtLink:
    """The host link of ``--host bt:PATH``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"bt:{path}"
        self.is_socket = is_socket_path(path)
        self._medium: _Medium | None = None
        self._connection = 0  # counts connections; a request's origin
        self._unsent: deque[tuple[int, bytes, Outcome | None]] = deque()
        self._unsent_wake = trio.Event()
        self._on_request: Callable[[HostRequest], None] = not_started
        self._on_connect: Callable[[], None] = nothing
        self.dropped = RateLimitedLog(log, logging.WARNING)

    # -- start-up and the reader -------------------------------------------

    async def start(
        self,
        nursery: trio.Nursery,
        on_request: Callable[[HostRequest], None],
        on_connect: Callable[[], None],
    ) -> None:
        self._on_request = on_request
        self._on_connect = on_connect
        if self.is_socket:
            nursery.start_soon(self._run_seam)
        else:
            self._connected(_Device(self.path))
            self._on_connect()  # SMS_ATN raised while starting up went nowhere
            nursery.start_soon(self._run_device)
        nursery.start_soon(self._run_writer)

    def peer(self) -> str:
        if self.is_socket:
            state = "connected" if self._medium is not None else "not connected"
            return f"host socket {self.path} ({state})"
        return f"BT device {self.path}"

    def _connected(self, medium: _Medium) -> None:
        self._medium = medium
        self._connection += 1

    def _disconnected(self, why: str) -> None:
        medium, self._medium = self._medium, None
        if medium is not None:
            medium.close()
        unsent, self._unsent = self._unsent, deque()
        for _conn, _frame, outcome in unsent:
            if outcome is not None:
                outcome(HostGone(why))

    async def _run_device(self) -> None:
        medium = self._medium
        assert medium is not None
        try:
            await self._read(medium)
        except (OSError, EOFError) as exc:
            raise HostLinkError(f"the BT device {self.path} failed: {exc}") from exc
        finally:
            self._disconnected("the BT device is closed")

    async def _run_seam(self) -> None:
        failures = 0
        while True:
            try:
                medium = _Seam(self.path)
            except OSError as exc:
                if failures == 0:
                    log.warning(
                        "host socket %s: %s; retrying every %ss",
                        self.path,
                        exc.strerror or exc,
                        RECONNECT_INTERVAL,
                    )
                failures += 1
                await trio.sleep(RECONNECT_INTERVAL)
                continue
            log.info(
                "host connected on %s%s",
                self.path,
                f" (after {failures} attempts)" if failures else "",
            )
            failures = 0
            self._connected(medium)
            self._on_connect()
            try:
                await self._read(medium)
            except (OSError, EOFError) as exc:
                log.warning(
                    "host on %s went away: %s; reconnecting every %ss",
                    self.path,
                    exc,
                    RECONNECT_INTERVAL,
                )
            finally:
                self._disconnected("the host disconnected")
            await trio.sleep(RECONNECT_INTERVAL)

    async def _read(self, medium: _Medium) -> None:
        connection = self._connection
        while True:
            # One frame per readiness: a host keeps one request outstanding,
            # so reading on until EAGAIN would cost a failed read (and its
            # exception) per request.  Every wait is a checkpoint, so a
            # flooding host cannot starve the other tasks either.
            await trio.lowlevel.wait_readable(medium.fileno())
            try:
                frame = medium.read()
            except BlockingIOError:
                continue
            try:
                self._frame(frame, connection)
            except BusClosed:
                raise
            except Exception:  # a bug must not take the host link down
                log.exception("handling a host frame failed")

    def _frame(self, frame: bytes, connection: int) -> None:
        parsed = bt.parse_request(frame)
        now = trio.current_time()
        if isinstance(parsed, bt.Request):
            self._on_request(
                HostRequest(
                    parsed.seq,
                    parsed.netfn,
                    parsed.lun,
                    parsed.cmd,
                    parsed.data,
                    now,
                    connection,
                )
            )
        elif isinstance(parsed, bt.BadLength):
            self.dropped(
                "host frame of %d bytes says length %d (seq=%d netfn=%#04x "
                "cmd=%#04x): answered cc 0xC7",
                parsed.size,
                parsed.length_byte,
                parsed.seq,
                parsed.netfn,
                parsed.cmd,
            )
            req = HostRequest(
                parsed.seq, parsed.netfn, parsed.lun, parsed.cmd, b"", now, connection
            )
            self.respond(req, CompletionCode.REQ_DATA_LEN_INVALID, b"", None)
        else:
            self.dropped(
                "dropped a host frame of %d bytes: too short for netfn, seq and cmd",
                parsed.size,
            )

    # -- writing -------------------------------------------------------------

    def respond(
        self, req: HostRequest, cc: int, data: bytes, on_outcome: Outcome | None
    ) -> None:
        frame = bt.encode_response(
            response_netfn(req.netfn), req.lun, req.seq, req.cmd, cc, data
        )
        if not self.current(req):
            self._failed(
                on_outcome,
                HostGone("the host that sent it is gone"),
                req,
            )
            return
        self._write(frame, on_outcome, req)

    def current(self, req: HostRequest) -> bool:
        return req.origin == self._connection and self._medium is not None

    def attention(self, done: Outcome) -> None:
        medium = self._medium
        if medium is None:
            done(HostGone("no host connected"))
            return
        if self.is_socket:
            # A packet, in order with the responses.
            self._write(bt.ATTENTION_PACKET, done, "SMS_ATN")
            return
        try:
            medium.raise_attention()
        except OSError as exc:
            done(exc)
        else:
            done(None)

    def _write(
        self, frame: bytes, outcome: Outcome | None, what: HostRequest | str
    ) -> None:
        medium = self._medium
        assert medium is not None
        if not self._unsent:
            try:
                medium.write(frame)
            except BlockingIOError:
                pass
            except OSError as exc:
                self._failed(outcome, exc, what)
                return
            else:
                if outcome is not None:
                    outcome(None)
                return
        if len(self._unsent) >= MAX_UNSENT:
            full = OSError(errno.ENOBUFS, "the host is not reading")
            self._failed(outcome, full, what)
            return
        self._unsent.append((self._connection, frame, outcome))
        self._unsent_wake.set()

    def _failed(
        self, outcome: Outcome | None, exc: BaseException, what: HostRequest | str
    ) -> None:
        """Tell ``outcome`` (or the log) why ``what`` was not written; the
        request is described only here, off the hot path."""
        if outcome is not None:
            outcome(exc)
            return
        if isinstance(what, HostRequest):
            what = f"the response to {what.describe()}"
        self.dropped("%s not sent: %s", what, exc)

    async def _run_writer(self) -> None:
        """Write what the medium did not take at once, in order."""
        while True:
            while not self._unsent:
                self._unsent_wake = trio.Event()
                await self._unsent_wake.wait()
            connection, frame, outcome = self._unsent[0]
            medium = self._medium
            if medium is None or connection != self._connection:
                self._unsent.popleft()
                if outcome is not None:
                    outcome(HostGone("the host disconnected"))
                continue
            try:
                await trio.lowlevel.wait_writable(medium.fileno())
            except trio.ClosedResourceError:
                continue  # it went away while we waited: failed above
            if medium is not self._medium or not self._unsent:
                continue  # the connection changed while we waited
            try:
                medium.write(frame)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._unsent.popleft()
                self._failed(outcome, exc, "a queued response")
                continue
            self._unsent.popleft()
            if outcome is not None:
                outcome(None)
