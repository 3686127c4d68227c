"""``hiomapbridge-demo``: the whole path host -> IPMI -> bridge -> hiomapd ->
flash, on an ordinary Linux box, in one command.

It starts a private ``dbus-daemon``, the hiomapd emulator and the bridge as
real subprocesses (each with its own ``NOTIFY_SOCKET``, as systemd runs
them), and the host side in this process. ``--host`` picks the host side (a
:class:`HostSetup`):

* ``btbridged`` (default): the btbridged stand-in plus the skiboot-like host;
  the bridge runs with ``--host btbridged``;
* ``bt``: the bridge owns the BT interface (``--host bt:SOCK``); the host
  simulator listens on SOCK, a fake ipmid answers what the bridge forwards,
  and the host also sends a few ordinary IPMI commands and fetches one
  SoftOff event of ipmid's through the bridge.

Then:

1. **boot**: the host negotiates and reads the whole flash through the bridge
   (progress on stderr); the SHA-256 of what it read must match the image;
2. **update**: it writes one region and erases another, flushes, and the
   emulator's flash file must match a model byte for byte;
3. **shutdown** in systemd order: SIGTERM to hiomapd, then SIGTERM to the
   bridge (``--scenario crash``: SIGKILL to hiomapd first, and the host must
   learn of the reset from the bridge's crash detection before the bridge
   is stopped). A timeline shows when the host held PROTOCOL_RESET relative
   to the bridge's exit. In ``bt`` mode, before this, ipmid raises SoftOff
   and the host, having fetched it, sends Chassis Control (power down);
4. a summary of measured numbers, and the checks. The exit status is 0 only
   if every check passed.

Every time in the timeline is ``trio.current_time()`` in this process: the
host's receipt of an event is stamped where it happens (in process), the
daemons' notifications when their datagram arrives, and their exits when
``waitpid`` returns (so an exit is shown no earlier than it happened).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import functools
import hashlib
import math
import random
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol, TextIO, TypeVar

import attrs
import trio

from . import __version__
from .dbus import open_bus
from .events import describe
from .hiomap import Command
from .ipmi import (
    CMD_CLEAR_MESSAGE_FLAGS,
    CMD_GET_BT_CAPABILITIES,
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    NETFN_APP,
    NETFN_OEM_IBM,
    SEL_CMD_HEARTBEAT,
)
from .sim.btbridged import Attention, Transaction
from .sim.bthost import BtHost
from .sim.host import (
    DAEMON_READY,
    PROTOCOL_RESET,
    EventRecord,
    HostClient,
    TryAgain,
    run_host,
)
from .sim.ipmid import (
    CHANNEL_SYSTEM_INTERFACE,
    CMD_CHASSIS_CONTROL,
    CMD_GET_DEVICE_ID,
    DEVICE_ID,
    NETFN_CHASSIS,
    SEL_CMD_POWER,
    SOFT_OFF,
    ExecuteCall,
    FakeIpmid,
)
from .sim.privatebus import dbus_daemon_path, private_bus
from .sim.process import Service, python_command, run_service

Scenario = Literal["clean", "crash"]
Fault = Literal["read", "write"]
T = TypeVar("T")
#: The skiboot-like host client, over whichever BT interface the host setup
#: gives it (the setup keeps the typed interface: :attr:`HostSetup.bt`).
DemoHost = HostClient[Any]

BLOCK: Final = 4096
#: GET_FLASH_INFO (and the emulator's v1 addressing) count 4 KiB blocks in 16
#: bits.
MAX_FLASH: Final = 0xFFFF * BLOCK
DEFAULT_FLASH_SIZE: Final = 8 << 20
READ_CHUNK: Final = 64 << 10
#: Longest path a unix socket may have (sun_path is 108 bytes with the NUL).
_MAX_SOCKET_PATH: Final = 107
_BRIDGE_SHUTDOWN_TIMEOUT: Final = 5.0
_LOG_TAIL: Final = 25

# -- small helpers ----------------------------------------------------------------


def parse_size(text: str) -> int:
    """``262144``, ``0x40000``, ``256K``, ``8M``; a positive multiple of 4 KiB."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(number, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0 or value % BLOCK:
        raise argparse.ArgumentTypeError(
            f"flash size must be a positive multiple of 4K: {text!r}"
        )
    if value > MAX_FLASH:
        raise argparse.ArgumentTypeError(
            f"flash size must be at most {MAX_FLASH:#x} (16-bit 4K blocks): {text!r}"
        )
    return value


def parse_window_size(text: str) -> int:
    """A power of two from 4K up to 16M."""
    value = parse_size(text)
    if value & (value - 1) or value > 16 << 20:
        raise argparse.ArgumentTypeError(
            f"window size must be a power of two up to 16M: {text!r}"
        )
    return value


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.2f} MiB"


def image_bytes(size: int, seed: int) -> bytes:
    """The demo's deterministic pseudo-random flash image."""
    return random.Random(seed).randbytes(size)


def _tail(path: Path, lines: int = _LOG_TAIL) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _status(code: int | None) -> str:
    if code is None:
        return "still running (killed by the demo)"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"{code} (signal {-code})"
    return str(code)


def _command_name(tx: Transaction) -> str:
    if (tx.netfn, tx.cmd) == (NETFN_OEM_IBM, CMD_HIOMAP):
        if tx.data:
            try:
                return f"HIOMAP {Command(tx.data[0]).name}"
            except ValueError:
                return f"HIOMAP {tx.data[0]:#04x}"
        return "HIOMAP (empty)"
    if (tx.netfn, tx.cmd) == (NETFN_CHASSIS, CMD_CHASSIS_CONTROL):
        action = _CHASSIS_ACTIONS.get(tx.data[0]) if len(tx.data) == 1 else None
        return f"Chassis Control ({action or tx.data.hex() or 'no data'})"
    names = {
        (NETFN_APP, CMD_GET_MESSAGE_FLAGS): "Get Message Flags",
        (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER): "Read Event Message Buffer",
        (NETFN_APP, CMD_CLEAR_MESSAGE_FLAGS): "Clear Message Flags",
        (NETFN_APP, CMD_GET_DEVICE_ID): "Get Device ID",
        (NETFN_APP, CMD_GET_BT_CAPABILITIES): "Get BT Interface Capabilities",
    }
    return names.get((tx.netfn, tx.cmd), f"netfn {tx.netfn:#04x} cmd {tx.cmd:#04x}")


#: Chassis Control's data byte (IPMI 2.0 table 28-4).
_CHASSIS_ACTIONS: Final = {
    0x00: "power down",
    0x01: "power up",
    0x02: "power cycle",
    0x03: "hard reset",
    0x05: "soft shutdown",
}


def _latency(tx: Transaction) -> float | None:
    if tx.delivered_at is None:
        return None
    return tx.delivered_at.trio - tx.sent.trio


