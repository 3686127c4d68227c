"""The benchmark harness still works (``bench/run.py --quick``).

Asserts only that it runs end to end and writes its outputs with every key;
nothing here is about speed (see docs/performance.md for the numbers).
"""

from __future__ import annotations

import importlib.util
import json
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
    "bt_vs_btbridged_p50_ratio",
    "bt_bridge_cpu_us_per_command",
    "bt_vs_btbridged_p50_ratio_min",
    "bt_vs_btbridged_p50_ratio_max",
    "bt_vs_btbridged_p50_target",
    "bt_vs_btbridged_p50_met",
}


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
    assert set(results) == KEYS
    for key, value in results.items():
        assert isinstance(value, int | float), key
        assert value == value, f"{key} is NaN"
    # Both modes ran through real bridges: every round trip took time, and
    # the ratio is the two medians' (one run, so no rounding across runs).
    assert results["bt_roundtrip_p50_us"] > 0 and results["roundtrip_p50_us"] > 0
    ratio = results["bt_roundtrip_p50_us"] / results["roundtrip_p50_us"]
    assert abs(results["bt_vs_btbridged_p50_ratio"] - ratio) < 0.01
    assert results["bt_vs_btbridged_p50_target"] == 0.6
    assert results["bt_vs_btbridged_p50_met"] is (
        results["bt_vs_btbridged_p50_ratio"] <= 0.6
    )
    table = (out / "results.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in table
    runs = json.loads((out / "runs.json").read_text())
    assert runs["runs"] and runs["soak"]["rss_series_kb"]
    assert runs["runs"][0]["commands"] == 300
    assert runs["profile"]["split_percent"]
    assert runs["profile_bt"]["split_percent"]
    assert (out / "profile-summary.txt").exists()
    assert (out / "profile-bt-summary.txt").read_text().startswith("bt: mode")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")


def load_harness() -> object:
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
