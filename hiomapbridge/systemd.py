"""systemd integration without libsystemd: sd_notify, watchdog, journal logs."""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``.

    Accepts a filesystem path or an abstract name written with a leading
    ``@``.  Returns False when there is no socket or sending failed (which is
    logged, never raised: a notification must not take the daemon down).
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as s:
            s.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify(%s) to %s failed: %s", state, path, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None.

    Honours ``WATCHDOG_PID`` as sd_watchdog_enabled() does: the watchdog is
    ours only if it is unset or names this process.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalPrefixFormatter(logging.Formatter):
    """Prefix each line with ``<N>`` so journald records its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno > 10 else 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str, name: str) -> None:
    """Log to stderr; journal priorities when ``JOURNAL_STREAM`` is set."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalPrefixFormatter(f"{name}: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
