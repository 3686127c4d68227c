"""``--host bt:PATH`` as systemd runs it: the bridge as a real subprocess
with real signals, on a real private bus, with the host simulator on the
unix-socket seam and a fake ipmid."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import trio

from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.process import python_command, run_service

from .bridgeutil import GET_FLAGS, READ_EVENT
from .btutil import bt_host, fake_ipmid, socket_dir
from .test_daemon import bridge_argv


async def test_sigterm_exits_only_after_protocol_reset_was_written(
    bus_address: str, tmp_path: Path
) -> None:
    path = socket_dir() / "bt.sock"
    async with (
        bt_host(path) as host,
        fake_ipmid(bus_address) as ipmid,
        run_service(
            "bridge",
            bridge_argv(
                bus_address, "--host", f"bt:{path}", "--shutdown-timeout", "60"
            ),
            tmp_path,
        ) as bridge,
    ):
        with trio.fail_after(10):
            await host.wait_connected()
            # Forwarding works from the subprocess too (channel 15).
            assert (await host.transact(0x06, 0x01)).cc == 0
            assert ipmid.calls[-1].channel == 0x0F
            bridge.signal(signal.SIGTERM)
            await bridge.wait_notified("STOPPING=1")
            await host.wait_attention()
        # The host has not fetched anything: the bridge must still be there,
        # answering (it needs the host's requests to deliver the event).
        with trio.fail_after(10):
            assert (await host.transact(*GET_FLAGS)).data == b"\x02"
        assert bridge.process.returncode is None
        with trio.fail_after(10):
            resp = await host.transact(*READ_EVENT)
        fetched = trio.current_time()
        assert resp.data == event_record(0x01)
        with trio.fail_after(10):
            assert await bridge.wait() == 0
        assert bridge.exited_at is not None  # alive until the fetch (above),
        assert bridge.exited_at - fetched < 2.0  # then gone promptly
        assert "the host holds PROTOCOL_RESET" in bridge.log()
        assert host.violations == []


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_command("hiomapbridge", *argv),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_bt_device_exits_1_with_a_clear_message(bus_address: str) -> None:
    result = _run("--bus", bus_address, "--host", "bt:/dev/ipmi-bt-host-absent")
    assert result.returncode == 1
    assert "cannot open the BT device /dev/ipmi-bt-host-absent" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_device_that_fails_exits_1(bus_address: str) -> None:
    """/dev/null opens, polls readable and reads end-of-file: not a BT
    device.  The bridge says so and exits 1 (systemd restarts it) instead of
    spinning."""
    result = _run("--bus", bus_address, "--host", "bt:/dev/null")
    assert result.returncode == 1
    assert "the BT device /dev/null failed" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
