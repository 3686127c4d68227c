"""The timing budget (README "Timing budget"): defaults and the CLI's check."""

from __future__ import annotations

import pytest

from hiomapbridge import bridge, cli, timing


def test_defaults_hold_the_budget_in_both_modes() -> None:
    for host in ("btbridged", "bt:/dev/ipmi-bt-host"):
        config = bridge.Config(host=host)
        assert timing.violations(config) == []


def test_default_chain_against_every_peer() -> None:
    c = bridge.Config()
    # Each of the bridge's deadlines < what it advertises ...
    assert c.hiomapd_timeout < c.bt_transaction_time
    assert c.ipmid_timeout < c.bt_transaction_time
    # ... < btbridged's own cut-off (btbridged mode).
    assert c.bt_transaction_time < timing.BTBRIDGED_TIMEOUT
    # The bridge answers before QEMU's ipmi-bmc-extern gives up by itself.
    assert max(c.hiomapd_timeout, c.ipmid_timeout) < timing.QEMU_TIMEOUT
    # Without our capabilities answer skiboot would wait its default 3 s:
    # the deadlines fit that too, so an old host is safe as well.
    assert max(c.hiomapd_timeout, c.ipmid_timeout) < timing.SKIBOOT_DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--hiomapd-timeout", "3"], "--hiomapd-timeout (3 s) must be shorter"),
        (
            ["--host", "bt:/x", "--ipmid-timeout", "4", "--bt-transaction-time", "4"],
            "--ipmid-timeout (4 s) must be shorter",
        ),
        (["--bt-transaction-time", "5"], "btbridged's own 5 s"),
    ],
)
def test_inconsistent_options_exit_2_naming_the_limit(
    options: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--bus", "unix:path=/nonexistent", *options])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "timing budget broken" in err
    assert says in err


def test_bt_mode_may_advertise_past_btbridged_s_limit() -> None:
    config = bridge.Config(
        host="bt:/dev/ipmi-bt-host",
        hiomapd_timeout=6,
        ipmid_timeout=6,
        bt_transaction_time=8,
    )
    assert timing.violations(config) == []


@pytest.mark.parametrize(
    "option",
    [
        ["--host", "bt:"],
        ["--host", "kcs:/dev/x"],
        ["--bt-transaction-time", "0"],
        ["--bt-transaction-time", "2.5"],
        ["--ipmi-channel", "no spaces"],
        ["--host", "bt:/x", "--no-reject-unknown"],  # btbridged mode only
    ],
)
def test_bad_values_exit_2(option: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(option)
    assert exited.value.code == 2
