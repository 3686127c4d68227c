"""Real OpenPOWER host firmware as the bridge's host: skiboot in QEMU powernv.

Three pieces (wire reference section 11):

* :func:`qemu_argv` / :func:`run_qemu`: QEMU ``-M powernv9 -nodefaults``
  booting ``skiboot.lid`` with a PNOR image on the ``mtd`` drive (mapped
  linearly at LPC firmware address 0x0C000000) and a BT interface whose BMC
  is external (``ipmi-bmc-extern`` on a unix socket chardev). The serial
  console is captured into a file and a :class:`Console` line stream that
  callers wait on (:meth:`Console.wait_for`).
* :class:`BmcLink`: the BMC end of that chardev. It listens on the unix
  socket (QEMU connects with ``reconnect=1``, so a restarted link is picked
  up again), speaks the VM protocol (:mod:`.vmproto`) and presents the host
  to the bridge through a *host side*: the btbridged stand-in
  (:class:`~hiomapbridge.sim.btbridged.BtBridge`, for ``hiomapbridge
  --host btbridged``) or the ``bt:`` seam's
  :class:`~hiomapbridge.sim.bthost.BtHost` (for ``--host bt:PATH``). Each
  request from QEMU becomes ``host.transact(...)`` and its answer goes back
  with QEMU's msgid; each ``host.wait_attention()`` becomes the VM ATTN
  command (SMS_ATN), latched while QEMU is not connected. Chassis Control
  (netfn 0x00 cmd 0x02, what skiboot's abort path sends every 200 ms) is
  acted on with the VM POWEROFF / RESET command, and answered either by the
  link itself (``chassis="handle"``) or by whoever answers the host side
  (``chassis="forward"``).
* the ``hiomapbridge-sim qemu`` subcommand composing both.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol

import attrs
import trio

from hiomapbridge.ipmi import CompletionCode, response_netfn
from hiomapbridge.sim import vmproto as vm
from hiomapbridge.sim.btbridged import BtTimeout, NotServing, Response

log = logging.getLogger(__name__)

QEMU_BINARY: Final = "qemu-system-ppc64"
SKIBOOT_PATHS: Final = (
    Path("/usr/share/qemu/skiboot.lid"),
    Path("/usr/share/qemu/skiboot.lid.xz"),
)
LPC_FLASH_BASE: Final = 0x0C000000
"""Where QEMU powernv maps the PNOR drive in LPC firmware space."""

NETFN_CHASSIS: Final = 0x00
CMD_CHASSIS_CONTROL: Final = 0x02
CC_BMC_INIT_IN_PROGRESS: Final = 0xD2

ChassisMode = Literal["handle", "forward"]
ResetAction = Literal["reset", "poweroff"]


class QemuUnavailable(RuntimeError):
    """qemu-system-ppc64 or skiboot.lid is missing (the message says which)."""


# -- finding QEMU -----------------------------------------------------------------


@attrs.frozen
class QemuPaths:
    qemu: Path
    bios: Path


def locate(qemu: str | os.PathLike[str] | None = None,
           bios: str | os.PathLike[str] | None = None) -> QemuPaths:  # fmt: skip
    """The QEMU binary and skiboot firmware to use; raises
    :class:`QemuUnavailable` naming what is missing. ``qemu`` defaults to
    ``$HIOMAPBRIDGE_QEMU`` or ``qemu-system-ppc64`` on ``PATH``, ``bios`` to
    ``$HIOMAPBRIDGE_SKIBOOT`` or Debian's ``/usr/share/qemu/skiboot.lid``."""
    qemu = qemu or os.environ.get("HIOMAPBRIDGE_QEMU") or QEMU_BINARY
    found = shutil.which(os.fspath(qemu))
    if found is None:
        raise QemuUnavailable(
            f"{os.fspath(qemu)} not found (apt-get install qemu-system-ppc)"
        )
    bios = bios or os.environ.get("HIOMAPBRIDGE_SKIBOOT")
    if bios is not None:
        candidates: Sequence[Path] = (Path(bios),)
    else:
        candidates = SKIBOOT_PATHS
    for candidate in candidates:
        if candidate.is_file():
            return QemuPaths(Path(found), candidate)
    raise QemuUnavailable(
        f"skiboot firmware not found ({', '.join(map(str, candidates))}; "
        "apt-get install qemu-system-data)"
    )


