"""Real host firmware: skiboot in QEMU powernv, through the bridge.

The first half drives :class:`~hiomapbridge.sim.qemu.BmcLink` with a fake
QEMU (a unix socket client speaking the VM protocol) and a fake host side,
so the link's rules are checked without QEMU. The second half boots the real
skiboot in QEMU (skipped, with the reason shown, when qemu-system-ppc64 or
skiboot.lid is missing): private dbus-daemon, hiomapd emulator in-process,
the bridge as a real subprocess, and the btbridged stand-in or the ``bt:``
seam in front of the link.

Every wait is bounded by ``trio.fail_after``; a failure prints the QEMU
console and the bridge's log.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Literal

import attrs
import pytest
import trio

from hiomapbridge.dbus import open_bus
from hiomapbridge.sim import vmproto as vm
from hiomapbridge.sim.btbridged import BtBridge, BtTimeout, Response
from hiomapbridge.sim.bthost import BtHost
from hiomapbridge.sim.ffs import make_pnor, read_table
from hiomapbridge.sim.hiomapd import Emulator, run_emulator
from hiomapbridge.sim.process import Service, python_command, run_service
from hiomapbridge.sim.qemu import (
    LPC_FLASH_BASE,
    BmcLink,
    Console,
    ConsoleClosed,
    QemuConfig,
    QemuHost,
    QemuPaths,
    chassis_action,
    locate,
    qemu_argv,
    run_qemu_host,
    unavailable_reason,
)

WAIT = 5  # seconds: bound on a wait on the fake QEMU
BOOT_WAIT = 30  # seconds: bound on each boot step of the real skiboot


# -- fakes --------------------------------------------------------------------


@attrs.define(eq=False)
class FakeHost:
    """A host side answering every request with ``cc`` and ``data``; a
    request whose cmd is in ``gates`` waits for that event first."""

    cc: int = 0
    data: bytes = b"\x42"
    raise_timeout: bool = False
    requests: list[tuple[int, int, bytes, int]] = attrs.field(factory=list)
    gates: dict[int, trio.Event] = attrs.field(factory=dict)
    _arrived: trio.Event = attrs.field(factory=trio.Event)
    _atn_send: trio.MemorySendChannel[None] = attrs.field(init=False)
    _atn_recv: trio.MemoryReceiveChannel[None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._atn_send, self._atn_recv = trio.open_memory_channel[None](math.inf)

    def raise_attention(self) -> None:
        self._atn_send.send_nowait(None)

    async def transact(
        self, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
    ) -> Response:
        self.requests.append((netfn, cmd, data, lun))
        self._arrived.set()
        self._arrived = trio.Event()
        gate = self.gates.get(cmd)
        if gate is not None:
            await gate.wait()
        if self.raise_timeout:
            raise BtTimeout("no answer")
        return Response(self.cc, self.data, 0, netfn | 1, lun, cmd)

    async def wait_attention(self) -> None:
        await self._atn_recv.receive()

    async def wait_requests(self, n: int) -> None:
        while len(self.requests) < n:
            await self._arrived.wait()


class FakeQemu:
    """QEMU's end of the chardev: sends requests, decodes what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = vm.Decoder(min_message=vm.MIN_RESPONSE)
        self.events: list[vm.Event] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, msgid: int, netfn: int, cmd: int, data: bytes = b""
    ) -> None:
        await self.send(vm.encode_request(vm.Request(msgid, netfn, 0, cmd, data)))

    async def next(self) -> vm.Event:
        while not self.events:
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError("link closed the connection")
            self.events += self.decoder.feed(data)
        return self.events.pop(0)

    async def response(self) -> vm.Response:
        event = await self.next()
        assert isinstance(event, vm.Message), event
        response = vm.parse_response(event)
        assert response is not None
        return response


