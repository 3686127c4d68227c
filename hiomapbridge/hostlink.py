"""The seam between the bridge's core and the medium that reaches the host.

The core (:mod:`hiomapbridge.bridge`) owns every rule: which requests it
answers, HIOMAP, the event queue and its delivery completions, forwarding,
the shutdown sequence.  A host link owns nothing but I/O: it turns what the
host sent into :class:`HostRequest` values, writes responses, raises SMS_ATN
and reports each outcome.  Two links exist: btbridged's D-Bus API
(:mod:`hiomapbridge.link_btbridged`) and the BT interface itself, as the
kernel device or the unix-socket seam (:mod:`hiomapbridge.link_bt`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import trio

#: Told ``None`` once the medium took the bytes (btbridged's reply, the
#: device's write, the socket's send), or what went wrong instead.
Outcome = Callable[[BaseException | None], None]


class HostRequest(NamedTuple):
    """One request from the host, whatever carried it.  (A named tuple, not
    an attrs class: one is built per request, and a tuple costs half as
    much to build as a frozen attrs instance.)"""

    seq: int
    netfn: int
    lun: int
    cmd: int
    data: bytes
    received: float  # trio.current_time() when it was read
    #: The link's own note of where the answer goes (btbridged's unique name
    #: and path; the bt: connection it came in on).  The core never looks.
    origin: object = None

    def describe(self) -> str:
        return f"seq={self.seq} netfn={self.netfn:#04x} cmd={self.cmd:#04x}"


class HostLinkError(Exception):
    """The link cannot start (e.g. the BT device cannot be opened)."""


class HostGone(ConnectionError):
    """No host is connected (any more) to take a response or SMS_ATN: a
    normal state while the host is powered off, not an error."""


def not_started(req: HostRequest) -> None:
    """A link's request handler before ``start()``."""
    raise RuntimeError("the host link was not started")


def nothing() -> None:
    """A link's connect handler before ``start()``."""


class HostLink(Protocol):
    """What the core needs of a host medium."""

    #: For logs: ``btbridged``, ``bt:/dev/ipmi-bt-host``.
    name: str

    async def start(
        self,
        nursery: trio.Nursery,
        on_request: Callable[[HostRequest], None],
        on_connect: Callable[[], None],
    ) -> None:
        """Start reading requests into ``on_request`` (called synchronously,
        in arrival order, never blocking).  ``on_connect`` runs whenever a
        (new) host peer appears, so that waiting events are announced again.
        Returns once requests can flow (or, where the medium reconnects by
        itself, once it is trying).  Raises :class:`HostLinkError` if the
        medium cannot be used at all."""
        ...

    def respond(
        self,
        req: HostRequest,
        cc: int,
        data: bytes,
        on_outcome: Outcome | None,
    ) -> None:
        """Send the response to ``req`` without blocking.  With
        ``on_outcome`` it is told when the host side has the bytes (or why
        not); without, the link logs a failure itself."""
        ...

    def current(self, req: HostRequest) -> bool:
        """Whether the host that sent ``req`` can still get its answer (False
        once it disconnected: nothing more is done for it)."""
        ...

    def attention(self, done: Outcome) -> None:
        """Raise SMS_ATN; ``done`` gets the outcome (it may run before this
        returns)."""
        ...

    def peer(self) -> str:
        """Who is on the other end now, for the ready line."""
        ...
