"""The host-command queue: one event byte, delivered for real.

HIOMAP events are level-triggered state, so the queue keeps the *latest*
byte rather than a backlog (design.md, "Events are state, not a log").
Every post gets a generation number; a generation is *delivered* once a Read
Event Message Buffer response carrying that generation's byte, or a newer
one, was accepted by btbridged (its reply to ``sendMessage``).  Nothing
earlier counts: this is the difference from ipmid, which completes on
dequeue.

The queue does no I/O itself: it asserts SMS_ATN through the injected
``start_attention(done)``, which sends ``setAttention`` and later calls
``done`` with None or the exception.  The first SMS_ATN for an event goes
out synchronously, from whatever posted it (the bus receiver, in wire
order: no task switch on the event path); the only task is the
re-assertion timer.  It runs unchanged under trio's MockClock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import attrs
import trio

from .events import describe
from .hostlink import HostGone
from .ipmi import HEARTBEAT_RECORD, event_record

log = logging.getLogger(__name__)


@attrs.frozen
class Fetch:
    """What a Read Event Message Buffer response carries.

    ``generation`` is 0 for a heartbeat (nothing was waiting).
    """

    record: bytes
    generation: int
    byte: int | None


AttentionDone = Callable[[BaseException | None], None]


class HostQueue:
    """Latest-byte event queue with delivery completions and SMS_ATN."""

    def __init__(
        self,
        start_attention: Callable[[AttentionDone], None],
        atn_interval: float = 3.0,
    ) -> None:
        self._start_attention = start_attention
        self.atn_interval = atn_interval
        self._byte: int | None = None  # latest posted byte
        self._posted = 0  # generation of the latest post
        self._delivered = 0  # highest delivered generation
        self.last_delivered: int | None = None  # byte the host last received
        self._changed = trio.Event()  # set (and replaced) on every change
        self._attention_due = False  # assert once the one in flight is done
        self._asserting = False  # a setAttention is in flight
        self._next_at = math.inf  # when the timer re-asserts
        self._timer = trio.CancelScope()  # run_attention sleeps in it
        self.attention_count = 0

    # -- state -------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """True while a posted byte has not been delivered."""
        return self._delivered < self._posted

    @property
    def waiting_byte(self) -> int | None:
        return self._byte if self.waiting else None

    @property
    def posted_generation(self) -> int:
        return self._posted

    @property
    def delivered_generation(self) -> int:
        return self._delivered

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _request_attention(self) -> None:
        self._attention_due = True
        if not self._asserting:
            self._assert()

    # -- the event source side ---------------------------------------------

    def post(self, byte: int) -> int:
        """Make ``byte`` the event the host should hold; return its generation.

        If nothing waits and the host already holds ``byte``, or ``byte`` is
        what already waits, this is a no-op returning that generation.
        Otherwise the byte replaces whatever waited: the host fetches only
        the newest state.
        """
        announce = not self.waiting
        if announce and byte == self.last_delivered:
            return self._delivered
        if not announce and byte == self._byte:
            # Already waiting: a response carrying the current generation
            # (maybe in flight now) delivers exactly this state.
            return self._posted
        self._posted += 1
        self._byte = byte
        log.debug("event %s posted (generation %d)", describe(byte), self._posted)
        self._notify()
        if announce:
            self._request_attention()
        return self._posted

    async def wait_delivered(self, generation: int) -> None:
        """Return once ``generation`` (or a newer one) reached the host."""
        while self._delivered < generation:
            await self._changed.wait()

    async def wait_all_delivered(self) -> None:
        """Return once nothing waits for the host."""
        while self.waiting:
            await self._changed.wait()

    # -- the host side -----------------------------------------------------

    def message_flags(self) -> int:
        """The Get Message Flags byte: Event Message Buffer Full iff waiting."""
        return 0x02 if self.waiting else 0x00

    def fetch(self) -> Fetch:
        """Build a Read Event Message Buffer response.  The caller sends it and
        reports the outcome with :meth:`delivered` or :meth:`failed`."""
        if not self.waiting or self._byte is None:
            return Fetch(HEARTBEAT_RECORD, 0, None)
        return Fetch(event_record(self._byte), self._posted, self._byte)

    def delivered(self, fetch: Fetch) -> None:
        """btbridged accepted the response carrying ``fetch``."""
        if fetch.generation <= self._delivered:
            return
        self._delivered = fetch.generation
        self.last_delivered = fetch.byte
        log.debug(
            "event %s delivered (generation %d)%s",
            describe(fetch.byte or 0),
            fetch.generation,
            "; a newer event waits" if self.waiting else "",
        )
        if self.waiting:
            self._request_attention()
        self._notify()

    def failed(self, fetch: Fetch, why: str) -> None:
        """Sending ``fetch`` failed: it stays waiting; re-assert SMS_ATN now."""
        if fetch.generation:
            log.warning(
                "event %s not delivered (%s); it stays waiting",
                describe(fetch.byte or 0),
                why,
            )
            self._request_attention()

    def kick(self) -> None:
        """Re-assert SMS_ATN now if something waits (e.g. btbridged restarted)."""
        if self.waiting:
            self._request_attention()

    # -- SMS_ATN -----------------------------------------------------------
    #
    # SMS_ATN is asserted when a byte starts waiting, when a delivery or a
    # failed send leaves a byte waiting, on kick(), and every atn_interval
    # while a byte waits.  A newer post while a byte already waits needs no
    # new SMS_ATN: the host fetches the newest.  One setAttention is in
    # flight at a time; a request meanwhile is remembered and sent after it.

    def _assert(self) -> None:
        self._attention_due = False
        if not self.waiting:
            return
        self._asserting = True
        self.attention_count += 1
        self._arm(math.inf)  # the interval runs from the call's outcome
        try:
            self._start_attention(self._asserted)
        except Exception as exc:
            self._asserted(exc)

    def _asserted(self, exc: BaseException | None) -> None:
        if not self._asserting:  # the bus closed under a call being started
            return
        self._asserting = False
        if isinstance(exc, HostGone):  # a powered-off host: normal
            log.debug("SMS_ATN not raised: %s", exc)
        elif exc is not None:  # logged; the interval retries
            log.warning("SMS_ATN failed: %s", exc)
        self._arm(trio.current_time() + self.atn_interval)
        if self._attention_due:
            self._assert()

    def _arm(self, when: float) -> None:
        self._next_at = when
        self._timer.deadline = when

    async def run_attention(self) -> None:
        """The re-assertion timer: SMS_ATN again every ``atn_interval``
        while a byte waits (the host may have missed the last one)."""
        while True:
            with trio.CancelScope(deadline=self._next_at) as self._timer:
                await trio.sleep_forever()
            if trio.current_time() < self._next_at:
                continue  # re-armed for later while this wake-up was queued
            self._next_at = math.inf
            if self.waiting:
                self._request_attention()