def unavailable_reason(
    qemu: str | os.PathLike[str] | None = None,
    bios: str | os.PathLike[str] | None = None,
) -> str | None:
    """Why skiboot cannot be booted here (None: it can)."""
    try:
        locate(qemu, bios)
    except QemuUnavailable as exc:
        return str(exc)
    return None


# -- the console -------------------------------------------------------------------


@attrs.frozen
class ConsoleLine:
    """One console line and when it arrived (``trio.current_time()``)."""

    at: float
    text: str

    @property
    def skiboot_time(self) -> float | None:
        """The guest timebase seconds skiboot prefixes (``[ 0.41,5] ...``)."""
        m = _SKIBOOT_STAMP.match(self.text)
        return float(m.group(1)) if m else None


_SKIBOOT_STAMP: Final = re.compile(r"\[\s*(\d+\.\d+),\d\]")

Pattern = str | re.Pattern[str]


class ConsoleClosed(Exception):
    """The console ended (QEMU exited) before the awaited line appeared."""


class Console:
    """QEMU's serial console: every line, in order, also written to ``path``.

    :meth:`wait_for` waits (bounded with ``timeout``) for a line containing a
    string or matching a regular expression."""

    def __init__(self, path: Path | None = None, echo: IO[str] | None = None) -> None:
        self.path = path
        self.echo = echo
        self.lines: list[ConsoleLine] = []
        self.closed = False
        self._partial = b""
        self._file: IO[bytes] | None = path.open("wb") if path is not None else None
        self._change = trio.Event()

    def feed(self, data: bytes | bytearray) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        text = self._partial + bytes(data)
        *complete, self._partial = text.split(b"\n")
        now = trio.current_time()
        for raw in complete:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            self.lines.append(ConsoleLine(now, line))
            if self.echo is not None:
                print(line, file=self.echo, flush=True)
        if complete:
            self._changed()

    def close(self) -> None:
        if self._partial:
            self.lines.append(
                ConsoleLine(
                    trio.current_time(), self._partial.decode("utf-8", "replace")
                )
            )
            self._partial = b""
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        self._changed()

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    def find(self, pattern: Pattern, start: int = 0) -> ConsoleLine | None:
        """The first line at index ``start`` or later matching ``pattern``."""
        for line in self.lines[start:]:
            if _matches(pattern, line.text):
                return line
        return None

    async def wait_for(
        self, pattern: Pattern, *, within: float = math.inf, start: int = 0
    ) -> ConsoleLine:
        """Wait for a line matching ``pattern``; raises :class:`ConsoleClosed`
        if the console ends first and ``TimeoutError`` (with the console's
        tail) after ``within`` seconds."""
        with trio.move_on_after(within):
            while True:
                line = self.find(pattern, start)
                if line is not None:
                    return line
                if self.closed:
                    raise ConsoleClosed(
                        f"console ended before {_describe(pattern)}:\n{self.tail()}"
                    )
                start = max(start, len(self.lines))
                await self._change.wait()
        raise TimeoutError(
            f"no console line {_describe(pattern)} within {within:g} s:\n{self.tail()}"
        )

    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line.text for line in self.lines[-n:])


def _matches(pattern: Pattern, text: str) -> bool:
    if isinstance(pattern, str):
        return pattern in text
    return pattern.search(text) is not None


def _describe(pattern: Pattern) -> str:
    return repr(pattern if isinstance(pattern, str) else pattern.pattern)


# -- running QEMU -----------------------------------------------------------------


