"""The randomised shutdown soak: 25 full-stack trials in the normal test run
(``nox -s soak`` runs 1000), and the soak's judge shown to have teeth.

Set HIOMAPBRIDGE_SOAK_SEED to replay a run; a failure prints the master seed
and each failed trial's own seed (``python -m hiomapbridge.sim.soak
--replay SEED``).
"""

from __future__ import annotations

import os
import random
import signal

import attrs
import pytest

from hiomapbridge.sim.soak import (
    DEADLINE_LINE,
    EXIT_MARGIN,
    HOLDS_LINE,
    UNRESPONSIVE_SHUTDOWN_TIMEOUT,
    Observation,
    TrialPlan,
    judge,
    plan_trial,
    run_soak,
    trial_seeds,
)

TRIALS = 25


async def test_soak_25_trials() -> None:
    """Every trial ends with the host holding PROTOCOL_RESET before the
    bridge exited, or (unresponsive host) with the deadline path logged and
    an exit in time."""
    env = os.environ.get("HIOMAPBRIDGE_SOAK_SEED")
    seed = int(env) if env else random.SystemRandom().getrandbits(32)
    report = await run_soak(TRIALS, seed)
    details = "\n".join(
        f"trial {r.plan.index} (--replay {r.plan.seed}): {r.verdict.reason}\n"
        f"  {r.plan.describe()}\n{r.log_tail}"
        for r in report.failures
    )
    assert not report.failures, f"soak seed {seed}:\n{details}"
    assert len(report.results) == TRIALS
    print(report.tally())


def test_plans_are_reproducible() -> None:
    seeds = trial_seeds(42, 10)
    assert seeds == trial_seeds(42, 10)
    assert [plan_trial(i, s) for i, s in enumerate(seeds)] == [
        plan_trial(i, s) for i, s in enumerate(seeds)
    ]


def test_plans_cover_every_scenario() -> None:
    plans = [plan_trial(i, s) for i, s in enumerate(trial_seeds(7, 400))]
    assert {p.hiomapd for p in plans} == {"stop", "kill", "none"}
    assert {p.timing for p in plans} == {
        "before_hiomapd",
        "after_event",
        "during_fetch",
        "random",
    }
    assert {p.host for p in plans} == {"responsive", "silent", "stuck"}
    assert {p.signum for p in plans} == {signal.SIGTERM, signal.SIGINT}
    assert any(p.repeat_sigterm for p in plans)


# -- the judge has teeth --------------------------------------------------------

RESPONSIVE = TrialPlan(
    index=0,
    seed=0,
    hiomapd="stop",
    timing="during_fetch",
    signum=int(signal.SIGTERM),
    repeat_sigterm=False,
    host="responsive",
    fetch_delay=0.0,
    write_delay=0.0,
    signal_delay=0.0,
    host_reads=False,
)
SILENT = attrs.evolve(RESPONSIVE, host="silent")


def seen(
    events: list[tuple[float, int]], *, exit_at: float = 2.0, status: int = 0, log: str
) -> Observation:
    return Observation(status, 1.0, exit_at, events, log)


@pytest.mark.parametrize(
    ("plan", "observation", "outcome"),
    [
        (
            RESPONSIVE,
            seen([(0.5, 0x81), (1.5, 0x01)], log=HOLDS_LINE),
            "reset-delivered",
        ),
        # ipmid's failure: the 0x01 reached the host only after the exit
        (RESPONSIVE, seen([(0.5, 0x81), (2.5, 0x01)], log=HOLDS_LINE), "FAILED"),
        # a stale DAEMON_READY after the reset
        (RESPONSIVE, seen([(1.2, 0x01), (1.5, 0x81)], log=HOLDS_LINE), "FAILED"),
        (RESPONSIVE, seen([(0.5, 0x81)], log=DEADLINE_LINE), "FAILED"),
        (RESPONSIVE, seen([(1.5, 0x01)], status=143, log=""), "FAILED"),
        (SILENT, seen([(0.5, 0x81)], log=DEADLINE_LINE), "deadline"),
        (SILENT, seen([(0.5, 0x81)], log="no deadline line"), "FAILED"),
        (
            SILENT,
            seen(
                [(0.5, 0x81)],
                exit_at=1.0 + UNRESPONSIVE_SHUTDOWN_TIMEOUT + EXIT_MARGIN + 0.1,
                log=DEADLINE_LINE,
            ),
            "FAILED",
        ),
        (SILENT, seen([(1.5, 0x03)], log=HOLDS_LINE), "reset-delivered"),
    ],
)
def test_judge(plan: TrialPlan, observation: Observation, outcome: str) -> None:
    verdict = judge(plan, observation)
    assert verdict.outcome == outcome, verdict.reason
    assert verdict.ok == (outcome != "FAILED")
