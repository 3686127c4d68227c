"""Logging that a flood cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import math

import trio


class RateLimitedLog:
    """Log at most once per ``interval`` seconds, with a count of the rest."""

    INTERVAL = 10.0

    def __init__(
        self, logger: logging.Logger, level: int, interval: float = INTERVAL
    ) -> None:
        self.log = logger
        self.level = level
        self.interval = interval
        self.count = 0
        self._suppressed = 0
        self._next = -math.inf

    def __call__(self, fmt: str, *args: object) -> None:
        self.count += 1
        now = trio.current_time()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            fmt += " (%d similar suppressed)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next = now + self.interval
        self.log.log(self.level, fmt, *args)

    def flush(self, what: str) -> None:
        """Log the count of lines suppressed since the last one, if any."""
        if self._suppressed:
            self.log.log(
                self.level, "%d more %s since the last report", self._suppressed, what
            )
            self._suppressed = 0
