"""The host-mode comparison (issue 12), and what the bench's phases share.

``bt:`` mode against btbridged mode, measured side by side with peers that
cost what the real ones cost:

* both modes have the same host: :class:`SeamHost`, the host end of a
  SOCK_SEQPACKET BT seam, timing each command with blocking ``send`` and
  ``recv`` (a host has no event loop between it and its BT registers);
* in ``bt:`` mode the bridge owns that seam (``--host bt:PATH``); in
  btbridged mode a C btbridged owns it (``bench/peers.c``, sd-bus, as the
  real btbridged is) and the bridge runs ``--host btbridged`` behind it;
* hiomapd is a C sd-bus stand-in too (``bench/peers.c``), one per bus, so
  the Python emulator's own cost, the same in both modes, does not dilute
  the difference the issue is about: btbridged's two D-Bus crossings and
  its own process hop per command.

Each mode has its own private dbus-daemon (each bridge owns names the other
mode's peers hold).  The two modes and a direct D-Bus call to the C hiomapd
(the floor) alternate in blocks of the same commands, in a rotating order.

What else lives here is shared with ``run.py``'s phases: ``/proc`` CPU,
percentiles, the harness's GC pause and the direct-call block.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hiomapbridge import bt, wire
from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, Command, HiomapCall
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
from hiomapbridge.sim.host import PROTOCOL_RESET
from hiomapbridge.sim.ipmid import FakeIpmid
from hiomapbridge.sim.process import Service, run_service

BLOCK_TIMEOUT = 10.0  # seconds: generous bound on any single step
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS_SOURCE = Path(__file__).resolve().with_name("peers.c")

#: The host-mode comparison's modes, in their first block's order.
MODES = ("btbridged", "bt", "direct")


# -- /proc, percentiles, the harness's GC --------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all threads) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@contextmanager
def harness_gc_paused() -> Iterator[None]:
    """Keep the harness's own garbage collector out of a timed block (as
    ``timeit`` does): the harness holds every transaction of the run, so a
    full collection in it can take milliseconds, a pause that would be
    charged to the bridge.  The bridge's process is not touched."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class SeamHost:
    """The host end of a BT seam, as lean as a host written in C.

    The harness listens on a SOCK_SEQPACKET unix socket; the BT owner (a
    ``--host bt:PATH`` bridge, or the C btbridged of ``peers.c``) connects.
    A request is one ``send()`` of its frame, then ``recv()`` until the
    frame with its BT seq comes back (SMS_ATN packets met on the way are
    counted, not answered).  No transaction records, no events, no timers.
    Inside :meth:`blocking` the wait is a blocking ``recv``, as a host
    polling its BT registers has no event loop; the harness's trio loop then
    stands still for the round trip, so use it only where nothing the round
    trip needs lives in the harness process.
    Events are fetched only outside timed blocks
    (:meth:`fetch_if_signalled`), the way skiboot does: Get Message Flags,
    then Read Event Message Buffer if the buffer is full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.sock: socket.socket | None = None
        self.bt_seq = 0
        self.hiomap_seq = 0
        self.attentions = 0  # SMS_ATN packets seen on this connection
        self.handled = 0  # of those, how many were answered with a fetch
        self.events: list[int] = []  # HIOMAP event bytes fetched, in order
        self.stray = 0  # response frames matching no request
        self._blocking = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.listener.close()

    async def accept(self) -> None:
        """Take the bridge's connection (replacing an old one)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with trio.fail_after(BLOCK_TIMEOUT):
            while True:
                try:
                    sock, _ = self.listener.accept()
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.listener)
        sock.setblocking(False)
        self.sock = sock
        self.attentions = self.handled = 0

    async def transact(self, netfn: int, cmd: int, data: bytes = b"") -> bytes:
        """One request; the response frame ``[len, netfn, seq, cmd, cc, ...]``."""
        sock = self.sock
        assert sock is not None
        self.bt_seq = seq = (self.bt_seq + 1) & 0xFF
        frame = bytes((3 + len(data), netfn << 2, seq, cmd)) + data
        if self._blocking:
            return self._transact_blocking(sock, frame, seq)
        sock.send(frame)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                packet = sock.recv(256)
            except BlockingIOError:
                continue
            if len(packet) >= 5 and packet[2] == seq:
                return packet
            self._other(packet)

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Plain blocking ``send``/``recv`` inside the block: one syscall
        each, the kernel bounding every wait (SO_RCVTIMEO, SO_SNDTIMEO), so
        nothing waits forever.  The harness's trio loop stands still
        meanwhile."""
        sock = self.sock
        assert sock is not None
        bound = struct.pack("@ll", int(BLOCK_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        sock.setblocking(True)
        self._blocking = True
        try:
            yield
        finally:
            self._blocking = False
            sock.setblocking(False)

    def _transact_blocking(self, sock: socket.socket, frame: bytes, seq: int) -> bytes:
        try:
            sock.send(frame)
            while True:
                packet = sock.recv(256)
                if len(packet) >= 5 and packet[2] == seq:
                    return packet
                self._other(packet)
        except BlockingIOError:  # the kernel's bound ran out
            raise TimeoutError(f"no response to BT seq {seq}") from None

    def _other(self, packet: bytes) -> None:
        if packet == bt.ATTENTION_PACKET:
            self.attentions += 1
        elif not packet:
            raise EOFError("the bridge closed the bt: seam")
        else:
            self.stray += 1

    async def command(self, command: int, args: bytes) -> None:
        """One HIOMAP command, checked as skiboot checks it (cc, seq, cmd)."""
        self.hiomap_seq = seq = (self.hiomap_seq + 1) & 0xFF
        packet = await self.transact(
            NETFN_OEM_IBM, CMD_HIOMAP, bytes((command, seq)) + args
        )
        if packet[4] != 0 or len(packet) < 7 or packet[6] != seq:
            raise RuntimeError(f"HIOMAP {command}: bad response {packet.hex()}")
        if packet[5] != command:
            raise RuntimeError(f"HIOMAP {command}: bad response {packet.hex()}")

    def poll(self) -> None:
        """Take what the bridge sent meanwhile (SMS_ATN), without waiting."""
        sock = self.sock
        assert sock is not None
        while True:
            try:
                packet = sock.recv(256)
            except BlockingIOError:
                return
            self._other(packet)

    async def wait_attention(self) -> None:
        """Wait for an SMS_ATN not answered yet."""
        sock = self.sock
        assert sock is not None
        self.poll()
        while self.attentions <= self.handled:
            await trio.lowlevel.wait_readable(sock)
            self.poll()

    async def fetch(self) -> None:
        """Answer SMS_ATN as skiboot does: Get Message Flags, then, if the
        buffer is full, one Read Event Message Buffer (a newer event raises
        SMS_ATN again).  Nothing more: after the final PROTOCOL_RESET the
        bridge is gone."""
        self.handled = self.attentions
        flags = await self.transact(NETFN_APP, CMD_GET_MESSAGE_FLAGS)
        if len(flags) < 6 or flags[4] != 0:
            raise RuntimeError(f"Get Message Flags: {flags.hex()}")
        if not flags[5] & MESSAGE_FLAG_EVENT_BUFFER_FULL:
            return
        record = await self.transact(NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)
        if record[4] != 0:
            raise RuntimeError(f"Read Event Message Buffer: {record.hex()}")
        parsed = parse_event_record(record[5:])
        if parsed is not None and parsed[0] == SEL_CMD_HIOMAP_EVENT:
            self.events.append(parsed[1])

    async def fetch_if_signalled(self) -> None:
        self.poll()
        if self.attentions > self.handled:
            await self.fetch()

    async def start(self) -> None:
        """What :meth:`Host.start` does: take the start-up event, then ACK,
        GET_INFO (v2) and GET_FLASH_INFO; then take what those raised."""
        with trio.fail_after(BLOCK_TIMEOUT):
            await self.wait_attention()
            await self.fetch()
            await self.command(Command.ACK, b"\x03")
            await self.command(Command.GET_INFO, b"\x02")
            await self.command(Command.GET_FLASH_INFO, b"")
            await trio.sleep(0.05)
            await self.fetch_if_signalled()


async def direct_block(bus: Bus, plans: list[HiomapCall]) -> list[float]:
    """The same hiomapd calls, made by this process the way the bridge makes
    them (a :class:`wire.CallTemplate` per method, built before the timing
    as the bridge keeps its own), so that the two sides of the ratio pay
    the same codec."""
    out = []
    clock = time.perf_counter
    templates = {
        (plan.interface, plan.member): wire.CallTemplate(
            HIOMAPD_SERVICE, HIOMAPD_PATH, plan.interface, plan.member, plan.signature
        )
        for plan in plans
    }
    with harness_gc_paused(), trio.fail_after(BLOCK_TIMEOUT + 0.01 * len(plans)):
        for plan in plans:
            t0 = clock()
            template = templates[plan.interface, plan.member]
            await bus.call_template(
                template, wire.pack_fixed(plan.signature, plan.args)
            )
            out.append(clock() - t0)
    return out


async def seam_block(
    seam: SeamHost, mix: list[tuple[int, bytes]], blocking: bool = False
) -> list[float]:
    """``mix`` through whatever owns ``seam`` (the host's view)."""
    out = []
    clock = time.perf_counter
    mode = seam.blocking() if blocking else contextlib.nullcontext()
    with harness_gc_paused(), mode:
        for cmd, args in mix:
            t0 = clock()
            await seam.command(cmd, args)
            out.append(clock() - t0)
    with trio.fail_after(BLOCK_TIMEOUT):
        await seam.fetch_if_signalled()  # outside the timed loop
    return out


async def stop_seam_bridge(
    seam: SeamHost, service: Service, what: str, pid: int | None = None
) -> None:
    """SIGTERM a bridge whose host is ``seam`` (``pid``: the bridge's own
    process where ``service`` is a profiler running it); fetch events until
    PROTOCOL_RESET, then wait for a clean exit."""
    seen = len(seam.events)
    os.kill(service.process.pid if pid is None else pid, signal.SIGTERM)
    with trio.fail_after(BLOCK_TIMEOUT):
        while not any(e & PROTOCOL_RESET for e in seam.events[seen:]):
            await seam.wait_attention()
            await seam.fetch()
        status = await service.wait()
    if status != 0:
        raise RuntimeError(f"{what} exited {status}:\n{service.log()}")


# -- the host-mode comparison ----------------------------------------------------------


def build_peers(directory: Path) -> Path | str:
    """Compile ``peers.c``; the binary, or why it could not be built."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return "no C compiler (cc)"
    try:
        flags = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "libsystemd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "libsystemd's development files (pkg-config libsystemd) are missing"
    binary = directory / "peers"
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(PEERS_SOURCE), *flags],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"building peers.c failed: {proc.stderr.strip()[-500:]}"
    return binary


class HostModes:
    """Two buses, each with a C hiomapd; the btbridged side's C btbridged and
    its seam host; the ``bt:`` side's seam host and a fake ipmid; and a
    direct D-Bus client of the btbridged side's hiomapd."""

    def __init__(
        self,
        directory: Path,
        btbridged_address: str,
        bt_address: str,
        direct: Bus,
    ) -> None:
        self.directory = directory
        self.btbridged_address = btbridged_address
        self.bt_address = bt_address
        self.direct = direct
        self.btbridged_seam = SeamHost(directory / "hm-btbridged.sock")
        self.bt_seam = SeamHost(directory / "hm-bt.sock")
        self.peer_pids: list[int] = []  # the C peers: BMC side
        self._started = 0

    def close(self) -> None:
        self.btbridged_seam.close()
        self.bt_seam.close()

    async def _bridge(self, stack: AsyncExitStack, address: str, *host: str) -> Service:
        self._started += 1
        argv = [sys.executable, "-m", "hiomapbridge", "--bus", address, *host]
        return await stack.enter_async_context(
            run_service(
                f"hm-bridge{self._started}", argv, self.directory, ready_timeout=60
            )
        )

    async def start_bridges(self, stack: AsyncExitStack) -> tuple[Service, Service]:
        """A btbridged-mode bridge and a ``bt:`` bridge, each through its
        host's start-up (event, ACK, GET_INFO, GET_FLASH_INFO)."""
        btbridged = await self._bridge(stack, self.btbridged_address)
        await self.btbridged_seam.start()
        bt_mode = await self._bridge(
            stack, self.bt_address, "--host", f"bt:{self.bt_seam.path}"
        )
        await self.bt_seam.accept()
        await self.bt_seam.start()
        return btbridged, bt_mode

    async def stop_bridges(self, btbridged: Service, bt_mode: Service) -> None:
        await stop_seam_bridge(self.btbridged_seam, btbridged, "btbridged-mode bridge")
        await stop_seam_bridge(self.bt_seam, bt_mode, "bt: bridge")


@asynccontextmanager
async def host_modes(
    peers: Path, directory: Path, btbridged_address: str, bt_address: str
) -> AsyncIterator[HostModes]:
    """The peers of :class:`HostModes`, running."""
    async with AsyncExitStack() as stack:
        direct = await stack.enter_async_context(open_bus(btbridged_address))
        modes = HostModes(directory, btbridged_address, bt_address, direct)
        stack.callback(modes.close)
        for i, address in enumerate((btbridged_address, bt_address)):
            service = await stack.enter_async_context(
                run_service(
                    f"hm-hiomapd{i}", [str(peers), "hiomapd", address], directory
                )
            )
            modes.peer_pids.append(service.process.pid)
        seam_path = str(modes.btbridged_seam.path)
        service = await stack.enter_async_context(
            run_service(
                "hm-btbridged",
                [str(peers), "btbridged", btbridged_address, seam_path],
                directory,
            )
        )
        modes.peer_pids.append(service.process.pid)
        await modes.btbridged_seam.accept()
        # Not on the HIOMAP path; the bt: bridge then runs as on a BMC.
        ipmid_bus = await stack.enter_async_context(open_bus(bt_address))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(FakeIpmid().serve, ipmid_bus)
        yield modes


@dataclass(frozen=True)
class Pinning:
    """A single-core BMC beside its host: every BMC-side process (the
    buses, the C peers, the bridges) on the ``bmc`` CPUs, the harness (the
    host, and the direct client) on the ``host`` CPUs.  The BMCs of
    OpenPOWER systems (AST2400, AST2500) have one core."""

    bmc: frozenset[int]
    host: frozenset[int]
    bus_pids: tuple[int, ...]

    @classmethod
    def one_bmc_cpu(cls, bus_pids: tuple[int, ...]) -> Pinning | None:
        """CPU 0 for the BMC, the others for the host; None with fewer than
        two CPUs to run on."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]), bus_pids)


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


async def host_mode_repeat(
    modes: HostModes,
    mix: list[tuple[int, bytes]],
    plans: list[HiomapCall],
    warm: list[tuple[int, bytes]],
    block: int,
    pinning: Pinning | None = None,
) -> dict[str, Any]:
    """One repeat: fresh bridges, a warm-up, then ``mix`` in blocks through
    each mode and directly, in rotating order; p50/p99 and each bridge's CPU
    over its own blocks.  With ``pinning``, from the warm-up on."""
    async with AsyncExitStack() as stack:
        btbridged, bt_mode = await modes.start_bridges(stack)
        seams = {"btbridged": modes.btbridged_seam, "bt": modes.bt_seam}
        pids = {"btbridged": btbridged.process.pid, "bt": bt_mode.process.pid}
        if pinning is not None:
            for pid in (*pinning.bus_pids, *modes.peer_pids, *pids.values()):
                pin_process(pid, pinning.bmc)
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, pinning.host)  # this (the host's) thread
            stack.callback(os.sched_setaffinity, 0, saved)
        for seam in seams.values():
            await seam_block(seam, warm, blocking=True)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        cpu = dict.fromkeys(pids, 0.0)
        stray0 = {m: s.stray for m, s in seams.items()}
        attentions0 = {m: s.attentions for m, s in seams.items()}
        for k, start in enumerate(range(0, len(mix), block)):
            chunk = mix[start : start + block]
            for mode in MODES[k % 3 :] + MODES[: k % 3]:
                if mode == "direct":
                    times[mode] += await direct_block(
                        modes.direct, plans[start : start + block]
                    )
                    continue
                c0 = cpu_seconds(pids[mode])
                times[mode] += await seam_block(seams[mode], chunk, blocking=True)
                cpu[mode] += cpu_seconds(pids[mode]) - c0
        stray = {m: s.stray - stray0[m] for m, s in seams.items()}
        attentions = {m: s.attentions - attentions0[m] for m, s in seams.items()}
        await modes.stop_bridges(btbridged, bt_mode)
    n = len(mix)
    p50 = {m: percentile(v, 50) * 1e6 for m, v in times.items()}
    return {
        "hostmodes_btbridged_p50_us": p50["btbridged"],
        "hostmodes_btbridged_p99_us": percentile(times["btbridged"], 99) * 1e6,
        "hostmodes_bt_p50_us": p50["bt"],
        "hostmodes_bt_p99_us": percentile(times["bt"], 99) * 1e6,
        "hostmodes_direct_p50_us": p50["direct"],
        "bt_vs_btbridged_p50_ratio": p50["bt"] / p50["btbridged"],
        # Of btbridged mode's p50 over a direct call, the part bt: keeps.
        "bt_vs_btbridged_overhead_share": (p50["bt"] - p50["direct"])
        / (p50["btbridged"] - p50["direct"]),
        "hostmodes_bridge_cpu_us_per_command_btbridged": cpu["btbridged"] / n * 1e6,
        "hostmodes_bridge_cpu_us_per_command_bt": cpu["bt"] / n * 1e6,
        "hostmodes_stray_frames": stray,
        "hostmodes_attentions_during_roundtrips": attentions,
        "commands": n,
        "_btbridged": times["btbridged"],
        "_bt": times["bt"],
        "_direct": times["direct"],
    }
