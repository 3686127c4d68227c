"""The demo (``hiomapbridge-demo``) runs in the suite, on a small image."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hiomapbridge.demo import (
    BtbridgedSetup,
    BtSetup,
    Demo,
    Options,
    _forwarded,
    main,
    parse_size,
    percentile,
)
from hiomapbridge.sim.btbridged import Stamp, Transaction
from hiomapbridge.sim.ipmid import ExecuteCall

SMALL = "256K"


def run_demo(
    capsys: pytest.CaptureFixture[str], workdir: Path, *args: str
) -> tuple[int, str]:
    status = main(["--flash-size", SMALL, "--workdir", str(workdir), *args])
    captured = capsys.readouterr()
    return status, captured.out


def test_clean_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = run_demo(capsys, tmp_path / "w")
    assert status == 0, out
    assert "[ok  ] boot read: SHA-256 matches the image" in out
    assert "[ok  ] flash file matches the model after write + erase + flush" in out
    assert "[ok  ] host held PROTOCOL_RESET before the bridge exited" in out
    assert "SIGTERM -> hiomapd" in out
    assert "fetched event 0x01 (PROTOCOL_RESET)  <== host holds PROTOCOL_RESET" in out
    assert "HIOMAP round trip, all commands" in out
    assert "[ok  ] every host request was answered with cc 0x00" in out
    assert "exit codes: hiomapd 0, hiomapbridge 0" in out
    assert "RESULT: PASS" in out
    # The timeline is in time order and the reset is held before the exit.
    timeline = out[out.index("timeline") : out.index("== summary ==")]
    assert timeline.index("<== host holds") < timeline.index("bridge   exited")
    assert (tmp_path / "w" / "hiomapbridge.log").exists()


def test_crash_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = run_demo(capsys, tmp_path / "w", "--scenario", "crash")
    assert status == 0, out
    assert "SIGKILL -> hiomapd" in out
    assert "hiomapd  exited, status -9 (SIGKILL)" in out
    assert (
        "[ok  ] host learned of the crash (0x01, DAEMON_READY clear) from the bridge"
        in out
    )
    assert "delivered by its crash detection" in out
    assert "hiomapd vanished with DAEMON_READY set" in out
    assert "RESULT: PASS" in out


def given_flash(tmp_path: Path) -> tuple[Path, bytes]:
    """A 128 KiB flash image of the user's, and its bytes."""
    image = tmp_path / "pnor.img"
    data = bytes(range(256)) * (128 << 10 >> 8)
    image.write_bytes(data)
    return image, data


def test_given_flash_file_is_served_and_never_modified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image, data = given_flash(tmp_path)
    status, out = run_demo(
        capsys, tmp_path / "w", "--flash", str(image), "--window-size", "16K", "-q"
    )
    assert status == 0, out
    assert out.strip().splitlines() == ["RESULT: PASS (all 7 checks, scenario clean)"]
    assert image.read_bytes() == data
    # The demo wrote to its copy, not to the user's file.
    assert hashlib.sha256((tmp_path / "w" / "flash.img").read_bytes()).digest() != (
        hashlib.sha256(data).digest()
    )


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        ("write", ["flash file matches the model"]),
        ("read", ["boot read: SHA-256 matches the image", "flash file matches"]),
    ],
)
def test_checks_catch_a_corrupted_flash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fault: str, failing: list[str]
) -> None:
    status, out = run_demo(capsys, tmp_path / "w", "--inject-fault", fault)
    assert status == 1, out
    for check in failing:
        assert f"[FAIL] {check}" in out
    assert "1 byte(s) differ" in out
    assert "RESULT: FAIL" in out
    assert f"logs are in {(tmp_path / 'w').resolve()}" in out
    assert "--- last " in out and "lines of hiomapbridge.log ---" in out


def test_bad_flash_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\0" * 1000)
    assert main(["--flash", str(odd)]) == 2
    assert "not a positive multiple of 4K" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--flash-size", "1000"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--host", "kcs"])
    assert exc.value.code == 2
    assert "invalid choice: 'kcs'" in capsys.readouterr().err


def test_helpers() -> None:
    assert parse_size("256K") == 256 << 10
    assert parse_size("0x2000") == 0x2000
    assert parse_size("8M") == 8 << 20
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_help_as_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hiomapbridge.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hiomapbridge-demo")
    for option in (
        "--scenario",
        "--host {btbridged,bt,qemu}",
        "--flash",
        "--flash-size",
        "--workdir",
        "--keep",
    ):
        assert option in result.stdout
    assert "--inject-fault" not in result.stdout  # test-only, hidden


# -- --host bt: the bridge owns the BT interface, ipmid beside it ---------------


def _section(out: str, start: str, end: str) -> str:
    return out[out.index(start) : out.index(end, out.index(start))]


