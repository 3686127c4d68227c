"""The deployment files in contrib/: systemd units, drop-ins, D-Bus policies,
the udev rule, for both host modes (btbridged and bt:).

Unit files are checked by systemd itself (``systemd-analyze verify`` on a
throw-away root holding our units, peers that mirror the upstream OpenBMC
units and stub binaries), the stop order is derived from the After=/Before=
edges the files declare, and the D-Bus policies are parsed as XML, loaded by
a real ``dbus-daemon`` and, when the tests run as root, enforced by one:
clients running as other users stand in for the bridge's user and for
everyone else.
"""

from __future__ import annotations

import contextlib
import graphlib
import os
import pwd
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Message

from hiomapbridge.dbus import Bus, DBusError, open_bus

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
BT_CONTRIB = CONTRIB / "bt"

BRIDGE_UNIT = "hiomapbridge.service"
BT_UNIT = "hiomapbridge-bt.service"
# Upstream unit names (see README "Deployment"):
#   btbridged: openbmc/btbridge meson.build installs btbridged.service as
#              org.openbmc.HostIpmi.service (same name in openbmc/openbmc's
#              phosphor-ipmi-bt recipe).
#   hiomapd:   openbmc/openbmc meta-phosphor/recipes-phosphor/mboxd ships
#              mboxd.service, running hiomapd's daemon mboxd.
#   ipmid:     openbmc/openbmc meta-phosphor/recipes-phosphor/ipmi/
#              phosphor-ipmi-host/phosphor-ipmi-host.service, with
#              Alias=xyz.openbmc_project.Control.Host.service.
BTBRIDGED_UNIT = "org.openbmc.HostIpmi.service"
HIOMAPD_UNIT = "mboxd.service"
IPMID_UNIT = "phosphor-ipmi-host.service"
CONTROL_HOST_ALIAS = "xyz.openbmc_project.Control.Host.service"
ALIASES = {CONTROL_HOST_ALIAS: IPMID_UNIT}

SERVICE_FILE = CONTRIB / BRIDGE_UNIT
DROPIN_FILE = CONTRIB / f"{HIOMAPD_UNIT}.d" / "hiomapbridge.conf"
POLICY_FILE = CONTRIB / "dbus-1" / "system.d" / "hiomapbridge.conf"
SYSUSERS_FILE = CONTRIB / "sysusers.d" / "hiomapbridge.conf"

BT_SERVICE_FILE = BT_CONTRIB / BT_UNIT
BT_DROPIN_FILE = BT_CONTRIB / f"{HIOMAPD_UNIT}.d" / "hiomapbridge-bt.conf"
BT_POLICY_FILE = BT_CONTRIB / "dbus-1" / "system.d" / "hiomapbridge-bt.conf"
BT_UDEV_FILE = BT_CONTRIB / "udev" / "rules.d" / "70-hiomapbridge-bt.rules"
BT_DEVICE = "/dev/ipmi-bt-host"  # drivers/char/ipmi/bt-bmc.c's misc device

DEFAULT_SHUTDOWN_TIMEOUT = 5.0  # hiomapbridge --shutdown-timeout default

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DBUS_DAEMON = shutil.which("dbus-daemon")
BUSCTL = shutil.which("busctl")
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None or not HOST_UNIT_DIR.is_dir(),
    reason="systemd-analyze (and /usr/lib/systemd/system) not installed",
)
needs_dbus_daemon = pytest.mark.skipif(
    DBUS_DAEMON is None, reason="dbus-daemon not installed"
)


# -- unit-file parsing ------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]


def parse_unit(*texts: str) -> Unit:
    """Parse a unit plus drop-ins into {section: {key: [values...]}}.

    Keys may repeat (systemd appends), so values are collected, in file
    order; list-valued settings are split on whitespace by the callers.
    """
    result: Unit = {}
    for text in texts:
        section = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                result.setdefault(section, {})
                continue
            assert section is not None, f"key outside a section: {line}"
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line: {line}"
            result[section].setdefault(key.strip(), []).append(value.strip())
    return result


def read_unit(*paths: Path) -> Unit:
    return parse_unit(*(path.read_text() for path in paths))


def unit_list(unit: Unit, key: str) -> set[str]:
    return {
        name for value in unit.get("Unit", {}).get(key, []) for name in value.split()
    }


def one(unit: Unit, section: str, key: str) -> str:
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


def service() -> Unit:
    return read_unit(SERVICE_FILE)


