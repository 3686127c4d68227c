"""Randomised shutdown soak: N trials over the full stack.

Each trial runs, on a private dbus-daemon shared by the trials of one job:
the hiomapd emulator (in-process, on its own bus connection), the btbridged
stand-in with a skiboot-like host client, and ``python -m hiomapbridge`` as
a real subprocess receiving a real signal.  The trial's plan is drawn from
its own seed: the host's fetch delay and BT write delay, what hiomapd does
(clean stop, crash, keeps running) and when the signal comes relative to
hiomapd's PropertiesChanged and to the host's fetch, an occasional repeated
SIGTERM, and sometimes a host that stops responding.

A trial passes when the bridge exited 0 and either the host held
PROTOCOL_RESET (0x01 set, DAEMON_READY clear in the last event it received)
before the bridge exited, or (only for an unresponsive host) the bridge
logged the deadline path ("did not fetch") and exited within
``--shutdown-timeout`` plus a margin.

    python -m hiomapbridge.sim.soak --trials 1000 --seed 42
    python -m hiomapbridge.sim.soak --replay 3735928559   # one trial's seed
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import trio

from hiomapbridge.dbus import open_bus
from hiomapbridge.ipmi import CMD_READ_EVENT_MESSAGE_BUFFER, NETFN_APP
from hiomapbridge.sim.btbridged import BtBridge, requests
from hiomapbridge.sim.hiomapd import Emulator, run_emulator
from hiomapbridge.sim.host import (
    DAEMON_READY,
    PROTOCOL_RESET,
    HiomapError,
    Host,
)
from hiomapbridge.sim.privatebus import private_bus
from hiomapbridge.sim.process import Service, python_command, run_service

log = logging.getLogger(__name__)

HiomapdAction = Literal["stop", "kill", "none"]
SignalTiming = Literal["before_hiomapd", "after_event", "during_fetch", "random"]
HostMode = Literal["responsive", "silent", "stuck"]

#: --shutdown-timeout for trials whose host keeps responding (never reached)
#: and for trials with an unresponsive host (always reached, so short).
RESPONSIVE_SHUTDOWN_TIMEOUT: Final = 10.0
UNRESPONSIVE_SHUTDOWN_TIMEOUT: Final = 1.0
#: How much later than its deadline the bridge may exit (signal delivery,
#: interpreter exit) before the trial fails.
EXIT_MARGIN: Final = 1.5
DEADLINE_LINE: Final = "shutdown: the host did not fetch event"
HOLDS_LINE: Final = "shutdown: the host holds PROTOCOL_RESET"

_HOST_MODES: Final[list[HostMode]] = ["responsive", "silent", "stuck"]
_is_read_event = requests(NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER)


@attrs.frozen
class TrialPlan:
    """Everything random about one trial, drawn from ``seed``."""

    index: int
    seed: int
    hiomapd: HiomapdAction
    timing: SignalTiming
    signum: int
    repeat_sigterm: bool
    host: HostMode
    fetch_delay: float  # host: SMS_ATN -> Get Message Flags
    write_delay: float  # btbridged: sendMessage -> BT write confirmed
    signal_delay: float  # "random" timing: signal this long after hiomapd acts
    host_reads: bool  # the host reads flash while the shutdown runs

    @property
    def shutdown_timeout(self) -> float:
        if self.host == "responsive":
            return RESPONSIVE_SHUTDOWN_TIMEOUT
        return UNRESPONSIVE_SHUTDOWN_TIMEOUT

    def describe(self) -> str:
        return (
            f"hiomapd={self.hiomapd} timing={self.timing} "
            f"signal={signal.Signals(self.signum).name}"
            f"{'+SIGTERM' if self.repeat_sigterm else ''} host={self.host} "
            f"fetch_delay={self.fetch_delay:.3f} write_delay={self.write_delay:.3f} "
            f"signal_delay={self.signal_delay:.3f} host_reads={self.host_reads}"
        )


def plan_trial(index: int, seed: int) -> TrialPlan:
    """The trial that ``seed`` stands for (the same seed, the same plan)."""
    rng = random.Random(seed)
    hiomapd: HiomapdAction = rng.choice(["stop", "stop", "kill", "none"])
    timing: SignalTiming = rng.choice(
        ["before_hiomapd", "after_event", "during_fetch", "random"]
    )
    host = rng.choices(_HOST_MODES, weights=[8, 1, 1])[0]
    return TrialPlan(
        index=index,
        seed=seed,
        hiomapd=hiomapd,
        timing=timing,
        signum=int(signal.SIGINT if rng.random() < 0.15 else signal.SIGTERM),
        repeat_sigterm=rng.random() < 0.2,
        host=host,
        fetch_delay=rng.choice([0.0, rng.uniform(0.0, 0.05), rng.uniform(0, 0.2)]),
        write_delay=rng.choice([0.0, 0.0, rng.uniform(0.0, 0.1)]),
        signal_delay=rng.uniform(0.0, 0.15),
        host_reads=rng.random() < 0.3,
    )


@attrs.define
class Observation:
    """What a trial saw, for :func:`judge`."""

    status: int | None
    signalled_at: float
    exited_at: float | None
    #: (trio time the host received it, event byte) for every HIOMAP event
    events: list[tuple[float, int]]
    log: str


@attrs.frozen
class Verdict:
    ok: bool
    outcome: str  # "reset-delivered", "deadline" or "FAILED"
    reason: str = ""


def judge(plan: TrialPlan, seen: Observation) -> Verdict:
    """Apply the soak's invariant to one trial (pure, unit-tested)."""
    if seen.status is None or seen.exited_at is None:
        return Verdict(False, "FAILED", "the bridge did not exit in time")
    if seen.status != 0:
        return Verdict(False, "FAILED", f"the bridge exited with {seen.status}")
    before_exit = [byte for when, byte in seen.events if when <= seen.exited_at]
    last = before_exit[-1] if before_exit else None
    holds_reset = (
        last is not None and bool(last & PROTOCOL_RESET) and not last & DAEMON_READY
    )
    took = seen.exited_at - seen.signalled_at
    limit = plan.shutdown_timeout + EXIT_MARGIN
    if holds_reset:
        if DEADLINE_LINE in seen.log:
            return Verdict(
                False, "FAILED", "host holds 0x01 but the bridge took the deadline"
            )
        if took > limit:
            return Verdict(False, "FAILED", f"exit took {took:.3f}s > {limit}s")
        return Verdict(True, "reset-delivered")
    last_text = "nothing" if last is None else f"{last:#04x}"
    if plan.host == "responsive":
        return Verdict(
            False,
            "FAILED",
            f"responsive host's last event before the exit was {last_text}",
        )
    if DEADLINE_LINE not in seen.log:
        return Verdict(
            False,
            "FAILED",
            f"host's last event {last_text} and no deadline line in the log",
        )
    if took > limit:
        return Verdict(False, "FAILED", f"deadline exit took {took:.3f}s > {limit}s")
    return Verdict(True, "deadline")


