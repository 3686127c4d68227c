"""``hiomapbridge-demo --host qemu``: real host firmware through the whole chain.

skiboot (OpenPOWER's host firmware, Debian's ``skiboot.lid``) boots in QEMU
powernv; its BT interface reaches the BMC end of QEMU's ``ipmi-bmc-extern``
chardev (:class:`~hiomapbridge.sim.qemu.BmcLink`), which presents it to the
bridge as it would be on a BMC: through the ``bt:`` seam (``--bridge-host
bt``, the documented deployment: the bridge owns the BT interface and hands
what it does not own to ipmid, played by
:class:`~hiomapbridge.sim.ipmid.FakeIpmid`) or through the btbridged stand-in
(``--bridge-host btbridged``). A private dbus-daemon carries the bridge and
the hiomapd emulator, both real subprocesses with their own
``NOTIFY_SOCKET``. The emulator maps the whole flash at LPC 0x0C000000
(``--direct-map``), where QEMU maps its PNOR drive; it keeps its own copy
of the image.

The PNOR holds no kernel, so every boot ends in skiboot's abort path ("Kernel
is zeros"), which asks the BMC for a hard reset (Chassis Control). The demo
plays the BMC's power control and uses that for its acts:

1. **boot 1** through the whole chain: HIOMAP v2 negotiated, the partition
   table read from hiomapd's window, the blank NVRAM formatted through a
   write window, a WINDOW_RESET event (SMS_ATN, fetched and ACKed). The
   reset that skiboot then asks for is held, so the firmware stays alive in
   its abort loop (which keeps polling the BT interface);
2. **shutdown in systemd order** with that firmware alive: SIGTERM to hiomapd
   (as ``mboxd.service`` stops first), then to the bridge, which exits only
   once the firmware fetched PROTOCOL_RESET; a timeline shows it;
3. **boot 2** with both daemons gone (the held reset is carried out):
   nothing answers HIOMAP, skiboot falls over to the LPC mailbox and prints
   "MBOX-FLASH: BMC NOT RESPONDING";
4. **hiomapd and the bridge restarted**, the BMC resets the host: **boot 3**
   negotiates and finds its flash again, with the NVRAM boot 1 wrote; its
   abort powers the VM off.

Then a summary table of the IPMI traffic on the link (per command: who
answered, completion codes, latency) and the checks. Exit status 0 only when
every check passed; :data:`EXIT_UNAVAILABLE` (3) when QEMU or skiboot is
missing (the message says how to get them; ``hiomapbridge-demo`` then falls
back to the simulated host).

Times are ``trio.current_time()`` in this process (one clock): a console
line is stamped when its bytes arrive, a daemon's notification when its
datagram arrives, an exit when ``waitpid`` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final, Literal, TextIO

import attrs
import trio
from jeepney import DBusAddress, new_method_call

from . import __version__
from .dbus import Bus, open_bus
from .demo import (
    Check,
    Mark,
    _describe_exc,
    _holds_reset,
    _leaves,
    _log_message,
    _ms,
    _ready,
    _status,
)
from .events import Event, describe
from .hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, Command
from .ipmi import (
    CMD_CLEAR_MESSAGE_FLAGS,
    CMD_GET_BT_CAPABILITIES,
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    NETFN_APP,
    NETFN_OEM_IBM,
    parse_event_record,
)
from .sim import vmproto as vm
from .sim.btbridged import BtBridge, Transaction
from .sim.bthost import BtHost
from .sim.ffs import make_pnor, read_table
from .sim.hiomapd import IFACE_CONTROL
from .sim.ipmid import ExecuteCall, FakeIpmid
from .sim.privatebus import dbus_daemon_path, private_bus
from .sim.process import Service, python_command, run_service
from .sim.qemu import (
    LPC_FLASH_BASE,
    BmcLink,
    ChassisMode,
    ConsoleClosed,
    ConsoleLine,
    Exchange,
    HostSide,
    Qemu,
    QemuConfig,
    QemuPaths,
    QemuUnavailable,
    locate,
    run_qemu,
)

BridgeHost = Literal["bt", "btbridged"]

EXIT_PASS: Final = 0
EXIT_FAIL: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
"""QEMU or skiboot is missing: the caller falls back to the simulated host."""

INSTALL_HINT: Final = (
    "apt-get install qemu-system-ppc (QEMU powernv and skiboot.lid, from "
    "qemu-system-data)"
)

BOOT_WAIT: Final = 20.0
"""Bound on each wait for the firmware (a boot step, a console line)."""
NOT_RESPONDING_WAIT: Final = 20.0
"""Bound on the wait for "BMC NOT RESPONDING" (QEMU times the first HIOMAP
request out after 4 s, then skiboot probes the mailbox for 2 s)."""
SERVICE_WAIT: Final = 15.0
BRIDGE_SHUTDOWN_TIMEOUT: Final = 5.0
_MAX_SOCKET_PATH: Final = 107
_LOG_TAIL: Final = 25

#: QEMU's own answer to a request nobody answered within 4 s.
CC_TIMEOUT: Final = 0xC3
CC_INVALID_COMMAND: Final = 0xC1

NETFN_CHASSIS: Final = 0x00
CMD_CHASSIS_CONTROL: Final = 0x02
NETFN_STORAGE: Final = 0x0A
CMD_GET_SEL_TIME: Final = 0x48

#: What ipmid answers skiboot's other start-up commands with (cc 0x00): the
#: fake ipmid only knows Get Device ID and Chassis Control of its own.
_IPMID_ANSWERS: Final[dict[tuple[int, int], tuple[str, bytes]]] = {
    (NETFN_APP, 0x06): ("Set ACPI Power State", b""),
    (NETFN_APP, 0x22): ("Reset Watchdog Timer", b""),
    (NETFN_APP, 0x24): ("Set Watchdog Timer", b""),
    (NETFN_APP, 0x2E): ("Set BMC Global Enables", b""),
    (NETFN_STORAGE, CMD_GET_SEL_TIME): ("Get SEL Time", bytes(4)),
}

_NAMES: Final[dict[tuple[int, int], str]] = {
    (NETFN_APP, 0x01): "Get Device ID",
    (NETFN_APP, CMD_GET_MESSAGE_FLAGS): "Get Message Flags",
    (NETFN_APP, CMD_CLEAR_MESSAGE_FLAGS): "Clear Message Flags",
    (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER): "Read Event Message Buffer",
    (NETFN_APP, CMD_GET_BT_CAPABILITIES): "Get BT Interface Capabilities",
    (NETFN_CHASSIS, CMD_CHASSIS_CONTROL): "Chassis Control",
    **{key: name for key, (name, _) in _IPMID_ANSWERS.items()},
}

#: Console lines worth showing: boot starts, HIOMAP, flash, NVRAM, the
#: mailbox fallback, the abort.
_INTERESTING: Final = re.compile(
    r"OPAL v\S+ starting|HIOMAP:|FLASH: Found|FLASH: Can't load resource id:0|"
    r"FLASH: Failed|NVRAM:|MBOX-FLASH:|PLAT: Failed to init PNOR|FATAL:"
)
_BOOT_START: Final = re.compile(r"OPAL v\S+ starting")
_STAMP: Final = re.compile(r"^\[\s*(\d+\.\d+),(\d)\]\s?")


# -- results ------------------------------------------------------------------------


@attrs.define
class Options:
    bridge_host: BridgeHost = "bt"
    workdir: Path | None = None
    keep: bool = False
    quiet: bool = False
    qemu: str | None = None
    bios: str | None = None


def command_name(netfn: int, cmd: int, data: bytes) -> str:
    if (netfn, cmd) == (NETFN_OEM_IBM, CMD_HIOMAP):
        if not data:
            return "HIOMAP (empty)"
        try:
            return f"HIOMAP {Command(data[0]).name}"
        except ValueError:
            return f"HIOMAP {data[0]:#04x}"
    if (netfn, cmd) == (NETFN_CHASSIS, CMD_CHASSIS_CONTROL) and data:
        what = {0: "power down", 2: "power cycle", 3: "hard reset"}.get(data[0])
        return f"Chassis Control ({what or data.hex()})"
    return _NAMES.get((netfn, cmd), f"netfn {netfn:#04x} cmd {cmd:#04x}")


def _event_byte(exchange: Exchange) -> int | None:
    """The HIOMAP event byte a Read Event Message Buffer answer carried."""
    r = exchange.response
    if r is None or r.cc != 0:
        return None
    parsed = parse_event_record(r.data)
    if parsed is None or parsed[0] != 0x0F:
        return None
    return parsed[1]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# -- the demo -----------------------------------------------------------------------


class QemuDemo:
    """One run of the QEMU demo."""

    def __init__(
        self, opts: Options, workdir: Path, paths: QemuPaths, out: TextIO
    ) -> None:
        self.opts = opts
        self.workdir = workdir
        self.paths = paths
        self.out = out
        self.checks: list[Check] = []
        self.pnor = workdir / "pnor.img"
        self.flash = workdir / "hiomapd" / "flash.img"
        self.lpc = workdir / "hiomapd" / "lpc.img"
        self.bt_socket = workdir / "bt.sock"
        self.t_start = 0.0
        self.boot_starts: list[float] = []
        self.link: BmcLink | None = None
        self.qemu: Qemu | None = None
        self.bt: BtHost | None = None
        self.btbridged: BtBridge | None = None
        self.ipmid: FakeIpmid | None = None
        self.services: list[Service] = []
        self.qemu_status: int | None = None
        self._printed = 0

    # -- output ---------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.flush_console()
        if not self.opts.quiet:
            print(text, file=self.out, flush=True)

    def flush_console(self) -> None:
        """Print the console lines that matter and were not printed yet (so
        that they always appear before what the demo says next)."""
        if self.qemu is None:
            return
        lines = self.qemu.console.lines
        for line in lines[self._printed :]:
            if _INTERESTING.search(line.text) and not self.opts.quiet:
                print(self._format_console(line), file=self.out, flush=True)
        self._printed = len(lines)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        line = f"  [{'ok  ' if ok else 'FAIL'}] {name}" + (
            f": {detail}" if detail else ""
        )
        if ok:
            self.say(line)
        else:
            print(line, file=self.out, flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def act(self, title: str, *explanation: str) -> None:
        self.say()
        self.say(f"== {title} ==")
        for line in explanation:
            self.say(f"  {line}")

    # -- running ----------------------------------------------------------------

    async def run(self, bus_address: str) -> None:
        self.t_start = trio.current_time()
        try:
            await self._run(bus_address)
        except Exception as exc:  # every failure becomes a failed check
            for leaf in _leaves(exc):
                self.check("the demo ran to the end", False, _describe_exc(leaf))

    def _hiomapd_argv(self, bus_address: str) -> list[str]:
        return python_command(
            "hiomapbridge.sim", "hiomapd", "--bus", bus_address,
            "--flash", str(self.flash), "--lpc", str(self.lpc),
            "--lpc-base", hex(LPC_FLASH_BASE), "--direct-map",
            "--log-level", "info",
        )  # fmt: skip

    def _bridge_argv(self, bus_address: str) -> list[str]:
        argv = python_command(
            "hiomapbridge", "--bus", bus_address,
            "--shutdown-timeout", str(BRIDGE_SHUTDOWN_TIMEOUT),
            "--log-level", "info",
        )  # fmt: skip
        if self.opts.bridge_host == "bt":
            argv += ["--host", f"bt:{self.bt_socket}"]
        return argv

    async def _run(self, bus_address: str) -> None:
        self.say("== start ==")
        table = make_pnor(self.pnor)
        self.flash.parent.mkdir(exist_ok=True)
        shutil.copyfile(self.pnor, self.flash)
        self.say(
            f"  PNOR image {self.pnor}: {table.flash_size >> 20} MiB, partitions "
            f"{', '.join(e.name for e in table.entries)} (NVRAM blank); "
            f"hiomapd serves its own copy"
        )
        self.say(f"  private dbus-daemon at {bus_address}")
        async with open_bus(bus_address) as bus, trio.open_nursery() as nursery:
            host = await self._start_host_side(bus, nursery)
            chassis: ChassisMode = (
                "forward" if self.opts.bridge_host == "bt" else "handle"
            )
            link = BmcLink(
                host, self.workdir / "ipmi.sock", chassis=chassis, hold_power=True
            )
            self.link = link
            await nursery.start(link.serve)
            self.say(
                f"  BMC link (QEMU's ipmi-bmc-extern chardev) on {link.path}; "
                + (
                    "Chassis Control goes to ipmid through the bridge"
                    if chassis == "forward"
                    else "it plays the BMC's chassis control itself"
                )
            )
            async with AsyncExitStack() as stack:
                hiomapd = await self._start_hiomapd(stack, bus_address, "hiomapd")
                bridge = await self._start_bridge(stack, bus_address, "hiomapbridge")
                config = QemuConfig(self.pnor, link.path, self.paths)
                qemu = await stack.enter_async_context(
                    run_qemu(config, console_path=self.workdir / "console.log")
                )
                self.qemu = qemu
                self.boot_starts.append(qemu.started_at)
                self.say(
                    f"  QEMU {config.machine} pid {qemu.process.pid}: "
                    f"{self.paths.qemu} -bios {self.paths.bios}"
                )
                nursery.start_soon(self._follow_console, qemu)
                await self._boot_one(bus)
                await self._shutdown(hiomapd, bridge)
                await self._boot_without_bmc()
                await self._restart_and_recover(stack, bus_address)
            self._final_checks()
            nursery.cancel_scope.cancel()

    async def _start_host_side(self, bus: Bus, nursery: trio.Nursery) -> HostSide:
        if self.opts.bridge_host == "bt":
            self.bt = BtHost(self.bt_socket)
            await nursery.start(self.bt.serve)
            self.ipmid = FakeIpmid()
            for (netfn, cmd), (_, data) in _IPMID_ANSWERS.items():
                self.ipmid.set_answer(netfn, cmd, 0, data)
            await nursery.start(self.ipmid.serve, bus)
            self.say(
                f"  BT interface (the bt: seam) listening on {self.bt_socket}; "
                "ipmid (FakeIpmid) answers what the bridge forwards"
            )
            return self.bt
        self.btbridged = BtBridge()
        await nursery.start(self.btbridged.serve, bus)
        self.say("  btbridged stand-in (org.openbmc.HostIpmi) on the bus")
        return self.btbridged

    async def _start_hiomapd(
        self, stack: AsyncExitStack, address: str, name: str
    ) -> Service:
        service = await stack.enter_async_context(
            run_service(name, self._hiomapd_argv(address), self.workdir)
        )
        self.services.append(service)
        self.say(
            f"  {name}: hiomapd emulator pid {service.process.pid} (flash "
            f"mapped at LPC {LPC_FLASH_BASE:#010x}), READY=1 after "
            f"{_ms(_ready(service) - service.started_at)}"
        )
        return service

    async def _start_bridge(
        self, stack: AsyncExitStack, address: str, name: str
    ) -> Service:
        service = await stack.enter_async_context(
            run_service(name, self._bridge_argv(address), self.workdir)
        )
        self.services.append(service)
        mode = (
            f"--host bt:{self.bt_socket.name}"
            if self.opts.bridge_host == "bt"
            else "--host btbridged"
        )
        self.say(
            f"  {name}: pid {service.process.pid} ({mode}), READY=1 after "
            f"{_ms(_ready(service) - service.started_at)}"
        )
        return service

    # -- the console ------------------------------------------------------------------

    def _boot_of(self, t: float) -> int:
        """Which boot (1-based) time ``t`` falls in."""
        return max(1, sum(1 for start in self.boot_starts if start <= t))

    def _format_console(self, line: ConsoleLine) -> str:
        text = line.text
        stamp = _STAMP.match(text)
        if stamp is not None:
            text = text[stamp.end() :]
            fw = f"skiboot {float(stamp.group(1)):7.3f} s"
        else:
            fw = " " * 15
        boot = self._boot_of(line.at)
        since = line.at - self.boot_starts[boot - 1]
        return f"  firmware | boot {boot} {since:+7.3f} s | {fw} | {text}"

    async def _follow_console(self, qemu: Qemu) -> None:
        """Print the console lines that matter as they arrive."""
        console = qemu.console
        while True:
            with contextlib.suppress(ConsoleClosed):
                await console.wait_for(_INTERESTING, start=self._printed)
            self.flush_console()
            if console.closed:
                return

    async def _console(self, pattern: str | re.Pattern[str], start: int) -> ConsoleLine:
        assert self.qemu is not None
        with trio.fail_after(BOOT_WAIT):
            return await self.qemu.console.wait_for(pattern, start=start)

    async def _link_until(
        self, what: str, condition: Callable[[], bool], within: float = BOOT_WAIT
    ) -> bool:
        assert self.link is not None
        with trio.move_on_after(within):
            await self.link.wait_until(condition)
            return True
        self.check(what, False, f"not within {within:g} s")
        return False

    def _console_index(self) -> int:
        assert self.qemu is not None
        return len(self.qemu.console.lines)

    # -- act 1 -----------------------------------------------------------------------

    async def _boot_one(self, bus: Bus) -> None:
        link = self.link
        assert link is not None
        self.act(
            "boot 1: skiboot through the whole chain",
            "QEMU -> BMC link -> "
            + (
                "bt: seam -> hiomapbridge -> hiomapd (and ipmid for the rest)"
                if self.opts.bridge_host == "bt"
                else "btbridged stand-in -> hiomapbridge -> hiomapd"
            ),
            "firmware lines: time since the boot began (this process's clock), "
            "skiboot's own stamp (the timebase: a reset does not clear it)",
        )
        negotiated = await self._console("HIOMAP: Negotiated hiomap protocol v2", 0)
        found = await self._console("FLASH: Found system flash", 0)
        nvram = await self._console("NVRAM: Re-initializing", 0)
        # The event once the NVRAM is written: a WINDOW_RESET while skiboot
        # writes makes its MARK_DIRTY fail (the write is lost), and one
        # during the partition-table read fails that read for the whole boot.
        if not await self._link_until(
            "skiboot flushed its NVRAM", lambda: _hiomap_ok(link, Command.FLUSH)
        ):
            return
        t_event = trio.current_time()
        await self._force_window_reset(bus)
        fetched = await self._link_until(
            "skiboot fetched the WINDOW_RESET event",
            lambda: _fetched_since(link, t_event, Event.WINDOW_RESET) is not None,
        )
        acked = fetched and await self._link_until(
            "skiboot ACKed WINDOW_RESET", lambda: _acked(link, Event.WINDOW_RESET)
        )
        await self._console("FATAL: Kernel is zeros", 0)
        await self._link_until("skiboot asked for a reset", lambda: bool(link.held))
        self.say(
            "  (no kernel in the PNOR: skiboot's abort path asked the BMC for a "
            "hard reset; the demo's power control holds it, so skiboot stays "
            "alive in its abort loop, still polling the BT interface)"
        )
        self.check(
            "firmware negotiated HIOMAP v2 through the bridge",
            _hiomap_ok(link, Command.GET_INFO),
            f"{negotiated.at - self.boot_starts[0]:.3f} s into the boot",
        )
        windows = [
            e.response.data
            for e in link.answered(NETFN_OEM_IBM, CMD_HIOMAP)
            if e.request.data[:1]
            in (
                bytes([Command.CREATE_READ_WINDOW]),
                bytes([Command.CREATE_WRITE_WINDOW]),
            )
            and e.response is not None
            and e.response.cc == 0
        ]
        at_base = all(w[2:4] == b"\x00\xc0" for w in windows)
        self.check(
            "firmware found its flash through hiomapd's windows",
            bool(windows) and at_base,
            f"{found.text.split('] ', 1)[-1]}; {len(windows)} window(s), all at "
            f"LPC {LPC_FLASH_BASE:#010x} + flash offset"
            if at_base
            else "a window outside LPC 0x0C000000",
        )
        image = self.pnor.read_bytes()
        nvram_entry = read_table(image).find("NVRAM")
        assert nvram_entry is not None
        header = image[nvram_entry.offset : nvram_entry.offset + 16]
        steps = [
            c.name
            for c in (Command.CREATE_WRITE_WINDOW, Command.MARK_DIRTY, Command.FLUSH)
            if _hiomap_ok(link, c)
        ]
        self.check(
            "firmware read the partition table and formatted the NVRAM "
            "through a write window",
            f"size: {nvram_entry.size:#010x}" in nvram.text
            and len(steps) == 3
            and header[4:15] == b"ibm,skiboot",
            f"size {nvram_entry.size:#x} is our FFS table's; "
            f"{', '.join(steps)} answered cc 0x00; NVRAM now starts with "
            f"{header[4:15].decode('ascii', 'replace')!r}",
        )
        self.check(
            "firmware fetched the WINDOW_RESET event (SMS_ATN) and ACKed it",
            fetched and acked,
            _event_detail(link, t_event),
        )
        self.say(
            "  (the firmware's reads and writes go through the LPC window "
            "straight to QEMU's PNOR drive; hiomapd, with its own copy, "
            "manages the windows)"
        )

    async def _force_window_reset(self, bus: Bus) -> None:
        msg = new_method_call(
            DBusAddress(
                HIOMAPD_PATH, bus_name=HIOMAPD_SERVICE, interface=IFACE_CONTROL
            ),
            "ForceWindowReset",
        )
        with trio.fail_after(5):
            await bus.call(msg)
        self.say(
            "  demo -> hiomapd: ForceWindowReset (the emulator's control "
            "interface): hiomapd drops its windows and raises WindowReset"
        )

    # -- act 2 -----------------------------------------------------------------------

    async def _shutdown(self, hiomapd: Service, bridge: Service) -> None:
        link = self.link
        assert link is not None
        self.act(
            "shutdown in systemd order, the firmware alive",
            "SIGTERM to hiomapd (mboxd.service stops first); once it exited, "
            "SIGTERM to the bridge,",
            "which exits only once the firmware fetched PROTOCOL_RESET",
        )
        marks: list[Mark] = []
        t0 = trio.current_time()
        hiomapd.signal(signal.SIGTERM)
        marks.append(
            Mark(t0, "demo", f"SIGTERM -> hiomapd (pid {hiomapd.process.pid})")
        )
        with trio.fail_after(SERVICE_WAIT):
            hiomapd_status = await hiomapd.wait()
        t_term = trio.current_time()
        bridge.signal(signal.SIGTERM)
        marks.append(
            Mark(t_term, "demo", f"SIGTERM -> hiomapbridge (pid {bridge.process.pid})")
        )
        with trio.fail_after(BRIDGE_SHUTDOWN_TIMEOUT + SERVICE_WAIT):
            bridge_status = await bridge.wait()
        exited = bridge.exited_at
        assert exited is not None and hiomapd.exited_at is not None
        for name, service in (("hiomapd", hiomapd), ("bridge", bridge)):
            for when, state in service.notifications:
                if when >= t0:
                    marks.append(Mark(when, name, f"sd_notify {state.strip()!r}"))
            assert service.exited_at is not None
            marks.append(
                Mark(
                    service.exited_at,
                    name,
                    f"exited, status {_status(service.process.returncode)}",
                )
            )
        for t in link.traffic:
            if (
                t.at >= t0
                and t.direction == "out"
                and isinstance(t.item, vm.ControlCommand)
            ):
                marks.append(Mark(t.at, "link", f"{t.item.name} to QEMU (SMS_ATN)"))
        held: Exchange | None = None
        for e in link.exchanges:
            if e.at < t0 or e.answered_at is None or e.response is None:
                continue
            name = command_name(e.request.netfn, e.request.cmd, e.request.data)
            what = f"{name} -> cc {e.response.cc:#04x}"
            byte = _event_byte(e)
            if byte is not None:
                what += f", event {describe(byte)}"
                if held is None and _holds_reset(byte):
                    held = e
                    what += "  <== firmware holds PROTOCOL_RESET"
            marks.append(Mark(e.answered_at, "skiboot", what))
        self.say(
            "  timeline (ms since SIGTERM to hiomapd; one clock, this process; "
            "skiboot: a request answered to QEMU):"
        )
        for m in sorted(marks, key=lambda m: m.t):
            self.say(f"  {(m.t - t0) * 1000:+10.3f}  {m.who:<8} {m.what}")
        said = [
            _log_message(line)
            for line in bridge.log().splitlines()
            if "shutdown" in line or "vanished" in line or "delivered" in line
        ]
        if said:
            self.say("  the bridge's log during shutdown:")
            for line in said[-6:]:
                self.say(f"    {line}")
        if held is None or held.answered_at is None:
            self.check(
                "firmware held PROTOCOL_RESET before the bridge exited",
                False,
                "no Read Event Message Buffer answer carried 0x01 with "
                "DAEMON_READY clear",
            )
        else:
            self.check(
                "firmware held PROTOCOL_RESET before the bridge exited",
                held.answered_at < exited,
                f"fetched {_ms(held.answered_at - t0)} after SIGTERM to hiomapd, "
                f"{_ms(exited - held.answered_at)} before the bridge's exit was seen",
            )
        self.check(
            "systemd order: hiomapd had exited before the bridge was told to stop",
            hiomapd.exited_at <= t_term,
            f"hiomapd exited {_ms(hiomapd.exited_at - t0)} after its SIGTERM",
        )
        self.check(
            "exit codes: hiomapd 0, hiomapbridge 0 after SIGTERM",
            hiomapd_status == 0 and bridge_status == 0,
            f"hiomapd {_status(hiomapd_status)}, hiomapbridge {_status(bridge_status)}",
        )

    # -- act 3 -----------------------------------------------------------------------

    async def _boot_without_bmc(self) -> None:
        link = self.link
        assert link is not None
        self.act(
            "boot 2: the firmware's next boot with hiomapd and the bridge gone",
            "the held reset is carried out; nothing answers HIOMAP now",
        )
        start = self._console_index()
        link.hold_power = True
        link.held.clear()
        t_boot = trio.current_time()
        self.boot_starts.append(t_boot)
        if not await link.power(vm.Control.RESET):
            self.check("QEMU reset for boot 2", False, "QEMU is not connected")
            return
        await self._console(_BOOT_START, start)
        with trio.fail_after(NOT_RESPONDING_WAIT):
            assert self.qemu is not None
            line = await self.qemu.console.wait_for(
                "MBOX-FLASH: BMC NOT RESPONDING", start=start
            )
        assert self.qemu is not None
        negotiated = self.qemu.console.find("HIOMAP: Negotiated", start)
        first = next(
            (
                e
                for e in link.exchanges
                if e.at >= t_boot and e.request.netfn == NETFN_OEM_IBM
            ),
            None,
        )
        unanswered = first is not None and (
            first.outcome != "answered"
            or (first.response is not None and first.response.cc != 0)
        )
        if first is None:
            detail = "no HIOMAP request"
        else:
            name = command_name(NETFN_OEM_IBM, CMD_HIOMAP, first.request.data)
            if first.outcome != "answered" or first.answered_at is None:
                how = "QEMU timed it out"
            else:
                assert first.response is not None
                who = "btbridged" if self.btbridged is not None else "the link"
                how = (
                    f"unanswered: {who} gave up after "
                    f"{first.answered_at - first.at:.1f} s, cc {first.response.cc:#04x}"
                )
            detail = f"first HIOMAP request ({name}) {how}"
        self.check(
            "boot 2: HIOMAP unanswered, the firmware fails over to "
            "'BMC NOT RESPONDING'",
            negotiated is None and unanswered,
            f"{detail}; 'BMC NOT RESPONDING' {line.at - t_boot:.1f} s into the boot",
        )

    # -- act 4 -----------------------------------------------------------------------

    async def _restart_and_recover(self, stack: AsyncExitStack, address: str) -> None:
        link = self.link
        assert link is not None and self.qemu is not None
        self.act(
            "hiomapd and the bridge restarted; the BMC resets the host: boot 3",
        )
        host_side: BtHost | BtBridge | None = self.bt or self.btbridged
        assert host_side is not None
        # nothing of boot 2 may still wait for an answer when the new bridge
        # comes up
        with trio.fail_after(SERVICE_WAIT):
            await host_side.wait_until(lambda: not host_side.outstanding)
        await self._start_hiomapd(stack, address, "hiomapd-2")
        await self._start_bridge(stack, address, "hiomapbridge-2")
        start = self._console_index()
        link.hold_power = False
        link.on_reset = "poweroff"  # boot 3's abort ends the demo's VM
        t_boot = trio.current_time()
        self.boot_starts.append(t_boot)
        if not await link.power(vm.Control.RESET):
            self.check("QEMU reset for boot 3", False, "QEMU is not connected")
            return
        self.say(
            "  BMC -> QEMU: RESET (the host's power control, as after a chassis reset)"
        )
        await self._console(_BOOT_START, start)
        negotiated = await self._console("HIOMAP: Negotiated hiomap protocol v2", start)
        found = await self._console("FLASH: Found system flash", start)
        with trio.fail_after(BOOT_WAIT):
            self.qemu_status = await self.qemu.wait()
        reinit = self.qemu.console.find("NVRAM: Re-initializing", start)
        self.check(
            "boot 3: the firmware recovered (HIOMAP v2 negotiated, flash found)",
            negotiated is not None and found is not None,
            f"negotiated {negotiated.at - t_boot:.3f} s, flash found "
            f"{found.at - t_boot:.3f} s into the boot",
        )
        self.check(
            "boot 3: the NVRAM boot 1 formatted was kept",
            reinit is None,
            "no re-initialisation: read back through the restarted chain "
            "(QEMU's drive keeps what the firmware wrote)"
            if reinit is None
            else reinit.text,
        )
        self.check(
            "boot 3's abort powered the VM off (Chassis Control acted on)",
            self.qemu_status == 0
            and [a for _, a in link.power_sent[-1:]] == [vm.Control.POWEROFF],
            f"QEMU exit status {self.qemu_status}",
        )
        # The end: no firmware left to tell (act 2 showed the clean stop).
        for service in self.services[-2:]:
            service.signal(signal.SIGKILL)
        self.say("  (end of the demo: hiomapd-2 and hiomapbridge-2 are killed)")

    # -- summary ---------------------------------------------------------------------

    def _final_checks(self) -> None:
        link = self.link
        assert link is not None
        garbled = [t for t in link.traffic if isinstance(t.item, vm.Garbled)]
        self.check(
            "every message on the QEMU link was well formed",
            not garbled,
            f"{len(link.traffic)} messages and control commands",
        )
        if self.bt is not None:
            self.check(
                "every BT frame from the bridge was well formed",
                not self.bt.violations,
                f"{sum(1 for f in self.bt.frames if f.direction == 'b2h')} frames"
                if not self.bt.violations
                else "; ".join(self.bt.violations[:3]),
            )

    def responders(self) -> dict[int, str]:
        """``id(exchange)`` -> who answered it: the bridge, ipmid (forwarded
        by the bridge), the link (chassis control, btbridged mode), btbridged
        (its own 0xCE) or nobody (timed out)."""
        link = self.link
        assert link is not None
        host_side: BtHost | BtBridge | None = self.bt or self.btbridged
        txs: list[Transaction] = list(host_side.transactions) if host_side else []
        calls: list[ExecuteCall] = list(self.ipmid.calls) if self.ipmid else []
        used_tx: set[int] = set()
        used_call: set[int] = set()
        out: dict[int, str] = {}
        for e in link.exchanges:
            req = e.request
            chassis = (req.netfn, req.cmd) == (NETFN_CHASSIS, CMD_CHASSIS_CONTROL)
            if chassis and link.chassis == "handle":
                out[id(e)] = "link"
                continue
            tx = next(
                (
                    tx
                    for tx in txs
                    if id(tx) not in used_tx
                    and tx.sent.trio >= e.at
                    and (tx.netfn, tx.cmd, tx.data) == (req.netfn, req.cmd, req.data)
                ),
                None,
            )
            if tx is None:
                out[id(e)] = "nobody"
                continue
            used_tx.add(id(tx))
            if tx.outcome == "timed_out":
                out[id(e)] = "btbridged"
                continue
            if tx.outcome != "delivered" or tx.delivered_at is None:
                out[id(e)] = "nobody"
                continue
            end = tx.delivered_at.trio
            call = next(
                (
                    c
                    for c in calls
                    if id(c) not in used_call
                    and tx.sent.trio <= c.at.trio <= end
                    and (c.netfn, c.cmd, c.data) == (req.netfn, req.cmd, req.data)
                ),
                None,
            )
            if call is not None:
                used_call.add(id(call))
                out[id(e)] = "ipmid"
            else:
                out[id(e)] = "bridge"
        return out

    def print_summary(self) -> None:
        link = self.link
        self.say()
        self.say("== IPMI traffic on the QEMU link (every request skiboot sent) ==")
        if link is None or not link.exchanges:
            self.say("  none")
            return
        by = self.responders()
        rows: dict[tuple[str, str], list[Exchange]] = {}
        for e in link.exchanges:
            req = e.request
            name = command_name(req.netfn, req.cmd, req.data)
            rows.setdefault((name, by[id(e)]), []).append(e)
        self.say(
            f"  {'command (firmware -> BMC)':<34}{'answered by':<12}{'count':>6}"
            f"  {'cc':<11}{'p50 ms':>8}{'max ms':>8}"
        )
        for name, who in sorted(rows, key=lambda k: (not k[0].startswith("HIOMAP"), k)):
            self.say(_row(name, who, rows[(name, who)]))
        self.say(
            "  (Get BT Interface Capabilities never reaches the link: QEMU's BT "
            "device answers it itself)"
        )
        if self.btbridged is not None:
            self.say(
                "  (btbridged mode: the bridge answers what it does not own "
                "0xc1; the link plays chassis control; 'btbridged': nothing "
                "answered its ReceivedMessage, it sent its own 0xce)"
            )
        else:
            self.say(
                "  ('nobody': no bridge on the BT interface; the BMC side gave "
                "up after 5 s and the link answered 0xc3)"
            )
        for boot, start in enumerate(self.boot_starts, 1):
            end = self.boot_starts[boot] if boot < len(self.boot_starts) else math.inf
            mine = [e for e in link.exchanges if start <= e.at < end]
            counts: dict[str, int] = {}
            for e in mine:
                counts[by[id(e)]] = counts.get(by[id(e)], 0) + 1
            who = ", ".join(f"{n} by {w}" for w, n in sorted(counts.items()))
            self.say(f"  boot {boot}: {len(mine)} request(s) ({who or 'none'})")
        self.say(
            f"  SMS_ATN raised on the link {link.attentions_sent} times; "
            f"power actions sent to QEMU: "
            f"{', '.join(a.name for _, a in link.power_sent) or 'none'}"
        )
        if self.ipmid is not None:
            chassis = ", ".join(f"{b:#04x}" for b in self.ipmid.chassis_controls)
            self.say(
                f"  ipmid: {len(self.ipmid.calls)} execute calls; Chassis Control "
                f"acted on: {chassis or 'none'}"
            )

    def print_verdict(self, kept: bool) -> None:
        failed = [c for c in self.checks if not c.ok]
        mode = f"host qemu, bridge --host {self.opts.bridge_host}"
        if failed or not self.checks:
            print(file=self.out)
            print(f"logs are in {self.workdir}:", file=self.out)
            for path in sorted(self.workdir.glob("*.log")):
                print(f"  {path}", file=self.out)
            for service in self.services:
                lines = service.log().splitlines()[-_LOG_TAIL:]
                if lines:
                    print(
                        f"--- last lines of {service.log_path.name} ---", file=self.out
                    )
                    for line in lines:
                        print(f"  {line}", file=self.out)
            if self.qemu is not None:
                print("--- last lines of the QEMU console ---", file=self.out)
                print(self.qemu.console.tail(_LOG_TAIL), file=self.out)
            print(
                f"RESULT: FAIL ({len(failed)} of {len(self.checks)} checks failed, "
                f"{mode})",
                file=self.out,
                flush=True,
            )
            return
        if kept:
            self.say(f"files and logs kept in {self.workdir}")
        print(
            f"RESULT: PASS (all {len(self.checks)} checks, {mode})",
            file=self.out,
            flush=True,
        )


def _row(name: str, who: str, exchanges: list[Exchange]) -> str:
    codes = sorted({e.response.cc for e in exchanges if e.response is not None})
    answered = [e for e in exchanges if e.outcome == "answered"]
    cc = ",".join(f"{c:#04x}" for c in codes) if answered else "-"
    latencies = [e.answered_at - e.at for e in answered if e.answered_at is not None]
    if latencies:
        lat = f"{_percentile(latencies, 50) * 1000:8.2f}{max(latencies) * 1000:8.2f}"
    else:
        lat = f"{'-':>8}{'-':>8}"
    return f"  {name:<34}{who:<12}{len(exchanges):>6}  {cc:<11}{lat}"


def _hiomap_ok(link: BmcLink, command: Command) -> bool:
    return any(
        e.request.data[:1] == bytes([command])
        and e.response is not None
        and e.response.cc == 0
        for e in link.answered(NETFN_OEM_IBM, CMD_HIOMAP)
    )


def _fetched_since(link: BmcLink, since: float, bit: int) -> Exchange | None:
    for e in link.answered(NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER):
        byte = _event_byte(e)
        if e.at >= since and byte is not None and byte & bit:
            return e
    return None


def _event_detail(link: BmcLink, since: float) -> str:
    """When the firmware fetched and ACKed the event, from ``since``."""
    fetch = _fetched_since(link, since, Event.WINDOW_RESET)
    ack = next(
        (
            e
            for e in link.answered(NETFN_OEM_IBM, CMD_HIOMAP)
            if e.at >= since and e.request.data[:1] == bytes([Command.ACK])
        ),
        None,
    )
    parts = []
    if fetch is not None and fetch.answered_at is not None:
        parts.append(f"Read Event Message Buffer {_ms(fetch.answered_at - since)}")
    if ack is not None and ack.answered_at is not None:
        parts.append(f"HIOMAP ACK 0x02 {_ms(ack.answered_at - since)}")
    return ", ".join(parts) + " after the event was raised" if parts else "-"


def _acked(link: BmcLink, bit: int) -> bool:
    return any(
        e.request.data[:1] == bytes([Command.ACK])
        and len(e.request.data) >= 3
        and e.request.data[2] & bit
        and e.response is not None
        and e.response.cc == 0
        for e in link.answered(NETFN_OEM_IBM, CMD_HIOMAP)
    )


# -- entry points -------------------------------------------------------------------


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this process's ``hiomapbridge`` logs (the link, the BT host
    side, ipmid) to ``path`` instead of stderr."""
    logger = logging.getLogger("hiomapbridge")
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    )
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        handler.close()