@attrs.frozen
class QemuConfig:
    """What QEMU boots: ``pnor`` on the mtd drive, the BMC on ``socket``."""

    pnor: Path = attrs.field(converter=Path)
    socket: Path = attrs.field(converter=Path)
    paths: QemuPaths = attrs.field(factory=locate)
    machine: str = "powernv9"
    memory: str = "2G"
    reconnect: int = 1
    """Seconds between QEMU's attempts to reach the BMC socket."""
    extra: tuple[str, ...] = ()


def qemu_argv(config: QemuConfig) -> list[str]:
    """QEMU's command line (wire reference section 11), console on stdio."""
    return [
        os.fspath(config.paths.qemu),
        "-M", config.machine,
        "-m", config.memory,
        "-nodefaults",
        "-display", "none",
        "-serial", "stdio",
        "-bios", os.fspath(config.paths.bios),
        "-drive", f"file={os.fspath(config.pnor)},format=raw,if=mtd",
        "-chardev",
        f"socket,id=ipmi0,path={os.fspath(config.socket)},"
        f"reconnect={config.reconnect}",
        "-device", "ipmi-bmc-extern,id=bmc0,chardev=ipmi0",
        "-device", "isa-ipmi-bt,bmc=bmc0,irq=10",
        *config.extra,
    ]  # fmt: skip


