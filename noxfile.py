"""Sessions for hiomapbridge. Run them through ``bash .ci/nox`` (see README).

``bash .ci/nox -l`` lists every session; the ones marked ``*`` run by default.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.10.16"

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.12", "3.13"]
DEFAULT_PYTHON = "3.11"  # the floor of requires-python and this machine's python3
# Wall-clock cap on one pytest run: a hung test must fail the cell with a
# traceback (SIGINT first, SIGKILL 30 s later), not eat CI's 90 minutes.
PYTEST_TIMEOUT = os.environ.get("HIOMAPBRIDGE_PYTEST_TIMEOUT", "900")
PACKAGE_PATHS = ["hiomapbridge", "tests", "fuzz", "bench", "noxfile.py"]
REPORTED = (
    "trio",
    "jeepney",
    "attrs",
    "pytest",
    "pytest-trio",
    "pytest-timeout",
    "hypothesis",
)

# uv makes venv creation and installs fast; virtualenv is the fallback.
nox.options.default_venv_backend = "uv|virtualenv"
# A missing interpreter skips its session with a warning instead of failing
# the run. nox flips this default to True when CI is set; a value set here wins
# over that default (only the command line wins over the noxfile).
nox.options.error_on_missing_interpreters = False
# Never download interpreters: the machines here reach no such host, and a
# cell we cannot run should be skipped, not fetched.
nox.options.download_python = "never"
nox.options.reuse_venv = "yes"
nox.options.sessions = [
    "lint",
    "typecheck",
    f"tests-{DEFAULT_PYTHON}(deps='latest')",
    f"tests-{DEFAULT_PYTHON}(deps='lowest')",
]

# Under a uv backend, never let uv fetch a Python behind our back either.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


def _lowest_constraints(session: nox.Session) -> Path:
    """Pin every direct dependency (runtime + test extra) to its lower bound.

    Derived from pyproject.toml by uv's lowest-direct resolution, so the
    bounds we publish are the bounds we test; there is no hand-kept list.
    """
    # Not session.create_tmp(): that also points TMPDIR into .nox/, and the
    # tests' dbus-daemon sockets would then exceed the 108-byte sun_path limit.
    out = Path(session.virtualenv.location) / "lowest-constraints.txt"
    session.run_install(
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "test",
        "--resolution",
        "lowest-direct",
        "--python",
        str(Path(session.bin) / "python"),
        "--no-header",
        "--quiet",
        "--output-file",
        str(out),
    )
    pins = [
        line.strip()
        for line in out.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    session.log("lowest-direct pins: " + ", ".join(pins))
    return out


def _dependency_group(group: str) -> list[str]:
    return list(nox.project.dependency_groups(nox.project.load_toml(), group))


@nox.session(python=PYTHONS)
@nox.parametrize("deps", ["latest", "lowest"])
def tests(session: nox.Session, deps: str) -> None:
    """Run pytest (posargs pass through) on latest or lowest-direct deps."""
    if session.venv_backend != "uv" and deps == "lowest":
        session.skip("the lowest-deps cell needs uv (pip cannot resolve lowest)")
    if deps == "lowest":
        constraints = _lowest_constraints(session)
        session.install("-c", str(constraints), "-e", ".[test]")
    else:
        session.install("--upgrade", "-e", ".[test]")
    # Say which versions this cell really tests.
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m; "
        f"print(', '.join(f'{{d}} {{m.version(d)}}' for d in {REPORTED!r}))",
    )
    timeout = shutil.which("timeout")
    guard = (
        [timeout, "--signal=INT", "--kill-after=30", PYTEST_TIMEOUT] if timeout else []
    )
    session.run(*guard, "pytest", *session.posargs, external=True)


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the package, tests and noxfile."""
    session.install(*_dependency_group("lint"))
    session.run("ruff", "check", *PACKAGE_PATHS)
    session.run("ruff", "format", "--check", "--diff", *PACKAGE_PATHS)


