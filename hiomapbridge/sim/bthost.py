"""The host end of the bridge's ``bt:PATH`` seam: a BT interface over a socket.

With ``--host bt:PATH`` the bridge owns the host's BT interface itself (as
kcsbridged owns a KCS device), so nothing stands between it and the host but
the BT FIFO. This module plays the host side of that FIFO:

* PATH is a unix socket; this simulator binds and listens, the bridge
  connects with ``SOCK_SEQPACKET``. One connection at a time: a new one
  replaces the old one (a restarted bridge), and losing it is survived.
* every packet is exactly one frame in the Linux ``bt-bmc`` device format
  (wire reference section 8): a request (host to bridge) is
  ``[len, netfn<<2 | lun, seq, cmd, data...]``, a response (bridge to host)
  ``[len, netfn<<2 | lun, seq, cmd, cc, data...]``; ``len`` counts the bytes
  after itself; a frame is at most 64 bytes (the FIFO), ``len`` included;
* the one-byte packet ``0xB1`` from the bridge is SMS_ATN.

:class:`BtHost` has the host-side API of
:class:`~hiomapbridge.sim.btbridged.BtBridge` (:meth:`~BtHost.transact`,
:meth:`~BtHost.wait_attention`), so the skiboot-like
:class:`~hiomapbridge.sim.host.HostClient` runs over it unchanged. Requests stay
in the "FIFO" while no bridge is connected and go out when one connects; a
request the bridge read and never answered is abandoned after
``host_timeout`` (:class:`~hiomapbridge.sim.btbridged.BtTimeout`). Several
requests may be outstanding at once; responses are matched by seq.

Every response is checked (length byte, size, netfn, lun, cmd, seq) and what
is wrong is appended to :attr:`BtHost.violations` instead of raising.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import trio

from hiomapbridge import bt
from hiomapbridge.ipmi import response_netfn
from hiomapbridge.sim import host as host_cli
from hiomapbridge.sim.btbridged import (
    BT_MAX_MESSAGE,
    MAX_REQUEST_DATA,
    Attention,
    BtTimeout,
    HostSide,
    NotServing,
    Response,
    Stamp,
    Transaction,
    _tx_row,
)
from hiomapbridge.sim.host import HostClient
from hiomapbridge.systemd import setup_logging

log = logging.getLogger(__name__)

ATTENTION: Final = bt.ATTENTION_PACKET[0]
"""The one-byte packet the bridge sends to raise SMS_ATN."""

DEFAULT_HOST_TIMEOUT: Final = 5.0
RECV_SIZE: Final = 4096
"""Larger than any legal frame, so an oversized one is seen whole."""


@attrs.frozen
class Frame:
    """One packet on the seam: ``direction`` is ``"h2b"`` (host to bridge)
    or ``"b2h"``; ``connection`` counts connections from 1."""

    direction: Literal["h2b", "b2h"]
    data: bytes
    at: Stamp
    connection: int


def encode_request(netfn: int, cmd: int, data: bytes, seq: int, lun: int = 0) -> bytes:
    """A request frame; ValueError if it exceeds the 64-byte FIFO."""
    if len(data) > MAX_REQUEST_DATA:
        raise ValueError(
            f"request data {len(data)} bytes > {MAX_REQUEST_DATA}: the frame "
            f"would exceed the {BT_MAX_MESSAGE}-byte BT FIFO"
        )
    body = bytes([(netfn & 0x3F) << 2 | (lun & 0x3), seq & 0xFF, cmd & 0xFF]) + data
    return bytes([len(body)]) + body


def decode_response(packet: bytes) -> Response | None:
    """The response in ``packet``, or None if it is too short to be one
    (the length byte is not checked: see :meth:`BtHost.check`)."""
    if len(packet) < 5:
        return None
    return Response(
        cc=packet[4],
        data=bytes(packet[5:]),
        seq=packet[2],
        netfn=packet[1] >> 2,
        lun=packet[1] & 0x3,
        cmd=packet[3],
    )


class _Connection:
    def __init__(self, sock: trio.socket.SocketType, number: int) -> None:
        self.sock = sock
        self.number = number
        self.scope = trio.CancelScope()
        self.closed = False


class _Pending:
    """A request written to the FIFO, waiting for its response."""

    def __init__(self, tx: Transaction, frame: bytes, raw: bool) -> None:
        self.tx = tx
        self.frame = frame
        self.raw = raw
        self.answered = trio.Event()


class BtHost(HostSide):
    """The host's end of the ``bt:`` seam. Start with
    ``await nursery.start(bt.serve)``; then the bridge may connect to
    ``path``.

    Attributes for tests: ``transactions`` (every :meth:`transact`, as
    :class:`~hiomapbridge.sim.btbridged.Transaction`; ``delivered`` is the
    response, ``outcome`` ``pending``/``delivered``/``abandoned``/``closed``),
    ``frames`` (every packet both ways, when ``record_frames``),
    ``attentions`` (an :class:`~hiomapbridge.sim.btbridged.Attention` per
    SMS_ATN packet; ``sender`` is None), ``violations``,
    ``unmatched`` (responses matching no :meth:`transact`: answers to
    :meth:`send_raw` requests, late or unknown ones) and ``late`` (responses
    to requests the host had already abandoned).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        host_timeout: float = DEFAULT_HOST_TIMEOUT,
        record_frames: bool = True,
    ) -> None:
        self.path = Path(path)
        self.host_timeout = host_timeout
        self.record_frames = record_frames
        self.transactions: list[Transaction] = []
        self.frames: list[Frame] = []
        self.attentions: list[Attention] = []
        self.violations: list[str] = []
        self.unmatched: list[Response] = []
        self.late: list[Response] = []
        self.connections = 0
        """How many connections the bridge has made so far."""

        self._serving = False
        self._conn: _Connection | None = None
        self._send_lock = trio.Lock()
        self._outstanding: dict[int, _Pending] = {}
        self._abandoned: dict[int, Transaction] = {}
        self._next_seq = 0
        self._attention_latched = False
        self._raw_read = 0
        self._change = trio.Event()

    # -- serving ----------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``path`` (a stale socket file is removed first) and
        serve connections, one at a time, until cancelled."""
        _unlink_stale(self.path)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await listener.bind(os.fspath(self.path))
            listener.listen(4)
            self._serving = True
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    self._replace(sock, nursery)
        finally:
            self._serving = False
            listener.close()
            if self._conn is not None:
                self._close(self._conn)
            with suppress(FileNotFoundError):
                self.path.unlink()
            for p in list(self._outstanding.values()):
                if p.tx.outcome == "pending":
                    p.tx.outcome = "closed"
                p.answered.set()
            self._outstanding.clear()
            self._changed()

    def _replace(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        if self._conn is not None:
            log.info("new bridge connection: dropping %d", self._conn.number)
            self._close(self._conn)
        self.connections += 1
        conn = _Connection(sock, self.connections)
        self._conn = conn
        log.info("bridge connected (connection %d)", conn.number)
        nursery.start_soon(self._read, conn)
        self._changed()

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.scope.cancel()
        conn.sock.close()
        if self._conn is conn:
            self._conn = None
        self._changed()

    async def _read(self, conn: _Connection) -> None:
        with conn.scope:
            try:
                while True:
                    packet = await conn.sock.recv(RECV_SIZE)
                    if not packet:
                        log.info("bridge closed connection %d", conn.number)
                        break
                    self._packet(packet, conn)
            except (OSError, trio.ClosedResourceError) as exc:
                log.info("connection %d lost: %s", conn.number, exc)
        self._close(conn)

    def _packet(self, packet: bytes, conn: _Connection) -> None:
        if self.record_frames:
            self.frames.append(Frame("b2h", packet, Stamp.now(), conn.number))
        if packet == bytes([ATTENTION]):
            self.attentions.append(Attention(len(self.attentions), Stamp.now(), None))
            self._attention_latched = True
            self._changed()
            return
        response = decode_response(packet)
        if response is None:
            self._violation(f"short frame from the bridge: {packet.hex()}")
            return
        self.check(packet)
        p = self._outstanding.pop(response.seq, None)
        if p is None:
            self.unmatched.append(response)
            tx = self._abandoned.pop(response.seq, None)
            if tx is not None:
                log.info("late response for abandoned seq %#04x", response.seq)
                self.late.append(response)
            else:
                self._violation(
                    f"response with seq {response.seq:#04x} matches no request: "
                    f"{packet.hex()}"
                )
            self._changed()
            return
        tx = p.tx
        if response.netfn != response_netfn(tx.netfn):
            self._violation(
                f"seq {tx.seq:#04x}: response netfn {response.netfn:#04x} for "
                f"request netfn {tx.netfn:#04x}"
            )
        if response.cmd != tx.cmd:
            self._violation(
                f"seq {tx.seq:#04x}: response cmd {response.cmd:#04x} for "
                f"request cmd {tx.cmd:#04x}"
            )
        if response.lun != tx.lun:
            self._violation(
                f"seq {tx.seq:#04x}: response lun {response.lun} for "
                f"request lun {tx.lun}"
            )
        tx.response = tx.delivered = response
        tx.responded = tx.delivered_at = Stamp.now()
        tx.outcome = "delivered"
        if p.raw:
            self.unmatched.append(response)
        p.answered.set()
        self._changed()

    def check(self, packet: bytes) -> None:
        """Record the framing violations of one response packet."""
        if packet[0] != len(packet) - 1:
            self._violation(
                f"length byte {packet[0]} but {len(packet) - 1} bytes follow: "
                f"{packet.hex()}"
            )
        if len(packet) > BT_MAX_MESSAGE:
            self._violation(
                f"frame of {len(packet)} bytes exceeds the {BT_MAX_MESSAGE}-byte "
                "BT FIFO"
            )

    def _violation(self, what: str) -> None:
        log.warning("protocol violation: %s", what)
        self.violations.append(what)
        self._changed()

    # -- the host side ----------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def wait_connected(self) -> None:
        """Wait until a bridge is connected."""
        await self.wait_until(lambda: self._conn is not None)

    def _allocate_seq(self) -> int:
        for _ in range(256):
            seq, self._next_seq = self._next_seq, (self._next_seq + 1) & 0xFF
            if seq not in self._outstanding:
                return seq
        raise RuntimeError("256 requests outstanding: no free BT sequence number")

    async def _write(self, frame: bytes) -> None:
        """Put ``frame`` in the FIFO: send it on the current connection,
        waiting for one if there is none (or the send failed). The frame is
        logged before the send, so the log never lags what the bridge saw."""
        while True:
            await self.wait_connected()
            conn = self._conn
            assert conn is not None
            entry = Frame("h2b", frame, Stamp.now(), conn.number)
            if self.record_frames:
                self.frames.append(entry)
            try:
                async with self._send_lock:
                    if conn.closed:
                        raise trio.ClosedResourceError
                    await conn.sock.send(frame)
            except (OSError, trio.ClosedResourceError) as exc:
                log.info("send on connection %d failed: %r", conn.number, exc)
                if self.record_frames:
                    self.frames.remove(entry)
                self._close(conn)
                continue
            self._changed()
            return

    async def transact(
        self, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
    ) -> Response:
        """Send one request as the host and wait for the response with its seq.

        Raises :class:`~hiomapbridge.sim.btbridged.BtTimeout` when no
        response arrives within ``host_timeout`` (counted from the call,
        including any wait for a bridge to connect), ValueError if the frame
        would exceed 64 bytes, NotServing unless :meth:`serve` runs.
        """
        if not self._serving:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise NotServing("BtHost.serve() is not running")
        seq = self._allocate_seq()
        frame = encode_request(netfn, cmd, data, seq, lun)
        tx = Transaction(
            seq, netfn & 0x3F, lun & 0x3, cmd & 0xFF, bytes(data), Stamp.now()
        )
        p = _Pending(tx, frame, raw=False)
        self._outstanding[seq] = p
        self._abandoned.pop(seq, None)
        self.transactions.append(tx)
        self._changed()
        try:
            with trio.move_on_after(self.host_timeout):
                await self._write(frame)
                await p.answered.wait()
            if tx.delivered is None:
                if tx.outcome == "pending":
                    tx.outcome = "abandoned"
                raise BtTimeout(
                    f"no response to netfn {netfn:#04x} cmd {cmd:#04x} seq {seq:#04x}"
                )
            return tx.delivered
        finally:
            if self._outstanding.get(seq) is p:
                del self._outstanding[seq]
                self._abandoned[seq] = tx
            if tx.outcome == "pending":
                tx.outcome = "abandoned"
            self._changed()

    async def send_raw(self, packet: bytes) -> None:
        """Write any bytes as one packet (waiting for a connection). If they
        parse as a request (4 bytes or more), a response with their seq is
        expected: it lands in :attr:`unmatched` (see :meth:`wait_raw`)
        without a violation."""
        if len(packet) >= 4 and packet[2] not in self._outstanding:
            tx = Transaction(
                packet[2], packet[1] >> 2, packet[1] & 0x3, packet[3],
                bytes(packet[4:]), Stamp.now(),
            )  # fmt: skip
            self._outstanding[packet[2]] = _Pending(tx, packet, raw=True)
        await self._write(packet)

    async def wait_raw(self) -> Response:
        """The next entry of :attr:`unmatched` not yet returned by this
        method (responses to :meth:`send_raw`, late or unknown ones)."""
        await self.wait_until(lambda: self._raw_read < len(self.unmatched))
        self._raw_read += 1
        return self.unmatched[self._raw_read - 1]

    async def disconnect(self) -> None:
        """Close the current connection ("host powered off"); keep listening.
        A request already written and not yet answered stays outstanding
        until its ``host_timeout``."""
        await trio.lowlevel.checkpoint()
        if self._conn is not None:
            self._close(self._conn)

    @property
    def outstanding(self) -> list[Transaction]:
        return [p.tx for p in self._outstanding.values() if not p.raw]

    # -- reports ----------------------------------------------------------

    def timeline(self) -> Iterator[dict[str, Any]]:
        """Transactions and attentions as dicts ordered by time (the rows of
        :meth:`BtBridge.timeline <hiomapbridge.sim.btbridged.BtBridge.timeline>`)."""
        rows = [_tx_row(tx) for tx in self.transactions]
        rows += [
            {"t": a.at.trio, "monotonic": a.at.monotonic, "kind": "attention",
             "index": a.index}
            for a in self.attentions
        ]  # fmt: skip
        return iter(sorted(rows, key=lambda r: float(r["t"])))

    def summary(self) -> dict[str, Any]:
        """Counts for a run's summary."""
        outcomes: dict[str, int] = {}
        for tx in self.transactions:
            outcomes[tx.outcome] = outcomes.get(tx.outcome, 0) + 1
        return {
            "transactions": len(self.transactions),
            "outcomes": outcomes,
            "attentions": len(self.attentions),
            "connections": self.connections,
            "violations": len(self.violations),
            "unmatched": len(self.unmatched),
            "late": len(self.late),
        }


