"""The deployment files in contrib/: systemd units, drop-in, D-Bus policy.

Unit files are checked by systemd itself (``systemd-analyze verify`` on a
throw-away root holding our units, stub peers and a stub binary), the stop
order is derived from the After=/Before= edges the files declare, and the
D-Bus policy is parsed both as XML and by a real ``dbus-daemon``.
"""

from __future__ import annotations

import contextlib
import graphlib
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"

BRIDGE_UNIT = "hiomapbridge.service"
# Upstream unit names (see README "Deployment"):
#   btbridged: openbmc/btbridge meson.build installs btbridged.service as
#              org.openbmc.HostIpmi.service (same name in openbmc/openbmc's
#              phosphor-ipmi-bt recipe).
#   hiomapd:   openbmc/openbmc meta-phosphor/recipes-phosphor/mboxd ships
#              mboxd.service, running hiomapd's daemon mboxd.
BTBRIDGED_UNIT = "org.openbmc.HostIpmi.service"
HIOMAPD_UNIT = "mboxd.service"

SERVICE_FILE = CONTRIB / BRIDGE_UNIT
DROPIN_FILE = CONTRIB / f"{HIOMAPD_UNIT}.d" / "hiomapbridge.conf"
POLICY_FILE = CONTRIB / "dbus-1" / "system.d" / "hiomapbridge.conf"
SYSUSERS_FILE = CONTRIB / "sysusers.d" / "hiomapbridge.conf"

DEFAULT_SHUTDOWN_TIMEOUT = 5.0  # hiomapbridge --shutdown-timeout default

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DBUS_DAEMON = shutil.which("dbus-daemon")
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None or not HOST_UNIT_DIR.is_dir(),
    reason="systemd-analyze (and /usr/lib/systemd/system) not installed",
)
needs_dbus_daemon = pytest.mark.skipif(
    DBUS_DAEMON is None, reason="dbus-daemon not installed"
)


# -- unit-file parsing ------------------------------------------------------


def read_unit(*paths: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit plus drop-ins into {section: {key: [values...]}}.

    Keys may repeat (systemd appends), so values are collected, in file
    order; list-valued settings are split on whitespace by the callers.
    """
    result: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        section = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                result.setdefault(section, {})
                continue
            assert section is not None, f"{path}: key outside a section: {line}"
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not a key=value line: {line}"
            result[section].setdefault(key.strip(), []).append(value.strip())
    return result


def unit_list(unit: dict[str, dict[str, list[str]]], key: str) -> set[str]:
    return {
        name for value in unit.get("Unit", {}).get(key, []) for name in value.split()
    }


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


_TIME_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}


def parse_timespan(text: str) -> float:
    """systemd time span ("15s", "1min 30s", "90") in seconds."""
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, f"not a time span: {text!r}"
    for number, unit in parts:
        assert unit in _TIME_UNITS or unit == "", f"unknown unit in {text!r}"
        total += float(number) * _TIME_UNITS.get(unit, 1)
    return total


def service() -> dict[str, dict[str, list[str]]]:
    return read_unit(SERVICE_FILE)


# -- systemd-analyze verify -------------------------------------------------


STUB_PEER = """\
[Unit]
Description=stub of {name} for systemd-analyze verify

[Service]
ExecStart=/usr/bin/hiomapbridge
"""


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: the host's stock units,
    our units under /etc/systemd/system, stub peer units and a stub
    /usr/bin/hiomapbridge (the real one comes from the package install)."""
    root = tmp_path / "root"
    shutil.copytree(HOST_UNIT_DIR, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    shutil.copy(SERVICE_FILE, etc / BRIDGE_UNIT)
    dropin_dir = etc / f"{HIOMAPD_UNIT}.d"
    dropin_dir.mkdir()
    shutil.copy(DROPIN_FILE, dropin_dir / DROPIN_FILE.name)
    for peer in (BTBRIDGED_UNIT, HIOMAPD_UNIT):
        (etc / peer).write_text(STUB_PEER.format(name=peer))
    binary = root / "usr/bin/hiomapbridge"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )


def assert_verifies(result: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 on unknown keys and unparsable values (it only warns),
    # so any output at all counts as a failure.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output or result.returncode


@needs_systemd_analyze
def test_units_verify(unit_root: Path) -> None:
    assert_verifies(verify(unit_root, BRIDGE_UNIT, HIOMAPD_UNIT))


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (("TimeoutStopSec=", "TimeoutStopSecc="), "Unknown key"),
        (("Type=notify", "Type=notifyy"), "Failed to parse"),
        (("Wants=", "Requires=no-such-peer.service\nWants="), "no-such-peer"),
    ],
    ids=["unknown-key", "bad-value", "missing-required-unit"],
)
def test_verify_harness_catches_errors(
    unit_root: Path, mutation: tuple[str, str], expected: str
) -> None:
    """The harness above really fails on a broken unit (it is not vacuous)."""
    unit = unit_root / "etc/systemd/system" / BRIDGE_UNIT
    text = unit.read_text()
    assert mutation[0] in text
    unit.write_text(text.replace(mutation[0], mutation[1], 1))
    result = verify(unit_root, BRIDGE_UNIT)
    assert expected in result.stdout + result.stderr
    with pytest.raises(AssertionError):
        assert_verifies(result)


