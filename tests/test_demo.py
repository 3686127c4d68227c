"""The demo (``hiomapbridge-demo``) runs in the suite, on a small image."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from hiomapbridge.demo import main, parse_size, percentile

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


def test_given_flash_file_is_served_and_never_modified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image = tmp_path / "pnor.img"
    data = bytes(range(256)) * (128 << 10 >> 8)  # 128 KiB
    image.write_bytes(data)
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
    for option in ("--scenario", "--flash", "--flash-size", "--workdir", "--keep"):
        assert option in result.stdout
    assert "--inject-fault" not in result.stdout  # test-only, hidden
