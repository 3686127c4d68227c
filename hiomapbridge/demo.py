"""``hiomapbridge-demo``: the whole path host -> IPMI -> bridge -> hiomapd ->
flash, on an ordinary Linux box, in one command.

It starts a private ``dbus-daemon``, the hiomapd emulator and the bridge as
real subprocesses (each with its own ``NOTIFY_SOCKET``, as systemd runs
them), and the btbridged stand-in plus the skiboot-like host in this
process. Then:

1. **boot**: the host negotiates and reads the whole flash through the bridge
   (progress on stderr); the SHA-256 of what it read must match the image;
2. **update**: it writes one region and erases another, flushes, and the
   emulator's flash file must match a model byte for byte;
3. **shutdown** in systemd order: SIGTERM to hiomapd, then SIGTERM to the
   bridge (``--scenario crash``: SIGKILL to hiomapd first, and the host must
   learn of the reset from the bridge's crash detection before the bridge
   is stopped). A timeline shows when the host held PROTOCOL_RESET relative
   to the bridge's exit;
4. a summary of measured numbers, and the checks. The exit status is 0 only
   if every check passed.

Every time in the timeline is ``trio.current_time()`` in this process: the
host's receipt of an event is stamped where it happens (in process), the
daemons' notifications when their datagram arrives, and their exits when
``waitpid`` returns (so an exit is shown no earlier than it happened).
"""

from __future__ import annotations

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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final, Literal, TextIO, TypeVar

import attrs
import trio

from . import __version__
from .events import describe
from .hiomap import Command
from .ipmi import (
    CMD_CLEAR_MESSAGE_FLAGS,
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    NETFN_APP,
    NETFN_OEM_IBM,
)
from .sim.btbridged import Transaction
from .sim.host import (
    DAEMON_READY,
    PROTOCOL_RESET,
    EventRecord,
    Host,
    TryAgain,
    run_host,
)
from .sim.privatebus import dbus_daemon_path, private_bus
from .sim.process import Service, python_command, run_service

Scenario = Literal["clean", "crash"]
Fault = Literal["read", "write"]
T = TypeVar("T")

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
    names = {
        (NETFN_APP, CMD_GET_MESSAGE_FLAGS): "Get Message Flags",
        (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER): "Read Event Message Buffer",
        (NETFN_APP, CMD_CLEAR_MESSAGE_FLAGS): "Clear Message Flags",
    }
    return names.get((tx.netfn, tx.cmd), f"netfn {tx.netfn:#04x} cmd {tx.cmd:#04x}")


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


@attrs.define
class Demo:
    """One run: its options, files, what it measured and what it checked."""

    opts: Options
    workdir: Path
    out: TextIO
    err: TextIO
    checks: list[Check] = attrs.field(factory=list)
    marks: list[Mark] = attrs.field(factory=list)
    image: bytes = b""
    hiomapd: Service | None = None
    bridge: Service | None = None
    host: Host | None = None
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
        )
        self.say(f"  private dbus-daemon at {bus_address}")
        async with run_service("hiomapd", emulator_argv, self.workdir) as hiomapd:
            self.hiomapd = hiomapd
            self.say(
                f"  hiomapd emulator: pid {hiomapd.process.pid}, READY=1 after "
                f"{_ms(_ready(hiomapd) - hiomapd.started_at)}"
            )
            async with run_service("hiomapbridge", bridge_argv, self.workdir) as bridge:
                self.bridge = bridge
                self.say(
                    f"  hiomapbridge: pid {bridge.process.pid}, READY=1 after "
                    f"{_ms(_ready(bridge) - bridge.started_at)}"
                )
                async with run_host(bus_address, self.lpc_path) as host:
                    self.host = host
                    self.say(
                        f"  host: negotiated HIOMAP v{host.version}, flash "
                        f"{mib(host.flash_size)}, erase block {host.erase_size} B"
                    )
                    await self._boot(host)
                    await self._update(host)
                    if opts.scenario == "clean":
                        await self._shutdown_clean(host, hiomapd, bridge)
                    else:
                        await self._shutdown_crash(host, hiomapd, bridge)
                    self.check_requests(host)

    async def _boot(self, host: Host) -> None:
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

    async def _update(self, host: Host) -> None:
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

    def check_requests(self, host: Host) -> None:
        txs = host.bt.transactions
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
        self, host: Host, hiomapd: Service, bridge: Service
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
        self, host: Host, hiomapd: Service, bridge: Service
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

    def _collect_marks(self, host: Host) -> None:
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
        for att in host.bt.attentions:
            if att.at.trio >= self.t0:
                self.mark(
                    "host", "SMS_ATN (the bridge called setAttention)", t=att.at.trio
                )
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
        self.say("  timeline (ms since the first signal; one clock, this process):")
        for m in sorted(self.marks, key=lambda m: m.t):
            self.say(f"  {(m.t - self.t0) * 1000:+10.3f}  {m.who:<8} {m.what}")
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

    def print_summary(self) -> None:
        self.say()
        self.say("== summary ==")
        host = self.host
        if host is not None:
            rows: dict[str, list[Transaction]] = {}
            for tx in host.bt.transactions:
                rows.setdefault(_command_name(tx), []).append(tx)
            hiomap = [
                tx
                for tx in host.bt.transactions
                if (tx.netfn, tx.cmd) == (NETFN_OEM_IBM, CMD_HIOMAP)
            ]
            self.say(
                f"  {'command (host -> bridge)':<34}{'count':>6}{'failed':>7}"
                f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            )
            for name in sorted(rows, key=lambda n: (not n.startswith("HIOMAP"), n)):
                self.say(_row(name, rows[name]))
            if hiomap:
                self.say(_row("HIOMAP round trip, all commands", hiomap))
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
                f"SMS_ATN raised {len(host.bt.attentions)} times; "
                f"event fetches dropped: {len(host.fetch_errors)}; "
                f"operations retried: {self.retries}"
            )
        self.say(
            f"  exit codes: hiomapd {self._final_status(self.hiomapd)}, "
            f"hiomapbridge {self._final_status(self.bridge)}"
        )

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
                f"scenario {self.opts.scenario})",
                file=out,
                flush=True,
            )
            return
        if kept:
            self.say(f"files and logs kept in {self.workdir}")
        print(
            f"RESULT: PASS (all {len(self.checks)} checks, scenario "
            f"{self.opts.scenario})",
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


def _first_reset(host: Host, since: float) -> EventRecord | None:
    """The first HIOMAP event at or after ``since`` carrying PROTOCOL_RESET
    with DAEMON_READY clear."""
    for ev in host.hiomap_events:
        if ev.trio_time >= since and ev.data is not None and _holds_reset(ev.data):
            return ev
    return None


def _row(name: str, txs: list[Transaction]) -> str:
    latencies = [lat for tx in txs if (lat := _latency(tx)) is not None]
    failed = sum(1 for tx in txs if not _ok(tx))
    if latencies:
        stats = "".join(
            f"{v * 1000:9.2f}"
            for v in (
                percentile(latencies, 50),
                percentile(latencies, 99),
                max(latencies),
            )
        )
    else:
        stats = f"{'-':>9}" * 3
    return f"  {name:<34}{len(txs):>6}{failed:>7}{stats}"


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


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiomapbridge-demo",
        description=(
            "Run the whole HIOMAP path on this machine: a private dbus-daemon, "
            "the hiomapd emulator and hiomapbridge as real subprocesses, and a "
            "skiboot-like host behind a btbridged stand-in. The host boots "
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
    demo.say(f"hiomapbridge-demo {__version__}: scenario {opts.scenario}")
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