@attrs.define
class TrialResult:
    plan: TrialPlan
    verdict: Verdict
    duration: float
    shutdown: float | None
    log_tail: str = ""

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = attrs.asdict(self.plan)
        row["signal"] = signal.Signals(self.plan.signum).name
        row.update(
            ok=self.verdict.ok,
            outcome=self.verdict.outcome,
            reason=self.verdict.reason,
            duration=round(self.duration, 4),
            shutdown=None if self.shutdown is None else round(self.shutdown, 4),
        )
        if not self.verdict.ok:
            row["bridge_log_tail"] = self.log_tail
        return row


class _Gate:
    """Open/closed, with waiting for open."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        await self._open.wait()


async def _host_loop(host: Host, plan: TrialPlan, gate: _Gate) -> None:
    """skiboot's SMS_ATN handling, with the plan's fetch delay and a gate
    the trial closes to hold the host back (or for good: unresponsive)."""
    bt = host.bt
    while True:
        await bt.wait_attention()
        await gate.wait_open()
        if plan.fetch_delay:
            await trio.sleep(plan.fetch_delay)
        await gate.wait_open()
        await host.fetch_event()


async def _host_reads(host: Host) -> None:
    """Flash reads racing the shutdown; their errors are the host's business."""
    for _ in range(3):
        try:
            await host.read(0, 4096)
        except HiomapError:
            return


async def _hiomapd_act(emu: Emulator, action: HiomapdAction) -> None:
    if action == "stop":
        await emu.stop_cleanly()
    elif action == "kill":
        await emu.crash()
    else:
        await emu.force_window_reset()  # an event, hiomapd keeps serving