def unavailable_message(reason: str) -> str:
    return (
        f"hiomapbridge-demo --host qemu: cannot boot skiboot here: {reason}.\n"
        f"  To get it: {INSTALL_HINT}."
    )


def run_demo(opts: Options, out: TextIO | None = None) -> int:
    """Run the demo; :data:`EXIT_PASS`, :data:`EXIT_FAIL`, :data:`EXIT_USAGE`
    or :data:`EXIT_UNAVAILABLE` (QEMU or skiboot missing: the message is
    printed, the caller may fall back to the simulated host)."""
    out = sys.stdout if out is None else out
    err = sys.stderr
    try:
        paths = locate(opts.qemu, opts.bios)
    except QemuUnavailable as exc:
        print(unavailable_message(str(exc)), file=err, flush=True)
        return EXIT_UNAVAILABLE
    try:
        dbus_daemon_path()
    except RuntimeError as exc:
        print(f"hiomapbridge-demo: {exc}", file=err)
        return EXIT_USAGE
    if opts.workdir is not None:
        workdir = opts.workdir.resolve()
        if len(str(workdir / "hiomapbridge-2.notify")) > _MAX_SOCKET_PATH:
            print(
                f"hiomapbridge-demo: --workdir {workdir} is too long for the unix "
                "sockets placed in it",
                file=err,
            )
            return EXIT_USAGE
        workdir.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="hiomapbridge-qemu-"))
        temporary = True
    demo = QemuDemo(opts, workdir, paths, out)
    demo.say(
        f"hiomapbridge-demo {__version__}: host qemu (skiboot in QEMU powernv), "
        f"bridge --host {opts.bridge_host}"
    )
    demo.say(f"  workdir {workdir}")
    interrupted = False
    try:
        with private_bus(workdir) as bus, _log_to(workdir / "demo.log"):
            trio.run(demo.run, bus.address)
    except KeyboardInterrupt:
        interrupted = True
        demo.check("the demo ran to the end", False, "interrupted (SIGINT)")
    except (OSError, RuntimeError) as exc:
        demo.check("private dbus-daemon started", False, str(exc))
    demo.print_summary()
    keep = not temporary or opts.keep or not demo.passed
    demo.print_verdict(kept=temporary and keep)
    if temporary and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    return EXIT_PASS if demo.passed else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiomapbridge-demo --host qemu",
        description=(
            "Boot real host firmware (skiboot in QEMU powernv) through the "
            "bridge and hiomapd: HIOMAP negotiation, flash, NVRAM and an "
            "event; the systemd-order shutdown with the firmware fetching "
            "PROTOCOL_RESET; a boot without the BMC ('BMC NOT RESPONDING'); "
            "hiomapd and the bridge restarted and the next boot recovering. "
            "Needs qemu-system-ppc64 and skiboot.lid (apt-get install "
            "qemu-system-ppc) and dbus-daemon."
        ),
        epilog=(
            "Exit status: 0 when every check passed, 1 when one failed, 2 for "
            "bad options or a missing dbus-daemon, 3 when QEMU or skiboot is "
            "missing."
        ),
    )
    parser.add_argument(
        "--bridge-host",
        choices=("bt", "btbridged"),
        default="bt",
        help="how the bridge reaches the firmware: bt (default: --host bt:SOCK, "
        "the bridge owns the BT interface and forwards the rest to ipmid) or "
        "btbridged (--host btbridged, behind a btbridged stand-in)",
    )
    parser.add_argument(
        "--workdir", type=Path, metavar="DIR",
        help="keep the PNOR, console and logs here (default: a temporary "
        "directory, removed unless a check fails or --keep)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory"
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true",
        help="print only failed checks and the result line",
    )  # fmt: skip
    parser.add_argument("--qemu", help="QEMU binary (default qemu-system-ppc64)")
    parser.add_argument("--bios", help="skiboot firmware (default skiboot.lid)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_demo(
        Options(
            bridge_host=args.bridge_host,
            workdir=args.workdir,
            keep=args.keep,
            quiet=args.quiet,
            qemu=args.qemu,
            bios=args.bios,
        )
    )


__all__ = [
    "EXIT_FAIL",
    "EXIT_PASS",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Options",
    "QemuDemo",
    "build_parser",
    "main",
    "run_demo",
    "unavailable_message",
]


if __name__ == "__main__":
    sys.exit(main())