def bt_service() -> Unit:
    return read_unit(BT_SERVICE_FILE)


def escape_path(path: str) -> str:
    """systemd-escape --path: the unit name of a device node, minus suffix."""
    out = []
    for i, char in enumerate(path.strip("/")):
        if char == "/":
            out.append("-")
        elif char.isalnum() or char in ":_" or (char == "." and i > 0):
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out)


# -- the upstream peers, as OpenBMC ships them ------------------------------

# openbmc/openbmc meta-phosphor/recipes-phosphor/mboxd/mboxd/mboxd.service
# (read at commit 52f1aea1), with the recipe's {FLASH_SIZE} and {WINDOW_NUM}
# substituted. Note what it does not have: any ordering against the bridge
# (our drop-ins add it) or against btbridged. Its Requires=/After= name ipmid
# through ipmid's alias.
HIOMAPD_UPSTREAM = r"""[Unit]
Description=Phosphor MBOX Daemon
BindsTo=dev-aspeed\x2dlpc\x2dctrl.device
After=dev-aspeed\x2dlpc\x2dctrl.device
Requires=xyz.openbmc_project.Control.Host.service
After=xyz.openbmc_project.Control.Host.service

[Service]
Restart=always
EnvironmentFile=-/etc/default/mboxd
ExecStart=/usr/bin/env mboxd --flash 64M --window-size 1M --window-num 63 $MBOXD_ARGS
SyslogIdentifier=mboxd

[Install]
WantedBy=multi-user.target
"""

# openbmc/openbmc meta-phosphor/recipes-phosphor/ipmi/phosphor-ipmi-host/
# phosphor-ipmi-host.service (commit 2b5a779b) without its Wants=/After= on
# mapper-wait@ and clear-once units (not present in the scratch root, and not
# ordered against ours).
IPMID_UPSTREAM = """[Unit]
Description=Phosphor Inband IPMI
After=org.openbmc.HostIpmi.service

[Service]
Restart=always
ExecStart=/usr/bin/env ipmid
SyslogIdentifier=ipmid
RuntimeDirectory = ipmi
RuntimeDirectoryPreserve = yes
StateDirectory = ipmi
Type=dbus
BusName=xyz.openbmc_project.Control.Host

[Install]
WantedBy=multi-user.target
Alias=xyz.openbmc_project.Control.Host.service
"""

# openbmc/openbmc meta-phosphor/recipes-phosphor/ipmi/phosphor-ipmi-bt/
# org.openbmc.HostIpmi.service (commit fc81e38a), {BUSNAME} substituted.
BTBRIDGED_UPSTREAM = """[Unit]
Description=Phosphor IPMI BT DBus Bridge

[Service]
Restart=always
ExecStart=/usr/bin/env btbridged
SyslogIdentifier=btbridged
Type=dbus
BusName=org.openbmc.HostIpmi

[Install]
WantedBy=multi-user.target
"""

PEERS = {
    BTBRIDGED_UNIT: BTBRIDGED_UPSTREAM,
    HIOMAPD_UNIT: HIOMAPD_UPSTREAM,
    IPMID_UNIT: IPMID_UPSTREAM,
}

# mode -> (bridge unit name, its file, hiomapd drop-in)
MODES = {
    "btbridged": (BRIDGE_UNIT, SERVICE_FILE, DROPIN_FILE),
    "bt": (BT_UNIT, BT_SERVICE_FILE, BT_DROPIN_FILE),
}


def test_upstream_peers_parse() -> None:
    """The mirrors say what README "Deployment" says of the upstream units."""
    hiomapd = parse_unit(HIOMAPD_UPSTREAM)
    assert unit_list(hiomapd, "Requires") == {CONTROL_HOST_ALIAS}
    assert unit_list(hiomapd, "After") == {
        CONTROL_HOST_ALIAS,
        r"dev-aspeed\x2dlpc\x2dctrl.device",
    }
    assert not unit_list(hiomapd, "Wants")
    assert IPMID_UNIT not in unit_list(hiomapd, "Requires")
    ipmid = parse_unit(IPMID_UPSTREAM)
    assert one(ipmid, "Install", "Alias") == CONTROL_HOST_ALIAS
    assert unit_list(ipmid, "After") == {BTBRIDGED_UNIT}
    assert "Requires" not in ipmid["Unit"]


# -- systemd-analyze verify -------------------------------------------------


STUB_BINARY = "#!/bin/sh\nexit 0\n"


