from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hiomapbridge.sim.privatebus import PrivateBus, private_bus


@pytest.fixture
def dbus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A real dbus-daemon on a private socket, one per test."""
    with private_bus(tmp_path) as bus:
        yield bus


@pytest.fixture
def bus_address(dbus: PrivateBus) -> str:
    return dbus.address
