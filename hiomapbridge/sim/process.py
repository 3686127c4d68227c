"""Run a daemon as a real subprocess with a systemd-style NOTIFY_SOCKET.

Used by the tests, the demo and the benchmarks to drive ``hiomapbridge``
and ``hiomapbridge-sim hiomapd`` exactly as systemd would: exec, wait for
READY=1, deliver real signals, collect the exit status and the log.
"""

from __future__ import annotations

import os
import signal
import socket as _socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio


@attrs.define
class Service:
    """A running daemon and what it told us over ``NOTIFY_SOCKET``."""

    name: str
    process: trio.Process
    log_path: Path
    started_at: float
    #: (trio time, state string) for every datagram received
    notifications: list[tuple[float, str]] = attrs.field(factory=list)
    exited_at: float | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _notified(self, state: str) -> None:
        self.notifications.append((trio.current_time(), state))
        self._changed.set()
        self._changed = trio.Event()

    def notified(self, state: str) -> float | None:
        """When ``state`` (e.g. ``READY=1``) was first announced, or None."""
        for when, text in self.notifications:
            if state in text.split("\n"):
                return when
        return None

    async def wait_notified(self, state: str) -> float:
        while (when := self.notified(state)) is None:
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}) before "
                    f"{state}:\n{self.log()}"
                )
            with trio.move_on_after(0.05):  # also notice an early exit
                await self._changed.wait()
        return when

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        code = await self.process.wait()
        if self.exited_at is None:
            self.exited_at = trio.current_time()
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def python_command(module: str, *args: str) -> list[str]:
    """argv running ``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@asynccontextmanager
async def run_service(
    name: str,
    argv: Sequence[str],
    directory: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 20.0,
    wait_ready: bool = True,
) -> AsyncIterator[Service]:
    """Start ``argv`` with its own NOTIFY_SOCKET; yield once READY=1 arrived.

    Leaving the block SIGKILLs the process if it still runs (a test that
    wants a clean exit signals and waits for it first).
    """
    notify_path = directory / f"{name}.notify"
    log_path = directory / f"{name}.log"
    with trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as sock:
        if notify_path.exists():
            notify_path.unlink()
        await sock.bind(str(notify_path))
        full_env = dict(os.environ if env is None else env)
        full_env["NOTIFY_SOCKET"] = str(notify_path)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                list(argv),
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, process, log_path, trio.current_time())
        try:
            async with trio.open_nursery() as nursery:

                async def listen() -> None:
                    while True:
                        data = await sock.recv(4096)
                        service._notified(data.decode(errors="replace"))

                nursery.start_soon(listen)
                if wait_ready:
                    with trio.fail_after(ready_timeout):
                        await service.wait_notified("READY=1")
                yield service
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
