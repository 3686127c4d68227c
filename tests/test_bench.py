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
    table = (out / "results.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in table
    runs = json.loads((out / "runs.json").read_text())
    assert runs["runs"] and runs["soak"]["rss_series_kb"]
    assert runs["profile"]["split_percent"]
    assert (out / "profile-summary.txt").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")