def _unlink_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()


@asynccontextmanager
async def run_bt_host(
    socket_path: str | os.PathLike[str],
    lpc_path: str | os.PathLike[str],
    *,
    start: bool = True,
    host_timeout: float = DEFAULT_HOST_TIMEOUT,
    **options: Any,
) -> AsyncIterator[HostClient[BtHost]]:
    """:func:`~hiomapbridge.sim.host.run_host` over the ``bt:`` seam: listen
    on ``socket_path``, run the skiboot-like host client on it and, with
    ``start``, wait for a bridge and do the start-up handshake. Yields the
    :class:`~hiomapbridge.sim.host.HostClient` (its ``bt`` is the
    :class:`BtHost`). ``options`` go to the client."""
    async with trio.open_nursery() as nursery:
        bt = BtHost(socket_path, host_timeout=host_timeout)
        await nursery.start(bt.serve)
        host = HostClient(bt, lpc_path, **options)
        await nursery.start(host.run)
        if start:
            await bt.wait_connected()
            await host.start()
        yield host
        nursery.cancel_scope.cancel()


# -- CLI -------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register ``bthost`` (``read``, ``write``, ``erase``, ``watch``)."""
    p = subparsers.add_parser(
        "bthost",
        help="a skiboot-like host at the BT end of the bridge's bt:PATH seam",
        description=(
            "Listen on a SEQPACKET unix socket for the bridge (started with "
            "--host bt:PATH), then act as a host modelled on skiboot's "
            "ipmi-hiomap over it and do one thing."
        ),
    )
    p.add_argument(
        "--socket", type=Path, required=True, metavar="PATH",
        help="the unix socket to listen on (the bridge's bt:PATH)",
    )  # fmt: skip
    p.add_argument(
        "--host-timeout", type=float, default=DEFAULT_HOST_TIMEOUT,
        help="seconds the host waits for each response (the first waits for "
        "the bridge to connect first, however long that takes)",
    )  # fmt: skip
    host_cli.add_actions(p, None, run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "bthost-sim")

    async def main() -> int:
        lpc = args.lpc if args.lpc is not None else Path("/dev/null")
        watch = args.host_command == "watch"
        hosted = run_bt_host(
            args.socket, lpc, start=not watch or args.start,
            host_timeout=args.host_timeout, flash_lost=args.flash_lost,
        )  # fmt: skip
        return await host_cli.do_action(hosted, args)

    return host_cli.run_action(main)


__all__ = [
    "ATTENTION",
    "BtHost",
    "Frame",
    "add_parser",
    "decode_response",
    "encode_request",
    "run",
    "run_bt_host",
]