def make_unit_root(tmp_path: Path, mode: str) -> Path:
    """A root for ``systemd-analyze verify --root``: the host's stock units,
    one mode's units under /etc/systemd/system, the upstream peers (ipmid's
    alias enabled, as ``systemctl enable`` leaves it) and stub binaries for
    /usr/bin/hiomapbridge and /usr/bin/env (the peers' ExecStart)."""
    unit_name, unit_file, dropin = MODES[mode]
    root = tmp_path / "root"
    shutil.copytree(HOST_UNIT_DIR, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    shutil.copy(unit_file, etc / unit_name)
    dropin_dir = etc / f"{HIOMAPD_UNIT}.d"
    dropin_dir.mkdir()
    shutil.copy(dropin, dropin_dir / dropin.name)
    for peer, text in PEERS.items():
        (etc / peer).write_text(text)
    (etc / CONTROL_HOST_ALIAS).symlink_to(IPMID_UNIT)
    for binary in ("hiomapbridge", "env"):
        path = root / "usr/bin" / binary
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STUB_BINARY)
        path.chmod(0o755)
    return root


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    return make_unit_root(tmp_path, "btbridged")


@pytest.fixture
def bt_unit_root(tmp_path: Path) -> Path:
    return make_unit_root(tmp_path, "bt")


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
def test_bt_units_verify(bt_unit_root: Path) -> None:
    assert_verifies(verify(bt_unit_root, BT_UNIT, HIOMAPD_UNIT, IPMID_UNIT))


def assert_mutation_caught(
    root: Path, unit_name: str, mutation: tuple[str, str], expected: str
) -> None:
    """Break ``unit_name`` under ``root`` with ``mutation``; systemd-analyze
    says ``expected`` and :func:`assert_verifies` fails."""
    unit = root / "etc/systemd/system" / unit_name
    text = unit.read_text()
    assert mutation[0] in text
    unit.write_text(text.replace(mutation[0], mutation[1], 1))
    result = verify(root, unit_name)
    assert expected in result.stdout + result.stderr
    with pytest.raises(AssertionError):
        assert_verifies(result)


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
    assert_mutation_caught(unit_root, BRIDGE_UNIT, mutation, expected)


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (("\nDeviceAllow=/dev/", "\nDeviceAllow=dev/"), "Invalid device node path"),
        (("host rw\n", "host rwz\n"), "Invalid device rights"),
        (("\nDevicePolicy=closed", "\nDevicePolicy=shut"), "device policy"),
        (("\nBindsTo=dev-", "\nBindsTo=dev/"), "Failed to add dependency"),
    ],
    ids=["device-path", "device-rights", "device-policy", "device-unit"],
)
def test_verify_harness_catches_bt_errors(
    bt_unit_root: Path, mutation: tuple[str, str], expected: str
) -> None:
    assert_mutation_caught(bt_unit_root, BT_UNIT, mutation, expected)


@needs_systemd_analyze
def test_verify_harness_needs_the_ipmid_alias(bt_unit_root: Path) -> None:
    """hiomapd's Requires= names ipmid only through its alias: without it
    (ipmid not enabled) systemd cannot start hiomapd, and the harness sees it."""
    (bt_unit_root / "etc/systemd/system" / CONTROL_HOST_ALIAS).unlink()
    result = verify(bt_unit_root, HIOMAPD_UNIT)
    assert CONTROL_HOST_ALIAS in result.stdout + result.stderr
    assert result.returncode != 0


@needs_systemd_analyze
def test_verify_harness_catches_missing_binary(unit_root: Path) -> None:
    (unit_root / "usr/bin/hiomapbridge").unlink()
    result = verify(unit_root, BRIDGE_UNIT)
    assert "/usr/bin/hiomapbridge" in result.stderr
    assert result.returncode != 0


# -- the services' own settings ------------------------------------------------


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


def test_bt_service_settings() -> None:
    unit = bt_service()
    assert one(unit, "Service", "Type") == "notify"
    assert (
        one(unit, "Service", "ExecStart")
        == f"/usr/bin/hiomapbridge --host bt:{BT_DEVICE}"
    )
    assert one(unit, "Service", "Restart") == "on-failure"
    assert parse_timespan(one(unit, "Service", "WatchdogSec")) > 0
    # It replaces btbridged (same device, one opener; same bus name) and the
    # btbridged-mode bridge; ordered against both so a switch-over stops them
    # before this starts.
    assert unit_list(unit, "Conflicts") == {BTBRIDGED_UNIT, BRIDGE_UNIT}
    assert {BTBRIDGED_UNIT, BRIDGE_UNIT} <= unit_list(unit, "After")
    assert BTBRIDGED_UNIT not in unit_list(unit, "Wants")
    # ipmid answers what the bridge forwards.
    assert IPMID_UNIT in unit_list(unit, "Wants")
    assert IPMID_UNIT in unit_list(unit, "After")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert one(unit, "Service", "User") == one(service(), "Service", "User")
    assert one(unit, "Service", "Group") == one(service(), "Service", "Group")