@nox.session(python=DEFAULT_PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, its tests, the bench and the fuzz
    harnesses (jeepney has an override: no hints)."""
    session.install("-e", ".[test]", "nox", *_dependency_group("typecheck"))
    args = session.posargs or ["hiomapbridge", "tests", "bench", "fuzz", "noxfile.py"]
    session.run("mypy", "--strict", *args)


@nox.session(python=DEFAULT_PYTHON)
def demo(session: nox.Session) -> None:
    """End-to-end demo: real skiboot firmware in QEMU as the host (the
    simulated host where QEMU cannot run), hiomapd's emulator, ipmid's
    stand-in and the bridge on a private bus. Arguments after -- replace the
    default ``--host qemu``."""
    session.install(".")
    session.run("hiomapbridge-demo", *(session.posargs or ["--host", "qemu"]))


SDIST_MUST_CONTAIN = ("hiomapbridge/", "tests/", "contrib/", "docs/")


@nox.session(python=DEFAULT_PYTHON)
def build(session: nox.Session) -> None:
    """Build sdist + wheel, check the sdist, smoke-test the wheel's scripts."""
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    if session.venv_backend == "uv":
        session.run("uv", "build", "--out-dir", str(dist), str(ROOT))
    else:
        session.install(*_dependency_group("build"))
        session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT))

    (sdist,) = dist.glob("hiomapbridge-*.tar.gz")
    (wheel,) = dist.glob("hiomapbridge-*.whl")

    with tarfile.open(sdist) as tar:
        # members look like "hiomapbridge-0.1.0/tests/test_x.py"
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [p for p in SDIST_MUST_CONTAIN if not any(n.startswith(p) for n in names)]
    if missing:
        session.error(f"{sdist.name} lacks {', '.join(missing)}")
    has = ", ".join(SDIST_MUST_CONTAIN)
    session.log(f"{sdist.name}: {len(names)} files, has {has}")

    with zipfile.ZipFile(wheel) as whl:
        stray = [n for n in whl.namelist() if n.startswith(("tests/", "contrib/"))]
    if stray:
        session.error(f"{wheel.name} should not ship {stray}")

    # A fresh venv that has only the wheel (and its runtime deps), run from a
    # directory outside the source tree so nothing is imported from it.
    venv = Path(session.virtualenv.location) / "wheel-venv"
    shutil.rmtree(venv, ignore_errors=True)
    if session.venv_backend == "uv":
        session.run("uv", "venv", "--quiet", "--python", DEFAULT_PYTHON, str(venv))
        session.run(
            "uv", "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
            str(wheel),
        )  # fmt: skip
    else:
        session.run("python", "-m", "venv", str(venv))
        session.run(str(venv / "bin/python"), "-m", "pip", "install", str(wheel))
    bin_dir = venv / "bin"
    with session.chdir(venv):
        for argv in (
            ("hiomapbridge", "--version"),
            ("hiomapbridge-sim", "--help"),
            ("hiomapbridge-demo", "--help"),
        ):
            session.run(str(bin_dir / argv[0]), *argv[1:], external=True)


@nox.session(python=DEFAULT_PYTHON)
def soak(session: nox.Session) -> None:
    """Randomised shutdown soak over the full stack (default 1000 trials).

    ``bash .ci/nox -s soak -- 200`` runs 200; further posargs pass through
    (``-- 50 --seed 7``, ``-- 1 --replay SEED``). Writes
    soak-results/results.json.
    """
    session.install("-e", ".")
    trials, *rest = session.posargs or ["1000"]
    session.run(
        "python",
        "-m",
        "hiomapbridge.sim.soak",
        "--trials",
        trials,
        "--results",
        str(ROOT / "soak-results" / "results.json"),
        *rest,
    )


@nox.session(python=DEFAULT_PYTHON)
def fuzz(session: nox.Session) -> None:
    """atheris harnesses (fuzz/) for a run length in seconds: posargs[0] or
    $FUZZ_SECONDS, default 60 in total; writes fuzz-results/results.json
    (executions per second and total executed).  Without atheris the same
    harnesses run under a hypothesis loop (see fuzz/run.py)."""
    session.install("-e", ".", "atheris", "hypothesis")
    seconds = (
        session.posargs[0] if session.posargs else os.environ.get("FUZZ_SECONDS", "60")
    )
    session.run("python", "fuzz/run.py", seconds, "--out", "fuzz-results/results.json")


@nox.session(python=DEFAULT_PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark harness (issues 6 and 12: the emulator rig and the host-mode
    comparison, whose C peers need cc and libsystemd-dev): writes
    bench-results/ (posargs pass through, e.g. ``-- --quick`` or
    ``-- --repeat 5``)."""
    session.install("-e", ".", "matplotlib")
    try:
        session.install("py-spy")
    except nox.command.CommandFailed:
        session.log("py-spy not installable here: the profile falls back to cProfile")
    session.run("python", "bench/run.py", *session.posargs)
