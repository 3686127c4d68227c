"""A host flash client behaving like skiboot's ``libflash/ipmi-hiomap.c``.

It talks IPMI through a :class:`~hiomapbridge.sim.btbridged.BtBridge` (in
process, no bus hop), or anything with its host-side API (:class:`HostBt`,
e.g. :class:`~hiomapbridge.sim.bthost.BtHost`), and moves flash data through
the LPC file that the hiomapd emulator maps the LPC firmware space to.

Behaviour taken from skiboot:

* sequence numbers: one 8-bit counter, pre-incremented for every HIOMAP
  command (the first command carries 1; 255 wraps to 0);
* start-up: assume DAEMON_READY, ACK ``0x03``, GET_INFO (v2), GET_FLASH_INFO;
* responses: cc != 0 fails the command; the echoed seq must match; each
  command's response has an exact size (GET_INFO/GET_FLASH_INFO 6,
  CREATE_*_WINDOW 8, the rest 2);
* events: on SMS_ATN, Get Message Flags; if bit ``0x02``, one Read Event
  Message Buffer; records other than id ``0x5555`` type ``0xC0`` are
  dropped, command ``0x0F`` carries the event byte; errors are dropped
  silently. A new byte replaces the state except the reset bits, which
  stick until ACKed: ``state = byte | (state & 0x03)``;
* before every flash operation: the reset bits are taken and ACKed in one
  ACK (restored if that fails), the window is closed, and after
  PROTOCOL_RESET GET_INFO and GET_FLASH_INFO are redone;
* before every message: DAEMON_READY clear -> :class:`DeviceGone` (nothing is
  sent, not even ACK); FLASH_CONTROL_LOST -> :class:`TryAgain`;
* windows: the current window is reused when it has the right kind and
  covers the whole range; otherwise a new one is created and the returned
  size/offset honoured (the operation proceeds window by window). Reads
  are re-validated after reading the LPC space (an event meanwhile fails
  the read with :class:`TryAgain`). Writes: write window, LPC write,
  MARK_DIRTY, FLUSH per window; erase: write window, ERASE, FLUSH.

Deliberate differences: ranges are converted to blocks rounding outwards
(skiboot truncates, which can under-cover unaligned ranges); by default an
operation fails with :class:`DeviceGone` while DAEMON_READY is clear even
when it would need no message (skiboot would still read a still-valid
window; ``strict_daemon_ready=False`` restores that); ``flash_lost="wait"``
waits for FLASH_CONTROL_LOST to clear instead of raising TryAgain. Like
skiboot it negotiates v2 only (the bridge never forwards a lower version).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import attrs
import trio

from hiomapbridge.dbus import open_bus
from hiomapbridge.hiomap import (
    Command,
    InfoV1,
    pack_request,
    unpack_flash_info,
    unpack_get_info,
    unpack_window,
    window_args,
)
from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    MESSAGE_FLAG_EVENT_BUFFER_FULL,
    NETFN_APP,
    NETFN_OEM_IBM,
    SEL_CMD_HIOMAP_EVENT,
    parse_event_record,
)
from hiomapbridge.sim.btbridged import (
    DEFAULT_HOST_TIMEOUT,
    DEFAULT_TIMEOUT,
    BtBridge,
    BtTimeout,
    Response,
)

log = logging.getLogger(__name__)

PROTOCOL_RESET: Final = 0x01
WINDOW_RESET: Final = 0x02
ACK_MASK: Final = 0x03
FLASH_CONTROL_LOST: Final = 0x40
DAEMON_READY: Final = 0x80

_RESPONSE_SIZE: Final = {
    Command.GET_INFO: 6,
    Command.GET_FLASH_INFO: 6,
    Command.CREATE_READ_WINDOW: 8,
    Command.CREATE_WRITE_WINDOW: 8,
}
_MAX_RETRIES: Final = 8


class HiomapError(Exception):
    """A flash operation failed."""


class DeviceGone(HiomapError):
    """DAEMON_READY is clear: the host sends nothing until it is set again."""


class TryAgain(HiomapError):
    """FLASH_CONTROL_LOST is set, or an event invalidated the window mid-way."""


class CommandFailed(HiomapError):
    """A command was answered with a non-zero completion code."""

    def __init__(self, command: int, cc: int) -> None:
        super().__init__(f"{_name(command)} failed: cc {cc:#04x}")
        self.command = command
        self.cc = cc


class NoResponse(HiomapError):
    """A command got no answer at all (the response was lost)."""


class ProtocolError(HiomapError):
    """A response the client cannot accept (size, seq, window)."""


class HostBt(Protocol):
    """What the host client needs of its BT interface."""

    async def transact(
        self, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
    ) -> Response: ...

    async def wait_attention(self) -> None: ...


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command:#04x}"


@attrs.frozen
class EventRecord:
    """One record fetched by Read Event Message Buffer.

    ``command``/``data`` are bytes 11 and 12 (None for a record skiboot
    drops); ``state`` is the host's event state after applying it.
    """

    trio_time: float
    monotonic: float
    record: bytes
    command: int | None
    data: int | None
    state: int

    @property
    def is_hiomap(self) -> bool:
        return self.command == SEL_CMD_HIOMAP_EVENT


BtT = TypeVar("BtT", bound=HostBt)


@attrs.define(eq=False)
class HostClient(Generic[BtT]):
    """The host client over any BT interface ``bt`` (see :class:`HostBt`).
    Run :meth:`run` (event handling) in a nursery, then :meth:`start`; or
    use :func:`run_host`. :data:`Host` is the client over the btbridged
    stand-in."""

    bt: BtT
    lpc_path: Path = attrs.field(converter=Path)
    flash_lost: Literal["raise", "wait"] = "raise"
    strict_daemon_ready: bool = True

    seq: int = 0
    state: int = DAEMON_READY
    version: int | None = None
    block_size_shift: int = 12
    timeout: int = 0
    flash_size: int = 0
    erase_size: int = 0
    window_state: Literal["closed", "read", "write"] = "closed"
    window_lpc: int = 0  # bytes
    window_size: int = 0  # bytes
    window_pos: int = 0  # flash offset of the window, bytes

    events: list[EventRecord] = attrs.field(factory=list)
    """Every record fetched, in order (HIOMAP events, heartbeats, junk)."""
    fetch_errors: list[str] = attrs.field(factory=list)

    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _change: trio.Event = attrs.field(factory=trio.Event)

    # -- low level ----------------------------------------------------------

    async def raw(self, netfn: int, cmd: int, data: bytes = b"") -> Response:
        """Send an arbitrary IPMI request; no checks, no state changes."""
        return await self.bt.transact(netfn, cmd, data)

    def _check_ready(self) -> None:
        if not self.state & DAEMON_READY:
            raise DeviceGone("BMC daemon not ready (DAEMON_READY clear)")
        if self.state & FLASH_CONTROL_LOST:
            raise TryAgain("BMC lost flash control (FLASH_CONTROL_LOST)")

    async def command(self, command: int, args: bytes = b"") -> bytes:
        """Send one HIOMAP command with the next seq; return its payload.

        Checks readiness first (nothing is sent if it fails), then the
        answer as skiboot does.
        """
        self._check_ready()
        self.seq = (self.seq + 1) & 0xFF
        seq = self.seq
        try:
            resp = await self.bt.transact(
                NETFN_OEM_IBM, CMD_HIOMAP, pack_request(command, seq, args)
            )
        except BtTimeout as exc:
            raise NoResponse(f"{_name(command)}: {exc}") from exc
        if resp.cc != 0:
            raise CommandFailed(command, resp.cc)
        data = resp.data
        if len(data) < 2:
            raise ProtocolError(f"{_name(command)}: response of {len(data)} bytes")
        if data[1] != seq:
            raise ProtocolError(
                f"unmatched sequence number: wanted {seq} got {data[1]}"
            )
        if data[0] != command:
            raise ProtocolError(f"{_name(command)}: response for {_name(data[0])}")
        want = _RESPONSE_SIZE.get(Command(command), 2) if command <= 10 else None
        if command == Command.GET_INFO and data[2:3] == b"\x01":
            want = 7  # v1 layout
        if want is not None and len(data) != want:
            raise ProtocolError(
                f"{_name(command)}: unexpected response size {len(data)} (want {want})"
            )
        return bytes(data[2:])

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; re-checked whenever an event
        record arrives or the state changes."""
        while not condition():
            await self._change.wait()

    async def wait_events(self, count: int) -> list[EventRecord]:
        """Wait until ``count`` HIOMAP events have arrived; return them."""
        await self.wait_until(lambda: len(self.hiomap_events) >= count)
        return self.hiomap_events[:count]

    @property
    def hiomap_events(self) -> list[EventRecord]:
        return [e for e in self.events if e.is_hiomap]

    # -- events ---------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Handle SMS_ATN forever: one fetch per attention."""
        task_status.started()
        while True:
            await self.bt.wait_attention()
            await self.fetch_event()

    async def fetch_event(self) -> EventRecord | None:
        """One SMS_ATN cycle: Get Message Flags, then (if the event buffer is
        full) Read Event Message Buffer. Errors are dropped, as skiboot does."""
        try:
            flags = await self.bt.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS)
            if flags.cc != 0 or not flags.data:
                self._fetch_error(f"Get Message Flags: cc {flags.cc:#04x}")
                return None
            if not flags.data[0] & MESSAGE_FLAG_EVENT_BUFFER_FULL:
                return None
            resp = await self.bt.transact(NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        except BtTimeout as exc:
            self._fetch_error(str(exc))
            return None
        if resp.cc != 0:
            self._fetch_error(f"Read Event Message Buffer: cc {resp.cc:#04x}")
            return None
        return self._apply_record(bytes(resp.data))

    def _fetch_error(self, why: str) -> None:
        log.info("event fetch dropped: %s", why)
        self.fetch_errors.append(why)
        self._changed()

    def _apply_record(self, record: bytes) -> EventRecord:
        parsed = parse_event_record(record)
        command, data = parsed if parsed is not None else (None, None)
        if command == SEL_CMD_HIOMAP_EVENT and data is not None:
            self.state = data | (self.state & ACK_MASK)
            log.debug("HIOMAP event %#04x -> state %#04x", data, self.state)
        elif parsed is None:
            log.info("dropped SEL record %s", record.hex())
        ev = EventRecord(
            trio.current_time(), time.monotonic(), record, command, data, self.state
        )
        self.events.append(ev)
        self._changed()
        return ev

    # -- protocol -------------------------------------------------------------

    async def start(self) -> None:
        """skiboot's start-up: assume DAEMON_READY, ACK 0x03, negotiate."""
        async with self._lock:
            self.state = DAEMON_READY
            self._changed()
            await self.ack(ACK_MASK)
            await self.get_info()
            await self.get_flash_info()

    async def ack(self, mask: int) -> None:
        await self.command(Command.ACK, bytes([mask]))

    async def get_info(self) -> None:
        payload = await self.command(Command.GET_INFO, b"\x02")
        info = unpack_get_info(payload)
        if isinstance(info, InfoV1) or info.version < 2:
            raise ProtocolError(
                f"failed to negotiate protocol v2 or higher: {info.version}"
            )
        self.version = info.version
        self.block_size_shift = info.block_size_shift
        self.timeout = info.timeout

    async def get_flash_info(self) -> None:
        info = unpack_flash_info(await self.command(Command.GET_FLASH_INFO))
        self.flash_size = info.flash_size << self.block_size_shift
        self.erase_size = info.erase_size << self.block_size_shift

    async def close_window(self, flags: int = 0) -> None:
        async with self._lock:
            await self.command(Command.CLOSE_WINDOW, bytes([flags]))
            self.window_state = "closed"

    async def _handle_events(self) -> None:
        if self.strict_daemon_ready and not self.state & DAEMON_READY:
            raise DeviceGone("BMC daemon not ready (DAEMON_READY clear)")
        status = self.state
        self.state &= ~ACK_MASK
        if status & ACK_MASK:
            self.window_state = "closed"
        try:
            if status & ACK_MASK:
                await self.ack(status & ACK_MASK)
            if status & PROTOCOL_RESET:
                log.info("protocol was reset: renegotiating")
                await self.get_info()
                await self.get_flash_info()
        except BaseException:
            self.state |= status & ACK_MASK
            raise

    def _window_valid(self, pos: int, length: int) -> None:
        if self.state & (FLASH_CONTROL_LOST | ACK_MASK):
            raise TryAgain(f"window invalidated by events (state {self.state:#04x})")
        if self.window_state == "closed":
            raise HiomapError("no window open")
        if pos < self.window_pos or pos + length > self.window_pos + self.window_size:
            raise HiomapError("range outside the current window")

    def _blocks(self, nbytes: int) -> int:
        return nbytes >> self.block_size_shift

    async def _window_move(
        self, kind: Literal["read", "write"], pos: int, length: int
    ) -> int:
        if self.window_state == kind:
            try:
                self._window_valid(pos, length)
            except HiomapError:
                pass
            else:
                return length
        self.window_state = "closed"
        bs = 1 << self.block_size_shift
        first = pos // bs
        size = min(-(-(pos + length) // bs) - first, 0xFFFF)
        if first > 0xFFFF:
            raise ValueError(f"offset {pos:#x} beyond 16-bit block addressing")
        command = (
            Command.CREATE_READ_WINDOW
            if kind == "read"
            else Command.CREATE_WRITE_WINDOW
        )
        win = unpack_window(await self.command(command, window_args(first, size)))
        self.window_lpc = win.lpc_address << self.block_size_shift
        self.window_size = win.size << self.block_size_shift
        self.window_pos = win.offset << self.block_size_shift
        self.window_state = kind
        end = self.window_pos + self.window_size
        if not self.window_pos <= pos < end:
            raise ProtocolError(
                f"window [{self.window_pos:#x}, {end:#x}) does not cover {pos:#x}"
            )
        log.debug(
            "opened %s window at flash %#x size %#x lpc %#x",
            kind, self.window_pos, self.window_size, self.window_lpc,
        )  # fmt: skip
        return min(length, end - pos)

    async def _lpc_read(self, pos: int, length: int) -> bytes:
        off = self.window_lpc + (pos - self.window_pos)
        async with await trio.open_file(self.lpc_path, "rb") as f:
            await f.seek(off)
            data = await f.read(length)
        if len(data) != length:
            raise HiomapError(f"LPC file too short at {off:#x} (+{length:#x})")
        return data

    async def _lpc_write(self, pos: int, data: bytes) -> None:
        off = self.window_lpc + (pos - self.window_pos)
        async with await trio.open_file(self.lpc_path, "r+b") as f:
            await f.seek(off)
            await f.write(data)

    def _range(self, pos: int, length: int) -> tuple[int, int]:
        """(offset of the window-relative range in blocks, size in blocks)."""
        bs = 1 << self.block_size_shift
        rel = pos - self.window_pos
        return rel // bs, -(-(rel + length) // bs) - rel // bs

    async def _operation(self, body: Callable[[], Any]) -> Any:
        for _attempt in range(_MAX_RETRIES):
            try:
                async with self._lock:
                    await self._handle_events()
                    return await body()
            except TryAgain:
                if self.flash_lost == "raise":
                    raise
                await self.wait_until(lambda: not self.state & FLASH_CONTROL_LOST)
        raise TryAgain(f"gave up after {_MAX_RETRIES} attempts")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if self.flash_size and offset + length > self.flash_size:
            raise ValueError(
                f"range {offset:#x}+{length:#x} beyond flash size {self.flash_size:#x}"
            )

    async def read(self, offset: int, length: int) -> bytes:
        """Read flash through read windows and the LPC file."""
        self._check_range(offset, length)

        async def body() -> bytes:
            out = bytearray()
            pos, left = offset, length
            while left > 0:
                size = await self._window_move("read", pos, left)
                chunk = await self._lpc_read(pos, size)
                self._window_valid(pos, size)  # can we trust what we read?
                out += chunk
                pos, left = pos + size, left - size
            return bytes(out)

        data: bytes = await self._operation(body)
        return data

    async def write(self, offset: int, data: bytes, *, flush: bool = True) -> None:
        """Write flash: per window, LPC write, MARK_DIRTY, then FLUSH."""
        self._check_range(offset, len(data))

        async def body() -> None:
            pos, view = offset, memoryview(data)
            while view:
                size = await self._window_move("write", pos, len(view))
                await self._lpc_write(pos, bytes(view[:size]))
                rel, blocks = self._range(pos, size)
                await self.command(Command.MARK_DIRTY, window_args(rel, blocks))
                if flush:
                    await self.command(Command.FLUSH)
                pos, view = pos + size, view[size:]

        await self._operation(body)

    async def erase(self, offset: int, length: int) -> None:
        """Erase flash: per window, ERASE then FLUSH."""
        self._check_range(offset, length)

        async def body() -> None:
            pos, left = offset, length
            while left > 0:
                size = await self._window_move("write", pos, left)
                rel, blocks = self._range(pos, size)
                await self.command(Command.ERASE, window_args(rel, blocks))
                await self.command(Command.FLUSH)
                pos, left = pos + size, left - size

        await self._operation(body)

    async def flush(self) -> bool:
        """FLUSH if a write window is open; False (nothing sent) otherwise."""
        async with self._lock:
            if self.window_state != "write":
                return False
            await self.command(Command.FLUSH)
            return True


Host = HostClient[BtBridge]
"""The host client over the btbridged stand-in (what :func:`run_host` runs)."""


@asynccontextmanager
async def run_host(
    bus_address: str,
    lpc_path: str | Path,
    *,
    start: bool = True,
    bt_timeout: float = DEFAULT_TIMEOUT,
    host_timeout: float = DEFAULT_HOST_TIMEOUT,
    **options: Any,
) -> AsyncIterator[Host]:
    """Run the btbridged stand-in and a host client on the bus at
    ``bus_address``. ``bt_timeout`` is btbridged's request timeout; with
    ``start``, do the start-up handshake first (which needs a bridge and
    hiomapd answering). ``options`` go to :class:`Host`."""
    async with open_bus(bus_address) as bus, trio.open_nursery() as nursery:
        bt = BtBridge(timeout=bt_timeout, host_timeout=host_timeout)
        await nursery.start(bt.serve, bus)
        host = Host(bt, lpc_path, **options)
        await nursery.start(host.run)
        if start:
            await host.start()
        yield host
        nursery.cancel_scope.cancel()


# -- CLI ----------------------------------------------------------------------


def _int(text: str) -> int:
    return int(text, 0)


def add_parser(subparsers: Any) -> None:
    """Register ``host`` with ``read``, ``write``, ``erase`` and ``watch``."""
    p = subparsers.add_parser(
        "host",
        help="a skiboot-like host behind a btbridged stand-in",
        description=(
            "Run the btbridged stand-in (owning org.openbmc.HostIpmi) and a "
            "host client modelled on skiboot's ipmi-hiomap, then do one thing."
        ),
    )

    def transport(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bus", default="system", help="system, session or address")
        sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="btbridged request timeout in seconds")  # fmt: skip

    add_actions(p, transport, run)


def add_actions(
    p: argparse.ArgumentParser,
    transport: Callable[[argparse.ArgumentParser], None] | None,
    func: Callable[[argparse.Namespace], int],
) -> None:
    """Add the ``read``, ``write``, ``erase`` and ``watch`` actions to ``p``;
    ``transport`` adds each action's transport options; ``func`` runs it."""
    sub = p.add_subparsers(dest="host_command", required=True)

    def common(sp: argparse.ArgumentParser, lpc_required: bool) -> None:
        if transport is not None:
            transport(sp)
        sp.add_argument(
            "--lpc", type=Path, required=lpc_required, default=None,
            help="the file hiomapd's emulator maps the LPC firmware space to",
        )  # fmt: skip
        sp.add_argument(
            "--flash-lost", choices=("raise", "wait"), default="raise",
            help="on FLASH_CONTROL_LOST: fail (skiboot) or wait for it to clear",
        )  # fmt: skip
        sp.add_argument("--log-level", default="warning")
        sp.set_defaults(func=func)

    r = sub.add_parser("read", help="read flash to a file")
    r.add_argument("offset", type=_int)
    r.add_argument("length", type=_int)
    r.add_argument("-o", "--output", required=True, help="output file ('-': stdout)")
    common(r, True)
    w = sub.add_parser("write", help="write a file to flash")
    w.add_argument("offset", type=_int)
    w.add_argument("file", help="input file ('-': stdin)")
    common(w, True)
    e = sub.add_parser("erase", help="erase a flash range")
    e.add_argument("offset", type=_int)
    e.add_argument("length", type=_int)
    common(e, False)
    wa = sub.add_parser("watch", help="print BMC events as the host receives them")
    wa.add_argument("--count", type=int, default=None, help="exit after N events")
    wa.add_argument(
        "--start",
        action="store_true",
        help="do the start-up handshake first (ACK, GET_INFO, ...)",
    )
    common(wa, False)


def run(args: argparse.Namespace) -> int:
    from .cli import start

    address = start(args, "host-sim")
    if address is None:
        return 2
    return run_action(lambda: _main(address, args))


def run_action(main: Callable[[], Awaitable[int]]) -> int:
    """``trio.run(main)``, a :class:`HiomapError` logged as exit status 1."""
    try:
        return trio.run(main)
    except HiomapError as exc:
        log.error("%s", exc)
        return 1
    except BaseExceptionGroup as group:
        failed, rest = group.split(HiomapError)
        if failed is None or rest is not None:
            raise
        for leaf in _leaves(failed):
            log.error("%s", leaf)
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _main(address: str, args: argparse.Namespace) -> int:
    lpc = args.lpc if args.lpc is not None else Path("/dev/null")
    watch = args.host_command == "watch"
    return await do_action(
        run_host(
            address, lpc, start=not watch or args.start, bt_timeout=args.timeout,
            flash_lost=args.flash_lost,
        ),
        args,
    )  # fmt: skip


async def do_action(
    hosted: AbstractAsyncContextManager[HostClient[Any]], args: argparse.Namespace
) -> int:
    """Run the host ``hosted`` yields, do the action ``args`` names, and stop
    on SIGINT/SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with hosted as host, trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await _do(host, args)
            nursery.cancel_scope.cancel()
    return 0


async def _do(host: HostClient[Any], args: argparse.Namespace) -> None:
    if args.host_command == "read":
        data = await host.read(args.offset, args.length)
        if args.output == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            await trio.Path(args.output).write_bytes(data)
    elif args.host_command == "write":
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            data = await trio.Path(args.file).read_bytes()
        await host.write(args.offset, data)
    elif args.host_command == "erase":
        await host.erase(args.offset, args.length)
    else:
        limit = args.count if args.count is not None else math.inf
        seen = 0

        def more() -> bool:
            return len(host.events) > seen

        while seen < limit:
            await host.wait_until(more)
            for ev in host.events[seen:]:
                print(_format_event(ev), flush=True)
                seen += 1
                if seen >= limit:
                    break


def _format_event(ev: EventRecord) -> str:
    if ev.command is None:
        what = "dropped record"
    elif ev.is_hiomap:
        assert ev.data is not None
        bits = [
            name
            for bit, name in (
                (DAEMON_READY, "DAEMON_READY"),
                (FLASH_CONTROL_LOST, "FLASH_CONTROL_LOST"),
                (WINDOW_RESET, "WINDOW_RESET"),
                (PROTOCOL_RESET, "PROTOCOL_RESET"),
            )
            if ev.data & bit
        ]
        what = f"event {ev.data:#04x} {'|'.join(bits) or '-'}"
    else:
        what = f"SEL command {ev.command:#04x} data {ev.data:#04x}"
    return f"{ev.monotonic:.6f} {what} state={ev.state:#04x} record={ev.record.hex()}"


__all__ = [
    "CommandFailed",
    "DeviceGone",
    "EventRecord",
    "HiomapError",
    "Host",
    "HostBt",
    "HostClient",
    "NoResponse",
    "ProtocolError",
    "TryAgain",
    "add_actions",
    "add_parser",
    "do_action",
    "run",
    "run_action",
    "run_host",
]