async def run_trial(plan: TrialPlan, bus_address: str, directory: Path) -> TrialResult:
    """Run one trial on the bus at ``bus_address``; never raises for a
    failed trial (the verdict says so)."""
    started = trio.current_time()
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    await trio.Path(directory / "hiomapbridge.log").unlink(missing_ok=True)
    argv = python_command(
        "hiomapbridge",
        "--bus", bus_address,
        "--shutdown-timeout", str(plan.shutdown_timeout),
        "--atn-interval", "0.5",
        "--log-level", "debug",
    )  # fmt: skip
    seen = Observation(None, started, None, [], "")
    bridge: Service | None = None
    error = ""
    try:
        async with AsyncExitStack() as stack:
            emu = await stack.enter_async_context(
                run_emulator(
                    bus_address,
                    directory / "hiomapd",
                    flash_size=1 << 20,
                    window_size=1 << 16,
                )
            )
            bus = await stack.enter_async_context(open_bus(bus_address))
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            bt = BtBridge(timeout=5.0, host_timeout=6.0)
            await nursery.start(bt.serve, bus)
            host = Host(bt, emu.lpc_path)
            gate = _Gate()
            nursery.start_soon(_host_loop, host, plan, gate)
            bridge = await stack.enter_async_context(
                run_service("hiomapbridge", argv, directory)
            )
            await _scenario(plan, emu, host, gate, bridge, seen, nursery)
    except* Exception as group:
        error = "; ".join(repr(exc) for exc in _leaves(group))
    if bridge is not None:
        seen.status = bridge.process.returncode
        seen.exited_at = bridge.exited_at if seen.status is not None else None
        seen.log = bridge.log()
    verdict = judge(plan, seen)
    if error:
        why = f"{verdict.reason}; " if verdict.reason else ""
        verdict = Verdict(False, "FAILED", f"{why}trial error: {error}")
    shutdown = None if seen.exited_at is None else seen.exited_at - seen.signalled_at
    return TrialResult(
        plan,
        verdict,
        trio.current_time() - started,
        shutdown,
        "" if verdict.ok else "\n".join(seen.log.splitlines()[-40:]),
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _scenario(
    plan: TrialPlan,
    emu: Emulator,
    host: Host,
    gate: _Gate,
    bridge: Service,
    seen: Observation,
    nursery: trio.Nursery,
) -> None:
    bt = host.bt
    # A slow BT write for every Read Event; removed where a hold must catch
    # the fetch (the first matching hook wins).
    slow = bt.delay(plan.write_delay, _is_read_event, count=None)
    with trio.fail_after(10):
        # start-up: 0x81 fetched, protocol negotiated, the result fetched
        await host.wait_until(lambda: bool(host.hiomap_events))
        await host.start()
        await host.wait_until(
            lambda: (
                bool(host.hiomap_events) and host.hiomap_events[-1].data == emu.events
            )
        )

    def record() -> None:
        seen.events = [
            (e.trio_time, e.data) for e in host.hiomap_events if e.data is not None
        ]

    async def send_signal() -> None:
        seen.signalled_at = trio.current_time()
        if plan.host == "silent":
            gate.close()  # the host stops answering SMS_ATN
        elif plan.host == "stuck":
            slow.remove()
            bt.hold(_is_read_event, count=None)  # BT writes never complete
        bridge.signal(plan.signum)
        if plan.host_reads:
            nursery.start_soon(_host_reads, host)
        if plan.repeat_sigterm:
            with trio.fail_after(5):
                await bridge.wait_notified("STOPPING=1")
            bridge.signal(signal.SIGTERM)

    with trio.fail_after(10):
        if plan.timing == "before_hiomapd":
            await send_signal()
            await bridge.wait_notified("STOPPING=1")
            await _hiomapd_act(emu, plan.hiomapd)
        elif plan.timing == "after_event":
            gate.close()  # the event must still wait when the signal comes
            count = bt.attention_count
            await _hiomapd_act(emu, plan.hiomapd)
            await bt.wait_until(lambda: bt.attention_count > count)
            await send_signal()
            await bridge.wait_notified("STOPPING=1")
            if plan.host != "silent":
                gate.open()
        elif plan.timing == "during_fetch":
            slow.remove()
            hold = bt.hold(_is_read_event, count=1)
            await _hiomapd_act(emu, plan.hiomapd)
            await hold.wait_held()
            await send_signal()
            await bridge.wait_notified("STOPPING=1")
            if plan.host != "stuck":
                hold.release()
        else:
            async with trio.open_nursery() as both:
                both.start_soon(_hiomapd_act, emu, plan.hiomapd)
                await trio.sleep(plan.signal_delay)
                await send_signal()
    with trio.fail_after(plan.shutdown_timeout + EXIT_MARGIN + 5):
        await bridge.wait()
    record()


# -- running many ------------------------------------------------------------


@attrs.define
class SoakReport:
    seed: int
    results: list[TrialResult]
    elapsed: float

    @property
    def failures(self) -> list[TrialResult]:
        return [r for r in self.results if not r.verdict.ok]

    def tally(self) -> dict[str, Any]:
        outcomes = Counter(r.verdict.outcome for r in self.results)
        scenarios = Counter(
            f"{r.plan.hiomapd}/{r.plan.timing}/{r.plan.host}/{r.verdict.outcome}"
            for r in self.results
        )
        n = len(self.results)
        return {
            "trials": n,
            "passed": n - len(self.failures),
            "failed": len(self.failures),
            "outcomes": dict(sorted(outcomes.items())),
            "scenarios": dict(sorted(scenarios.items())),
            "elapsed": round(self.elapsed, 2),
            "seconds_per_trial": round(self.elapsed / n, 3) if n else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "tally": self.tally(),
            "failures": [r.as_dict() for r in self.failures],
            "trials": [r.as_dict() for r in self.results],
        }


def trial_seeds(seed: int, trials: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(trials)]


async def run_soak(
    trials: int,
    seed: int,
    *,
    directory: Path | None = None,
    replay: Sequence[int] = (),
    progress: Callable[[TrialResult], None] | None = None,
) -> SoakReport:
    """Run ``trials`` trials (or exactly the ``replay`` seeds) on one private
    dbus-daemon, one after another (the peers own well-known names, so two
    trials cannot share a bus at once)."""
    seeds = list(replay) or trial_seeds(seed, trials)
    started = trio.current_time()
    results: list[TrialResult] = []
    with tempfile.TemporaryDirectory(prefix="soak-", dir=directory) as tmp:
        root = Path(tmp)
        with private_bus(root) as bus:
            for index, trial_seed in enumerate(seeds):
                plan = plan_trial(index, trial_seed)
                result = await run_trial(plan, bus.address, root / "trial")
                results.append(result)
                if progress is not None:
                    progress(result)
    return SoakReport(seed, results, trio.current_time() - started)


def _print_failure(result: TrialResult) -> None:
    plan = result.plan
    print(
        f"FAILED trial {plan.index} (replay with --replay {plan.seed}): "
        f"{result.verdict.reason}\n  {plan.describe()}\n"
        + "\n".join("  | " + line for line in result.log_tail.splitlines()),
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hiomapbridge.sim.soak",
        description="Randomised shutdown trials over the full stack "
        "(dbus-daemon, hiomapd emulator, hiomapbridge subprocess, host).",
    )
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument(
        "--seed", type=int, default=None, help="master seed (default: random)"
    )
    parser.add_argument(
        "--replay",
        type=int,
        action="append",
        default=[],
        metavar="TRIAL_SEED",
        help="run just the trial with this seed (repeatable)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("soak-results/results.json"),
        help="where to write the JSON results (default soak-results/results.json)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"soak: {args.trials if not args.replay else len(args.replay)} trials, "
          f"seed {seed}", flush=True)  # fmt: skip
    wall = time.monotonic()

    def progress(result: TrialResult) -> None:
        if not result.verdict.ok:
            _print_failure(result)
        elif args.verbose:
            print(
                f"trial {result.plan.index} ok {result.verdict.outcome} "
                f"{result.duration:.3f}s: {result.plan.describe()}",
                flush=True,
            )
        elif (result.plan.index + 1) % 50 == 0:
            print(f"  {result.plan.index + 1} trials done", flush=True)

    report = trio.run(
        lambda: run_soak(args.trials, seed, replay=args.replay, progress=progress)
    )
    tally = report.tally()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    print(json.dumps(tally, indent=1))
    print(
        f"soak: {tally['passed']}/{tally['trials']} passed in "
        f"{time.monotonic() - wall:.1f}s (seed {seed}); results in {args.results}",
        flush=True,
    )
    if report.failures:
        print(f"soak: {len(report.failures)} FAILED (seed {seed}):", flush=True)
        for result in report.failures:
            _print_failure(result)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
