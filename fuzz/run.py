"""Run every harness in fuzz/ for a share of a time budget; record speed.

    python fuzz/run.py [SECONDS] [--out fuzz-results/results.json]

SECONDS (default: $FUZZ_SECONDS or 60) is the total, split evenly between
the harnesses.  With atheris (coverage-guided libFuzzer) each harness runs
as ``python fuzz/<harness>.py -max_total_time=N``; without atheris, a
hypothesis loop feeds the same ``test_one_input`` random bytes for the same
time (``engine: hypothesis`` in the results).  Prints and writes, per
harness, the total executed and executions per second.  Exits non-zero if
any harness found a crash (atheris leaves ``crash-*`` files in the
artifacts directory).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HARNESSES = ["fuzz_requests", "fuzz_fold", "fuzz_wire"]
DONE = re.compile(r"Done (\d+) runs in (\d+) second")
STAT = re.compile(r"#(\d+)\s+\w+.*exec/s: (\d+)")


def run_atheris(name: str, seconds: int, artifacts: Path) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / f"{name}.py"),
            f"-max_total_time={seconds}",
            f"-artifact_prefix={artifacts}/{name}-",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
        check=False,
    )
    wall = time.monotonic() - start
    out = proc.stderr + proc.stdout
    total = 0
    if done := DONE.findall(out):
        total = int(done[-1][0])
    elif stats := STAT.findall(out):
        total = int(stats[-1][0])
    final = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    if final:
        total = int(final.group(1))
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", out)
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
    return {
        "harness": name,
        "engine": "atheris",
        "seconds": round(wall, 2),  # wall clock, including instrumentation
        "fuzzing_seconds": seconds,
        "executed": total,
        "exec_per_second": int(rate.group(1)) if rate else round(total / seconds),
        "ok": proc.returncode == 0,
    }


def run_hypothesis(name: str, seconds: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sys.path.insert(0, str(HERE.parent))
    module = importlib.import_module(f"fuzz.{name}")
    count = 0
    deadline = time.monotonic() + seconds

    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=256))
    def loop(data: bytes) -> None:
        nonlocal count
        if time.monotonic() > deadline:
            return
        count += 1
        module.test_one_input(data)

    start = time.monotonic()
    ok = True
    while time.monotonic() < deadline:
        try:
            loop()
        except Exception as exc:  # a failure: report it, stop this harness
            print(f"{name}: {exc!r}", file=sys.stderr)
            ok = False
            break
    wall = time.monotonic() - start
    return {
        "harness": name,
        "engine": "hypothesis",
        "seconds": round(wall, 2),
        "executed": count,
        "exec_per_second": round(count / wall) if wall else 0,
        "ok": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "seconds", nargs="?", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60))
    )
    parser.add_argument("--out", type=Path, default=Path("fuzz-results/results.json"))
    args = parser.parse_args()
    share = max(1, args.seconds // len(HARNESSES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    have_atheris = importlib.util.find_spec("atheris") is not None
    results = []
    for name in HARNESSES:
        if have_atheris:
            result = run_atheris(name, share, args.out.parent.resolve())
        else:
            result = run_hypothesis(name, share)
        results.append(result)
        print(
            f"{name}: {result['engine']}, {result['executed']} executed in "
            f"{result['seconds']} s wall (start-up included), "
            f"{result['exec_per_second']} exec/s while fuzzing"
            f"{'' if result['ok'] else ' FAILED'}",
            flush=True,
        )
    total = sum(r["executed"] for r in results)
    summary = {"total_executed": total, "budget_seconds": args.seconds, "runs": results}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"total executed: {total}; results in {args.out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