@needs_systemd_analyze
def test_verify_harness_catches_missing_binary(unit_root: Path) -> None:
    (unit_root / "usr/bin/hiomapbridge").unlink()
    result = verify(unit_root, BRIDGE_UNIT)
    assert "/usr/bin/hiomapbridge" in result.stderr
    assert result.returncode != 0


# -- the service's own settings ----------------------------------------------


def test_service_settings() -> None:
    unit = service()
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "ExecStart") == "/usr/bin/hiomapbridge"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert BTBRIDGED_UNIT in unit_list(unit, "Wants")
    assert BTBRIDGED_UNIT in unit_list(unit, "After")
    # Owns no bus name: a Type=dbus / BusName= would contradict the policy.
    assert "BusName" not in unit["Service"]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_stop_timeout_exceeds_shutdown_timeout() -> None:
    """systemd must not SIGKILL the bridge while it is still delivering."""
    stop = parse_timespan(one(service(), "Service", "TimeoutStopSec"))
    assert stop >= 2 * DEFAULT_SHUTDOWN_TIMEOUT, stop


@pytest.mark.parametrize(
    ("text", "seconds"), [("15s", 15), ("1min 30s", 90), ("90", 90), ("500ms", 0.5)]
)
def test_parse_timespan(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


# -- ordering -----------------------------------------------------------------


def ordering_graph(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> dict[str, set[str]]:
    """{unit: units it starts after}, restricted to the given units, from
    After= edges and the inverse of Before= edges."""
    after: dict[str, set[str]] = {name: set() for name in units}
    for name, unit in units.items():
        for other in unit_list(unit, "After") & units.keys():
            after[name].add(other)
        for other in unit_list(unit, "Before") & units.keys():
            after[other].add(name)
    return after


def shipped_units() -> dict[str, dict[str, dict[str, list[str]]]]:
    """The three units as a system with our files installed sees them:
    peers are empty stubs (nothing upstream orders them against the bridge)
    plus our drop-in for hiomapd's unit."""
    empty: dict[str, dict[str, list[str]]] = {"Unit": {}}
    return {
        BTBRIDGED_UNIT: empty,
        BRIDGE_UNIT: service(),
        HIOMAPD_UNIT: read_unit(DROPIN_FILE),
    }


def stop_order(after: dict[str, set[str]]) -> list[str]:
    """systemd stops in reverse start order; the order must be unique."""
    sorter = graphlib.TopologicalSorter(after)
    sorter.prepare()  # raises CycleError on a cycle
    start: list[str] = []
    while sorter.is_active():
        ready = sorter.get_ready()
        assert len(ready) == 1, f"start order not determined among {ready}"
        start.extend(ready)
        sorter.done(*ready)
    return start[::-1]


def test_dropin_orders_hiomapd_after_bridge() -> None:
    dropin = read_unit(DROPIN_FILE)
    assert unit_list(dropin, "After") == {BRIDGE_UNIT}
    assert unit_list(dropin, "Wants") == {BRIDGE_UNIT}
    assert set(dropin) == {"Unit"}, "a drop-in should touch ordering only"


def test_bridge_not_ordered_against_hiomapd() -> None:
    unit = service()
    assert HIOMAPD_UNIT not in unit_list(unit, "After")
    assert HIOMAPD_UNIT not in unit_list(unit, "Before")


def test_stop_order_is_hiomapd_bridge_btbridged() -> None:
    after = ordering_graph(shipped_units())
    assert BRIDGE_UNIT in after[HIOMAPD_UNIT]
    assert BTBRIDGED_UNIT in after[BRIDGE_UNIT]
    assert stop_order(after) == [HIOMAPD_UNIT, BRIDGE_UNIT, BTBRIDGED_UNIT]


def test_stop_order_check_can_fail() -> None:
    """Dropping the drop-in leaves hiomapd unordered: the check notices."""
    units = shipped_units()
    units[HIOMAPD_UNIT] = {"Unit": {}}
    with pytest.raises(AssertionError, match="not determined"):
        stop_order(ordering_graph(units))
    # and a Before= edge counts the same as the reverse After=
    units[HIOMAPD_UNIT] = {"Unit": {}}
    units[BTBRIDGED_UNIT] = {"Unit": {"Before": [BRIDGE_UNIT]}}
    units[BRIDGE_UNIT] = {"Unit": {"Before": [HIOMAPD_UNIT]}}
    assert stop_order(ordering_graph(units)) == [
        HIOMAPD_UNIT,
        BRIDGE_UNIT,
        BTBRIDGED_UNIT,
    ]


# -- D-Bus policy -------------------------------------------------------------


def policy_user() -> str:
    return one(service(), "Service", "User")


def allow_rules() -> list[dict[str, str]]:
    tree = ET.parse(POLICY_FILE)
    root = tree.getroot()
    assert root.tag == "busconfig"
    policies = root.findall("policy")
    assert [p.attrib for p in policies] == [{"user": policy_user()}], (
        "exactly one policy, for the service's user (nothing for everyone)"
    )
    return [dict(e.attrib) for e in policies[0].findall("allow")]


def test_policy_is_for_the_service_user() -> None:
    sysusers = [
        line.split()
        for line in SYSUSERS_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [(f[0], f[1]) for f in sysusers] == [("u", policy_user())]
    assert one(service(), "Service", "Group") == policy_user()
    allow_rules()


@pytest.mark.parametrize(
    "rule",
    [
        {
            "send_destination": "org.openbmc.HostIpmi",
            "send_interface": "org.openbmc.HostIpmi",
            "send_member": "sendMessage",
        },
        {
            "send_destination": "org.openbmc.HostIpmi",
            "send_interface": "org.openbmc.HostIpmi",
            "send_member": "setAttention",
        },
        {
            "send_destination": "xyz.openbmc_project.Hiomapd",
            "send_interface": "xyz.openbmc_project.Hiomapd.Protocol",
        },
        {
            "send_destination": "xyz.openbmc_project.Hiomapd",
            "send_interface": "xyz.openbmc_project.Hiomapd.Protocol.V2",
        },
        {
            "send_destination": "xyz.openbmc_project.Hiomapd",
            "send_interface": "org.freedesktop.DBus.Properties",
        },
        {"receive_sender": "org.openbmc.HostIpmi", "receive_type": "signal"},
        {"receive_sender": "xyz.openbmc_project.Hiomapd", "receive_type": "signal"},
    ],
)
def test_policy_allows(rule: dict[str, str]) -> None:
    assert rule in allow_rules()


def test_policy_grants_nothing_else() -> None:
    rules = allow_rules()
    assert len(rules) == 7, rules
    assert not any("own" in r or "own_prefix" in r for r in rules)
    # every send rule names a destination (no blanket allow)
    assert all("send_destination" in r for r in rules if "receive_sender" not in r)
    denies = [e.attrib for e in ET.parse(POLICY_FILE).getroot().iter("deny")]
    assert {"own": "*"} in denies, "the bridge owns no bus name"


BUS_CONFIG = """\
<busconfig>
  <type>custom</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <include ignore_missing="no">{policy}</include>
</busconfig>
"""


@contextlib.contextmanager
def run_dbus_daemon(tmp_path: Path, policy: Path) -> Iterator[str]:
    """Start dbus-daemon on a config that includes ``policy``; yield the
    address it prints (it exits with an error on an invalid policy)."""
    assert DBUS_DAEMON is not None
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(policy=policy))
    proc = subprocess.Popen(
        [DBUS_DAEMON, f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            proc.wait(timeout=10)
            assert proc.stderr is not None
            raise AssertionError(
                f"dbus-daemon refused the policy: {proc.stderr.read()}"
            )
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@needs_dbus_daemon
def test_dbus_daemon_accepts_policy(tmp_path: Path) -> None:
    with run_dbus_daemon(tmp_path, POLICY_FILE) as address:
        assert address.startswith("unix:")


@needs_dbus_daemon
def test_dbus_daemon_rejects_a_broken_policy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text(
        POLICY_FILE.read_text().replace('send_member="', 'send_membr="', 1)
    )
    with (
        pytest.raises(AssertionError, match="send_membr"),
        run_dbus_daemon(tmp_path, broken),
    ):
        pass
