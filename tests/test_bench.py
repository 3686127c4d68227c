"""The benchmark harness still works (``bench/run.py --quick``).

Asserts only that it runs end to end and writes its outputs with every key;
nothing here is about speed (see docs/performance.md for the numbers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "run.py"

KEYS = {
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
    "bt_vs_btbridged_p50_target",
    "bt_vs_btbridged_p50_met",
}

#: The host-mode comparison's keys (bench/hostmodes.py: C peers), present
#: when bench/peers.c can be built here.
HOSTMODE_KEYS = {
    "hostmodes_btbridged_p50_us",
    "hostmodes_btbridged_p99_us",
    "hostmodes_bt_p50_us",
    "hostmodes_bt_p99_us",
    "hostmodes_direct_p50_us",
    "bt_vs_btbridged_p50_ratio",
    "bt_vs_btbridged_overhead_share",
    "hostmodes_bridge_cpu_us_per_command_btbridged",
    "hostmodes_bridge_cpu_us_per_command_bt",
    "bt_vs_btbridged_p50_ratio_min",
    "bt_vs_btbridged_p50_ratio_max",
}


#: The same with the BMC side on one CPU: present with two CPUs or more.
ONE_BMC_CPU_KEYS = {
    "hostmodes_one_bmc_cpu_btbridged_p50_us",
    "hostmodes_one_bmc_cpu_bt_p50_us",
    "hostmodes_one_bmc_cpu_direct_p50_us",
    "bt_vs_btbridged_p50_ratio_one_bmc_cpu",
    "bt_vs_btbridged_overhead_share_one_bmc_cpu",
}


def peers_buildable() -> bool:
    """Whether bench/peers.c can be compiled here ($CC or cc, and
    libsystemd), as bench/hostmodes.py's build_peers does it."""
    if not (HARNESS.parent / "peers.c").exists():
        return False
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return False
    if shutil.which("pkg-config") is None:
        return False
    probe = subprocess.run(["pkg-config", "--exists", "libsystemd"], check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not HARNESS.exists(), reason="bench/ is not in this tree")
@pytest.mark.timeout(240)
def test_quick_bench_writes_all_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--quick",
            "--profiler",
            "cprofile",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    results = json.loads((out / "results.json").read_text())
    compared = peers_buildable()
    pinned = compared and len(os.sched_getaffinity(0)) >= 2
    expected = KEYS | (HOSTMODE_KEYS if compared else set())
    assert set(results) == expected | (ONE_BMC_CPU_KEYS if pinned else set())
    for key, value in results.items():
        assert isinstance(value, int | float), key
        assert value == value, f"{key} is NaN"
    # The emulator rig's bt: bridge ran; its ratio is the two medians'.
    assert results["bt_roundtrip_p50_us"] > 0 and results["roundtrip_p50_us"] > 0
    ratio = results["bt_roundtrip_p50_us"] / results["roundtrip_p50_us"]
    assert abs(results["bt_vs_btbridged_p50_ratio_emulator"] - ratio) < 0.01
    assert results["bt_vs_btbridged_p50_target"] == 0.6
    table = (out / "results.md").read_text()
    runs = json.loads((out / "runs.json").read_text())
    if compared:
        # Both host modes ran through real bridges and the C peers; the
        # ratio is the two medians' (one run), and "met" follows from it.
        bt, btbridged = (
            results["hostmodes_bt_p50_us"],
            results["hostmodes_btbridged_p50_us"],
        )
        assert bt > 0 and btbridged > 0
        assert abs(results["bt_vs_btbridged_p50_ratio"] - bt / btbridged) < 0.01
        direct = results["hostmodes_direct_p50_us"]
        share = (bt - direct) / (btbridged - direct)
        assert abs(results["bt_vs_btbridged_overhead_share"] - share) < 0.01
        assert results["bt_vs_btbridged_p50_met"] is (
            results["bt_vs_btbridged_p50_ratio"] <= 0.6
        )
        assert runs["host_modes_unavailable"] is None
        if pinned:
            one = runs["host_modes_one_bmc_cpu"][0]
            assert results["bt_vs_btbridged_p50_ratio_one_bmc_cpu"] == round(
                one["bt_vs_btbridged_p50_ratio"], 3
            )
        assert runs["host_modes"][0]["hostmodes_stray_frames"] == {
            "btbridged": 0,
            "bt": 0,
        }
    else:
        assert results["bt_vs_btbridged_p50_met"] is False
        assert runs["host_modes_unavailable"] in table
    for key in set(results) - {"bt_vs_btbridged_p50_met"}:
        assert f"`{key}`" in table
    assert runs["runs"] and runs["soak"]["rss_series_kb"]
    assert runs["runs"][0]["commands"] == 300
    assert runs["profile"]["split_percent"]
    assert runs["profile_bt"]["split_percent"]
    assert (out / "profile-summary.txt").exists()
    assert (out / "profile-bt-summary.txt").read_text().startswith("bt: mode")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")


def load_harness() -> object:
    if str(HARNESS.parent) not in sys.path:  # run.py imports hostmodes.py
        sys.path.insert(0, str(HARNESS.parent))
    spec = importlib.util.spec_from_file_location("bench_run", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not HARNESS.exists(), reason="bench/ is not in this tree")
def test_pyspy_summary_charges_socket_lines_to_socket_io(tmp_path: Path) -> None:
    """A sample on a line calling sock.send/recv is socket I/O (the syscall,
    charged by py-spy to that line); a codec frame anywhere wins; else the
    innermost categorised frame decides."""
    harness: Any = load_harness()
    src = tmp_path / "hiomapbridge" / "dbus.py"
    src.parent.mkdir()
    src.write_text("def send_raw(self, data):\n    sent = self._sock.send(data)\n")
    codec = tmp_path / "hiomapbridge" / "wire.py"
    codec.write_text("def decode(buf):\n    pass\n")
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"run ({src}:1);send_raw ({src}:2) 30\n"
        f"run ({src}:1);send_raw ({src}:1) 50\n"
        f"run ({src}:2);decode ({codec}:2) 20\n"
    )
    split = harness.summarise_pyspy(raw)["split_percent"]
    assert split["socket I/O"] == 30.0
    assert split["our logic"] == 50.0
    assert split["D-Bus encode/decode"] == 20.0


@pytest.mark.skipif(not HARNESS.exists(), reason="bench/ is not in this tree")
def test_peers_missing_compiler_is_a_reason_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a compiler the host-mode comparison is skipped with a reason
    (the bench then reports the target as not met), never a traceback."""
    harness: Any = load_harness()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert harness.build_peers(tmp_path) == "no C compiler (cc)"


@pytest.mark.skipif(not peers_buildable(), reason="no cc or libsystemd here")
def test_peers_build_and_refuse_bad_arguments(tmp_path: Path) -> None:
    harness: Any = load_harness()
    binary = harness.build_peers(tmp_path)
    assert isinstance(binary, Path), binary

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args], capture_output=True, text=True, timeout=10
        )

    proc = run("btbridged", "unix:path=/nonexistent")  # no SEAM
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = run("hiomapd", "unix:path=/nonexistent")
    assert proc.returncode == 1 and "connecting to the bus" in proc.stderr
