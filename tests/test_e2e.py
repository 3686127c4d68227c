"""End to end through all three: the host simulator (with the btbridged
stand-in) -> the bridge as a real subprocess -> the hiomapd emulator -> the
flash file, on a private dbus-daemon.

Every wait is on a real event (an event record reaching the host, a process
exit) under a ``trio.fail_after`` bound; nothing sleeps.
"""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiomapbridge.hiomap import Command
from hiomapbridge.ipmi import CMD_HIOMAP, NETFN_OEM_IBM
from hiomapbridge.sim.btbridged import Transaction
from hiomapbridge.sim.hiomapd import Emulator, run_emulator
from hiomapbridge.sim.host import (
    DAEMON_READY,
    FLASH_CONTROL_LOST,
    PROTOCOL_RESET,
    WINDOW_RESET,
    DeviceGone,
    EventRecord,
    Host,
    TryAgain,
    run_host,
)
from hiomapbridge.sim.process import Service, python_command, run_service

KIB = 1024
FLASH = 512 * KIB
BLOCK = 4 * KIB
# 4 windows of 64 KiB cache 256 KiB of the 512 KiB flash: random ranges
# cross windows and evict them.
WINDOW = 64 * KIB
WINDOWS = 4
MAX_OP = 96 * KIB
WAIT = 10  # seconds: bound on any single wait for a real event

EmulatorKind = Literal["inproc", "process"]
T = TypeVar("T")


@attrs.define
class Stack:
    bus_address: str
    directory: Path
    image: bytes
    stack: AsyncExitStack
    bridge: Service = attrs.field(init=False)
    host: Host = attrs.field(init=False)
    emu: Emulator | None = None
    hiomapd: Service | None = None

    @property
    def flash_path(self) -> Path:
        return self.directory / "flash.img"

    @property
    def lpc_path(self) -> Path:
        return self.directory / "lpc.img"

    async def flash(self) -> bytes:
        return await trio.Path(self.flash_path).read_bytes()

    async def start_emulator(self, kind: EmulatorKind, name: str = "hiomapd") -> None:
        """Start (or, after a crash, restart) hiomapd on the same files."""
        self.emu = self.hiomapd = None
        if kind == "inproc":
            self.emu = await self.stack.enter_async_context(
                run_emulator(
                    self.bus_address,
                    self.directory,
                    window_size=WINDOW,
                    window_count=WINDOWS,
                )
            )
            return
        argv = python_command(
            "hiomapbridge.sim", "hiomapd", "--bus", self.bus_address,
            "--flash", str(self.flash_path), "--lpc", str(self.lpc_path),
            "--window-size", str(WINDOW), "--window-count", str(WINDOWS),
        )  # fmt: skip
        self.hiomapd = await self.stack.enter_async_context(
            run_service(name, argv, self.directory)
        )

    def logs(self) -> str:
        """For assertion messages."""
        parts = [f"--- bridge log ---\n{self.bridge.log()}"]
        if self.hiomapd is not None:
            parts.append(f"--- hiomapd log ---\n{self.hiomapd.log()}")
        return "\n".join(parts)


@asynccontextmanager
async def open_stack(
    bus_address: str, directory: Path, kind: EmulatorKind = "inproc"
) -> AsyncIterator[Stack]:
    """hiomapd (``kind``), the bridge subprocess, and a started host that has
    taken the bridge's first event (hiomapd's state)."""
    image = random.Random(1).randbytes(FLASH)
    (directory / "flash.img").write_bytes(image)
    async with AsyncExitStack() as stack:
        bridge_argv = python_command(
            "hiomapbridge", "--bus", bus_address, "--log-level", "debug",
            "--shutdown-timeout", "5",
        )  # fmt: skip
        running = Stack(bus_address, directory, image, stack)
        await running.start_emulator(kind)
        running.bridge = await stack.enter_async_context(
            run_service("hiomapbridge", bridge_argv, directory)
        )
        running.host = await stack.enter_async_context(
            run_host(bus_address, directory / "lpc.img")
        )
        with trio.fail_after(WAIT):
            await running.host.wait_events(1)
        yield running


def holds_reset(state: int) -> bool:
    """PROTOCOL_RESET set and DAEMON_READY clear: hiomapd is gone."""
    return bool(state & PROTOCOL_RESET) and not state & DAEMON_READY


def reset_events(host: Host, since: float) -> list[EventRecord]:
    return [
        ev
        for ev in host.hiomap_events
        if ev.trio_time >= since and ev.data is not None and holds_reset(ev.data)
    ]


