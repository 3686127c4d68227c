"""A private dbus-daemon for tests, benchmarks and the demo."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <limit name="max_replies_per_connection">50000</limit>
  <policy context="default">
{policy}
  </policy>
</busconfig>
"""

#: Anything goes (a session bus, and then some): the default for tests.
PERMISSIVE_POLICY = """\
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>"""

#: system.conf's rule for replies: only those the bus saw requested.
SYSTEM_REPLY_POLICY = """\
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>"""


@attrs.frozen
class PrivateBus:
    address: str
    process: subprocess.Popen[bytes]
    directory: Path

    def kill(self) -> None:
        """Kill the bus daemon (as a crash would)."""
        self.process.kill()
        self.process.wait()


def dbus_daemon_path() -> str:
    path = shutil.which("dbus-daemon")
    if path is None:
        raise RuntimeError(
            "dbus-daemon not found: install it (Debian: apt-get install dbus-daemon)"
        )
    return path


@contextlib.contextmanager
def private_bus(
    directory: Path | None = None,
    policy: str = PERMISSIVE_POLICY,
    kind: str = "session",
) -> Iterator[PrivateBus]:
    """Run a dbus-daemon on a private socket for the duration of the block,
    with the given ``<policy context="default">`` rules."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        socket = directory / "bus"
        config = directory / "bus.conf"
        config.write_text(_CONFIG.format(socket=socket, policy=policy, kind=kind))
        proc = subprocess.Popen(
            [
                dbus_daemon_path(),
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                f"--config-file={config}",
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stderr=stack.enter_context((directory / "bus.log").open("wb")),
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()
            if not line:
                raise RuntimeError("dbus-daemon failed to start")
            yield PrivateBus(address=line, process=proc, directory=directory)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
