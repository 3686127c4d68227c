#!/usr/bin/env python3
"""hiomapbridge benchmark harness (issue 6).

One run, over a real private dbus-daemon:

* the hiomapd emulator (in this process, on its own bus connection);
* the btbridged stand-in and the skiboot-like host client (in this process);
* the bridge, as a real subprocess (``python -m hiomapbridge``), started the
  way systemd starts it (``NOTIFY_SOCKET``, READY=1, SIGTERM);
* beside it, a second bridge in ``--host bt:PATH`` mode on a second private
  dbus-daemon with its own hiomapd emulator and fake ipmid (it owns
  ``org.openbmc.HostIpmi``, which the btbridged stand-in holds on the first
  bus), and a lean host on its SOCK_SEQPACKET seam (:class:`SeamHost`).

Then the host-mode comparison (issue 12, ``hostmodes.py``): the same seam
host in front of either a ``bt:`` bridge or a C btbridged with a
btbridged-mode bridge behind it, C sd-bus peers (``peers.c``), each repeat
from nothing, once with free placement and once with the BMC side pinned
to one CPU.

Per repeat: exec -> READY=1; HIOMAP round trips seen by the host through the
bridge, alternating in blocks with the same calls made directly to the
emulator over D-Bus and the same commands through the ``bt:`` bridge (so
both ratios come from one run); each bridge's CPU time over its own blocks
from ``/proc/<pid>/stat``; event latency
(emulator's ``PropertiesChanged`` -> the host holds the byte); SIGTERM ->
exit with a responsive host.  Then, once: a soak of ``--soak`` commands
(RSS at start and after), and a profiled run (py-spy if it works here, else
cProfile) of each mode whose summaries are saved beside the results.

Writes ``OUT/results.json`` (medians over the repeats), ``OUT/results.md``,
``OUT/runs.json`` (every repeat, the RSS series, the profile split),
``OUT/latency.png``, ``OUT/latency-hostmodes.png``, ``OUT/profile-*.txt``
(btbridged mode) and
``OUT/profile-bt*.txt`` (``bt:`` mode).

    python bench/run.py                 # 5 repeats of 10,000 commands + 100k soak
    python bench/run.py --quick         # a few seconds: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from hostmodes import (
    BLOCK_TIMEOUT,
    Pinning,
    SeamHost,
    build_peers,
    cpu_seconds,
    direct_block,
    harness_gc_paused,
    host_mode_repeat,
    host_modes,
    percentile,
    seam_block,
    stop_seam_bridge,
)

from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.hiomap import (
    Command,
    Dispatcher,
    HiomapCall,
    pack_request,
    window_args,
)
from hiomapbridge.sim.hiomapd import Emulator, run_emulator
from hiomapbridge.sim.host import PROTOCOL_RESET, Host, run_host
from hiomapbridge.sim.ipmid import FakeIpmid
from hiomapbridge.sim.privatebus import private_bus
from hiomapbridge.sim.process import Service, run_service

RESULT_KEYS = (
    "roundtrip_p50_us",
    "roundtrip_p99_us",
    "direct_p50_us",
    "overhead_ratio_p50",
    "commands_per_s",
    "bridge_cpu_us_per_command",
    "event_latency_p50_us",
    "event_latency_p99_us",
    "rss_start_kb",
    "rss_after_kb",
    "ready_s",
    "shutdown_after_fetch_ms",
    "bt_roundtrip_p50_us",
    "bt_roundtrip_p99_us",
    "bt_vs_btbridged_p50_ratio_emulator",
    "bt_bridge_cpu_us_per_command",
)

#: The host-mode comparison's results (hostmodes.py; C peers), medians.
HOSTMODE_KEYS = (
    "hostmodes_btbridged_p50_us",
    "hostmodes_btbridged_p99_us",
    "hostmodes_bt_p50_us",
    "hostmodes_bt_p99_us",
    "hostmodes_direct_p50_us",
    "bt_vs_btbridged_p50_ratio",
    "bt_vs_btbridged_overhead_share",
    "hostmodes_bridge_cpu_us_per_command_btbridged",
    "hostmodes_bridge_cpu_us_per_command_bt",
)

#: The host-mode comparison with the BMC side on one CPU (hostmodes.Pinning):
#: results key -> key of a repeat, medians.  Absent with fewer than 2 CPUs.
ONE_BMC_CPU_KEYS = {
    "hostmodes_one_bmc_cpu_btbridged_p50_us": "hostmodes_btbridged_p50_us",
    "hostmodes_one_bmc_cpu_bt_p50_us": "hostmodes_bt_p50_us",
    "hostmodes_one_bmc_cpu_direct_p50_us": "hostmodes_direct_p50_us",
    "bt_vs_btbridged_p50_ratio_one_bmc_cpu": "bt_vs_btbridged_p50_ratio",
    "bt_vs_btbridged_overhead_share_one_bmc_cpu": "bt_vs_btbridged_overhead_share",
}

#: ``bt:`` mode's round trip p50 over the btbridged mode's, measured side by
#: side: at most this (issue: no btbridged, so two D-Bus crossings fewer).
BT_RATIO_TARGET = 0.6

#: (key, unit, target text, predicate on the value) for the markdown table.
TARGETS: dict[str, tuple[str, str, Callable[[float], bool] | None]] = {
    "roundtrip_p50_us": ("µs", "", None),
    "roundtrip_p99_us": ("µs", "", None),
    "direct_p50_us": ("µs", "", None),
    "overhead_ratio_p50": ("x", "≤ 1.5", lambda v: v <= 1.5),
    "commands_per_s": ("/s", "", None),
    "bridge_cpu_us_per_command": ("µs", "≤ 100", lambda v: v <= 100),
    "event_latency_p50_us": ("µs", "", None),
    "event_latency_p99_us": ("µs", "≤ 2000", lambda v: v <= 2000),
    "rss_start_kb": ("KiB", "≤ 32768", lambda v: v <= 32768),
    "rss_after_kb": ("KiB", "≤ 32768, flat", lambda v: v <= 32768),
    "ready_s": ("s", "≤ 0.4", lambda v: v <= 0.4),
    "shutdown_after_fetch_ms": ("ms", "≤ 50", lambda v: v <= 50),
    "bt_roundtrip_p50_us": ("µs", "", None),
    "bt_roundtrip_p99_us": ("µs", "", None),
    "bt_vs_btbridged_p50_ratio_emulator": ("x", "", None),
    "bt_bridge_cpu_us_per_command": ("µs", "", None),
    "hostmodes_btbridged_p50_us": ("µs", "", None),
    "hostmodes_btbridged_p99_us": ("µs", "", None),
    "hostmodes_bt_p50_us": ("µs", "", None),
    "hostmodes_bt_p99_us": ("µs", "", None),
    "hostmodes_direct_p50_us": ("µs", "", None),
    "bt_vs_btbridged_p50_ratio": (
        "x",
        f"≤ {BT_RATIO_TARGET}",
        lambda v: v <= BT_RATIO_TARGET,
    ),
    "hostmodes_bridge_cpu_us_per_command_btbridged": ("µs", "", None),
    "hostmodes_bridge_cpu_us_per_command_bt": ("µs", "", None),
    "hostmodes_one_bmc_cpu_btbridged_p50_us": ("µs", "", None),
    "hostmodes_one_bmc_cpu_bt_p50_us": ("µs", "", None),
    "hostmodes_one_bmc_cpu_direct_p50_us": ("µs", "", None),
    "bt_vs_btbridged_p50_ratio_one_bmc_cpu": ("x", "", None),
    "bt_vs_btbridged_overhead_share": ("x", "", None),
    "bt_vs_btbridged_overhead_share_one_bmc_cpu": ("x", "", None),
}

#: Columns of the per-run table in results.md.
RUN_COLUMNS = (
    "roundtrip_p50_us",
    "bt_roundtrip_p50_us",
    "bt_vs_btbridged_p50_ratio_emulator",
    "direct_p50_us",
    "overhead_ratio_p50",
    "bridge_cpu_us_per_command",
    "bt_bridge_cpu_us_per_command",
    "event_latency_p99_us",
)

FLASH_SIZE = 8 << 20  # 2048 blocks of 4 KiB
BLOCK_SHIFT = 12


# -- the command mix ------------------------------------------------------------


def command_mix(count: int, seed: int = 6) -> list[tuple[int, bytes]]:
    """A boot-like HIOMAP stream: mostly CREATE_READ_WINDOW at scattered
    offsets (the host reading partitions), some CLOSE_WINDOW, GET_FLASH_INFO
    and ACK.  No GET_INFO: it re-announces events, which would mix event
    traffic into the round trips."""
    rng = random.Random(seed)
    blocks = FLASH_SIZE >> BLOCK_SHIFT
    out: list[tuple[int, bytes]] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.80:
            offset = rng.randrange(blocks)
            size = rng.randint(1, 16)
            out.append((Command.CREATE_READ_WINDOW, window_args(offset, size)))
        elif r < 0.88:
            out.append((Command.GET_FLASH_INFO, b""))
        elif r < 0.94:
            out.append((Command.CLOSE_WINDOW, b"\x00"))
        else:
            out.append((Command.ACK, b"\x03"))
    return out


def direct_plans(mix: list[tuple[int, bytes]]) -> list[HiomapCall]:
    """The D-Bus calls the bridge makes for ``mix`` (decoded up front)."""
    dispatcher = Dispatcher()
    plans = []
    for i, (cmd, args) in enumerate(mix):
        plan = dispatcher.request(pack_request(cmd, (i + 1) & 0xFF, args))
        assert isinstance(plan, HiomapCall), plan
        plans.append(plan)
    return plans


# -- /proc ------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def child_pid(pid: int) -> int:
    """The single child of ``pid`` (the bridge under py-spy)."""
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        kids = path.read_text().split()
        if kids:
            return int(kids[0])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            return int(stat.parent.name)
    raise RuntimeError(f"{pid} has no child")


# -- the rig ------------------------------------------------------------------------


class Rig:
    """The bus peers living in this process, and a way to start bridges."""

    def __init__(
        self,
        address: str,
        directory: Path,
        emu: Emulator,
        host: Host,
        direct: Bus,
        bt_address: str,
        seam: SeamHost,
    ) -> None:
        self.address = address
        self.directory = directory
        self.emu = emu
        self.host = host
        self.direct = direct
        self.bt_address = bt_address
        self.seam = seam
        self._started = 0

    def bridge_argv(
        self, profiler: str | None, profile_out: Path | None, mode: str = "btbridged"
    ) -> list[str]:
        argv = [sys.executable, "-m", "hiomapbridge", "--bus", self.address]
        if mode == "bt":
            argv = [sys.executable, "-m", "hiomapbridge", "--bus", self.bt_address]
            argv += ["--host", f"bt:{self.seam.path}"]
        if profiler == "py-spy":
            assert profile_out is not None
            pyspy = shutil.which("py-spy") or str(
                Path(sys.executable).with_name("py-spy")
            )
            return [
                pyspy,
                "record",
                "--rate",
                "1000",
                "--nonblocking",
                "--format",
                "raw",
                "--full-filenames",
                "--output",
                str(profile_out),
                "--",
                *argv,
            ]
        if profiler == "cprofile":
            assert profile_out is not None
            return [sys.executable, "-m", "cProfile", "-o", str(profile_out), *argv[1:]]
        return argv

    async def start_bridge(
        self,
        stack: AsyncExitStack,
        profiler: str | None = None,
        profile_out: Path | None = None,
    ) -> tuple[Service, int]:
        """Start a bridge; return it and the pid of the Python process."""
        self._started += 1
        service = await stack.enter_async_context(
            run_service(
                f"bridge{self._started}",
                self.bridge_argv(profiler, profile_out),
                self.directory,
                ready_timeout=60,
            )
        )
        pid = service.process.pid
        if profiler == "py-spy":
            pid = child_pid(pid)
        # The bridge posts hiomapd's state at start; let the host take it.
        host = self.host
        await host.wait_until(lambda: host.state & 0x80 != 0)
        await host.start()  # skiboot's start-up: ACK, GET_INFO, GET_FLASH_INFO
        await self.settle()
        return service, pid

    async def start_bt_bridge(
        self,
        stack: AsyncExitStack,
        profiler: str | None = None,
        profile_out: Path | None = None,
    ) -> tuple[Service, int]:
        """Start a ``bt:`` bridge; the seam host takes its connection and
        does the start-up.  Return it and the pid of the Python process."""
        self._started += 1
        service = await stack.enter_async_context(
            run_service(
                f"bridge{self._started}-bt",
                self.bridge_argv(profiler, profile_out, "bt"),
                self.directory,
                ready_timeout=60,
            )
        )
        pid = service.process.pid
        if profiler == "py-spy":
            pid = child_pid(pid)
        await self.seam.accept()
        await self.seam.start()
        return service, pid

    async def stop_bt_bridge(self, service: Service, pid: int) -> None:
        """SIGTERM the ``bt:`` bridge; fetch events until PROTOCOL_RESET."""
        await stop_seam_bridge(self.seam, service, "bt: bridge", pid)

    async def settle(self) -> None:
        """Wait until no event is on its way to the host."""
        await trio.sleep(0.05)

    async def stop_bridge(self, service: Service, pid: int) -> dict[str, float]:
        """SIGTERM the bridge; time its exit against the host's fetch of
        PROTOCOL_RESET."""
        host = self.host
        seen = len(host.events)
        sent = trio.current_time()
        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(BLOCK_TIMEOUT):
            status = await service.wait()
        assert service.exited_at is not None
        if status != 0:
            raise RuntimeError(f"bridge exited {status}:\n{service.log()}")
        fetched = [
            e
            for e in host.events[seen:]
            if e.data is not None and e.data & PROTOCOL_RESET
        ]
        if not fetched:
            raise RuntimeError("the host never fetched PROTOCOL_RESET")
        return {
            "sigterm_to_exit_ms": (service.exited_at - sent) * 1000,
            "shutdown_after_fetch_ms": (service.exited_at - fetched[0].trio_time)
            * 1000,
        }


async def bridged_block(host: Host, mix: list[tuple[int, bytes]]) -> list[float]:
    out = []
    clock = time.perf_counter
    with harness_gc_paused():
        for cmd, args in mix:
            t0 = clock()
            await host.command(cmd, args)
            out.append(clock() - t0)
    return out


async def event_latencies(rig: Rig, count: int) -> list[float]:
    """PropertiesChanged emitted by the emulator -> the host holds the byte."""
    host, emu = rig.host, rig.emu
    out = []
    with harness_gc_paused():
        for i in range(count):
            out.append(await one_event(host, emu, 0x82 if i % 2 == 0 else 0x80))
    return out


async def one_event(host: Host, emu: Emulator, expected: int) -> float:
    """Toggle WindowReset so that the event byte becomes ``expected``; return
    the seconds until the host holds a record of it."""
    before = len(host.events)

    def arrived() -> bool:
        return any(e.data == expected for e in host.events[before:])

    t0 = trio.current_time()
    await emu.emit_properties({"WindowReset": ("b", expected == 0x82)})
    with trio.fail_after(BLOCK_TIMEOUT):
        await host.wait_until(arrived)
    record = next(e for e in host.events[before:] if e.data == expected)
    await trio.sleep(0.002)  # pacing: let the delivery complete (sendMessage reply)
    return record.trio_time - t0


async def one_repeat(rig: Rig, args: argparse.Namespace, index: int) -> dict[str, Any]:
    mix = command_mix(args.commands, seed=index)
    plans = direct_plans(mix)
    warm = command_mix(args.warmup, seed=1000 + index)
    async with AsyncExitStack() as stack:
        service, pid = await rig.start_bridge(stack)
        ready = service.notified("READY=1")
        assert ready is not None
        ready_s = ready - service.started_at
        rss_start = rss_kb(pid)
        host, seam = rig.host, rig.seam
        # The bt: bridge runs beside it, on its own bus (it owns
        # org.openbmc.HostIpmi); the three modes alternate block by block.
        bt_service, bt_pid = await rig.start_bt_bridge(stack)
        await bridged_block(host, warm)
        await seam_block(seam, warm)
        await direct_block(rig.direct, direct_plans(warm))
        events_before = len(host.events)
        bt_attentions_before = seam.attentions
        bridged: list[float] = []
        over_bt: list[float] = []
        direct: list[float] = []
        cpu = {"bridged": 0.0, "bt": 0.0}
        wall = 0.0
        self_cpu = {"bridged": 0.0, "bt": 0.0, "direct": 0.0}
        step = args.block
        for k, start in enumerate(range(0, len(mix), step)):
            chunk = mix[start : start + step]
            # Rotate the order so that no mode always follows the same one.
            modes = ("bridged", "bt", "direct")
            order = modes[k % 3 :] + modes[: k % 3]
            for mode in order:
                watched = {"bridged": pid, "bt": bt_pid}.get(mode)
                c0 = cpu_seconds(watched) if watched is not None else 0.0
                s0, w0 = time.process_time(), time.perf_counter()
                if mode == "bridged":
                    bridged += await bridged_block(host, chunk)
                elif mode == "bt":
                    over_bt += await seam_block(seam, chunk)
                else:
                    direct += await direct_block(
                        rig.direct, plans[start : start + step]
                    )
                s1, w1 = time.process_time(), time.perf_counter()
                self_cpu[mode] += s1 - s0
                if watched is not None:
                    cpu[mode] += cpu_seconds(watched) - c0
                if mode == "bridged":
                    wall += w1 - w0
        stray_events = len(host.events) - events_before
        bt_stray_attentions = seam.attentions - bt_attentions_before
        await rig.stop_bt_bridge(bt_service, bt_pid)
        events = await event_latencies(rig, args.events)
        await rig.settle()
        rss_end = rss_kb(pid)
        stop = await rig.stop_bridge(service, pid)
    n = len(mix)
    rt50 = percentile(bridged, 50) * 1e6
    d50 = percentile(direct, 50) * 1e6
    bt50 = percentile(over_bt, 50) * 1e6
    return {
        "roundtrip_p50_us": rt50,
        "roundtrip_p99_us": percentile(bridged, 99) * 1e6,
        "direct_p50_us": d50,
        "direct_p99_us": percentile(direct, 99) * 1e6,
        "overhead_ratio_p50": rt50 / d50,
        "commands_per_s": n / wall,
        "bridge_cpu_us_per_command": cpu["bridged"] / n * 1e6,
        "bt_roundtrip_p50_us": bt50,
        "bt_roundtrip_p99_us": percentile(over_bt, 99) * 1e6,
        "bt_vs_btbridged_p50_ratio_emulator": bt50 / rt50,
        "bt_vs_direct_p50_ratio": bt50 / d50,
        "bt_bridge_cpu_us_per_command": cpu["bt"] / n * 1e6,
        "bt_stray_attentions_during_roundtrips": bt_stray_attentions,
        "bench_cpu_us_per_command_bridged": self_cpu["bridged"] / n * 1e6,
        "bench_cpu_us_per_command_bt": self_cpu["bt"] / n * 1e6,
        "bench_cpu_us_per_command_direct": self_cpu["direct"] / n * 1e6,
        "event_latency_p50_us": percentile(events, 50) * 1e6,
        "event_latency_p99_us": percentile(events, 99) * 1e6,
        "rss_start_kb": rss_start,
        "rss_end_kb": rss_end,
        "ready_s": ready_s,
        **stop,
        "commands": n,
        "events": len(events),
        "stray_events_during_roundtrips": stray_events,
        "_bridged": bridged,
        "_bt": over_bt,
        "_direct": direct,
        "_events": events,
    }


async def soak(rig: Rig, commands: int) -> dict[str, Any]:
    """RSS of one bridge after start and along ``commands`` commands."""
    async with AsyncExitStack() as stack:
        service, pid = await rig.start_bridge(stack)
        series = [(0, rss_kb(pid))]
        chunk = max(1, commands // 10)
        done = 0
        seed = 0
        while done < commands:
            n = min(chunk, commands - done)
            await bridged_block(rig.host, command_mix(n, seed=2000 + seed))
            seed += 1
            done += n
            series.append((done, rss_kb(pid)))
        await rig.stop_bridge(service, pid)
    return {"commands": commands, "rss_series_kb": series}


async def profile_run(
    rig: Rig, commands: int, profiler: str, out: Path, mode: str = "btbridged"
) -> float:
    """Run ``commands`` through a bridge in ``mode`` under ``profiler``;
    return its CPU s."""
    mix = command_mix(commands, seed=3000)
    async with AsyncExitStack() as stack:
        if mode == "bt":
            service, pid = await rig.start_bt_bridge(stack, profiler, out)
            c0 = cpu_seconds(pid)
            await seam_block(rig.seam, mix)
            cpu = cpu_seconds(pid) - c0
            await rig.stop_bt_bridge(service, pid)
        else:
            service, pid = await rig.start_bridge(stack, profiler, out)
            c0 = cpu_seconds(pid)
            await bridged_block(rig.host, mix)
            cpu = cpu_seconds(pid) - c0
            await rig.stop_bridge(service, pid)
        if profiler == "py-spy":  # py-spy writes once its child is gone
            with trio.fail_after(30):
                await service.process.wait()
    return cpu


# -- profile summaries ------------------------------------------------------------

CATEGORIES = (
    "D-Bus encode/decode",
    "epoll (I/O wait + trio I/O manager)",
    "socket I/O",
    "trio scheduling",
    "our logic",
    "logging",
    "other",
)


def categorise(filename: str, function: str) -> str | None:
    """The category a frame decides, or None (look at its caller)."""
    f = filename.replace("\\", "/")
    if "/jeepney/low_level.py" in f or "/jeepney/wrappers.py" in f:
        return "D-Bus encode/decode"
    if "/jeepney/bus_messages.py" in f or "/hiomapbridge/wire.py" in f:
        return "D-Bus encode/decode"
    if "/trio/_core/_io_epoll.py" in f:
        return "epoll (I/O wait + trio I/O manager)"
    if "/trio/_socket.py" in f or "/jeepney/io/" in f or "/socket.py" in f:
        return "socket I/O"
    if "/trio/" in f or "/outcome/" in f or "/sniffio/" in f:
        return "trio scheduling"
    if "/logging/" in f:
        return "logging"
    if "/hiomapbridge/" in f:
        return "our logic"
    return None


_SOCKET_CALL = re.compile(r"sock\.(send|recv)")


def on_socket_call(where: str) -> bool:
    """Whether the source line ``path:line`` calls a socket's send or recv:
    py-spy (without --native) charges the syscall, and the kernel's wake-up
    of dbus-daemon inside it, to that Python line."""
    path, _, line = where.rpartition(":")
    return line.isdigit() and bool(
        _SOCKET_CALL.search(linecache.getline(path, int(line)))
    )


def summarise_pyspy(raw: Path) -> dict[str, Any]:
    """Collapsed stacks (root;...;leaf count) -> self samples by category,
    deciding each sample by its innermost frame that names a category (a
    codec frame anywhere on the stack wins: time under it is codec time; a
    leaf on a line calling socket send/recv is socket I/O)."""
    totals = dict.fromkeys(CATEGORIES, 0)
    leaves: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if any("importlib._bootstrap" in frame for frame in frames):
            continue  # start-up imports, not the commands
        parsed = []
        for frame in frames:
            name, _, where = frame.partition(" (")
            parsed.append((where.rsplit(":", 1)[0], name))
        category = None
        if any(categorise(f, n) == "D-Bus encode/decode" for f, n in parsed):
            category = "D-Bus encode/decode"
        elif on_socket_call(frames[-1].partition(" (")[2].rstrip(")")):
            category = "socket I/O"
        else:
            for f, n in reversed(parsed):
                category = categorise(f, n)
                if category is not None:
                    break
        totals[category or "other"] += count
        leaf = frames[-1]
        leaves[leaf] = leaves.get(leaf, 0) + count
    total = sum(totals.values()) or 1
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:25]
    return {
        "tool": "py-spy (sampling, 1 kHz, active samples only)",
        "samples": total,
        "split_percent": {k: round(100 * v / total, 1) for k, v in totals.items()},
        "top_self": [(name, round(100 * n / total, 1)) for name, n in top],
    }


def summarise_cprofile(path: Path) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path))
    totals = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for (filename, _line, function), (_cc, _nc, tt, _ct, _callers) in (
        stats.stats.items()  # type: ignore[attr-defined]
    ):
        category = categorise(filename, function) or "other"
        if filename == "~":  # builtins: attribute by name
            category = "socket I/O" if function.startswith("<method 's") else "other"
        totals[category] += tt
        rows.append((f"{function} ({filename})", tt))
    total = sum(totals.values()) or 1.0
    rows.sort(key=lambda r: -r[1])
    return {
        "tool": "cProfile (deterministic; inflates many small calls)",
        "seconds": total,
        "split_percent": {k: round(100 * v / total, 1) for k, v in totals.items()},
        "top_self": [(name, round(100 * t / total, 1)) for name, t in rows[:25]],
    }


def pyspy_works() -> bool:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.txt"
        try:
            subprocess.run(
                [
                    exe,
                    "record",
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--",
                    sys.executable,
                    "-c",
                    "import time\nt=time.time()\nwhile time.time()-t<0.3: pass",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return out.exists() and out.stat().st_size > 0


# -- reporting --------------------------------------------------------------------


def median_results(
    runs: list[dict[str, Any]],
    soaked: dict[str, Any],
    host_mode_runs: list[dict[str, Any]],
    pinned_runs: list[dict[str, Any]],
) -> dict[str, float | bool]:
    """RESULT_KEYS (medians over the runs; RSS from the soak); then
    HOSTMODE_KEYS (medians over the host-mode runs, when they ran), the
    ``bt:`` ratio's spread over them, its target and whether the median
    meets it (never, when it was not measured)."""
    series = soaked["rss_series_kb"]
    out: dict[str, float | bool] = {}
    for key in RESULT_KEYS:
        if key == "rss_start_kb":
            value = float(series[0][1])
        elif key == "rss_after_kb":
            value = float(series[-1][1])
        else:
            value = statistics.median(float(r[key]) for r in runs)
        out[key] = round(value, 3)
    out["bt_vs_btbridged_p50_target"] = BT_RATIO_TARGET
    out["bt_vs_btbridged_p50_met"] = False
    if not host_mode_runs:
        return out
    for key in HOSTMODE_KEYS:
        out[key] = round(statistics.median(float(r[key]) for r in host_mode_runs), 3)
    ratios = [float(r["bt_vs_btbridged_p50_ratio"]) for r in host_mode_runs]
    out["bt_vs_btbridged_p50_ratio_min"] = round(min(ratios), 3)
    out["bt_vs_btbridged_p50_ratio_max"] = round(max(ratios), 3)
    out["bt_vs_btbridged_p50_met"] = out["bt_vs_btbridged_p50_ratio"] <= BT_RATIO_TARGET
    if pinned_runs:
        for key, source in ONE_BMC_CPU_KEYS.items():
            value = statistics.median(float(r[source]) for r in pinned_runs)
            out[key] = round(value, 3)
    return out


def markdown(
    results: dict[str, float | bool],
    data: dict[str, Any],
) -> str:
    runs, soaked = data["runs"], data["soak"]
    host_mode_runs = data["host_modes"]
    lines = [
        f"Medians of {len(runs)} runs of {runs[0]['commands']} commands "
        f"(soak: {soaked['commands']} commands).",
        "",
        "| metric | value | target | met |",
        "|---|---:|---|---|",
    ]
    for key in (*RESULT_KEYS, *HOSTMODE_KEYS, *ONE_BMC_CPU_KEYS):
        if key not in results:
            continue
        unit, target, ok = TARGETS[key]
        value = results[key]
        met = "" if ok is None else ("yes" if ok(value) else "**no**")
        lines.append(f"| `{key}` | {value:,.3f} {unit} | {target} | {met} |")
    lines.append("")
    if host_mode_runs:
        lines += [
            "Host-mode comparison (C peers, the same seam host for both "
            "modes; hostmodes.py): `bt:` p50 over btbridged mode's p50, "
            "measured side by side, median of the repeats' ratios: "
            "`bt_vs_btbridged_p50_ratio` "
            f"{results['bt_vs_btbridged_p50_ratio']} (runs "
            f"`bt_vs_btbridged_p50_ratio_min` "
            f"{results['bt_vs_btbridged_p50_ratio_min']} to "
            f"`bt_vs_btbridged_p50_ratio_max` "
            f"{results['bt_vs_btbridged_p50_ratio_max']}); "
            f"`bt_vs_btbridged_p50_target` ≤ "
            f"{results['bt_vs_btbridged_p50_target']}: `bt_vs_btbridged_p50_met` "
            f"= {'yes' if results['bt_vs_btbridged_p50_met'] else '**no**'}.",
            "",
            "| host-mode run | btbridged p50 µs | bt: p50 µs | ratio | direct p50 µs "
            "| bridge CPU µs/cmd (btbridged / bt:) | stray frames, SMS_ATN "
            "(btbridged / bt:) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(host_mode_runs):
            lines.append(
                f"| {i} | {r['hostmodes_btbridged_p50_us']:,.0f} | "
                f"{r['hostmodes_bt_p50_us']:,.0f} | "
                f"{r['bt_vs_btbridged_p50_ratio']:.3f} | "
                f"{r['hostmodes_direct_p50_us']:,.0f} | "
                f"{r['hostmodes_bridge_cpu_us_per_command_btbridged']:.0f} / "
                f"{r['hostmodes_bridge_cpu_us_per_command_bt']:.0f} | "
                f"{_pair(r['hostmodes_stray_frames'])}, "
                f"{_pair(r['hostmodes_attentions_during_roundtrips'])} |"
            )
        pinned = data["host_modes_one_bmc_cpu"]
        if not pinned:
            lines += ["", "(No single-BMC-CPU variant: fewer than two CPUs here.)"]
        else:
            lines += [
                "",
                "The same with the BMC side on one CPU and the host on the "
                "others (a single-core BMC, as the AST2400/AST2500): "
                "`bt_vs_btbridged_p50_ratio_one_bmc_cpu` "
                f"{results['bt_vs_btbridged_p50_ratio_one_bmc_cpu']} (runs "
                + ", ".join(f"{r['bt_vs_btbridged_p50_ratio']:.3f}" for r in pinned)
                + "); p50 btbridged / bt: / direct "
                f"{results['hostmodes_one_bmc_cpu_btbridged_p50_us']:.0f} / "
                f"{results['hostmodes_one_bmc_cpu_bt_p50_us']:.0f} / "
                f"{results['hostmodes_one_bmc_cpu_direct_p50_us']:.0f} µs.",
            ]
    else:
        lines.append(
            "Host-mode comparison not run: "
            f"{data['host_modes_unavailable']}; `bt_vs_btbridged_p50_met` = **no** "
            f"(`bt_vs_btbridged_p50_target` ≤ "
            f"{results['bt_vs_btbridged_p50_target']}, not measured)."
        )
    lines += [
        "",
        "Per run (emulator rig):",
        "",
        "| run | " + " | ".join(RUN_COLUMNS) + " |",
        "|---|" + "---:|" * len(RUN_COLUMNS),
    ]
    for i, r in enumerate(runs):
        cells = " | ".join(f"{r[k]:,.2f}" for k in RUN_COLUMNS)
        lines.append(f"| {i} | {cells} |")
    lines += [
        "",
        "Harness CPU per command (host side + emulator, µs): btbridged mode "
        + ", ".join(f"{r['bench_cpu_us_per_command_bridged']:.0f}" for r in runs)
        + "; bt: mode "
        + ", ".join(f"{r['bench_cpu_us_per_command_bt']:.0f}" for r in runs)
        + "; direct "
        + ", ".join(f"{r['bench_cpu_us_per_command_direct']:.0f}" for r in runs),
    ]
    rss = ", ".join(f"{n}: {kb}" for n, kb in soaked["rss_series_kb"])
    lines += ["", f"RSS (KiB) along the soak: {rss}"]
    for mode, prof in (("btbridged", data["profile"]), ("bt:", data["profile_bt"])):
        if prof:
            lines += [
                "",
                f"Profile of the {mode} mode ({prof['tool']}), bridge CPU split "
                f"({prof['cpu_us_per_command_while_profiled']:.0f} µs/command "
                "while profiled):",
                "",
            ]
            lines += [f"- {k}: {v}%" for k, v in prof["split_percent"].items()]
    return "\n".join(lines) + "\n"


def _pair(counts: dict[str, int]) -> str:
    return f"{counts['btbridged']} / {counts['bt']}"


def plot(path: Path, title: str, series: dict[str, list[float]]) -> None:
    """Histogram and CDF of each labelled series of round trips (seconds)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no latency plot", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    hi = percentile([v for data in series.values() for v in data], 99.5) * 1e6
    bins = [hi * i / 120 for i in range(121)]
    for label, data in series.items():
        us = [v * 1e6 for v in data]
        ax1.hist(
            us, bins=bins, alpha=0.6, label=f"{label} (p50 {percentile(us, 50):.0f} µs)"
        )
        xs = sorted(us)
        ax2.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax1.set_xlabel("round trip seen by the host (µs)")
    ax1.set_ylabel("commands")
    ax1.set_title(f"{title}: histogram (≤ p99.5)")
    ax1.legend()
    ax2.set_xscale("log")
    ax2.set_xlabel("round trip (µs, log)")
    ax2.set_ylabel("fraction ≤ x")
    ax2.set_title("cumulative distribution")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------