def test_bt_service_device_access() -> None:
    """The device in ExecStart is the one the unit lets through, binds to,
    and the udev rule hands to the service's group."""
    unit = bt_service()
    device_unit = f"{escape_path(BT_DEVICE)}.device"
    assert device_unit == r"dev-ipmi\x2dbt\x2dhost.device"
    assert unit_list(unit, "BindsTo") == {device_unit}
    assert device_unit in unit_list(unit, "After")
    assert one(unit, "Service", "DevicePolicy") == "closed"
    assert one(unit, "Service", "DeviceAllow") == f"{BT_DEVICE} rw"
    # PrivateDevices= would give the service a /dev without the BT device.
    assert unit["Service"].get("PrivateDevices", ["no"]) == ["no"]

    rules = [
        line
        for line in BT_UDEV_FILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(rules) == 1, rules
    pairs = re.findall(r'([A-Z_{}]+)\s*(==|\+=|=)\s*"([^"]*)"', rules[0])
    assert len(pairs) == rules[0].count('"') // 2, rules[0]
    rule = {(key, op): value for key, op, value in pairs}
    assert rule == {
        ("SUBSYSTEM", "=="): "misc",
        ("KERNEL", "=="): Path(BT_DEVICE).name,
        ("GROUP", "="): one(unit, "Service", "Group"),
        ("MODE", "="): "0660",
        ("TAG", "+="): "systemd",
    }


def syscall_groups(text: str) -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter`` output: {@group: [members]}."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            assert current is not None, line
            current.append(line.strip())
    return groups


def expand_syscalls(groups: dict[str, list[str]], name: str) -> set[str]:
    out: set[str] = set()
    for member in groups[name]:
        out |= expand_syscalls(groups, member) if member.startswith("@") else {member}
    return out


@needs_systemd_analyze
def test_bt_service_syscall_filter_allows_ioctl() -> None:
    """SMS_ATN is BT_BMC_IOCTL_SMS_ATN: the filter must let ioctl through,
    and the device's read/write/poll."""
    assert SYSTEMD_ANALYZE is not None
    (group,) = one(bt_service(), "Service", "SystemCallFilter").split()
    listed = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    groups = syscall_groups(listed)
    allowed = expand_syscalls(groups, group)
    assert {"ioctl", "read", "write", "ppoll", "openat"} <= allowed
    assert "reboot" not in allowed  # the expansion is not vacuous


def test_bt_service_hardening_matches_btbridged_mode() -> None:
    """bt: mode gives up PrivateDevices= for DeviceAllow= and nothing else."""
    plain = service()["Service"]
    bt = bt_service()["Service"]
    ignore = {"ExecStart", "PrivateDevices", "DevicePolicy", "DeviceAllow"}
    assert {k: v for k, v in plain.items() if k not in ignore} == {
        k: v for k, v in bt.items() if k not in ignore
    }


@pytest.mark.parametrize("mode", MODES)
def test_stop_timeout_exceeds_shutdown_timeout(mode: str) -> None:
    """systemd must not SIGKILL the bridge while it is still delivering."""
    unit = read_unit(MODES[mode][1])
    stop = parse_timespan(one(unit, "Service", "TimeoutStopSec"))
    assert stop >= 2 * DEFAULT_SHUTDOWN_TIMEOUT, stop


@pytest.mark.parametrize(
    ("text", "seconds"), [("15s", 15), ("1min 30s", 90), ("90", 90), ("500ms", 0.5)]
)
def test_parse_timespan(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("path", "escaped"),
    [("/dev/ipmi-bt-host", r"dev-ipmi\x2dbt\x2dhost"), ("/dev/a_b:c", "dev-a_b:c")],
)
def test_escape_path(path: str, escaped: str) -> None:
    assert escape_path(path) == escaped
    if shutil.which("systemd-escape"):
        out = subprocess.run(
            ["systemd-escape", "--path", path],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == escaped


# -- ordering -----------------------------------------------------------------


def ordering_graph(units: dict[str, Unit]) -> dict[str, set[str]]:
    """{unit: units it starts after}, restricted to the given units, from
    After= edges and the inverse of Before= edges; aliases resolved."""

    def names(unit: Unit, key: str) -> set[str]:
        return {ALIASES.get(name, name) for name in unit_list(unit, key)}

    after: dict[str, set[str]] = {name: set() for name in units}
    for name, unit in units.items():
        for other in names(unit, "After") & units.keys():
            after[name].add(other)
        for other in names(unit, "Before") & units.keys():
            after[other].add(name)
    return after


def shipped_units(mode: str, *peers: str) -> dict[str, Unit]:
    """The bridge, hiomapd and the given peers as a system with one mode's
    files installed sees them: upstream units plus our drop-in."""
    unit_name, unit_file, dropin = MODES[mode]
    units = {
        unit_name: read_unit(unit_file),
        HIOMAPD_UNIT: parse_unit(HIOMAPD_UPSTREAM, dropin.read_text()),
    }
    for peer in peers:
        units[peer] = parse_unit(PEERS[peer])
    return units


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


@pytest.mark.parametrize(
    ("mode", "dropin", "bridge"),
    [("btbridged", DROPIN_FILE, BRIDGE_UNIT), ("bt", BT_DROPIN_FILE, BT_UNIT)],
)
def test_dropin_orders_hiomapd_after_bridge(
    mode: str, dropin: Path, bridge: str
) -> None:
    unit = read_unit(dropin)
    assert unit_list(unit, "After") == {bridge}
    assert unit_list(unit, "Wants") == {bridge}
    assert set(unit) == {"Unit"}, "a drop-in should touch ordering only"


@pytest.mark.parametrize("mode", MODES)
def test_bridge_not_ordered_against_hiomapd(mode: str) -> None:
    unit = read_unit(MODES[mode][1])
    assert HIOMAPD_UNIT not in unit_list(unit, "After")
    assert HIOMAPD_UNIT not in unit_list(unit, "Before")


def test_stop_order_is_hiomapd_bridge_btbridged() -> None:
    after = ordering_graph(shipped_units("btbridged", BTBRIDGED_UNIT))
    assert BRIDGE_UNIT in after[HIOMAPD_UNIT]
    assert BTBRIDGED_UNIT in after[BRIDGE_UNIT]
    assert stop_order(after) == [HIOMAPD_UNIT, BRIDGE_UNIT, BTBRIDGED_UNIT]


def test_btbridged_mode_with_ipmid_has_no_cycle() -> None:
    """With ipmid in the picture (ipmid After btbridged, hiomapd After ipmid
    through the alias) the order still holds and has no cycle."""
    after = ordering_graph(shipped_units("btbridged", BTBRIDGED_UNIT, IPMID_UNIT))
    assert after[HIOMAPD_UNIT] == {BRIDGE_UNIT, IPMID_UNIT}
    sorter = graphlib.TopologicalSorter(after)
    start = list(sorter.static_order())
    assert start.index(BTBRIDGED_UNIT) < start.index(BRIDGE_UNIT)
    assert start.index(BRIDGE_UNIT) < start.index(HIOMAPD_UNIT)


def test_stop_order_is_hiomapd_bridge_ipmid_in_bt_mode() -> None:
    """bt: mode: hiomapd stops first (its PROTOCOL_RESET finds the bridge),
    ipmid last (the host's other commands are forwarded until the bridge is
    gone). btbridged is not running: the bridge conflicts with it."""
    after = ordering_graph(shipped_units("bt", IPMID_UNIT))
    assert after[HIOMAPD_UNIT] == {BT_UNIT, IPMID_UNIT}
    assert after[BT_UNIT] == {IPMID_UNIT}
    assert stop_order(after) == [HIOMAPD_UNIT, BT_UNIT, IPMID_UNIT]


def test_stop_order_check_can_fail() -> None:
    """Dropping the drop-in leaves hiomapd unordered: the check notices."""
    units = shipped_units("btbridged", BTBRIDGED_UNIT)
    units[HIOMAPD_UNIT] = parse_unit(HIOMAPD_UPSTREAM)
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
    # and hiomapd's After= on ipmid's alias counts as After= on ipmid
    units = shipped_units("bt", IPMID_UNIT)
    units[HIOMAPD_UNIT] = parse_unit(HIOMAPD_UPSTREAM)
    assert ordering_graph(units)[HIOMAPD_UNIT] == {IPMID_UNIT}


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


HOSTIPMI = "org.openbmc.HostIpmi"
CHANNEL_SMS = "xyz.openbmc_project.Ipmi.Channel.SMS"  # --ipmi-channel default
HIOMAPD = "xyz.openbmc_project.Hiomapd"
IPMID = "xyz.openbmc_project.Ipmi.Host"

BT_BRIDGE_RULES = [
    {"own": HOSTIPMI},
    {"own": CHANNEL_SMS},
    {
        "send_destination": HIOMAPD,
        "send_interface": "xyz.openbmc_project.Hiomapd.Protocol",
    },
    {
        "send_destination": HIOMAPD,
        "send_interface": "xyz.openbmc_project.Hiomapd.Protocol.V2",
    },
    {"send_destination": HIOMAPD, "send_interface": "org.freedesktop.DBus.Properties"},
    {
        "send_destination": IPMID,
        "send_interface": "xyz.openbmc_project.Ipmi.Server",
        "send_member": "execute",
    },
    {"receive_sender": HIOMAPD, "receive_type": "signal"},
]
BT_IPMID_RULES = [
    {
        "send_destination": HOSTIPMI,
        "send_interface": "org.openbmc.HostIpmi",
        "send_member": "setAttention",
    }
]


def bt_policies() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """{user: [(allow|deny, attributes), ...]} of the bt: mode policy."""
    root = ET.parse(BT_POLICY_FILE).getroot()
    assert root.tag == "busconfig"
    result: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for policy in root.findall("policy"):
        assert list(policy.attrib) == ["user"], policy.attrib
        assert policy.attrib["user"] not in result
        result[policy.attrib["user"]] = [(e.tag, dict(e.attrib)) for e in policy]
    return result


def test_bt_policy_grants_exactly_this() -> None:
    """The bridge's user: a blanket deny own first, then the two names and
    the calls it needs; root (ipmid): setAttention on the bridge, nothing
    more. Nothing for anyone else (no default or group context)."""
    policies = bt_policies()
    assert set(policies) == {policy_user(), "root"}
    bridge = policies[policy_user()]
    assert bridge[0] == ("deny", {"own": "*"})
    assert [rule for tag, rule in bridge[1:] if tag == "allow"] == BT_BRIDGE_RULES
    assert len(bridge) == 1 + len(BT_BRIDGE_RULES)
    assert policies["root"] == [("allow", rule) for rule in BT_IPMID_RULES]


def test_bt_policy_is_for_the_bt_service_user() -> None:
    assert one(bt_service(), "Service", "User") == policy_user()


@needs_dbus_daemon
@pytest.mark.parametrize(
    "policy", [POLICY_FILE, BT_POLICY_FILE], ids=["btbridged", "bt"]
)
def test_dbus_daemon_accepts_policy(tmp_path: Path, policy: Path) -> None:
    with run_dbus_daemon(tmp_path, policy) as address:
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
def run_dbus_daemon(
    tmp_path: Path, policy: Path, template: str = BUS_CONFIG, **fields: str
) -> Iterator[str]:
    """Start dbus-daemon on a config that includes ``policy``; yield the
    address it prints (it exits with an error on an invalid policy)."""
    assert DBUS_DAEMON is not None
    config = tmp_path / "bus.conf"
    config.write_text(template.format(policy=policy, **fields))
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
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- the policies, enforced -----------------------------------------------------
#
# A dbus-daemon with system.conf's default context (deny own and method calls,
# allow signals and requested replies, allow the bus driver) plus one of our
# policies, in which the bridge's user is replaced by a stand-in that exists
# here. The stand-ins for hiomapd and ipmid run as root (this test process) and
# may own their names; the bridge's calls are made by busctl as the stand-in
# user; a third user stands for everyone else.

BRIDGE_STANDIN = "nobody"
OTHER_USER = "daemon"

SYSTEM_BUS_CONFIG = """\
<busconfig>
  <type>custom</type>
  <listen>unix:abstract={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
  </policy>
  <policy user="root">
    <allow own="xyz.openbmc_project.Hiomapd"/>
    <allow own="xyz.openbmc_project.Ipmi.Host"/>
  </policy>
  <include ignore_missing="no">{policy}</include>
</busconfig>
"""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_root_and_users = pytest.mark.skipif(
    os.geteuid() != 0
    or BUSCTL is None
    or DBUS_DAEMON is None
    or not all(_user_exists(u) for u in (BRIDGE_STANDIN, OTHER_USER)),
    reason="needs root (to run clients as other users), busctl, dbus-daemon "
    f"and the users {BRIDGE_STANDIN!r} and {OTHER_USER!r}",
)


def standin_policy(tmp_path: Path, policy: Path) -> Path:
    """``policy`` with the bridge's user replaced by the stand-in."""
    text = policy.read_text()
    original = f'user="{policy_user()}"'
    assert original in text
    out = tmp_path / f"standin-{policy.name}"
    out.write_text(text.replace(original, f'user="{BRIDGE_STANDIN}"'))
    return out


async def busctl_as(
    user: str, address: str, *args: str
) -> subprocess.CompletedProcess[str]:
    assert BUSCTL is not None
    entry = pwd.getpwnam(user)
    with trio.fail_after(30):
        result = await trio.run_process(
            [BUSCTL, f"--address={address}", "--timeout=10", *args],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def request_name(user: str, address: str, name: str) -> str:
    """RequestName as ``user``: "u 1" when granted, else busctl's error."""
    result = await busctl_as(
        user,
        address,
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "RequestName",
        "su",
        name,
        "0",
    )
    return (result.stdout if result.returncode == 0 else result.stderr).strip()


DENIED = "Call failed: Access denied"


async def serve_peers(bus: Bus) -> None:
    """Own hiomapd's and ipmid's names and answer every call with an empty
    return (which busctl reports as success)."""

    async def answer(msg: Message) -> None:
        await bus.reply(msg)

    for name in (HIOMAPD, IPMID):
        reply = await bus.bus_call("RequestName", "su", name, 0)
        assert reply.body == (1,), (name, reply.body)
    bus.export("/xyz/openbmc_project/Hiomapd", answer)
    bus.export("/xyz/openbmc_project/Ipmi", answer)


@needs_root_and_users
async def test_bt_policy_owns_exactly_two_names(tmp_path: Path) -> None:
    policy = standin_policy(tmp_path, BT_POLICY_FILE)
    socket = f"hiomapbridge-test-{os.getpid()}-{tmp_path.name}"
    with run_dbus_daemon(tmp_path, policy, SYSTEM_BUS_CONFIG, socket=socket) as bus:
        for name in (HOSTIPMI, CHANNEL_SMS):
            assert await request_name(BRIDGE_STANDIN, bus, name) == "u 1", name
        for name in (
            HIOMAPD,
            IPMID,
            "xyz.openbmc_project.Ipmi.Channel.eth0",
            "xyz.openbmc_project.Control.Host",
            "org.openbmc.HostIpmi.Other",
        ):
            assert await request_name(BRIDGE_STANDIN, bus, name) == DENIED, name
        # Nobody else may take the bridge's names.
        for name in (HOSTIPMI, CHANNEL_SMS):
            assert await request_name(OTHER_USER, bus, name) == DENIED, name


@needs_root_and_users
async def test_btbridged_policy_owns_no_name(tmp_path: Path) -> None:
    """The same harness with the btbridged-mode policy: the bridge's user
    may not own org.openbmc.HostIpmi there (the check above can fail)."""
    policy = standin_policy(tmp_path, POLICY_FILE)
    socket = f"hiomapbridge-test-{os.getpid()}-{tmp_path.name}"
    with run_dbus_daemon(tmp_path, policy, SYSTEM_BUS_CONFIG, socket=socket) as bus:
        for name in (HOSTIPMI, CHANNEL_SMS):
            assert await request_name(BRIDGE_STANDIN, bus, name) == DENIED, name


@needs_root_and_users
async def test_bt_policy_sends_exactly_what_the_bridge_needs(tmp_path: Path) -> None:
    policy = standin_policy(tmp_path, BT_POLICY_FILE)
    socket = f"hiomapbridge-test-{os.getpid()}-{tmp_path.name}"
    with run_dbus_daemon(tmp_path, policy, SYSTEM_BUS_CONFIG, socket=socket) as bus:
        async with open_bus(bus) as peers:
            await serve_peers(peers)

            async def call(user: str, *args: str) -> subprocess.CompletedProcess[str]:
                return await busctl_as(user, bus, "call", *args)

            execute = (
                IPMID,
                "/xyz/openbmc_project/Ipmi",
                "xyz.openbmc_project.Ipmi.Server",
                "execute",
                "yyyaya{sv}",
                *("6", "0", "1", "0", "0"),  # Get Device ID
            )
            allowed = [
                execute,
                (
                    HIOMAPD,
                    "/xyz/openbmc_project/Hiomapd",
                    "xyz.openbmc_project.Hiomapd.Protocol",
                    "GetInfo",
                    "y",
                    "2",
                ),
                (
                    HIOMAPD,
                    "/xyz/openbmc_project/Hiomapd",
                    "xyz.openbmc_project.Hiomapd.Protocol.V2",
                    "CreateReadWindow",
                    "qq",
                    *("0", "1"),
                ),
                (
                    HIOMAPD,
                    "/xyz/openbmc_project/Hiomapd",
                    "org.freedesktop.DBus.Properties",
                    "GetAll",
                    "s",
                    "xyz.openbmc_project.Hiomapd.Protocol.V2",
                ),
            ]
            denied = [
                (
                    IPMID,
                    "/xyz/openbmc_project/Ipmi",
                    "org.freedesktop.DBus.Introspectable",
                    "Introspect",
                ),
                (
                    HIOMAPD,
                    "/xyz/openbmc_project/Hiomapd",
                    "xyz.openbmc_project.Hiomapd.Control",
                    "Reset",
                ),
            ]
            # The bridge sends GetAll to hiomapd's unique name: a
            # send_destination rule matches a recipient that owns the name.
            allowed.append(
                (
                    peers.unique_name,
                    "/xyz/openbmc_project/Hiomapd",
                    "org.freedesktop.DBus.Properties",
                    "GetAll",
                    "s",
                    "xyz.openbmc_project.Hiomapd.Protocol.V2",
                )
            )
            for args in allowed:
                result = await call(BRIDGE_STANDIN, *args)
                assert result.returncode == 0, (args, result.stderr)
            for args in denied:
                result = await call(BRIDGE_STANDIN, *args)
                assert result.stderr.strip() == DENIED, (args, result)
            # The same calls from another user are refused: the grants are
            # the bridge's, not everyone's.
            result = await call(OTHER_USER, *execute)
            assert result.stderr.strip() == DENIED, result


@contextlib.asynccontextmanager
async def open_bus_as(user: str, address: str) -> AsyncIterator[Bus]:
    """:func:`open_bus` on a connection made as ``user``: dbus-daemon takes
    the peer's credentials when it connects (SO_PEERCRED) and jeepney
    authenticates with the effective uid, so only the connection set-up runs
    with ``user``'s euid; everything after runs as root again."""
    async with contextlib.AsyncExitStack() as stack:
        os.seteuid(pwd.getpwnam(user).pw_uid)
        try:
            bus = await stack.enter_async_context(open_bus(address))
        finally:
            os.seteuid(0)
        yield bus


@needs_root_and_users
async def test_bt_policy_lets_root_raise_attention(tmp_path: Path) -> None:
    """ipmid (root) may call setAttention on the bridge; another user may
    not, and root may call nothing else there."""
    policy = standin_policy(tmp_path, BT_POLICY_FILE)
    socket = f"hiomapbridge-test-{os.getpid()}-{tmp_path.name}"
    with run_dbus_daemon(tmp_path, policy, SYSTEM_BUS_CONFIG, socket=socket) as bus:
        async with open_bus_as(BRIDGE_STANDIN, bus) as bridge, open_bus(bus) as ipmid:
            assert os.geteuid() == 0
            with trio.fail_after(30):
                reply = await bridge.bus_call("RequestName", "su", HOSTIPMI, 0)
                assert reply.body == (1,)  # primary owner

                async def attention(msg: Message) -> None:
                    await bridge.reply(msg, "x", 0)

                bridge.export("/org/openbmc/HostIpmi/1", attention)
                target = DBusAddress(
                    "/org/openbmc/HostIpmi/1",
                    bus_name=HOSTIPMI,
                    interface="org.openbmc.HostIpmi",
                )
                reply = await ipmid.call(new_method_call(target, "setAttention"))
                assert reply.body == (0,)
                with pytest.raises(DBusError) as refused:
                    await ipmid.call(
                        new_method_call(
                            target, "sendMessage", "yyyyyay", (0, 7, 0, 1, 0, b"")
                        )
                    )
                assert refused.value.name == "org.freedesktop.DBus.Error.AccessDenied"
            result = await busctl_as(
                OTHER_USER,
                bus,
                "call",
                HOSTIPMI,
                "/org/openbmc/HostIpmi/1",
                "org.openbmc.HostIpmi",
                "setAttention",
            )
            assert result.stderr.strip() == DENIED, result
