"""The host through btbridged's D-Bus API (wire reference 2).

Requests arrive as ``ReceivedMessage`` signals from the current owner of
``org.openbmc.HostIpmi``; responses go back with ``sendMessage`` to the
signal's sender and path; SMS_ATN is ``setAttention``.  btbridged replies to
``sendMessage`` only after writing the bytes to the BT device, so that reply
is the delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from jeepney import HeaderFields, MatchRule, Message

from . import wire
from .dbus import Bus, NameOwner, SignalGuard
from .hostlink import HostRequest, Outcome, not_started, nothing
from .ipmi import HOSTIPMI_IFACE, HOSTIPMI_PATH, HOSTIPMI_SERVICE, response_netfn

log = logging.getLogger("hiomapbridge")

#: How long btbridged may take to accept a response (it gives up on the
#: host after 5 s itself).
SEND_REPLY_WITHIN = 5.0
#: A response sent this long or longer after the bridge read its request
#: asks for btbridged's reply, so that a refusal (btbridged already timed the
#: request out) is logged.  A quicker one is sent NO_REPLY_EXPECTED: its
#: request could only have timed out after waiting long in the bus, and
#: waking up for the reply was a third of the bridge's CPU per command.
#: Responses with an ``on_outcome`` (event records) always ask: their reply
#: is the delivery.
CONFIRM_RESPONSES_AFTER = 0.25


class BtbridgedLink:
    """The host link of ``--host btbridged``."""

    name = "btbridged"

    def __init__(self, bus: Bus, guard: SignalGuard) -> None:
        self.bus = bus
        self.guard = guard
        self.owner = NameOwner(HOSTIPMI_SERVICE, self._owner_changed)
        self._on_request: Callable[[HostRequest], None] = not_started
        self._on_connect: Callable[[], None] = nothing
        self._send_templates: dict[tuple[str, str], wire.CallTemplate] = {}
        self._set_attention_call = wire.CallTemplate(
            HOSTIPMI_SERVICE, HOSTIPMI_PATH, HOSTIPMI_IFACE, "setAttention"
        )

    async def start(
        self,
        nursery: trio.Nursery,
        on_request: Callable[[HostRequest], None],
        on_connect: Callable[[], None],
    ) -> None:
        self._on_request = on_request
        self._on_connect = on_connect
        self.bus.on_signal(
            HOSTIPMI_PATH, HOSTIPMI_IFACE, "ReceivedMessage", self._received
        )
        await self.bus.add_match(
            MatchRule(
                type="signal",
                interface=HOSTIPMI_IFACE,
                member="ReceivedMessage",
                path=HOSTIPMI_PATH,
            )
        )
        await self.owner.start(self.bus)

    def peer(self) -> str:
        return f"btbridged {self.owner.owner or '(absent)'}"

    def _owner_changed(self, old: str | None, new: str | None) -> None:
        if new is not None and old is not None:
            log.info("btbridged restarted; re-announcing any waiting event")
        if new is not None:
            self._on_connect()

    def _received(self, msg: Message) -> None:
        if not self.guard.accepted(msg, self.owner, "btbridged", "yyyyay"):
            return
        fields = msg.header.fields
        seq, netfn, lun, cmd, data = msg.body
        self._on_request(
            HostRequest(
                seq,
                netfn,
                lun,
                cmd,
                data,
                trio.current_time(),
                (fields[HeaderFields.sender], fields[HeaderFields.path]),
            )
        )

    def respond(
        self, req: HostRequest, cc: int, data: bytes, on_outcome: Outcome | None
    ) -> None:
        """``sendMessage`` to the request's btbridged, without waiting for the
        reply (a stalled btbridged must not stall us); the reply is asked for
        when it matters: for ``on_outcome``, and for a response late enough
        that btbridged may have given up on the request."""
        key: tuple[str, str] = req.origin  # type: ignore[assignment]
        template = self._send_templates.get(key)
        if template is None:
            if len(self._send_templates) >= 8:  # owners come and go: stay small
                self._send_templates.clear()
            template = self._send_templates[key] = wire.CallTemplate(
                key[0], key[1], HOSTIPMI_IFACE, "sendMessage", "yyyyyay"
            )
        body = wire.pack_send_message(
            req.seq, response_netfn(req.netfn), req.lun, req.cmd, cc, data
        )
        if (
            on_outcome is None
            and trio.current_time() - req.received < CONFIRM_RESPONSES_AFTER
        ):
            self.bus.send_template_noreply(template, body)
            return

        def outcome(reply: Message | Exception) -> None:
            failed = reply if isinstance(reply, Exception) else None
            if on_outcome is not None:
                on_outcome(failed)
            elif failed is not None:
                log.warning("sendMessage for %s failed: %r", req.describe(), failed)

        self.bus.call_template_nowait(template, body, outcome, SEND_REPLY_WITHIN)

    def current(self, req: HostRequest) -> bool:
        return True  # btbridged times requests out itself

    def attention(self, done: Outcome) -> None:
        def outcome(reply: Message | Exception) -> None:
            done(reply if isinstance(reply, Exception) else None)

        self.bus.call_template_nowait(
            self._set_attention_call, b"", outcome, SEND_REPLY_WITHIN
        )
