"""``hiomapbridge-demo --host qemu`` (hiomapbridge.demo_qemu).

The power-control hold is checked against a fake QEMU; the demo itself runs
as a real subprocess booting skiboot in QEMU in both bridge modes (skipped,
with the reason shown, where qemu-system-ppc64 or skiboot.lid is missing);
the missing-QEMU path runs everywhere. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hiomapbridge.demo_qemu import EXIT_UNAVAILABLE, main
from hiomapbridge.sim import vmproto as vm
from hiomapbridge.sim.process import python_command
from hiomapbridge.sim.qemu import BmcLink, unavailable_reason

from .test_qemu import FakeHost, connect

WAIT = 5  # seconds: bound on a wait on the fake QEMU
DEMO_WAIT = 90  # seconds: bound on one demo run (it takes ~10 s alone)


async def test_power_link_holds_resets_until_told(tmp_path: Path) -> None:
    """Chassis Control is still answered while power actions are held; the
    held action never reaches QEMU; :meth:`BmcLink.power` sends one even
    while holding; once released, the chassis request acts again."""
    host = FakeHost()
    link = BmcLink(host, tmp_path / "ipmi.sock", chassis="handle", hold_power=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        async with connect(link) as qemu:
            with trio.fail_after(WAIT):
                await qemu.request(1, 0x00, 0x02, b"\x03")  # hard reset
                assert await qemu.response() == vm.Response(1, 0x01, 0, 0x02, 0)
                await link.wait_until(lambda: bool(link.held))
                assert [a for _, a in link.held] == [vm.Control.RESET]
                assert await link.power(vm.Control.RESET)
                assert await qemu.next() == vm.ControlCommand(vm.Control.RESET)
                link.hold_power = False
                link.on_reset = "poweroff"
                await qemu.request(2, 0x00, 0x02, b"\x03")
                assert (await qemu.response()).msgid == 2
                assert await qemu.next() == vm.ControlCommand(vm.Control.POWEROFF)
        nursery.cancel_scope.cancel()
    assert [a for _, a in link.power_sent] == [vm.Control.RESET, vm.Control.POWEROFF]
    assert len(link.held) == 1
    assert host.requests == []  # chassis="handle": the link answered it


async def test_power_without_qemu_is_refused(tmp_path: Path) -> None:
    link = BmcLink(
        FakeHost(), tmp_path / "ipmi.sock", chassis="handle", hold_power=True
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        assert not await link.power(vm.Control.RESET)
        nursery.cancel_scope.cancel()
    assert link.power_sent == []


def test_missing_qemu_exits_3_with_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "x"
    status = main(["--qemu", str(tmp_path / "no-such-qemu"), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert status == EXIT_UNAVAILABLE == 3
    assert "no-such-qemu" in err
    assert "apt-get install qemu-system-ppc" in err
    assert not workdir.exists()  # nothing was started


# -- the demo, booting the real skiboot ------------------------------------------------


@pytest.fixture
def need_qemu() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot boot skiboot here: {reason}")


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


@pytest.mark.timeout(DEMO_WAIT + 30)
@pytest.mark.parametrize("mode", ["bt", "btbridged"])
async def test_demo_boots_skiboot_through_the_chain(
    mode: str, tmp_path: Path, need_qemu: None
) -> None:
    workdir = tmp_path / "w"
    argv = [
        sys.executable, "-m", "hiomapbridge.demo_qemu",
        "--bridge-host", mode, "--workdir", str(workdir),
    ]  # fmt: skip
    with trio.fail_after(DEMO_WAIT):
        done = await trio.run_process(
            argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False
        )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out
    result = re.search(r"RESULT: PASS \(all (\d+) checks", out)
    assert result is not None, out
    assert out.count("[ok  ]") == int(result[1]) and "[FAIL]" not in out

    boot1 = _between(out, "== boot 1", "== shutdown")
    for line in (
        "| HIOMAP: Negotiated hiomap protocol v2",
        "| FLASH: Found system flash",
        "| NVRAM: Re-initializing (size: 0x00012000)",
        "[ok  ] firmware fetched the WINDOW_RESET event (SMS_ATN) and ACKed it",
    ):
        assert line in boot1, boot1

    shutdown = _between(out, "== shutdown", "== boot 2")
    order = [
        "demo     SIGTERM -> hiomapd",
        "hiomapd  exited, status 0",
        "demo     SIGTERM -> hiomapbridge",
        "<== firmware holds PROTOCOL_RESET",
        "bridge   exited, status 0",
    ]
    positions = [shutdown.find(mark) for mark in order]
    assert -1 not in positions and positions == sorted(positions), shutdown

    boot2 = _between(out, "== boot 2", "== hiomapd and the bridge restarted")
    assert "| MBOX-FLASH: BMC NOT RESPONDING" in boot2
    assert "HIOMAP: Negotiated" not in boot2

    boot3 = _between(out, "== hiomapd and the bridge restarted", "== IPMI traffic")
    assert re.search(r"boot 3 .*\| HIOMAP: Negotiated hiomap protocol v2", boot3)
    assert re.search(r"boot 3 .*\| FLASH: Found system flash", boot3)
    assert "NVRAM: Re-initializing" not in boot3

    table = out[out.index("== IPMI traffic") :]
    assert re.search(r"HIOMAP GET_INFO\s+bridge\s+2\s+0x00", table), table
    assert re.search(r"Read Event Message Buffer\s+bridge", table), table
    if mode == "bt":
        assert re.search(r"Get Device ID\s+ipmid\s+2\s+0x00", table), table
        assert re.search(r"Chassis Control \(hard reset\)\s+ipmid", table), table
        assert re.search(r"HIOMAP ACK\s+nobody\s+1\s+0xc3", table), table
    else:
        assert re.search(r"Get Device ID\s+bridge\s+2\s+0xc1", table), table
        assert re.search(r"Chassis Control \(hard reset\)\s+link", table), table
        assert re.search(r"HIOMAP ACK\s+btbridged\s+1\s+0xce", table), table
    assert "power actions sent to QEMU: RESET, RESET, POWEROFF" in table

    console = (workdir / "console.log").read_text(errors="replace")
    assert console.count("OPAL v7.0 starting") == 3
    assert (workdir / "hiomapbridge.log").exists()
    assert (workdir / "hiomapbridge-2.log").exists()


def test_without_qemu_the_demo_falls_back_to_the_simulated_host(
    tmp_path: Path,
) -> None:
    """The quick-start demo (--host qemu) where QEMU cannot run: it says so,
    then runs the simulated host in the same bridge mode, and passes."""
    env = dict(os.environ, HIOMAPBRIDGE_QEMU=str(tmp_path / "no-qemu"))
    result = subprocess.run(
        python_command("hiomapbridge.demo", "--host", "qemu", "--quiet"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot boot skiboot here" in result.stderr
    assert "falling back to the simulated host (--host bt)" in result.stderr
    assert "RESULT: PASS" in result.stdout
    assert "host bt" in result.stdout