async def run_host_modes(
    args: argparse.Namespace, work: Path, peers: Path, one_bmc_cpu: bool = False
) -> list[dict[str, Any]]:
    """The host-mode comparison's repeats (hostmodes.py), with the BMC side
    on one CPU if ``one_bmc_cpu`` (none where fewer than two CPUs are
    available).  Every repeat starts from nothing (buses, peers, bridges),
    so that where the scheduler put the processes in one repeat does not
    carry into the next."""
    runs: list[dict[str, Any]] = []
    label = "host modes, one BMC CPU" if one_bmc_cpu else "host modes"
    for i in range(args.repeat):
        t0 = time.perf_counter()
        mix = command_mix(args.commands, seed=500 + i)
        warm = command_mix(args.warmup, seed=1500 + i)
        here = work / f"{'pinned' if one_bmc_cpu else 'free'}-repeat{i}"
        for sub in ("btbridged-bus", "bt-bus"):
            (here / sub).mkdir(parents=True)
        with (
            private_bus(here / "btbridged-bus") as btbridged_bus,
            private_bus(here / "bt-bus") as bt_bus,
        ):
            pinning = None
            if one_bmc_cpu:
                buses = (btbridged_bus.process.pid, bt_bus.process.pid)
                pinning = Pinning.one_bmc_cpu(buses)
                if pinning is None:
                    return runs
            async with host_modes(
                peers, here, btbridged_bus.address, bt_bus.address
            ) as modes:
                r = await host_mode_repeat(
                    modes, mix, direct_plans(mix), warm, args.block, pinning
                )
            runs.append(r)
            print(
                f"{label}, run {i} (C peers): btbridged mode p50 "
                f"{r['hostmodes_btbridged_p50_us']:.0f} µs, bt: p50 "
                f"{r['hostmodes_bt_p50_us']:.0f} µs (x"
                f"{r['bt_vs_btbridged_p50_ratio']:.3f}), direct p50 "
                f"{r['hostmodes_direct_p50_us']:.0f} µs, bridge CPU "
                f"{r['hostmodes_bridge_cpu_us_per_command_btbridged']:.0f} / "
                f"{r['hostmodes_bridge_cpu_us_per_command_bt']:.0f} µs/cmd "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return runs


async def bench(
    args: argparse.Namespace,
    address: str,
    bt_address: str,
    work: Path,
) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(
            run_emulator(
                address,
                work / "emu",
                flash_size=FLASH_SIZE,
                block_size_shift=BLOCK_SHIFT,
            )
        )
        host = await stack.enter_async_context(
            run_host(address, emu.lpc_path, start=False)
        )
        direct = await stack.enter_async_context(open_bus(address))
        await stack.enter_async_context(
            run_emulator(
                bt_address,
                work / "emu-bt",
                flash_size=FLASH_SIZE,
                block_size_shift=BLOCK_SHIFT,
            )
        )
        # A fake ipmid beside the bt: bridge: not on the HIOMAP path, but the
        # bridge then runs as on a BMC (it forwards other commands to ipmid).
        ipmid_bus = await stack.enter_async_context(open_bus(bt_address))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(FakeIpmid().serve, ipmid_bus)
        seam = SeamHost(work / "bt.sock")
        stack.callback(seam.close)
        rig = Rig(address, work, emu, host, direct, bt_address, seam)
        runs = []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            runs.append(await one_repeat(rig, args, i))
            r = runs[-1]
            print(
                f"run {i}: bridge p50 {r['roundtrip_p50_us']:.0f} µs, bt: p50 "
                f"{r['bt_roundtrip_p50_us']:.0f} µs (x"
                f"{r['bt_vs_btbridged_p50_ratio_emulator']:.2f}), direct p50 "
                f"{r['direct_p50_us']:.0f} µs, ratio {r['overhead_ratio_p50']:.2f}, "
                f"bt: bridge CPU {r['bt_bridge_cpu_us_per_command']:.0f} µs/cmd, "
                f"bridge CPU {r['bridge_cpu_us_per_command']:.0f} µs/cmd, events p99 "
                f"{r['event_latency_p99_us']:.0f} µs, ready {r['ready_s']:.3f} s, "
                f"exit {r['shutdown_after_fetch_ms']:.1f} ms after fetch "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        host_mode_runs: list[dict[str, Any]] = []
        pinned_runs: list[dict[str, Any]] = []
        peers = build_peers(work / "host-modes")
        unavailable = peers if isinstance(peers, str) else None
        if isinstance(peers, str):
            print(f"host-mode comparison not run: {peers}", file=sys.stderr)
        else:
            host_mode_runs = await run_host_modes(args, work / "host-modes", peers)
            pinned_runs = await run_host_modes(
                args, work / "host-modes", peers, one_bmc_cpu=True
            )
        t0 = time.perf_counter()
        soaked = await soak(rig, args.soak)
        print(
            f"soak: RSS {soaked['rss_series_kb']} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        profiles: dict[str, dict[str, Any] | None] = {"btbridged": None, "bt": None}
        if args.profile_commands > 0:
            profiler = args.profiler
            if profiler == "auto":
                profiler = "py-spy" if pyspy_works() else "cprofile"
            for mode, prefix in (("btbridged", "profile"), ("bt", "profile-bt")):
                raw = args.out / (
                    f"{prefix}-pyspy.txt"
                    if profiler == "py-spy"
                    else f"{prefix}.cprofile"
                )
                cpu = await profile_run(rig, args.profile_commands, profiler, raw, mode)
                summary = (
                    summarise_pyspy(raw)
                    if profiler == "py-spy"
                    else summarise_cprofile(raw)
                )
                summary["commands"] = args.profile_commands
                summary["cpu_us_per_command_while_profiled"] = (
                    cpu / args.profile_commands * 1e6
                )
                summary["raw"] = raw.name
                profiles[mode] = summary
                print(
                    f"profile {mode} ({profiler}): {summary['split_percent']}",
                    flush=True,
                )
    return {
        "runs": runs,
        "host_modes": host_mode_runs,
        "host_modes_one_bmc_cpu": pinned_runs,
        "host_modes_unavailable": unavailable,
        "soak": soaked,
        "profile": profiles["btbridged"],
        "profile_bt": profiles["bt"],
    }


def write_outputs(out: Path, data: dict[str, Any]) -> dict[str, float | bool]:
    runs, soaked, profile = data["runs"], data["soak"], data["profile"]
    profile_bt = data["profile_bt"]
    host_mode_runs, pinned_runs = data["host_modes"], data["host_modes_one_bmc_cpu"]
    results = median_results(runs, soaked, host_mode_runs, pinned_runs)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results, data))

    def public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]

    (out / "runs.json").write_text(
        json.dumps(
            {
                "results": results,
                "runs": public(runs),
                "host_modes": public(host_mode_runs),
                "host_modes_one_bmc_cpu": public(pinned_runs),
                "host_modes_unavailable": data["host_modes_unavailable"],
                "soak": soaked,
                "profile": profile,
                "profile_bt": profile_bt,
            },
            indent=2,
        )
        + "\n"
    )
    for filename, prof, mode in (
        ("profile-summary.txt", profile, "btbridged"),
        ("profile-bt-summary.txt", profile_bt, "bt:"),
    ):
        if prof is None:
            continue
        text = [
            f"{mode} mode, {prof['tool']}: {prof['commands']} commands, "
            f"{prof['cpu_us_per_command_while_profiled']:.0f} µs of bridge CPU "
            "per command while profiled",
            "",
            "split (% of the bridge's CPU):",
        ]
        text += [f"  {k:38} {v:5.1f}" for k, v in prof["split_percent"].items()]
        text += ["", "top self (% of the bridge's CPU):"]
        text += [f"  {p:5.1f}  {name}" for name, p in prof["top_self"]]
        (out / filename).write_text("\n".join(text) + "\n")

    def joined(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [v for r in rows for v in r[key]]

    plot(
        out / "latency.png",
        "HIOMAP round trip, emulator rig",
        {
            "direct to the emulator": joined(runs, "_direct"),
            "through the bridge, bt: mode": joined(runs, "_bt"),
            "through the bridge, btbridged mode": joined(runs, "_bridged"),
        },
    )
    if host_mode_runs:
        plot(
            out / "latency-hostmodes.png",
            "HIOMAP round trip, host modes (C peers)",
            {
                "direct to the C hiomapd": joined(host_mode_runs, "_direct"),
                "bt: mode": joined(host_mode_runs, "_bt"),
                "btbridged mode (C btbridged)": joined(host_mode_runs, "_btbridged"),
            },
        )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commands", type=int, default=10_000, help="per repeat and mode")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--events", type=int, default=1000, help="events per repeat")
    p.add_argument("--soak", type=int, default=100_000, help="commands in the RSS soak")
    p.add_argument(
        "--profile-commands",
        type=int,
        default=5_000,
        help="commands in the profiled run (0: no profile)",
    )
    p.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto")
    p.add_argument(
        "--block",
        type=int,
        default=500,
        help="bridged/direct alternate in blocks of this many",
    )
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: 300 commands, 1 repeat, small soak",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    if args.quick:
        args.commands = min(args.commands, 300)
        args.repeat = 1
        args.events = min(args.events, 20)
        args.soak = min(args.soak, 500)
        args.profile_commands = min(args.profile_commands, 300)
        args.warmup = min(args.warmup, 50)
        args.block = min(args.block, 100)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hb-bench-") as tmp:
        work = Path(tmp)
        for sub in ("bt-bus", "host-modes"):
            (work / sub).mkdir()
        with private_bus(work) as bus, private_bus(work / "bt-bus") as bt_bus:
            data = trio.run(bench, args, bus.address, bt_bus.address, work)
    results = write_outputs(args.out, data)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