def _summary_row(out: str, command: str, by: str) -> list[str]:
    """The columns after ``command`` in its summary row answered by ``by``:
    [by, count, failed, cc, p50, p99, max]."""
    summary = out[out.index("== summary ==") :]
    pattern = re.compile(rf"^  {re.escape(command)} +{by} +\d+ .*$", re.MULTILINE)
    match = pattern.search(summary)
    assert match is not None, f"no row {command!r} by {by!r} in:\n{summary}"
    return match.group(0)[2 + len(command) :].split()


def test_bt_clean_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = run_demo(capsys, tmp_path / "w", "--host", "bt")
    assert status == 0, out
    assert "scenario clean, host bt" in out.splitlines()[0]
    assert f"listening on {(tmp_path / 'w').resolve() / 'bt.sock'}" in out
    assert "hiomapbridge (--host bt:SOCK, owns the BT interface): pid" in out
    for check in (
        "Get BT Interface Capabilities answered by the bridge: 1 request(s) "
        "outstanding, 64-byte buffers, 3 s transaction time, 1 retry(ies)",
        "Get Device ID forwarded to ipmid, on the system interface channel",
        "boot read: SHA-256 matches the image",
        "flash file matches the model after write + erase + flush",
        "host fetched ipmid's SoftOff through the bridge: record "
        "5555c0000000000000003a0400ffffff",
        "Chassis Control (power down) forwarded to ipmid: cc 0x00; ipmid acted on 0x00",
        "host held PROTOCOL_RESET before the bridge exited",
        "exit codes: hiomapd 0 after SIGTERM, hiomapbridge 0 after SIGTERM",
        "every host request was answered with cc 0x00",
        "every BT frame from the bridge was well formed",
    ):
        assert f"[ok  ] {check}" in out, check
    assert "RESULT: PASS (all 11 checks, scenario clean, host bt)" in out

    # ipmid's SoftOff: its setAttention reaches the host as SMS_ATN on the
    # seam, the flags come from the bridge, the record from ipmid.
    soft_off = _section(out, "timeline (ms since ipmid queued SoftOff", "== shutdown")
    order = [
        "ipmid    queued SoftOff",
        "ipmid    setAttention() on org.openbmc.HostIpmi (owned by the bridge)",
        "host     SMS_ATN (the bridge raised it on the BT seam)",
        "host     Get Message Flags: cc 0x00, answered by bridge",
        "host     Read Event Message Buffer: cc 0x00, answered by ipmid",
        "host     holds SoftOff (record 0x04 0x00)",
        "host     Chassis Control (power down): cc 0x00, answered by ipmid",
    ]
    positions = [soft_off.index(line) for line in order]
    assert positions == sorted(positions), soft_off

    # The shutdown: the host fetches PROTOCOL_RESET over the seam (from the
    # bridge) before the bridge exits.
    shutdown = _section(out, "timeline (ms since the first signal", "== summary ==")
    order = [
        "demo     SIGTERM -> hiomapd",
        "host     SMS_ATN (the bridge raised it on the BT seam)",
        "host     Read Event Message Buffer: cc 0x00, answered by bridge",
        "fetched event 0x01 (PROTOCOL_RESET)  <== host holds PROTOCOL_RESET",
        "bridge   exited, status 0",
    ]
    positions = [shutdown.index(line) for line in order]
    assert positions == sorted(positions), shutdown
    assert shutdown.index("<== host holds") < shutdown.index(
        "demo     SIGTERM -> hiomapbridge"
    )
    assert "answered by ipmid" not in shutdown

    # The summary says who answered what.
    assert "answered by" in _section(out, "== summary ==", "HIOMAP ACK")

    def row(command: str, by: str) -> list[str]:
        """by, count, failed, cc (the latencies vary)."""
        return _summary_row(out, command, by)[:4]

    assert row("Get Device ID", "ipmid") == ["ipmid", "1", "0", "0x00"]
    assert row("Chassis Control (power down)", "ipmid") == ["ipmid", "1", "0", "0x00"]
    assert row("Get BT Interface Capabilities", "bridge") == [
        "bridge",
        "1",
        "0",
        "0x00",
    ]
    assert row("Read Event Message Buffer", "ipmid") == ["ipmid", "1", "0", "0x00"]
    by_bridge = row("Read Event Message Buffer", "bridge")
    assert int(by_bridge[1]) >= 2 and by_bridge[2:] == ["0", "0x00"]  # 0x81.., 0x01
    assert row("forwarded to ipmid, all", "ipmid") == ["ipmid", "3", "0", "0x00"]
    assert int(row("HIOMAP round trip, all", "bridge")[1]) >= 8
    assert len(_summary_row(out, "Get Device ID", "ipmid")) == 7  # + p50, p99, max
    assert not re.search(r"^  HIOMAP \S+ +ipmid", out, re.MULTILINE)
    assert not re.search(r"^  Get Message Flags +ipmid", out, re.MULTILINE)
    assert (
        "ipmid: 3 execute calls on channel(s) 15; its host commands: SoftOff "
        "delivered; its records the host fetched: SoftOff (0x04 0x00); Chassis "
        "Control acted on: 0x00" in out
    )
    assert "1 connection(s), 0 framing violations" in out
    assert "exit codes: hiomapd 0, hiomapbridge 0" in out
    log = (tmp_path / "w" / "hiomapbridge.log").read_text()
    assert "host connected on" in log and "bt.sock" in log