@attrs.define(eq=False)
class Qemu:
    """A running QEMU and its console."""

    process: trio.Process
    console: Console
    argv: list[str]
    started_at: float
    exited_at: float | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        code = await self.process.wait()
        if self.exited_at is None:
            self.exited_at = trio.current_time()
        return code

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM (QEMU exits cleanly on it), SIGKILL after ``grace`` s."""
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(grace):
                return await self.wait()
            self.process.kill()
        return await self.wait()


@asynccontextmanager
async def run_qemu(
    config: QemuConfig,
    *,
    console_path: Path | None = None,
    echo: IO[str] | None = None,
) -> AsyncIterator[Qemu]:
    """Start QEMU; yield it while its console is read. Leaving the block
    stops QEMU (SIGTERM, then SIGKILL) if it still runs."""
    argv = qemu_argv(config)
    console = Console(console_path, echo)
    log.info("starting %s", " ".join(argv))
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    qemu = Qemu(process, console, argv, trio.current_time())
    try:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                assert process.stdout is not None
                try:
                    while data := await process.stdout.receive_some(65536):
                        console.feed(data)
                finally:
                    console.close()

            nursery.start_soon(read)
            try:
                yield qemu
            finally:
                with trio.CancelScope(shield=True):
                    await qemu.stop()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# -- the BMC link -----------------------------------------------------------------


class HostSide(Protocol):
    """The host-side API of BtBridge and BtHost that the link drives."""

    async def transact(
        self, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
    ) -> Response: ...

    async def wait_attention(self) -> None: ...


@attrs.frozen
class Traffic:
    """One thing on the link: ``direction`` ``"in"`` (from QEMU) or
    ``"out"``; ``item`` the decoded request/response/control command, or
    a :class:`~.vmproto.Garbled`; ``connection`` counts from 1."""

    at: float
    direction: Literal["in", "out"]
    item: vm.Request | vm.Response | vm.ControlCommand | vm.Garbled
    connection: int


@attrs.define(eq=False)
class Exchange:
    """One request from QEMU and what became of it."""

    request: vm.Request
    connection: int
    at: float
    response: vm.Response | None = None
    answered_at: float | None = None
    outcome: Literal["pending", "answered", "stale", "failed"] = "pending"
    """``stale``: the answer came after QEMU had moved on (new request or
    new connection) and was dropped; ``failed``: the host side raised."""


def chassis_action(data: bytes, on_reset: ResetAction = "reset") -> vm.Control | None:
    """The VM command acting out a Chassis Control request (None: nothing to
    do, e.g. power up). Hard reset and power cycle become ``on_reset``."""
    if not data:
        return None
    reset = vm.Control.RESET if on_reset == "reset" else vm.Control.POWEROFF
    return {
        0x00: vm.Control.POWEROFF,  # power down
        0x02: reset,  # power cycle
        0x03: reset,  # hard reset
        0x04: vm.Control.SEND_NMI,  # pulse diagnostic interrupt
        0x05: vm.Control.GRACEFUL_SHUTDOWN,  # soft shutdown
    }.get(data[0] & 0x0F)


class _Connection:
    def __init__(self, sock: trio.socket.SocketType, number: int) -> None:
        self.sock = sock
        self.number = number
        self.lock = trio.Lock()
        self.closed = False
        self.current: vm.Request | None = None
        self.scope = trio.CancelScope()


class BmcLink:
    """The BMC end of QEMU's ``ipmi-bmc-extern`` chardev.

    Start with ``await nursery.start(link.serve)`` after the host side
    serves; then start QEMU with ``socket=link.path``.

    ``chassis``: ``"handle"`` answers Chassis Control itself (cc 0);
    ``"forward"`` passes it to the host side like any request and relays the
    answer. Either way the request is then acted on with the VM command
    (:func:`chassis_action`; ``on_reset`` chooses what a reset does).
    ``attention`` is the VM command used for SMS_ATN (ATTN_IRQ: set the bit
    and interrupt, what OpenIPMI's simulator sends).

    Power actions can be held: while :attr:`hold_power` is set, the POWEROFF
    or RESET a Chassis Control request turns into is recorded in
    :attr:`held` instead of being sent (the request is still answered), and
    :meth:`power` sends one when the caller decides, as ``ipmitool chassis
    power reset`` on the BMC would.  :attr:`power_sent` records what
    reached QEMU.
    """

    def __init__(
        self,
        host: HostSide,
        path: str | os.PathLike[str],
        *,
        chassis: ChassisMode = "handle",
        on_reset: ResetAction = "reset",
        attention: vm.Control = vm.Control.ATTN_IRQ,
        hold_power: bool = False,
    ) -> None:
        self.host = host
        self.path = Path(path)
        self.chassis = chassis
        self.on_reset = on_reset
        self.attention = attention
        self.traffic: list[Traffic] = []
        self.exchanges: list[Exchange] = []
        self.controls_received: list[vm.ControlCommand] = []
        self.power_actions: list[vm.Control] = []
        """Power actions Chassis Control requests turned into."""
        self.hold_power = hold_power
        self.held: list[tuple[float, vm.Control]] = []
        """Power actions held (when, what)."""
        self.power_sent: list[tuple[float, vm.Control]] = []
        """Power actions written to QEMU (when, what)."""
        self.attentions_raised = 0
        """SMS_ATN raised by the host side."""
        self.attentions_sent = 0
        """ATTN commands written to QEMU."""
        self.attention_latched = False
        self.connections = 0
        self.capabilities: vm.Capability | None = None
        self._conn: _Connection | None = None
        self._change = trio.Event()

    # -- state --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; re-checked on every change
        (connection, traffic either way, attention)."""
        while not condition():
            await self._change.wait()

    async def wait_connected(self) -> None:
        await self.wait_until(lambda: self._conn is not None)

    def _record(
        self,
        direction: Literal["in", "out"],
        item: vm.Request | vm.Response | vm.ControlCommand | vm.Garbled,
        conn: _Connection,
    ) -> None:
        self.traffic.append(Traffic(trio.current_time(), direction, item, conn.number))
        self._changed()

    def answered(
        self, netfn: int | None = None, cmd: int | None = None
    ) -> list[Exchange]:
        """Exchanges answered to QEMU, optionally only one netfn/cmd."""
        return [
            e
            for e in self.exchanges
            if e.outcome == "answered"
            and (netfn is None or e.request.netfn == netfn)
            and (cmd is None or e.request.cmd == cmd)
        ]

    # -- serving ------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``path`` (a stale socket file is removed first) and serve
        QEMU's connections, one at a time (a new one replaces the old)."""
        _unlink_stale(self.path)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(os.fspath(self.path))
            listener.listen(2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_attention)
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    if self._conn is not None:
                        self._conn.scope.cancel()
                    self.connections += 1
                    conn = _Connection(sock, self.connections)
                    self._conn = conn
                    nursery.start_soon(self._run_connection, conn)
        finally:
            listener.close()
            with suppress(FileNotFoundError):
                self.path.unlink()

    async def _run_connection(self, conn: _Connection) -> None:
        log.info("QEMU connected (connection %d)", conn.number)
        self._changed()
        decoder = vm.Decoder()
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    if self.attention_latched:
                        nursery.start_soon(self._send_attention, conn)
                    while True:
                        try:
                            data = await conn.sock.recv(4096)
                        except OSError as exc:
                            log.info("connection %d: %s", conn.number, exc)
                            break
                        if not data:
                            break
                        for event in decoder.feed(data):
                            self._event(event, conn, nursery)
                    nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            conn.sock.close()
            if self._conn is conn:
                self._conn = None
            for e in self.exchanges:
                if e.connection == conn.number and e.outcome == "pending":
                    e.outcome = "stale"
            log.info("QEMU disconnected (connection %d)", conn.number)
            self._changed()

    def _event(self, event: vm.Event, conn: _Connection, nursery: trio.Nursery) -> None:
        if isinstance(event, vm.Garbled):
            self._record("in", event, conn)
        elif isinstance(event, vm.ControlCommand):
            self._record("in", event, conn)
            self.controls_received.append(event)
            log.info("QEMU: %s %s", event.name, event.operand.hex())
            if event.code == vm.Control.CAPABILITIES and event.operand:
                self.capabilities = vm.Capability(event.operand[0])
            elif event.code == vm.Control.RESET:
                conn.current = None  # a guest reset drops the request in flight
        else:
            request = vm.parse_request(event)
            if request is None:
                self._record("in", vm.Garbled("request too short", event.payload), conn)
                return
            self._record("in", request, conn)
            if conn.current is not None:
                log.warning(
                    "QEMU sent msgid %#04x while msgid %#04x is unanswered "
                    "(it timed the old one out)",
                    request.msgid,
                    conn.current.msgid,
                )
            conn.current = request
            exchange = Exchange(request, conn.number, trio.current_time())
            self.exchanges.append(exchange)
            nursery.start_soon(self._answer, exchange, conn)

    async def _answer(self, exchange: Exchange, conn: _Connection) -> None:
        req = exchange.request
        chassis = req.netfn == NETFN_CHASSIS and req.cmd == CMD_CHASSIS_CONTROL
        if chassis and self.chassis == "handle":
            cc, data = int(CompletionCode.OK), b""
        else:
            try:
                answer = await self.host.transact(req.netfn, req.cmd, req.data, req.lun)
                cc, data = answer.cc, answer.data
            except BtTimeout as exc:
                log.warning("msgid %#04x: %s", req.msgid, exc)
                cc, data = int(CompletionCode.TIMEOUT), b""
            except NotServing as exc:
                log.warning("msgid %#04x: %s", req.msgid, exc)
                cc, data = CC_BMC_INIT_IN_PROGRESS, b""
        response = vm.Response(
            req.msgid, response_netfn(req.netfn), req.lun, req.cmd, cc, data
        )
        exchange.response = response
        if conn.closed or conn.current is not req:
            exchange.outcome = "stale"
            log.info(
                "msgid %#04x: answer cc %#04x dropped (QEMU moved on)", req.msgid, cc
            )
        elif await self._write(conn, vm.encode_response(response), response):
            conn.current = None
            exchange.outcome = "answered"
            exchange.answered_at = trio.current_time()
        else:
            exchange.outcome = "failed"
        self._changed()
        if chassis:
            action = chassis_action(req.data, self.on_reset)
            log.info(
                "Chassis Control %s (answered cc %#04x): %s",
                req.data.hex(),
                cc,
                action.name if action is not None else "nothing to do",
            )
            if action is None:
                return
            self.power_actions.append(action)
            if self.hold_power:
                self.held.append((trio.current_time(), action))
                self._changed()
            else:
                await self._send_power(conn, action)

    async def power(self, action: vm.Control) -> bool:
        """Send ``action`` to QEMU now (held or not); False if QEMU is not
        connected or the write failed."""
        conn = self._conn
        if conn is None:
            await trio.lowlevel.checkpoint()
            return False
        return await self._send_power(conn, action)

    async def _send_power(self, conn: _Connection, action: vm.Control) -> bool:
        command = vm.ControlCommand(action)
        if not await self._write(conn, vm.encode_control(action), command):
            return False
        self.power_sent.append((trio.current_time(), action))
        self._changed()
        return True

    async def _write(
        self,
        conn: _Connection,
        data: bytes,
        item: vm.Response | vm.ControlCommand,
    ) -> bool:
        """Send ``data`` whole on ``conn``; False if the connection failed."""
        async with conn.lock:
            if conn.closed:
                return False
            try:
                view = memoryview(data)
                while view:
                    sent = await conn.sock.send(view)
                    view = view[sent:]
            except (OSError, trio.ClosedResourceError) as exc:
                log.info("connection %d: write failed: %s", conn.number, exc)
                conn.scope.cancel()
                return False
        self._record("out", item, conn)
        return True

    async def _relay_attention(self) -> None:
        while True:
            await self.host.wait_attention()
            self.attentions_raised += 1
            self.attention_latched = True
            self._changed()
            conn = self._conn
            if conn is not None:
                await self._send_attention(conn)
            else:
                log.info("SMS_ATN latched until QEMU connects")

    async def _send_attention(self, conn: _Connection) -> None:
        self.attention_latched = False
        command = vm.ControlCommand(self.attention)
        if await self._write(conn, vm.encode_control(self.attention), command):
            self.attentions_sent += 1
            log.debug("SMS_ATN sent to QEMU")
        else:
            self.attention_latched = True
        self._changed()


def _unlink_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()


# -- composition ------------------------------------------------------------------


@attrs.define(eq=False)
class QemuHost:
    """A booting skiboot: the link and QEMU."""

    link: BmcLink
    qemu: Qemu

    @property
    def console(self) -> Console:
        return self.qemu.console


@asynccontextmanager
async def run_qemu_host(
    host: HostSide,
    pnor: Path,
    directory: Path,
    *,
    chassis: ChassisMode = "handle",
    on_reset: ResetAction = "reset",
    socket_path: Path | None = None,
    console_path: Path | None = None,
    echo: IO[str] | None = None,
    paths: QemuPaths | None = None,
) -> AsyncIterator[QemuHost]:
    """The link on ``socket_path`` (default ``directory/ipmi.sock``) serving
    ``host`` (which must already serve), then QEMU booting skiboot with
    ``pnor``, its console in ``console_path`` (default
    ``directory/console.log``); both stop when the block ends."""
    link = BmcLink(
        host,
        socket_path or directory / "ipmi.sock",
        chassis=chassis,
        on_reset=on_reset,
    )
    config = QemuConfig(pnor, link.path, paths if paths is not None else locate())
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        async with run_qemu(
            config,
            console_path=console_path or directory / "console.log",
            echo=echo,
        ) as qemu:
            yield QemuHost(link, qemu)
        nursery.cancel_scope.cancel()


# -- command line ------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register the ``qemu`` subcommand."""
    p = subparsers.add_parser(
        "qemu",
        help="boot skiboot in QEMU powernv with the BMC link as its host",
        description=(
            "Boot OpenPOWER firmware (skiboot) in QEMU powernv and connect its "
            "BT interface to the bridge: through the btbridged stand-in on "
            "D-Bus (--host btbridged) or the bt:PATH seam (--host bt:PATH). "
            "Runs until QEMU exits or SIGINT/SIGTERM; exits with QEMU's status."
        ),
    )
    p.add_argument("--pnor", type=Path, required=True, help="PNOR image (mtd drive)")
    p.add_argument(
        "--make-pnor", action="store_true",
        help="(re)write --pnor first: an FFS table with VERSION and a blank NVRAM",
    )  # fmt: skip
    p.add_argument(
        "--host", default="btbridged", metavar="btbridged|bt:PATH",
        help="how the bridge reaches the host (default btbridged)",
    )  # fmt: skip
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument("--console", type=Path, help="also write the console to FILE")
    p.add_argument(
        "--socket", type=Path,
        help="the BMC chardev socket (default: a temporary directory)",
    )  # fmt: skip
    p.add_argument(
        "--chassis", choices=("handle", "forward"), default="handle",
        help="answer Chassis Control here (handle) or forward it (default handle)",
    )  # fmt: skip
    p.add_argument(
        "--on-reset", choices=("reset", "poweroff"), default="reset",
        help="what a chassis hard reset / power cycle does to the VM",
    )  # fmt: skip
    p.add_argument("--qemu", help=f"QEMU binary (default {QEMU_BINARY})")
    p.add_argument("--bios", help="skiboot firmware (default skiboot.lid)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .cli import start

    address = start(args, "qemu-sim")
    if args.host != "btbridged" and not args.host.startswith("bt:"):
        log.error("--host must be btbridged or bt:PATH, not %r", args.host)
        return 2
    if args.host == "btbridged" and address is None:
        return 2
    try:
        paths = locate(args.qemu, args.bios)
    except QemuUnavailable as exc:
        log.error("%s", exc)
        return 2
    if args.make_pnor:
        from .ffs import make_pnor

        make_pnor(args.pnor)
    if not args.pnor.is_file():
        log.error("no PNOR image at %s (use --make-pnor)", args.pnor)
        return 2
    return trio.run(_main, args, address, paths)


async def _main(args: argparse.Namespace, address: str | None, paths: QemuPaths) -> int:
    from hiomapbridge.dbus import open_bus

    from .btbridged import BtBridge
    from .bthost import BtHost

    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        tempfile.TemporaryDirectory(prefix="hiomapbridge-qemu-") as tmp,
    ):
        async with AsyncExitStack() as stack:
            host: HostSide
            if args.host == "btbridged":
                assert address is not None
                bus = await stack.enter_async_context(open_bus(address))
                nursery = await stack.enter_async_context(trio.open_nursery())
                bt = BtBridge()
                await nursery.start(bt.serve, bus)
                host = bt
            else:
                nursery = await stack.enter_async_context(trio.open_nursery())
                bthost = BtHost(args.host[3:])
                await nursery.start(bthost.serve)
                host = bthost
            running = await stack.enter_async_context(
                run_qemu_host(
                    host,
                    args.pnor,
                    Path(tmp),
                    socket_path=args.socket,
                    chassis=args.chassis,
                    on_reset=args.on_reset,
                    console_path=args.console,
                    echo=sys.stdout,
                    paths=paths,
                )
            )
            status = await _wait_or_signal(running.qemu, signals)
            nursery.cancel_scope.cancel()
    return status


async def _wait_or_signal(qemu: Qemu, signals: AsyncIterator[int]) -> int:
    """QEMU's exit status, or 0 once a signal stopped it."""
    result: list[int] = []
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            result.append(await qemu.wait())
            nursery.cancel_scope.cancel()

        async def on_signal() -> None:
            async for signum in signals:
                log.info("signal %d: stopping QEMU", signum)
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(wait)
        nursery.start_soon(on_signal)
    if result:
        return result[0]
    await qemu.stop()
    return 0


__all__ = [
    "LPC_FLASH_BASE",
    "BmcLink",
    "Console",
    "ConsoleClosed",
    "ConsoleLine",
    "Exchange",
    "HostSide",
    "Qemu",
    "QemuConfig",
    "QemuHost",
    "QemuPaths",
    "QemuUnavailable",
    "Traffic",
    "add_parser",
    "chassis_action",
    "locate",
    "qemu_argv",
    "run",
    "run_qemu",
    "run_qemu_host",
    "unavailable_reason",
]
