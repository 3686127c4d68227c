"""The daemon as systemd runs it: a real subprocess, real signals, a real bus."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from hiomapbridge import __version__
from hiomapbridge.ipmi import event_record
from hiomapbridge.sim.privatebus import PrivateBus
from hiomapbridge.sim.process import python_command, run_service

from .bridgeutil import READ_EVENT, run_btbridged
from .scripted_hiomapd import scripted_hiomapd


def bridge_argv(address: str, *extra: str) -> list[str]:
    return python_command(
        "hiomapbridge", "--bus", address, "--log-level", "debug", *extra
    )


def test_version_and_help() -> None:
    out = subprocess.run(
        python_command("hiomapbridge", "--version"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"hiomapbridge {__version__}"
    helptext = subprocess.run(
        python_command("hiomapbridge", "--help"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--bus",
        "--host",
        "--hiomapd-timeout",
        "--ipmid-timeout",
        "--bt-transaction-time",
        "--ipmi-channel",
        "Timing budget",
        "--atn-interval",
        "--shutdown-timeout",
        "--log-level",
        "--version",
        "Exit status",
    ):
        assert option in helptext


def test_bad_options_exit_2() -> None:
    for argv in (
        ["--bus", "tcp:host=example"],
        ["--hiomapd-timeout", "-1"],
        ["--atn-interval", "soon"],
        ["--log-level", "chatty"],
        ["--frobnicate"],
    ):
        result = subprocess.run(
            python_command("hiomapbridge", *argv), capture_output=True, text=True
        )
        assert result.returncode == 2, argv
        assert "error:" in result.stderr, argv
        assert "Traceback" not in result.stderr, argv


def test_session_bus_needs_its_address() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    result = subprocess.run(
        python_command("hiomapbridge", "--bus", "session"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "DBUS_SESSION_BUS_ADDRESS" in result.stderr


def test_system_bus_honours_environment(dbus: PrivateBus, tmp_path: Path) -> None:
    """The default bus is the system bus at $DBUS_SYSTEM_BUS_ADDRESS."""

    async def main() -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=dbus.address)
        async with run_service(
            "bridge", python_command("hiomapbridge"), tmp_path, env=env
        ) as bridge:
            assert bridge.notified("READY=1") is not None
            bridge.signal(signal.SIGTERM)
            with trio.fail_after(10):
                await bridge.wait()

    trio.run(main)


async def test_sigterm_waits_for_real_delivery_of_protocol_reset(
    bus_address: str, tmp_path: Path
) -> None:
    """Held sendMessage reply for the PROTOCOL_RESET record: the process stays
    alive; released, it exits 0 promptly."""
    async with run_btbridged(bus_address) as bt:
        async with run_service(
            "bridge", bridge_argv(bus_address, "--shutdown-timeout", "60"), tmp_path
        ) as bridge:
            hold = bt.hold(lambda tx: tx.cmd == 0x35)
            bridge.signal(signal.SIGTERM)
            with trio.fail_after(10):
                await bt.wait_attention()
                await bridge.wait_notified("STOPPING=1")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bt.transact, *READ_EVENT)
                with trio.fail_after(10):
                    (held,) = await hold.wait_held()
                assert held.response is not None
                assert held.response.data == event_record(0x01)
                # The host does not have it yet: btbridged has not replied.
                # Prove the bridge is still alive by having it answer a request.
                flags = await bt.transact(0x06, 0x31)
                assert flags.data == b"\x02"
                assert bridge.process.returncode is None
                released_at = trio.current_time()
                hold.release()
            with trio.fail_after(10):
                assert await bridge.wait() == 0
            assert bridge.exited_at is not None
            assert bridge.exited_at - released_at < 2.0
            assert "the host holds PROTOCOL_RESET" in bridge.log()


async def test_host_never_fetches_exit_after_shutdown_timeout(
    bus_address: str, tmp_path: Path
) -> None:
    async with (
        run_btbridged(bus_address) as bt,
        run_service(
            "bridge", bridge_argv(bus_address, "--shutdown-timeout", "0.5"), tmp_path
        ) as bridge,
    ):
        sent = trio.current_time()
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await bridge.wait() == 0
        assert bridge.exited_at is not None
        assert 0.5 <= bridge.exited_at - sent < 5
        assert bt.attention_count >= 1
        assert "did not fetch event 0x01 (PROTOCOL_RESET)" in bridge.log()


async def test_ready_after_initial_state_and_picks_up_hiomapd_later(
    bus_address: str, tmp_path: Path
) -> None:
    """READY=1 comes with hiomapd absent; when it appears, its state is read."""
    async with (
        run_btbridged(bus_address) as bt,
        run_service("bridge", bridge_argv(bus_address), tmp_path) as bridge,
    ):
        assert "hiomapd is not running" in bridge.log()
        async with scripted_hiomapd(bus_address):
            with trio.fail_after(10):
                await bt.wait_attention()
            response = await bt.transact(*READ_EVENT)
            assert response.data == event_record(0x81)
        bridge.signal(signal.SIGTERM)
        with trio.fail_after(10):
            await bt.wait_attention()
        await bt.transact(*READ_EVENT)
        with trio.fail_after(10):
            assert await bridge.wait() == 0


async def test_bus_lost_exits_nonzero_within_a_second(
    dbus: PrivateBus, tmp_path: Path
) -> None:
    async with run_service("bridge", bridge_argv(dbus.address), tmp_path) as bridge:
        killed = trio.current_time()
        dbus.kill()
        with trio.fail_after(5):
            status = await bridge.wait()
        assert status == 1
        assert bridge.exited_at is not None
        assert bridge.exited_at - killed < 1.0
        assert "connection to the bus lost" in bridge.log()


async def test_abstract_notify_socket_and_watchdog(
    bus_address: str, tmp_path: Path
) -> None:
    name = f"hiomapbridge-test-{os.getpid()}-{id(tmp_path)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name)
        env = dict(
            os.environ,
            NOTIFY_SOCKET="@" + name,
            WATCHDOG_USEC="200000",
            JOURNAL_STREAM="8:1234",
        )
        log_path = tmp_path / "bridge.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                bridge_argv(bus_address, "--shutdown-timeout", "0.3"),
                env=env,
                stderr=log_file,
                stdout=log_file,
            )
        try:
            states: list[str] = []
            with trio.fail_after(15):
                while states.count("WATCHDOG=1") < 3 or "READY=1" not in states:
                    states.append((await sock.recv(4096)).decode())
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                while "STOPPING=1" not in states:
                    states.append((await sock.recv(4096)).decode())
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert states[0] in ("READY=1", "WATCHDOG=1")
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if line]
    assert lines and all(line[:3] in ("<6>", "<7>", "<4>", "<3>") for line in lines)
    assert any(line.startswith("<6>") and "ready" in line for line in lines)
    assert any(line.startswith("<3>") and "did not fetch" in line for line in lines)


def test_python_dash_m_and_console_script_agree() -> None:
    script = Path(sys.executable).with_name("hiomapbridge")
    if not script.exists():
        pytest.skip("the console script is not installed beside this interpreter")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"hiomapbridge {__version__}"