def test_bt_crash_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = run_demo(
        capsys, tmp_path / "w", "--host", "bt", "--scenario", "crash"
    )
    assert status == 0, out
    assert (
        "[ok  ] host learned of the crash (0x01, DAEMON_READY clear) from the bridge"
        in out
    )
    assert "hiomapd vanished with DAEMON_READY set" in out
    assert "[ok  ] host fetched ipmid's SoftOff through the bridge" in out
    shutdown = _section(out, "timeline (ms since the first signal", "== summary ==")
    order = [
        "demo     SIGKILL -> hiomapd",
        "host     SMS_ATN (the bridge raised it on the BT seam)",
        "host     Read Event Message Buffer: cc 0x00, answered by bridge",
        "fetched event 0x01 (PROTOCOL_RESET)  <== host holds PROTOCOL_RESET",
        "demo     SIGTERM -> hiomapbridge",
        "bridge   exited, status 0",
    ]
    positions = [shutdown.index(line) for line in order]
    assert positions == sorted(positions), shutdown
    assert "RESULT: PASS (all 12 checks, scenario crash, host bt)" in out


def test_bt_quiet_with_a_given_flash_and_small_windows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image, data = given_flash(tmp_path)
    status, out = run_demo(
        capsys,
        tmp_path / "w",
        *("--host", "bt", "--flash", str(image), "--window-size", "16K", "-q"),
    )
    assert status == 0, out
    assert out.strip().splitlines() == [
        "RESULT: PASS (all 12 checks, scenario clean, host bt)"
    ]
    assert image.read_bytes() == data


def test_bt_checks_catch_a_corrupted_flash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out = run_demo(
        capsys, tmp_path / "w", "--host", "bt", "--inject-fault", "write"
    )
    assert status == 1, out
    assert "[FAIL] flash file matches the model" in out
    assert "RESULT: FAIL (1 of 11 checks failed, scenario clean, host bt)" in out
    assert "lines of hiomapbridge.log ---" in out


def test_bt_socket_falls_back_to_a_short_directory(tmp_path: Path) -> None:
    """A workdir too long for a unix socket (main() refuses such a --workdir;
    the setup copes anyway) puts the socket in a short temporary directory."""
    deep = tmp_path / ("d" * 100)
    demo = Demo(_options(host="bt"), deep, io.StringIO(), io.StringIO())
    setup = demo.setup
    assert isinstance(setup, BtSetup)
    try:
        assert setup.socket.parent != deep
        assert len(str(setup.socket)) <= 107
        assert setup.bridge_args() == ["--host", f"bt:{setup.socket}"]
    finally:
        shutil.rmtree(setup.socket.parent)
    short = Demo(_options(host="bt"), tmp_path, io.StringIO(), io.StringIO())
    assert isinstance(short.setup, BtSetup)
    assert short.setup.socket == tmp_path / "bt.sock"
    default = Demo(_options(), tmp_path, io.StringIO(), io.StringIO())
    assert isinstance(default.setup, BtbridgedSetup)
    assert default.setup.bridge_args() == []


def _options(**overrides: object) -> Options:
    values: dict[str, object] = dict(
        scenario="clean",
        flash=None,
        flash_size=256 << 10,
        seed=0,
        window_size=None,
        workdir=None,
        keep=False,
        quiet=True,
        inject_fault=None,
    )
    values.update(overrides)
    return Options(**values)  # type: ignore[arg-type]


def test_forwarded_requests_are_matched_to_ipmid_s_calls_by_time() -> None:
    def tx(sent: float, done: float | None, cmd: int = 0x35) -> Transaction:
        t = Transaction(0, 0x06, 0, cmd, b"", Stamp(sent, sent))
        if done is not None:
            t.delivered_at = Stamp(done, done)
        return t

    def call(at: float, cmd: int = 0x35) -> ExecuteCall:
        return ExecuteCall(0x06, 0, cmd, b"", 15, ":1.1", {}, Stamp(at, at))

    own = tx(1.0, 2.0)  # answered by the bridge: no call in its window
    forwarded = tx(3.0, 4.0)
    other = tx(3.0, 4.0, cmd=0x01)  # a different command at the same time
    pending = tx(5.0, None)  # never answered: its window is open-ended
    twin_a, twin_b = tx(6.0, 7.0), tx(6.0, 7.0)  # one call each, in order
    txs = [own, forwarded, other, pending, twin_a, twin_b]
    calls = [call(3.5), call(3.6, cmd=0x01), call(8.0), call(6.5), call(6.6)]
    matched = _forwarded(txs, calls)
    assert matched == {
        id(forwarded): calls[0],
        id(other): calls[1],
        id(pending): calls[2],
        id(twin_a): calls[3],
        id(twin_b): calls[4],
    }
    assert id(own) not in matched
