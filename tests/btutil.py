"""A ``bt:`` stack for integration tests: the host simulator on the unix
socket seam, a fake ipmid and the hiomapd emulator on a real private bus,
and the bridge (in-process, or the caller's subprocess) in between."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from hiomapbridge.dbus import open_bus
from hiomapbridge.sim.bthost import BtHost
from hiomapbridge.sim.hiomapd import Emulator, run_emulator
from hiomapbridge.sim.ipmid import FakeIpmid

from .bridgeutil import READ_EVENT, RunningBridge, run_bridge

_SOCKETS = tempfile.TemporaryDirectory(prefix="hb-bt-")  # removed at exit


def socket_dir() -> Path:
    """A short, fresh directory for unix sockets (sun_path holds 108 bytes;
    pytest's tmp_path for a long test name does not fit), removed with the
    test process."""
    return Path(tempfile.mkdtemp(dir=_SOCKETS.name))


@asynccontextmanager
async def bt_host(path: Path, **options: object) -> AsyncIterator[BtHost]:
    async with trio.open_nursery() as nursery:
        host = BtHost(path, **options)  # type: ignore[arg-type]
        await nursery.start(host.serve)
        yield host
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def fake_ipmid(address: str, **options: object) -> AsyncIterator[FakeIpmid]:
    async with open_bus(address) as bus, trio.open_nursery() as nursery:
        ipmid = FakeIpmid(**options)  # type: ignore[arg-type]
        await nursery.start(ipmid.serve, bus)
        yield ipmid
        nursery.cancel_scope.cancel()


@attrs.frozen
class BtStack:
    host: BtHost
    ipmid: FakeIpmid | None
    hiomapd: Emulator
    bridge: RunningBridge
    socket: Path


@asynccontextmanager
async def bt_stack(
    address: str,
    workdir: Path,
    *,
    with_ipmid: bool = True,
    drain: bool = True,
    **config: object,
) -> AsyncIterator[BtStack]:
    """Host, ipmid, hiomapd and the bridge in ``bt:`` mode; with ``drain``
    the host has fetched the start-up event (0x81) when the body starts."""
    path = socket_dir() / "bt.sock"
    async with (
        bt_host(path) as host,
        run_emulator(address, workdir, flash_size=1 << 20) as hiomapd,
        _maybe_ipmid(address, with_ipmid) as ipmid,
        run_bridge(address, host=f"bt:{path}", **config) as running,  # type: ignore[arg-type]
    ):
        with trio.fail_after(10):
            await host.wait_connected()
            if drain:
                await host.wait_attention()
                await host.transact(*READ_EVENT)
                await running.bridge.queue.wait_all_delivered()
        yield BtStack(host, ipmid, hiomapd, running, path)


@asynccontextmanager
async def _maybe_ipmid(address: str, wanted: bool) -> AsyncIterator[FakeIpmid | None]:
    if not wanted:
        yield None
        return
    async with fake_ipmid(address) as ipmid:
        yield ipmid