def _ok(tx: Transaction) -> bool:
    return (
        tx.outcome == "delivered"
        and tx.delivered is not None
        and (tx.delivered.cc == 0)
    )


# -- output -----------------------------------------------------------------------


class Progress:
    """A progress bar on a TTY; otherwise a line at every quarter."""

    WIDTH: Final = 32

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = max(total, 1)
        self.tty = stream.isatty()
        self.start = trio.current_time()
        self._last_draw = -math.inf
        self._next_quarter = 1

    def update(self, done: int) -> None:
        now = trio.current_time()
        elapsed = max(now - self.start, 1e-9)
        fraction = min(done / self.total, 1.0)
        rate = f"{done / elapsed / (1 << 20):6.1f} MiB/s"
        if self.tty:
            if now - self._last_draw < 0.05 and done < self.total:
                return
            self._last_draw = now
            filled = int(fraction * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(
                f"\r  {self.label} [{bar}] {fraction:4.0%} "
                f"{mib(done)} / {mib(self.total)} {rate}"
            )
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
            return
        while self._next_quarter <= 4 and fraction >= self._next_quarter / 4:
            self.stream.write(
                f"  {self.label}: {self._next_quarter * 25:3d}% "
                f"({mib(done)} of {mib(self.total)}, {rate})\n"
            )
            self._next_quarter += 1
        self.stream.flush()


@attrs.define
class Check:
    name: str
    ok: bool
    detail: str = ""


@attrs.frozen
class Mark:
    """One line of the shutdown timeline."""

    t: float
    who: str
    what: str


@attrs.define
class Options:
    scenario: Scenario
    flash: Path | None
    flash_size: int
    seed: int
    window_size: int | None
    workdir: Path | None
    keep: bool
    quiet: bool
    inject_fault: Fault | None
    host: str = "btbridged"


@attrs.define
class Demo:
    """One run: its options, files, what it measured and what it checked."""

    opts: Options
    workdir: Path
    out: TextIO
    err: TextIO
    #: The host side, chosen by ``--host`` (:data:`HOST_SETUPS`).
    setup: HostSetup = attrs.field(
        default=attrs.Factory(
            lambda self: HOST_SETUPS[self.opts.host](self), takes_self=True
        )
    )
    checks: list[Check] = attrs.field(factory=list)
    marks: list[Mark] = attrs.field(factory=list)
    image: bytes = b""
    hiomapd: Service | None = None
    bridge: Service | None = None
    host: DemoHost | None = None
    hiomapd_status: int | None = None
    bridge_status: int | None = None
    bytes_read: int = 0
    read_seconds: float = 0.0
    bytes_written: int = 0
    bytes_erased: int = 0
    update_seconds: float = 0.0
    retries: int = 0
    t0: float = 0.0
    user_flash_sha: str | None = None

    @property
    def flash_path(self) -> Path:
        return self.workdir / "flash.img"

    @property
    def lpc_path(self) -> Path:
        return self.workdir / "lpc.img"

    def say(self, text: str = "") -> None:
        if not self.opts.quiet:
            print(text, file=self.out, flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        mark = "ok  " if ok else "FAIL"
        line = f"  [{mark}] {name}" + (f": {detail}" if detail else "")
        if ok:
            self.say(line)
        else:
            print(line, file=self.out, flush=True)
        return ok

    def mark(self, who: str, what: str, *, t: float | None = None) -> None:
        self.marks.append(Mark(trio.current_time() if t is None else t, who, what))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    # -- the run ------------------------------------------------------------

    async def run(self, bus_address: str) -> None:
        try:
            await self._run(bus_address)
        except Exception as exc:  # every failure becomes a failed check
            for leaf in _leaves(exc):
                self.check("the demo ran to the end", False, _describe_exc(leaf))

    async def _run(self, bus_address: str) -> None:
        opts = self.opts
        setup = self.setup
        self.say("== start ==")
        emulator_argv = python_command(
            "hiomapbridge.sim",
            "hiomapd",
            "--bus",
            bus_address,
            "--flash",
            str(self.flash_path),
            "--lpc",
            str(self.lpc_path),
            "--log-level",
            "info",
        )
        if opts.window_size is not None:
            emulator_argv += ["--window-size", str(opts.window_size)]
        bridge_argv = python_command(
            "hiomapbridge",
            "--bus",
            bus_address,
            "--shutdown-timeout",
            str(_BRIDGE_SHUTDOWN_TIMEOUT),
            "--log-level",
            "info",
            *setup.bridge_args(),
        )
        self.say(f"  private dbus-daemon at {bus_address}")
        async with (
            setup.prepare(bus_address),
            run_service("hiomapd", emulator_argv, self.workdir) as hiomapd,
        ):
            self.hiomapd = hiomapd
            self.say(
                f"  hiomapd emulator: pid {hiomapd.process.pid}, READY=1 after "
                f"{_ms(_ready(hiomapd) - hiomapd.started_at)}"
            )
            async with run_service("hiomapbridge", bridge_argv, self.workdir) as bridge:
                self.bridge = bridge
                self.say(
                    f"  hiomapbridge{setup.bridge_note}: pid {bridge.process.pid}, "
                    f"READY=1 after {_ms(_ready(bridge) - bridge.started_at)}"
                )
                async with setup.attach(bus_address) as host:
                    self.host = host
                    self.say(
                        f"  host: negotiated HIOMAP v{host.version}, flash "
                        f"{mib(host.flash_size)}, erase block {host.erase_size} B"
                    )
                    await setup.exercise(host, hiomapd, bridge)

    async def scenarios(
        self, host: DemoHost, hiomapd: Service, bridge: Service
    ) -> None:
        """The standard run once the host is up: boot, update, the host
        setup's extras, the scenario's shutdown, the request check."""
        await self._boot(host)
        await self._update(host)
        await self.setup.before_shutdown(host)
        if self.opts.scenario == "clean":
            await self._shutdown_clean(host, hiomapd, bridge)
        else:
            await self._shutdown_crash(host, hiomapd, bridge)
        self.check_requests(host)
        self.setup.final_checks(host)

    async def _boot(self, host: DemoHost) -> None:
        self.say()
        self.say("== boot: read the whole flash through the bridge ==")
        # The bridge tells the host hiomapd's state once btbridged appears
        # (SMS_ATN); take that event before reading, as a booting host would.
        with trio.fail_after(10):
            await host.wait_events(1)
        first = host.hiomap_events[0]
        self.say(f"  host got the first event: {describe(first.data or 0)}")
        self.check(
            "host sees the image's size",
            host.flash_size == len(self.image),
            f"GET_FLASH_INFO says {host.flash_size} B, image has {len(self.image)} B",
        )
        digest = hashlib.sha256()
        stream = self.err if not self.opts.quiet else None
        progress = Progress(stream, "boot read", host.flash_size) if stream else None
        start = trio.current_time()
        offset = 0
        while offset < host.flash_size:
            length = min(READ_CHUNK, host.flash_size - offset)
            chunk = await self._retry(functools.partial(host.read, offset, length))
            digest.update(chunk)
            offset += len(chunk)
            if progress is not None:
                progress.update(offset)
        self.read_seconds = trio.current_time() - start
        self.bytes_read += offset
        expected = hashlib.sha256(self.image).hexdigest()
        got = digest.hexdigest()
        self.check(
            "boot read: SHA-256 matches the image",
            got == expected,
            f"{got[:16]}... over {offset} B"
            if got == expected
            else f"read {got[:16]}..., image {expected[:16]}...",
        )

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Retry an operation an event invalidated mid-way (skiboot retries
        FLASH_ERR_AGAIN too); every retry is counted in the summary."""
        for _ in range(3):
            try:
                return await op()
            except TryAgain:
                self.retries += 1
        return await op()

    async def _update(self, host: DemoHost) -> None:
        self.say()
        self.say("== update: write one region, erase another, flush ==")
        size = host.flash_size
        model = bytearray(self.image)
        rng = random.Random(self.opts.seed + 1)
        # An unaligned write (the host rewrites whole blocks around it) ...
        w_off = size // 4 + 0x321
        w_len = min(size // 8, 192 << 10) + 0x123
        data = rng.randbytes(w_len)
        # ... and a block-aligned erase.
        erase = max(host.erase_size, BLOCK)
        e_off = (size // 2) // erase * erase
        e_len = min(4 * erase, size - e_off)
        start = trio.current_time()
        await self._retry(lambda: host.write(w_off, data))
        model[w_off : w_off + w_len] = data
        self.bytes_written += w_len
        self.say(f"  wrote {w_len} B at {w_off:#x}")
        await self._retry(lambda: host.erase(e_off, e_len))
        model[e_off : e_off + e_len] = b"\xff" * e_len
        self.bytes_erased += e_len
        self.say(f"  erased {e_len} B at {e_off:#x}")
        flushed = await host.flush()
        self.update_seconds = trio.current_time() - start
        self.say(f"  FLUSH {'sent' if flushed else 'not needed (no write window)'}")
        if self.opts.inject_fault == "write":
            _corrupt(self.flash_path, w_off + w_len // 2)
            self.say("  (test fault: flipped one byte of the flash file)")
        actual = await trio.Path(self.flash_path).read_bytes()
        diffs = _differences(model, actual)
        if not diffs and len(actual) == len(model):
            detail = f"{len(actual)} B identical"
        else:
            where = ", ".join(f"{d:#x}" for d in diffs[:4])
            detail = (
                f"{len(diffs)} byte(s) differ (first at {where}); "
                f"file {len(actual)} B, model {len(model)} B"
            )
        self.check(
            "flash file matches the model after write + erase + flush",
            not diffs and len(actual) == len(model),
            detail,
        )

    def check_requests(self, host: DemoHost) -> None:
        txs = self.setup.bt.transactions
        bad = [tx for tx in txs if not _ok(tx)]
        self.check(
            "every host request was answered with cc 0x00",
            not bad,
            f"{len(txs)} requests"
            if not bad
            else f"{len(bad)} of {len(txs)} not: "
            + ", ".join(
                f"{_command_name(tx)} -> "
                + (f"cc {tx.delivered.cc:#04x}" if tx.delivered else tx.outcome)
                for tx in bad[:4]
            ),
        )

    async def _stop_hiomapd(
        self, hiomapd: Service, signum: signal.Signals, title: str
    ) -> None:
        """Open a scenario's last act: its title, t0, ``signum`` to hiomapd,
        and hiomapd's exit."""
        self.say()
        self.say(f"== {title} ==")
        self.t0 = trio.current_time()
        hiomapd.signal(signum)
        self.mark("demo", f"{signum.name} -> hiomapd (pid {hiomapd.process.pid})")
        with trio.fail_after(15):
            self.hiomapd_status = await hiomapd.wait()

    async def _shutdown_clean(
        self, host: DemoHost, hiomapd: Service, bridge: Service
    ) -> None:
        await self._stop_hiomapd(
            hiomapd,
            signal.SIGTERM,
            "shutdown in systemd order: SIGTERM hiomapd, then the bridge",
        )
        bridge.signal(signal.SIGTERM)
        term_bridge = trio.current_time()
        self.mark("demo", f"SIGTERM -> hiomapbridge (pid {bridge.process.pid})")
        with trio.fail_after(_BRIDGE_SHUTDOWN_TIMEOUT + 15):
            self.bridge_status = await bridge.wait()
        self._collect_marks(host)
        self.print_timeline()
        held = _first_reset(host, self.t0)
        exited = bridge.exited_at
        assert exited is not None
        if held is None:
            self.check(
                "host held PROTOCOL_RESET before the bridge exited",
                False,
                "the host never received 0x01 with DAEMON_READY clear "
                f"(its state: {describe(host.state)})",
            )
        else:
            when = "after" if held.trio_time > term_bridge else "before"
            self.check(
                "host held PROTOCOL_RESET before the bridge exited",
                held.trio_time < exited and _holds_reset(host.state),
                f"received {_ms(held.trio_time - self.t0)} after SIGTERM to "
                f"hiomapd, {_ms(exited - held.trio_time)} before the bridge's "
                f"exit was observed ({when} SIGTERM to the bridge)",
            )
        self.check(
            "exit codes: hiomapd 0 after SIGTERM, hiomapbridge 0 after SIGTERM",
            self.hiomapd_status == 0 and self.bridge_status == 0,
            f"hiomapd {_status(self.hiomapd_status)}, "
            f"hiomapbridge {_status(self.bridge_status)}",
        )

    async def _shutdown_crash(
        self, host: DemoHost, hiomapd: Service, bridge: Service
    ) -> None:
        await self._stop_hiomapd(
            hiomapd,
            signal.SIGKILL,
            "crash: SIGKILL hiomapd; the bridge must tell the host",
        )
        t0 = self.t0
        with trio.move_on_after(10):
            await host.wait_until(lambda: _first_reset(host, t0) is not None)
        held = _first_reset(host, t0)
        bridge.signal(signal.SIGTERM)
        term_bridge = trio.current_time()
        self.mark("demo", f"SIGTERM -> hiomapbridge (pid {bridge.process.pid})")
        with trio.fail_after(_BRIDGE_SHUTDOWN_TIMEOUT + 15):
            self.bridge_status = await bridge.wait()
        self._collect_marks(host)
        self.print_timeline()
        if held is None:
            self.check(
                "host learned of the crash (0x01, DAEMON_READY clear) from the bridge",
                False,
                f"nothing within 10 s of the crash (host state {describe(host.state)})",
            )
        else:
            self.check(
                "host learned of the crash (0x01, DAEMON_READY clear) from the bridge",
                held.trio_time < term_bridge,
                f"{_ms(held.trio_time - t0)} after SIGKILL, before the bridge "
                "was told to stop: delivered by its crash detection",
            )
        exited = bridge.exited_at
        assert exited is not None
        self.check(
            "host still held PROTOCOL_RESET when the bridge exited",
            held is not None and held.trio_time < exited and _holds_reset(host.state),
            f"host state {describe(host.state)}",
        )
        self.check(
            "exit codes: hiomapd killed by SIGKILL, hiomapbridge 0 after SIGTERM",
            self.hiomapd_status == -signal.SIGKILL and self.bridge_status == 0,
            f"hiomapd {_status(self.hiomapd_status)}, "
            f"hiomapbridge {_status(self.bridge_status)}",
        )

    # -- reporting ------------------------------------------------------------

    def _collect_marks(self, host: DemoHost) -> None:
        for name, service in (("hiomapd", self.hiomapd), ("bridge", self.bridge)):
            if service is None:
                continue
            for when, state in service.notifications:
                if when >= self.t0 and "READY=1" not in state.split("\n"):
                    self.mark(name, f"sd_notify {state.strip()!r}", t=when)
            if service.exited_at is not None:
                self.mark(
                    name,
                    f"exited, status {_status(service.process.returncode)} "
                    "(seen by waitpid)",
                    t=service.exited_at,
                )
        for att in self.setup.bt.attentions:
            if att.at.trio >= self.t0:
                self.mark("host", self.setup.attention_note, t=att.at.trio)
        self.setup.shutdown_marks(self.t0)
        held = _first_reset(host, self.t0)
        for ev in host.events:
            if ev.trio_time < self.t0:
                continue
            if ev.is_hiomap and ev.data is not None:
                what = f"fetched event {describe(ev.data)}"
                if ev is held:
                    what += "  <== host holds PROTOCOL_RESET"
                self.mark("host", what, t=ev.trio_time)
            else:
                self.mark("host", f"fetched record {ev.record.hex()}", t=ev.trio_time)

    def print_timeline(self) -> None:
        self.say()
        self.print_marks(self.marks, self.t0, "the first signal")
        if self.bridge is not None:
            said = [
                _log_message(line)
                for line in self.bridge.log().splitlines()
                if "shutdown" in line or "vanished" in line
            ]
            if said:
                self.say("  the bridge's log during shutdown:")
                for line in said:
                    self.say(f"    {line}")

    def print_marks(self, marks: Sequence[Mark], t0: float, since: str) -> None:
        """A timeline: ``marks`` in time order, in ms since ``t0``."""
        self.say(f"  timeline (ms since {since}; one clock, this process):")
        for m in sorted(marks, key=lambda m: m.t):
            self.say(f"  {(m.t - t0) * 1000:+10.3f}  {m.who:<8} {m.what}")

    def print_summary(self) -> None:
        self.say()
        self.say("== summary ==")
        host = self.host
        if host is not None:
            txs = self.setup.bt.transactions
            answered_by = self.setup.answered_by()
            if answered_by is None:
                self._print_table(txs)
            else:
                self._print_table_by(txs, answered_by)
            self.say()
            rate = self.bytes_read / self.read_seconds if self.read_seconds else 0.0
            self.say(
                f"  bytes moved: read {self.bytes_read} B in "
                f"{self.read_seconds:.3f} s ({rate / (1 << 20):.1f} MiB/s); "
                f"written {self.bytes_written} B, erased {self.bytes_erased} B "
                f"in {self.update_seconds:.3f} s"
            )
            events = host.hiomap_events
            self.say(
                f"  events delivered to the host: {len(events)} "
                f"({', '.join(f'{e.data:#04x}' for e in events) or 'none'}); "
                f"SMS_ATN raised {len(self.setup.bt.attentions)} times; "
                f"event fetches dropped: {len(host.fetch_errors)}; "
                f"operations retried: {self.retries}"
            )
            for line in self.setup.summary_lines(host):
                self.say(f"  {line}")
        self.say(
            f"  exit codes: hiomapd {self._final_status(self.hiomapd)}, "
            f"hiomapbridge {self._final_status(self.bridge)}"
        )

    def _print_table(self, txs: Sequence[Transaction]) -> None:
        rows: dict[str, list[Transaction]] = {}
        for tx in txs:
            rows.setdefault(_command_name(tx), []).append(tx)
        hiomap = [tx for tx in txs if (tx.netfn, tx.cmd) == (NETFN_OEM_IBM, CMD_HIOMAP)]
        self.say(
            f"  {'command (host -> bridge)':<34}{'count':>6}{'failed':>7}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        )
        for name in sorted(rows, key=lambda n: (not n.startswith("HIOMAP"), n)):
            self.say(_row(name, rows[name]))
        if hiomap:
            self.say(_row("HIOMAP round trip, all commands", hiomap))

    def _print_table_by(
        self, txs: Sequence[Transaction], answered_by: Callable[[Transaction], str]
    ) -> None:
        """The table with the component that answered each kind of command
        (a command kind answered by both is split into two rows)."""
        rows: dict[tuple[str, str], list[Transaction]] = {}
        for tx in txs:
            rows.setdefault((_command_name(tx), answered_by(tx)), []).append(tx)
        self.say(
            f"  {'command (host -> BT)':<31}{'answered by':<12}{'count':>5}"
            f"{'failed':>7}{'cc':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        )
        keys = sorted(rows, key=lambda k: (not k[0].startswith("HIOMAP"), k))
        for name, by in keys:
            self.say(_row_by(name, by, rows[(name, by)]))
        hiomap = [tx for tx in txs if (tx.netfn, tx.cmd) == (NETFN_OEM_IBM, CMD_HIOMAP)]
        if hiomap:
            self.say(_row_by("HIOMAP round trip, all", "bridge", hiomap))
        forwarded = [tx for tx in txs if answered_by(tx) == "ipmid"]
        if forwarded:
            self.say(_row_by("forwarded to ipmid, all", "ipmid", forwarded))

    def _final_status(self, service: Service | None) -> str:
        """A daemon's exit status for the summary, saying who ended it."""
        if service is None:
            return "did not start (see its log)"
        code = service.process.returncode
        recorded = (
            self.hiomapd_status if service is self.hiomapd else self.bridge_status
        )
        if recorded is not None or code is None:
            return _status(recorded if recorded is not None else code)
        if code == -signal.SIGKILL:
            return f"{_status(code)}, sent by the demo's clean-up after a failure"
        return f"{_status(code)} (exited on its own)"

    @property
    def _host_note(self) -> str:
        return f", host {self.opts.host}" if self.opts.host != "btbridged" else ""

    def print_verdict(self, kept: bool) -> None:
        failed = [c for c in self.checks if not c.ok]
        out = self.out
        if failed or not self.checks:
            print(file=out)
            print(f"logs are in {self.workdir}:", file=out)
            for name in ("hiomapbridge.log", "hiomapd.log", "bus.log"):
                path = self.workdir / name
                print(f"  {path}", file=out)
            for name in ("hiomapbridge.log", "hiomapd.log"):
                lines = _tail(self.workdir / name)
                if lines:
                    print(f"--- last {len(lines)} lines of {name} ---", file=out)
                    for line in lines:
                        print(f"  {line}", file=out)
            print(
                f"RESULT: FAIL ({len(failed)} of {len(self.checks)} checks failed, "
                f"scenario {self.opts.scenario}{self._host_note})",
                file=out,
                flush=True,
            )
            return
        if kept:
            self.say(f"files and logs kept in {self.workdir}")
        print(
            f"RESULT: PASS (all {len(self.checks)} checks, scenario "
            f"{self.opts.scenario}{self._host_note})",
            file=out,
            flush=True,
        )


_LOG_LINE: Final = re.compile(r"^\S+ \S+ \S+ (?P<level>[A-Z]+): (?P<message>.*)$")


def _log_message(line: str) -> str:
    """A daemon's log line without its timestamp and name."""
    match = _LOG_LINE.match(line)
    if match is None:
        return line
    level, message = match["level"], match["message"]
    return message if level == "INFO" else f"{level.lower()}: {message}"


def _ready(service: Service) -> float:
    when = service.notified("READY=1")
    return service.started_at if when is None else when


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _holds_reset(state: int) -> bool:
    return bool(state & PROTOCOL_RESET) and not state & DAEMON_READY


def _first_reset(host: DemoHost, since: float) -> EventRecord | None:
    """The first HIOMAP event at or after ``since`` carrying PROTOCOL_RESET
    with DAEMON_READY clear."""
    for ev in host.hiomap_events:
        if ev.trio_time >= since and ev.data is not None and _holds_reset(ev.data):
            return ev
    return None


def _latency_columns(txs: list[Transaction]) -> str:
    """p50, p99 and max latency (ms) of ``txs``, 9 characters each."""
    latencies = [lat for tx in txs if (lat := _latency(tx)) is not None]
    if not latencies:
        return f"{'-':>9}" * 3
    return "".join(
        f"{v * 1000:9.2f}"
        for v in (percentile(latencies, 50), percentile(latencies, 99), max(latencies))
    )


def _row(name: str, txs: list[Transaction]) -> str:
    failed = sum(1 for tx in txs if not _ok(tx))
    return f"  {name:<34}{len(txs):>6}{failed:>7}{_latency_columns(txs)}"


def _row_by(name: str, by: str, txs: list[Transaction]) -> str:
    """A row of the table with responders: who answered, and the completion
    codes the host got."""
    failed = sum(1 for tx in txs if not _ok(tx))
    codes = sorted({tx.delivered.cc for tx in txs if tx.delivered is not None})
    cc = ",".join(f"{c:#04x}" for c in codes) or "-"
    return f"  {name:<31}{by:<12}{len(txs):>5}{failed:>7}{cc:>6}{_latency_columns(txs)}"


def _differences(model: bytes | bytearray, actual: bytes) -> list[int]:
    """Offsets of differing bytes (compared 4 KiB at a time, for speed)."""
    out: list[int] = []
    for start in range(0, min(len(model), len(actual)), BLOCK):
        a = model[start : start + BLOCK]
        b = actual[start : start + BLOCK]
        if a != b:
            out.extend(
                start + i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y
            )
    return out


def _corrupt(path: Path, offset: int) -> None:
    """Flip every bit of one byte of ``path`` (the test-only fault)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- the host side ------------------------------------------------------------------


class RecordingBt(Protocol):
    """What the demo reads of the host's BT interface after the run (both
    :class:`~hiomapbridge.sim.btbridged.BtBridge` and
    :class:`~hiomapbridge.sim.bthost.BtHost` record these)."""

    @property
    def transactions(self) -> list[Transaction]: ...

    @property
    def attentions(self) -> list[Attention]: ...


class HostSetup(abc.ABC):
    """The host side of one demo run, chosen by ``--host`` (see
    :data:`HOST_SETUPS`).

    :meth:`Demo._run` composes a run as: :meth:`prepare` (host-side pieces
    that must exist before the daemons), the hiomapd emulator, the bridge
    with :meth:`bridge_args`, :meth:`attach` (yields the host client once it
    has negotiated), then :meth:`exercise`. The default :meth:`exercise` is
    the standard run (:meth:`Demo.scenarios`), which calls back
    :meth:`before_shutdown` and :meth:`final_checks`; the summary asks
    :meth:`answered_by` and :meth:`summary_lines`. A new host kind subclasses
    this, overrides what differs and registers in :data:`HOST_SETUPS` (the
    ``--host`` choices come from there).
    """

    #: The ``--host`` value.
    name: ClassVar[str]
    #: The timeline's text for one SMS_ATN the host saw.
    attention_note: ClassVar[str] = "SMS_ATN (the bridge raised it)"
    #: Shown after "hiomapbridge" in the start-up lines.
    bridge_note: ClassVar[str] = ""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo

    @property
    @abc.abstractmethod
    def bt(self) -> RecordingBt:
        """The host's BT interface (valid once :meth:`attach` yielded)."""

    def bridge_args(self) -> list[str]:
        """Extra arguments for the bridge's command line."""
        return []

    @asynccontextmanager
    async def prepare(self, bus_address: str) -> AsyncIterator[None]:
        """Run what must be up before hiomapd and the bridge start."""
        await trio.lowlevel.checkpoint()
        yield

    @abc.abstractmethod
    def attach(self, bus_address: str) -> AbstractAsyncContextManager[DemoHost]:
        """Run the host client, started (HIOMAP negotiated), while the
        bridge runs."""

    async def exercise(self, host: DemoHost, hiomapd: Service, bridge: Service) -> None:
        """Everything the run does with the host up."""
        await self.demo.scenarios(host, hiomapd, bridge)

    async def before_shutdown(self, host: DemoHost) -> None:
        """Between the update and the shutdown scenario."""
        await trio.lowlevel.checkpoint()

    def shutdown_marks(self, t0: float) -> None:
        """Add this host side's own marks to the shutdown timeline
        (:meth:`Demo.mark`); none by default."""
        return None

    def final_checks(self, host: DemoHost) -> None:
        """Checks of this host side, after the shutdown; none by default."""
        return None

    def answered_by(self) -> Callable[[Transaction], str] | None:
        """Which component answered each host request, for the summary
        (None: the bridge answers everything; the plain table)."""
        return None

    def summary_lines(self, host: DemoHost) -> list[str]:
        return []


class BtbridgedSetup(HostSetup):
    """``--host btbridged``: the btbridged stand-in and the skiboot-like
    host in this process; the bridge reaches them over D-Bus."""

    name = "btbridged"
    attention_note = "SMS_ATN (the bridge called setAttention)"

    def __init__(self, demo: Demo) -> None:
        super().__init__(demo)
        self._host: DemoHost | None = None

    @property
    def bt(self) -> RecordingBt:
        assert self._host is not None, "the host is not attached"
        bt: RecordingBt = self._host.bt
        return bt

    @asynccontextmanager
    async def attach(self, bus_address: str) -> AsyncIterator[DemoHost]:
        async with run_host(bus_address, self.demo.lpc_path) as host:
            self._host = host
            yield host


#: The BT interface's socket, in the workdir (unix sun_path is 108 bytes).
_BT_SOCKET: Final = "bt.sock"
_BT_CAPS_FIELDS: Final = 5


class BtSetup(HostSetup):
    """``--host bt``: the bridge owns the BT interface (``--host bt:SOCK``).

    The host simulator :class:`~hiomapbridge.sim.bthost.BtHost` listens on
    SOCK and the skiboot-like host runs over it; a
    :class:`~hiomapbridge.sim.ipmid.FakeIpmid` on the private bus answers
    every command the bridge forwards. Before negotiating HIOMAP the host
    asks Get BT Interface Capabilities (the bridge answers) and Get Device
    ID (forwarded to ipmid), as skiboot does; before the shutdown, ipmid
    raises SoftOff (through the bridge's ``setAttention``), the host fetches
    it and sends Chassis Control (power down), which reaches ipmid."""

    name = "bt"
    attention_note = "SMS_ATN (the bridge raised it on the BT seam)"
    bridge_note = " (--host bt:SOCK, owns the BT interface)"

    def __init__(self, demo: Demo) -> None:
        super().__init__(demo)
        self.socket = demo.workdir / _BT_SOCKET
        self._short_dir: Path | None = None
        if len(str(self.socket)) > _MAX_SOCKET_PATH:  # main() checks the workdir
            self._short_dir = Path(tempfile.mkdtemp(prefix="hb-demo-"))
            self.socket = self._short_dir / _BT_SOCKET
        self._bt: BtHost | None = None
        self._ipmid: FakeIpmid | None = None

    @property
    def bt(self) -> BtHost:
        assert self._bt is not None, "the BT interface is not running"
        return self._bt

    @property
    def ipmid(self) -> FakeIpmid:
        assert self._ipmid is not None, "ipmid is not running"
        return self._ipmid

    def bridge_args(self) -> list[str]:
        return ["--host", f"bt:{self.socket}"]

    @asynccontextmanager
    async def prepare(self, bus_address: str) -> AsyncIterator[None]:
        demo = self.demo
        try:
            async with open_bus(bus_address) as bus, trio.open_nursery() as nursery:
                self._bt = BtHost(self.socket)
                await nursery.start(self._bt.serve)
                demo.say(f"  host BT interface (BtHost): listening on {self.socket}")
                self._ipmid = FakeIpmid()
                await nursery.start(self._ipmid.serve, bus)
                demo.say(
                    "  ipmid (FakeIpmid): owns xyz.openbmc_project.Ipmi.Host, "
                    "answers execute()"
                )
                yield
                nursery.cancel_scope.cancel()
        finally:
            if self._short_dir is not None:
                shutil.rmtree(self._short_dir, ignore_errors=True)

    @asynccontextmanager
    async def attach(self, bus_address: str) -> AsyncIterator[DemoHost]:
        demo, bt = self.demo, self.bt
        async with trio.open_nursery() as nursery:
            host: DemoHost = HostClient(bt, demo.lpc_path)
            await nursery.start(host.run)
            with trio.move_on_after(10):
                await bt.wait_connected()
            if not bt.connected:
                raise TimeoutError(
                    f"the bridge did not connect to {self.socket} within 10 s"
                )
            demo.say(f"  host: the bridge connected to {self.socket}")
            with trio.fail_after(10):
                caps = await host.raw(NETFN_APP, CMD_GET_BT_CAPABILITIES)
                device = await host.raw(NETFN_APP, CMD_GET_DEVICE_ID)
                await host.start()
            self._check_caps(caps.cc, caps.data)
            self._check_device_id(device.cc, device.data)
            yield host
            nursery.cancel_scope.cancel()

    def _check_caps(self, cc: int, data: bytes) -> None:
        forwarded = [c for c in self.ipmid.calls if c.cmd == CMD_GET_BT_CAPABILITIES]
        if cc == 0 and len(data) == _BT_CAPS_FIELDS:
            detail = (
                f"{data[0]} request(s) outstanding, {data[1] + 1}-byte buffers, "
                f"{data[3]} s transaction time, {data[4]} retry(ies)"
            )
        else:
            detail = f"cc {cc:#04x}, data {data.hex() or '-'}"
        if forwarded:
            detail += "; but ipmid was asked too"
        self.demo.check(
            "Get BT Interface Capabilities answered by the bridge",
            cc == 0 and len(data) == _BT_CAPS_FIELDS and not forwarded,
            detail,
        )

    def _check_device_id(self, cc: int, data: bytes) -> None:
        calls = [c for c in self.ipmid.calls if c.cmd == CMD_GET_DEVICE_ID]
        channels = ", ".join(str(c.channel) for c in calls) or "-"
        self.demo.check(
            "Get Device ID forwarded to ipmid, on the system interface channel",
            cc == 0
            and data == DEVICE_ID
            and [c.channel for c in calls] == [CHANNEL_SYSTEM_INTERFACE],
            f"cc {cc:#04x}, {len(data)} B "
            f"{'identical to' if data == DEVICE_ID else 'differing from'} ipmid's "
            f"answer; ipmid saw {len(calls)} call(s), on channel {channels} "
            f"(15: system interface)",
        )

    async def before_shutdown(self, host: DemoHost) -> None:
        demo, ipmid, bt = self.demo, self.ipmid, self.bt
        demo.say()
        demo.say("== power off: ipmid asks the host for a soft off ==")
        start = trio.current_time()
        command = ipmid.soft_off()
        demo.say("  ipmid queued SoftOff (SEL command 0x04) and calls setAttention")

        def soft_off_fetched() -> bool:
            return _soft_off(host, start) is not None

        with trio.move_on_after(10):
            await host.wait_until(soft_off_fetched)
        record = _soft_off(host, start)
        demo.check(
            "host fetched ipmid's SoftOff through the bridge",
            record is not None and command.outcome == "delivered",
            f"record {record.record.hex()} after {_ms(record.trio_time - start)}"
            if record is not None
            else f"nothing within 10 s (ipmid's command: {command.outcome})",
        )
        # The host's OS shuts down; then it asks the BMC to power it off.
        power = await host.raw(NETFN_CHASSIS, CMD_CHASSIS_CONTROL, b"\x00")
        demo.check(
            "Chassis Control (power down) forwarded to ipmid",
            power.cc == 0 and ipmid.chassis_controls == [0x00],
            f"cc {power.cc:#04x}; ipmid acted on "
            f"{', '.join(f'{b:#04x}' for b in ipmid.chassis_controls) or 'nothing'}",
        )
        marks = self._exchange_marks(start)
        for att in bt.attentions:
            if att.at.trio >= start:
                marks.append(Mark(att.at.trio, "host", self.attention_note))
        for attention in ipmid.attentions:
            if attention.at.trio >= start:
                marks.append(
                    Mark(
                        attention.at.trio,
                        "ipmid",
                        "setAttention() on org.openbmc.HostIpmi (owned by the bridge)",
                    )
                )
        marks.append(Mark(command.queued.trio, "ipmid", "queued SoftOff"))
        if command.done is not None:
            marks.append(Mark(command.done.trio, "ipmid", f"SoftOff {command.outcome}"))
        if record is not None:
            marks.append(
                Mark(record.trio_time, "host", "holds SoftOff (record 0x04 0x00)")
            )
        demo.print_marks(marks, start, "ipmid queued SoftOff")

    def _exchange_marks(self, since: float) -> list[Mark]:
        """One mark per host request sent at or after ``since``, with who
        answered it."""
        by = self.answered_by()
        marks = []
        for tx in self.bt.transactions:
            if tx.sent.trio < since or tx.delivered_at is None:
                continue
            cc = tx.delivered.cc if tx.delivered is not None else -1
            marks.append(
                Mark(
                    tx.delivered_at.trio,
                    "host",
                    f"{_command_name(tx)}: cc {cc:#04x}, answered by {by(tx)}",
                )
            )
        return marks

    def shutdown_marks(self, t0: float) -> None:
        for mark in self._exchange_marks(t0):
            self.demo.marks.append(mark)

    def final_checks(self, host: DemoHost) -> None:
        bt = self.bt
        self.demo.check(
            "every BT frame from the bridge was well formed",
            not bt.violations,
            f"{sum(1 for f in bt.frames if f.direction == 'b2h')} frames"
            if not bt.violations
            else "; ".join(bt.violations[:3]),
        )

    def answered_by(self) -> Callable[[Transaction], str]:
        forwarded = _forwarded(self.bt.transactions, self.ipmid.calls)

        def by(tx: Transaction) -> str:
            return "ipmid" if id(tx) in forwarded else "bridge"

        return by

    def summary_lines(self, host: DemoHost) -> list[str]:
        ipmid, bt = self.ipmid, self.bt
        channels = sorted({c.channel for c in ipmid.calls}, key=str)
        records = [
            f"{_SEL_NAMES.get(ev.command, f'{ev.command:#04x}')} "
            f"({ev.command:#04x} {ev.data:#04x})"
            for ev in host.events
            if not ev.is_hiomap and ev.command is not None and ev.data is not None
        ]
        commands = ", ".join(
            f"{_SEL_NAMES.get(c.cmd, f'{c.cmd:#04x}')} {c.outcome}"
            for c in ipmid.host_commands
        )
        return [
            f"ipmid: {len(ipmid.calls)} execute calls on channel(s) "
            f"{', '.join(str(ch) for ch in channels) or '-'}; its host commands: "
            f"{commands or 'none'}; its records the host fetched: "
            f"{', '.join(records) or 'none'}; Chassis Control acted on: "
            f"{', '.join(f'{b:#04x}' for b in ipmid.chassis_controls) or 'none'}",
            f"BT seam: {sum(1 for f in bt.frames if f.direction == 'h2b')} frames "
            f"host -> bridge, {sum(1 for f in bt.frames if f.direction == 'b2h')} "
            f"bridge -> host (SMS_ATN included), {bt.connections} connection(s), "
            f"{len(bt.violations)} framing violations",
        ]


_SEL_NAMES: Final = {SEL_CMD_POWER: "SoftOff", SEL_CMD_HEARTBEAT: "heartbeat"}


def _soft_off(host: DemoHost, since: float) -> EventRecord | None:
    for ev in host.events:
        if ev.trio_time >= since and (ev.command, ev.data) == (SEL_CMD_POWER, SOFT_OFF):
            return ev
    return None


def _forwarded(
    txs: Sequence[Transaction], calls: Sequence[ExecuteCall]
) -> dict[int, ExecuteCall]:
    """The host requests the bridge forwarded to ipmid: ``id(tx)`` -> the
    ``execute`` call with the same request that ipmid received while the
    host waited for the answer (one call per request, in order)."""
    matched: dict[int, ExecuteCall] = {}
    for call in calls:
        for tx in txs:
            if id(tx) in matched:
                continue
            if (tx.netfn, tx.lun, tx.cmd, tx.data) != (
                call.netfn,
                call.lun,
                call.cmd,
                call.data,
            ):
                continue
            answered = tx.delivered_at.trio if tx.delivered_at else math.inf
            if tx.sent.trio <= call.at.trio <= answered:
                matched[id(tx)] = call
                break
    return matched


#: ``--host`` value -> its host setup.
HOST_SETUPS: Final[dict[str, Callable[[Demo], HostSetup]]] = {
    BtbridgedSetup.name: BtbridgedSetup,
    BtSetup.name: BtSetup,
}


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiomapbridge-demo",
        description=(
            "Run the whole HIOMAP path on this machine: a private dbus-daemon, "
            "the hiomapd emulator and hiomapbridge as real subprocesses, and a "
            "skiboot-like host (behind a btbridged stand-in, or on the BT "
            "interface itself with --host bt). The host boots "
            "(reads the whole flash, checks its SHA-256), writes and erases, "
            "then everything shuts down in systemd order and a timeline shows "
            "the host holding PROTOCOL_RESET before the bridge exits. Needs "
            "only dbus-daemon."
        ),
        epilog=(
            "Exit status: 0 when every check passed, 1 when a check failed "
            "(the logs' location and their tails are printed), 2 for bad "
            "options or a missing dbus-daemon."
        ),
    )
    parser.add_argument(
        "--scenario",
        choices=("clean", "crash"),
        default="clean",
        help="clean: SIGTERM hiomapd then the bridge (default); crash: SIGKILL "
        "hiomapd, the host must still learn of the reset",
    )
    parser.add_argument(
        "--host",
        choices=(*HOST_SETUPS, "qemu"),
        default="btbridged",
        help="how the host reaches the bridge. qemu: real skiboot firmware in "
        "QEMU powernv9 boots through the whole chain (its own acts: boot, "
        "systemd-order shutdown with the firmware alive, a boot with the BMC "
        "side gone, a restart it recovers from; see --bridge-host), falling "
        "back to the simulated host (--bridge-host) when QEMU or skiboot.lid "
        "is missing. btbridged (default): the "
        "bridge runs with --host btbridged, the host sits behind a btbridged "
        "stand-in. bt: the bridge runs with --host bt:SOCK and owns the BT "
        "interface, whose host end (a simulator) listens on a unix socket in "
        "the workdir; a fake ipmid answers what the bridge forwards, the host "
        "also sends Get BT Interface Capabilities, Get Device ID and Chassis "
        "Control (power down) and fetches ipmid's SoftOff event, and the "
        "summary shows whether the bridge or ipmid answered each command",
    )
    parser.add_argument(
        "--bridge-host",
        choices=("bt", "btbridged"),
        default="bt",
        help="with --host qemu: how the bridge reaches skiboot (default bt); "
        "--scenario, --flash, --flash-size and --window-size do not apply",
    )
    parser.add_argument(
        "--flash",
        type=Path,
        metavar="FILE",
        help="flash image to serve (copied; your file is never modified); "
        "default: a generated pseudo-random image",
    )
    parser.add_argument(
        "--flash-size",
        type=parse_size,
        default=DEFAULT_FLASH_SIZE,
        metavar="SIZE",
        help="size of the generated image, e.g. 256K or 8M (default 8M)",
    )
    parser.add_argument(
        "--window-size",
        type=parse_window_size,
        metavar="SIZE",
        help="hiomapd's window size, a power of two from 4K (default: the "
        "emulator's, 1M as hiomapd's); smaller windows mean more round trips",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the generated image and of the written data (default 0)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep the flash, LPC and log files here (created if needed; "
        "default: a temporary directory, removed unless a check fails or --keep)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory even when every check passed",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only failed checks and the result line",
    )
    # Test-only: corrupt the flash file behind the host's back ("read": the
    # served image before hiomapd starts; "write": the flash file after the
    # flush) so that the suite can prove the checks catch a mismatch.
    parser.add_argument(
        "--inject-fault", choices=("read", "write"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


def _prepare_image(demo: Demo) -> None:
    opts = demo.opts
    if opts.flash is not None:
        data = opts.flash.read_bytes()
        demo.user_flash_sha = hashlib.sha256(data).hexdigest()
        shutil.copyfile(opts.flash, demo.flash_path)
        source = f"a copy of {opts.flash}"
    else:
        data = image_bytes(opts.flash_size, opts.seed)
        demo.flash_path.write_bytes(data)
        source = f"generated, seed {opts.seed}"
    demo.image = data
    demo.say(
        f"  flash image: {demo.flash_path} ({len(data)} B, {source}), "
        f"SHA-256 {hashlib.sha256(data).hexdigest()[:16]}..."
    )
    if demo.lpc_path.exists():
        demo.lpc_path.unlink()
    if opts.inject_fault == "read":
        _corrupt(demo.flash_path, len(data) * 7 // 8)  # outside the update
        demo.say("  (test fault: flipped one byte of the served image)")


def _check_flash_file(path: Path) -> str | None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"--flash {path}: {exc.strerror}"
    if size == 0 or size % BLOCK or size > MAX_FLASH:
        return (
            f"--flash {path}: size {size} is not a positive multiple of 4K "
            f"up to {MAX_FLASH:#x}"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host == "qemu":
        from . import demo_qemu

        status = demo_qemu.run_demo(
            demo_qemu.Options(
                bridge_host=args.bridge_host,
                workdir=args.workdir,
                keep=args.keep,
                quiet=args.quiet,
            )
        )
        if status != demo_qemu.EXIT_UNAVAILABLE:
            return status
        print(
            "hiomapbridge-demo: falling back to the simulated host "
            f"(--host {args.bridge_host})",
            file=sys.stderr,
        )
        args.host = args.bridge_host
    opts = Options(
        scenario=args.scenario,
        flash=args.flash,
        flash_size=args.flash_size,
        seed=args.seed,
        window_size=args.window_size,
        workdir=args.workdir,
        keep=args.keep,
        quiet=args.quiet,
        inject_fault=args.inject_fault,
        host=args.host,
    )
    err = sys.stderr
    if opts.flash is not None and (problem := _check_flash_file(opts.flash)):
        print(f"hiomapbridge-demo: {problem}", file=err)
        return 2
    try:
        dbus_daemon_path()
    except RuntimeError as exc:
        print(f"hiomapbridge-demo: {exc}", file=err)
        return 2

    if opts.workdir is not None:
        workdir = opts.workdir.resolve()
        if opts.flash is not None and opts.flash.resolve() == workdir / "flash.img":
            print("hiomapbridge-demo: --flash must not be DIR/flash.img", file=err)
            return 2
        longest = workdir / "hiomapbridge.notify"
        if len(str(longest)) > _MAX_SOCKET_PATH:
            print(
                f"hiomapbridge-demo: --workdir {workdir} is too long for the unix "
                f"sockets placed in it (at most {_MAX_SOCKET_PATH - 20} characters)",
                file=err,
            )
            return 2
        workdir.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="hiomapbridge-demo-"))
        temporary = True

    demo = Demo(opts, workdir, sys.stdout, err)
    interrupted = False
    try:
        _execute(demo)
    except KeyboardInterrupt:
        interrupted = True
        demo.check("the demo ran to the end", False, "interrupted (SIGINT)")
    demo.print_summary()
    keep = not temporary or opts.keep or not demo.passed
    demo.print_verdict(kept=temporary and keep)
    if temporary and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if demo.passed else 1


def _execute(demo: Demo) -> None:
    """Prepare the image, run the bus and the demo's trio part, and check
    the user's image afterwards."""
    opts = demo.opts
    demo.say(
        f"hiomapbridge-demo {__version__}: scenario {opts.scenario}"
        + (f", host {opts.host}" if opts.host != "btbridged" else "")
    )
    demo.say(f"  workdir {demo.workdir}")
    _prepare_image(demo)
    with contextlib.ExitStack() as stack:
        try:
            bus = stack.enter_context(private_bus(demo.workdir))
        except (OSError, RuntimeError) as exc:
            demo.check("private dbus-daemon started", False, str(exc))
            return
        trio.run(demo.run, bus.address)
    if demo.user_flash_sha is not None and opts.flash is not None:
        after = hashlib.sha256(opts.flash.read_bytes()).hexdigest()
        demo.check(
            "your --flash file is unchanged",
            after == demo.user_flash_sha,
            f"SHA-256 {after[:16]}...",
        )


if __name__ == "__main__":
    sys.exit(main())