@asynccontextmanager
async def serve_link(
    tmp_path: Path, host: FakeHost, **options: object
) -> AsyncIterator[BmcLink]:
    link = BmcLink(host, tmp_path / "ipmi.sock", **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        yield link
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(link: BmcLink) -> AsyncIterator[FakeQemu]:
    stream = await trio.open_unix_socket(str(link.path))
    async with stream:
        qemu = FakeQemu(stream)
        # what QEMU sends first on every connection
        await qemu.send(vm.encode_control(vm.Control.VERSION, b"\x01"))
        await qemu.send(vm.encode_control(vm.Control.CAPABILITIES, b"\x3f"))
        yield qemu


# -- the link against a fake QEMU ----------------------------------------------


async def test_request_is_answered_with_qemus_msgid(tmp_path: Path) -> None:
    host = FakeHost(cc=0, data=b"\x09\x01")
    async with serve_link(tmp_path, host) as link, connect(link) as qemu:
        with trio.fail_after(WAIT):
            await qemu.request(0xA0, 0x3A, 0x5A, b"\x09\x01\x03")
            response = await qemu.response()
            await link.wait_until(lambda: link.capabilities is not None)
    assert response == vm.Response(0xA0, 0x3B, 0, 0x5A, 0, b"\x09\x01")
    assert host.requests == [(0x3A, 0x5A, b"\x09\x01\x03", 0)]
    assert link.capabilities == vm.Capability(0x3F)
    assert [c.code for c in link.controls_received] == [0xFF, 0x08]
    (exchange,) = link.answered()
    assert exchange.outcome == "answered" and exchange.response == response


async def test_attention_is_latched_until_qemu_connects(tmp_path: Path) -> None:
    host = FakeHost()
    async with serve_link(tmp_path, host) as link:
        host.raise_attention()
        host.raise_attention()
        with trio.fail_after(WAIT):
            await link.wait_until(lambda: link.attentions_raised == 2)
        assert link.attention_latched and link.attentions_sent == 0
        async with connect(link) as qemu:
            with trio.fail_after(WAIT):
                assert await qemu.next() == vm.ControlCommand(vm.Control.ATTN_IRQ)
                await link.wait_until(lambda: not link.attention_latched)
                # and one raised while connected goes out at once
                host.raise_attention()
                assert await qemu.next() == vm.ControlCommand(vm.Control.ATTN_IRQ)
        assert link.attentions_sent == 2


async def test_chassis_control_handled_by_the_link(tmp_path: Path) -> None:
    host = FakeHost()
    async with serve_link(tmp_path, host, chassis="handle") as link:
        async with connect(link) as qemu:
            with trio.fail_after(WAIT):
                await qemu.request(7, 0x00, 0x02, b"\x00")  # power down
                assert await qemu.response() == vm.Response(7, 0x01, 0, 0x02, 0)
                assert await qemu.next() == vm.ControlCommand(vm.Control.POWEROFF)
    assert host.requests == []
    assert link.power_actions == [vm.Control.POWEROFF]


@pytest.mark.parametrize(
    ("on_reset", "action"),
    [("reset", vm.Control.RESET), ("poweroff", vm.Control.POWEROFF)],
)
async def test_chassis_control_forwarded_is_still_acted_on(
    tmp_path: Path, on_reset: str, action: vm.Control
) -> None:
    host = FakeHost(cc=0xC1, data=b"")
    async with serve_link(tmp_path, host, chassis="forward", on_reset=on_reset) as link:
        async with connect(link) as qemu:
            with trio.fail_after(WAIT):
                await qemu.request(3, 0x00, 0x02, b"\x03")  # hard reset
                assert await qemu.response() == vm.Response(3, 0x01, 0, 0x02, 0xC1)
                assert await qemu.next() == vm.ControlCommand(action)
    assert host.requests == [(0x00, 0x02, b"\x03", 0)]
    assert link.power_actions == [action]


def test_chassis_actions() -> None:
    assert chassis_action(b"\x00") == vm.Control.POWEROFF
    assert chassis_action(b"\x01") is None  # power up: already on
    assert chassis_action(b"\x02") == vm.Control.RESET
    assert chassis_action(b"\x03", "poweroff") == vm.Control.POWEROFF
    assert chassis_action(b"\x04") == vm.Control.SEND_NMI
    assert chassis_action(b"\x05") == vm.Control.GRACEFUL_SHUTDOWN
    assert chassis_action(b"") is None


async def test_answer_after_qemu_moved_on_is_dropped(tmp_path: Path) -> None:
    """QEMU times a request out after 4 s and sends the next one: the late
    answer to the old msgid must not reach it (QEMU's extern BMC would take
    it as the answer in flight)."""
    slow = trio.Event()
    host = FakeHost(gates={0x31: slow})
    async with serve_link(tmp_path, host) as link, connect(link) as qemu:
        with trio.fail_after(WAIT):
            await qemu.request(1, 0x06, 0x31)
            await host.wait_requests(1)
            await qemu.request(2, 0x06, 0x01)
            assert (await qemu.response()).msgid == 2
            slow.set()
            await link.wait_until(lambda: link.exchanges[0].outcome != "pending")
    assert [e.outcome for e in link.exchanges] == ["stale", "answered"]
    assert [t.item.msgid for t in link.traffic if isinstance(t.item, vm.Response)] == [
        2
    ]


async def test_lost_host_answer_becomes_timeout(tmp_path: Path) -> None:
    host = FakeHost(raise_timeout=True)
    async with serve_link(tmp_path, host) as link, connect(link) as qemu:
        with trio.fail_after(WAIT):
            await qemu.request(9, 0x3A, 0x5A, b"\x02\x01\x02")
            assert (await qemu.response()).cc == 0xC3


async def test_garbled_bytes_are_dropped(tmp_path: Path) -> None:
    host = FakeHost()
    async with serve_link(tmp_path, host) as link, connect(link) as qemu:
        bad = bytearray(vm.encode_request(vm.Request(5, 0x06, 0, 0x31)))
        bad[-2] ^= 0xFF
        with trio.fail_after(WAIT):
            await qemu.send(bytes(bad))
            await qemu.request(6, 0x06, 0x31)
            assert (await qemu.response()).msgid == 6
    assert host.requests == [(0x06, 0x31, b"", 0)]
    garbled = [t.item for t in link.traffic if isinstance(t.item, vm.Garbled)]
    assert [g.reason for g in garbled] == ["bad checksum"]


async def test_new_connection_replaces_the_old(tmp_path: Path) -> None:
    host = FakeHost()
    async with serve_link(tmp_path, host) as link:
        async with connect(link) as first:
            with trio.fail_after(WAIT):
                await link.wait_until(lambda: link.connections == 1)
                async with connect(link) as second:
                    await link.wait_until(lambda: link.connections == 2)
                    with pytest.raises(EOFError):
                        await first.next()
                    await second.request(1, 0x06, 0x31)
                    assert (await second.response()).msgid == 1
        with trio.fail_after(WAIT):
            await link.wait_until(lambda: not link.connected)


# -- console and command line ---------------------------------------------------


async def test_console_wait_for(tmp_path: Path) -> None:
    console = Console(tmp_path / "console.log")
    console.feed(b"[    0.01,5] OPAL v7.0 start")
    assert console.find("OPAL") is None  # no newline yet
    console.feed(b"ing...\r\n[    0.09,5] HIOMAP: Negotiated hiomap protocol v2\n")
    line = await console.wait_for("HIOMAP: Negotiated")
    assert line.skiboot_time == 0.09
    assert (await console.wait_for(re.compile(r"OPAL v\d"))).text.endswith("ing...")
    with pytest.raises(TimeoutError, match="FLASH"):
        await console.wait_for("FLASH", within=0)
    console.feed(b"partial")
    console.close()
    assert console.lines[-1].text == "partial"
    with pytest.raises(ConsoleClosed):
        await console.wait_for("never")
    assert (tmp_path / "console.log").read_bytes().endswith(b"v2\npartial")


def test_qemu_argv(tmp_path: Path) -> None:
    paths = QemuPaths(Path("/q/qemu-system-ppc64"), Path("/q/skiboot.lid"))
    argv = qemu_argv(QemuConfig(tmp_path / "pnor", tmp_path / "s.sock", paths))
    text = " ".join(argv)
    assert argv[0] == "/q/qemu-system-ppc64"
    for part in [
        "-M powernv9",
        "-nodefaults",
        "-display none",
        "-serial stdio",
        "-bios /q/skiboot.lid",
        f"-drive file={tmp_path}/pnor,format=raw,if=mtd",
        f"-chardev socket,id=ipmi0,path={tmp_path}/s.sock,reconnect=1",
        "-device ipmi-bmc-extern,id=bmc0,chardev=ipmi0",
        "-device isa-ipmi-bt,bmc=bmc0,irq=10",
    ]:
        assert part in text


def test_missing_qemu_is_reported(tmp_path: Path) -> None:
    reason = unavailable_reason(qemu=tmp_path / "no-such-qemu")
    assert reason is not None and "no-such-qemu" in reason
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    reason = unavailable_reason(qemu=fake, bios=tmp_path / "no.lid")
    assert reason is not None and "no.lid" in reason


# -- the real skiboot ----------------------------------------------------------------


@pytest.fixture
def qemu_paths() -> QemuPaths:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot boot skiboot here: {reason}")
    return locate()


def bridge_has_host_option() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "hiomapbridge", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return "--host" in out


Mode = Literal["btbridged", "bt"]


@attrs.define
class Rig:
    emu: Emulator
    bridge: Service
    running: QemuHost
    pnor: Path
    flash: Path

    @property
    def console(self) -> Console:
        return self.running.console

    @property
    def link(self) -> BmcLink:
        return self.running.link

    def report(self) -> str:
        return (
            f"--- QEMU console ---\n{self.console.text()}\n"
            f"--- bridge log ---\n{self.bridge.log()}"
        )

    async def wait_console(self, pattern: str) -> float:
        """Wait (bounded) for a console line; its skiboot timestamp."""
        with trio.fail_after(BOOT_WAIT):
            line = await self.console.wait_for(pattern)
        assert line.skiboot_time is not None
        return line.skiboot_time

    async def wait_link(self, what: str, condition: Callable[[], bool]) -> None:
        with trio.move_on_after(BOOT_WAIT):
            await self.link.wait_until(condition)
            return
        raise AssertionError(f"no {what} within {BOOT_WAIT} s")


@asynccontextmanager
async def boot(
    mode: Mode, bus_address: str, tmp_path: Path, paths: QemuPaths
) -> AsyncIterator[Rig]:
    """hiomapd emulator, host side, bridge subprocess, then QEMU booting."""
    pnor = tmp_path / "pnor.img"
    table = make_pnor(pnor)
    # hiomapd gets its own copy: QEMU serves the host's reads and writes from
    # the file on its mtd drive; hiomapd only manages windows.
    flash = tmp_path / "hiomapd" / "flash.img"
    flash.parent.mkdir()
    shutil.copyfile(pnor, flash)
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(
            run_emulator(
                bus_address,
                flash.parent,
                lpc_base=LPC_FLASH_BASE,
                direct_map=True,
            )
        )
        host: BtBridge | BtHost
        bridge_args = ["--bus", bus_address, "--log-level", "debug"]
        if mode == "btbridged":
            bus = await stack.enter_async_context(open_bus(bus_address))
            nursery = await stack.enter_async_context(trio.open_nursery())
            host = BtBridge()
            await nursery.start(host.serve, bus)
        else:
            nursery = await stack.enter_async_context(trio.open_nursery())
            host = BtHost(tmp_path / "bt.sock")
            await nursery.start(host.serve)
            bridge_args += ["--host", f"bt:{host.path}"]
        bridge = await stack.enter_async_context(
            run_service(
                "hiomapbridge", python_command("hiomapbridge", *bridge_args), tmp_path
            )
        )
        running = await stack.enter_async_context(
            # poweroff: skiboot's abort path (no kernel here) ends the VM
            run_qemu_host(host, pnor, tmp_path, on_reset="poweroff", paths=paths)
        )
        assert table.flash_size == emu.core.flash_size
        rig = Rig(emu, bridge, running, pnor, flash)
        try:
            yield rig
        except BaseException:
            print(rig.report())
            raise
        nursery.cancel_scope.cancel()


def hiomap_answered(link: BmcLink, command: int) -> bool:
    """A HIOMAP ``command`` was answered to the host with cc 0."""
    return any(
        e.request.data[:1] == bytes([command])
        and e.response is not None
        and e.response.cc == 0
        for e in link.answered(0x3A, 0x5A)
    )


def fetched(link: BmcLink, bit: int) -> bool:
    """The host read an event record carrying ``bit`` (Read Event Message
    Buffer answered to QEMU)."""
    return any(
        e.response is not None
        and e.response.cc == 0
        and len(e.response.data) == 16
        and e.response.data[11] == 0x0F
        and e.response.data[12] & bit
        for e in link.answered(0x06, 0x35)
    )


def acked(link: BmcLink, bit: int) -> bool:
    """The host sent HIOMAP ACK with ``bit`` and was answered cc 0."""
    return any(
        e.request.data[:1] == b"\x09"
        and len(e.request.data) >= 3
        and e.request.data[2] & bit
        and e.response is not None
        and e.response.cc == 0
        for e in link.answered(0x3A, 0x5A)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["btbridged", "bt"])
async def test_skiboot_through_the_bridge(
    mode: Mode, bus_address: str, tmp_path: Path, qemu_paths: QemuPaths
) -> None:
    """skiboot negotiates HIOMAP v2 through the bridge, reads the partition
    table from the LPC window hiomapd opened, formats the blank NVRAM, takes
    a WINDOW_RESET event (fetches the SEL record, ACKs it), and its abort
    path's Chassis Control powers the VM off."""
    if mode == "bt" and not bridge_has_host_option():
        pytest.skip("hiomapbridge --help lists no --host option (no bt: mode yet)")
    async with boot(mode, bus_address, tmp_path, qemu_paths) as rig:
        await rig.wait_console("OPAL v7.0 starting")
        await rig.wait_console("HIOMAP: Negotiated hiomap protocol v2")
        await rig.wait_console("HIOMAP: Flash size is 32MiB")
        await rig.wait_console("FLASH: Found system flash")
        # the size comes from our NVRAM partition entry: the table was read
        await rig.wait_console("NVRAM: Re-initializing (size: 0x00012000)")
        # An event while skiboot writes the NVRAM: hiomapd drops its windows.
        # (Earlier, during the partition table read, it fails that read:
        # skiboot does not retry it.)
        await rig.wait_link("write window", lambda: hiomap_answered(rig.link, 6))
        await rig.emu.force_window_reset()
        await rig.wait_link("WINDOW_RESET record", lambda: fetched(rig.link, 0x02))
        await rig.wait_link("ACK of WINDOW_RESET", lambda: acked(rig.link, 0x02))
        with trio.fail_after(BOOT_WAIT):
            status = await rig.running.qemu.wait()
        assert status == 0
        assert rig.link.power_actions == [vm.Control.POWEROFF]
        assert rig.link.attentions_sent >= 2  # hiomapd's start-up state, the reset
        windows = [
            e.response.data
            for e in rig.link.answered(0x3A, 0x5A)
            if e.request.data[:1] in (b"\x04", b"\x06") and e.response is not None
        ]
        # every window hiomapd opened is at 0xC000 (LPC 0x0C000000) + offset
        assert windows and all(w[2:4] == b"\x00\xc0" for w in windows)
    # skiboot's NVRAM format reached QEMU's image; hiomapd's copy is untouched
    nvram = read_table(rig.pnor.read_bytes()).find("NVRAM")
    assert nvram is not None
    written = rig.pnor.read_bytes()[nvram.offset : nvram.offset + 16]
    assert written[0] == 0x51 and written[4:15] == b"ibm,skiboot"
    untouched = rig.flash.read_bytes()[nvram.offset : nvram.offset + nvram.size]
    assert untouched == b"\xff" * nvram.size


@pytest.mark.timeout(120)
async def test_sim_qemu_command(
    bus_address: str, tmp_path: Path, qemu_paths: QemuPaths
) -> None:
    """``hiomapbridge-sim qemu`` boots skiboot through a bridge subprocess
    and exits with QEMU's status once skiboot's abort powers the VM off."""
    pnor = tmp_path / "pnor.img"
    flash_dir = tmp_path / "hiomapd"
    flash_dir.mkdir()
    make_pnor(flash_dir / "flash.img")
    argv = python_command(
        "hiomapbridge.sim", "qemu", "--pnor", str(pnor), "--make-pnor",
        "--host", "btbridged", "--bus", bus_address, "--on-reset", "poweroff",
        "--console", str(tmp_path / "console.log"),
    )  # fmt: skip
    bridge_argv = python_command("hiomapbridge", "--bus", bus_address)
    async with (
        run_emulator(bus_address, flash_dir, lpc_base=LPC_FLASH_BASE, direct_map=True),
        run_service("hiomapbridge", bridge_argv, tmp_path) as bridge,
        run_service("qemu-sim", argv, tmp_path, wait_ready=False) as sim,
    ):
        try:
            with trio.fail_after(BOOT_WAIT * 2):
                status = await sim.wait()
        except BaseException:
            print(sim.log(), bridge.log())
            raise
    assert status == 0, sim.log()
    console = (tmp_path / "console.log").read_text()
    assert "HIOMAP: Negotiated hiomap protocol v2" in console
    assert "FLASH: Found system flash" in console
    assert "HIOMAP: Negotiated hiomap protocol v2" in sim.log()  # echoed to stdout