def hiomap_sent(txs: list[Transaction]) -> list[tuple[str, bytes]]:
    """(command name, arguments) of HIOMAP requests."""
    return [
        (Command(tx.data[0]).name, tx.data[2:])
        for tx in txs
        if (tx.netfn, tx.cmd) == (NETFN_OEM_IBM, CMD_HIOMAP)
    ]


async def retry(op: Callable[[], Awaitable[T]]) -> T:
    """An event arriving mid-operation fails it with TryAgain (the client's
    contract, as skiboot's FLASH_ERR_AGAIN); callers retry."""
    for _ in range(3):
        try:
            return await op()
        except TryAgain:
            pass
    return await op()


# -- data path: hypothesis-chosen operations against a model -------------------

Op = tuple[str, int, int, int]  # (kind, offset, length, data seed)


@st.composite
def operations(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from(["read", "write", "erase"]))
    near = st.sampled_from([WINDOW * i + d for i in range(1, 8) for d in (-1, 0, 1)])
    offset = draw(st.one_of(st.integers(0, FLASH - 1), near))
    length = draw(st.integers(1, min(MAX_OP, FLASH - offset)))
    return kind, offset, length, draw(st.integers(0, 2**32 - 1))


async def apply(stack: Stack, model: bytearray, ops: list[Op]) -> None:
    """Run ``ops``, then flush and compare the flash file with the model.

    The model starts from the flash file as the previous example left it
    (which that example already checked), so that a failure found while
    shrinking is this example's own."""
    host = stack.host
    model[:] = await stack.flash()
    for kind, offset, length, seed in ops:
        if kind == "read":
            data = await retry(partial(host.read, offset, length))
            assert data == model[offset : offset + length], (kind, offset, length)
        elif kind == "write":
            data = random.Random(seed).randbytes(length)
            await retry(partial(host.write, offset, data))
            model[offset : offset + length] = data
        else:
            await retry(partial(host.erase, offset, length))
            # The host erases whole blocks, rounding the range outwards.
            first = offset // BLOCK * BLOCK
            end = -(-(offset + length) // BLOCK) * BLOCK
            model[first:end] = b"\xff" * (end - first)
    await host.flush()
    flash = await stack.flash()
    if flash != model:
        bad = next(
            i for i, (a, b) in enumerate(zip(flash, model, strict=True)) if a != b
        )
        raise AssertionError(f"flash file differs from the model at {bad:#x}: {ops}")


async def test_hypothesis_operations_match_model(
    bus_address: str, tmp_path: Path
) -> None:
    """Random reads, writes and erases through the whole path; after each
    example the flash file equals the model byte for byte.

    The stack starts once; hypothesis runs in a worker thread and hands each
    example back to this trio loop (``trio.from_thread.run``)."""
    async with open_stack(bus_address, tmp_path) as stack:
        model = bytearray(stack.image)

        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(st.lists(operations(), min_size=1, max_size=4))
        def example(ops: list[Op]) -> None:
            trio.from_thread.run(apply, stack, model, ops)

        with trio.fail_after(60):
            await trio.to_thread.run_sync(example)
        # The whole flash, read back through the bridge, is the model too.
        assert await retry(lambda: stack.host.read(0, FLASH)) == model
        failed = [
            tx
            for tx in stack.host.bt.transactions
            if tx.delivered is None or tx.delivered.cc != 0
        ]
        assert not failed, stack.logs()


# -- events as the host sees them --------------------------------------------------


async def test_suspend_and_resume_flash_control(
    bus_address: str, tmp_path: Path
) -> None:
    async with open_stack(bus_address, tmp_path) as stack:
        host, emu = stack.host, stack.emu
        assert emu is not None
        assert await retry(lambda: host.read(0, BLOCK)) == stack.image[:BLOCK]

        await emu.suspend_flash_control()
        with trio.fail_after(WAIT):
            await host.wait_until(lambda: bool(host.state & FLASH_CONTROL_LOST))
        before = len(host.bt.transactions)
        with pytest.raises(TryAgain):
            await host.read(WINDOW, BLOCK)  # not in the open window
        assert hiomap_sent(host.bt.transactions[before:]) == []  # nothing sent

        # A host that waits instead: its read completes once control is back.
        host.flash_lost = "wait"
        result: list[bytes] = []

        async def read() -> None:
            result.append(await host.read(WINDOW, BLOCK))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert result == []
            await emu.resume_flash_control()
            with trio.fail_after(WAIT):
                await host.wait_until(lambda: not host.state & FLASH_CONTROL_LOST)
        assert result == [stack.image[WINDOW : WINDOW + BLOCK]]
        data = [ev.data for ev in host.hiomap_events]
        assert 0x80 | FLASH_CONTROL_LOST in data, data


async def test_forced_window_reset(bus_address: str, tmp_path: Path) -> None:
    async with open_stack(bus_address, tmp_path) as stack:
        host, emu = stack.host, stack.emu
        assert emu is not None
        assert await retry(lambda: host.read(0, BLOCK)) == stack.image[:BLOCK]
        assert host.window_state == "read"

        await emu.force_window_reset()
        with trio.fail_after(WAIT):
            await host.wait_until(lambda: bool(host.state & WINDOW_RESET))
        before = len(host.bt.transactions)
        # Same range as before: without the event the host would reuse its
        # window; with it, it ACKs WINDOW_RESET and maps a new one.
        assert await host.read(0, BLOCK) == stack.image[:BLOCK]
        sent = hiomap_sent(host.bt.transactions[before:])
        assert [name for name, _ in sent] == ["ACK", "CREATE_READ_WINDOW"]
        assert sent[0][1] == bytes([WINDOW_RESET])
        assert not emu.events & WINDOW_RESET  # the ACK reached hiomapd


async def test_clean_stop_in_systemd_order(bus_address: str, tmp_path: Path) -> None:
    """SIGTERM hiomapd, then the bridge: the host ends on 0x01 with
    DAEMON_READY clear, received before the bridge exits."""
    async with open_stack(bus_address, tmp_path, "process") as stack:
        host, hiomapd, bridge = stack.host, stack.hiomapd, stack.bridge
        assert hiomapd is not None
        await retry(lambda: host.write(3 * BLOCK + 5, b"persisted"))
        t0 = trio.current_time()
        hiomapd.signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await hiomapd.wait() == 0, stack.logs()
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await bridge.wait() == 0, stack.logs()
        held = reset_events(host, t0)
        assert held, (host.hiomap_events, stack.logs())
        assert bridge.exited_at is not None
        assert held[0].trio_time < bridge.exited_at
        assert holds_reset(host.state)
        assert "the host holds PROTOCOL_RESET" in bridge.log()
        with pytest.raises(DeviceGone):
            await host.read(0, BLOCK)
        flash = await stack.flash()
        assert flash[3 * BLOCK + 5 : 3 * BLOCK + 14] == b"persisted"


@pytest.mark.parametrize("how", ["crash()", "SIGKILL"])
async def test_crash_then_restart(bus_address: str, tmp_path: Path, how: str) -> None:
    """hiomapd vanishes without a word: the bridge tells the host 0x01
    (DAEMON_READY clear); a restarted hiomapd brings the host back."""
    kind: EmulatorKind = "inproc" if how == "crash()" else "process"
    async with open_stack(bus_address, tmp_path, kind) as stack:
        host = stack.host
        await retry(lambda: host.write(7 * BLOCK, b"before the crash"))
        t0 = trio.current_time()
        if stack.emu is not None:
            await stack.emu.crash()
        else:
            assert stack.hiomapd is not None
            stack.hiomapd.signal(signal.SIGKILL)
            with trio.fail_after(WAIT):
                assert await stack.hiomapd.wait() == -signal.SIGKILL
        with trio.fail_after(WAIT):
            await host.wait_until(lambda: bool(reset_events(host, t0)))
        assert holds_reset(host.state)
        assert "hiomapd vanished with DAEMON_READY set" in stack.bridge.log()
        with pytest.raises(DeviceGone):
            await host.read(0, BLOCK)

        t1 = trio.current_time()
        await stack.start_emulator(kind, name="hiomapd-restarted")
        with trio.fail_after(WAIT):
            await host.wait_until(lambda: bool(host.state & DAEMON_READY))
        back = [e for e in host.hiomap_events if e.trio_time >= t1]
        assert back and back[0].data is not None and back[0].data & DAEMON_READY
        before = len(host.bt.transactions)
        data = await retry(lambda: host.read(7 * BLOCK, 16))
        assert data == b"before the crash"
        # PROTOCOL_RESET was still held: ACK it and renegotiate first.
        sent = [name for name, _ in hiomap_sent(host.bt.transactions[before:])]
        assert sent[:3] == ["ACK", "GET_INFO", "GET_FLASH_INFO"], sent
