"""Beside ipmid (``--host bt:``): forward what the bridge does not own, and
carry ipmid's own events to the host (wire reference 9).

* Every request the core does not answer itself goes to ipmid's
  ``execute`` and the host gets ipmid's bytes verbatim.  Each call has a
  deadline; no owner answers cc 0xD3, no reply 0xC3, an error or a reply of
  the wrong shape 0xFF, each logged.  Calls run concurrently, as callbacks:
  nothing waits behind another forwarded command or behind hiomapd.
* ipmid decides a caller's channel from the well-known names it owns, so the
  bridge owns ``xyz.openbmc_project.Ipmi.Channel.<NAME>``: forwarded
  commands then count as system-interface commands.
* ipmid raises SMS_ATN for its own events (SoftOff, heartbeat) by calling
  ``setAttention`` on ``org.openbmc.HostIpmi``; the bridge owns that name
  and serves exactly that method there, to ipmid alone.  ipmid's event then
  waits until a Read Event Message Buffer forwarded to ipmid was answered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio
from jeepney import DBusAddress, HeaderFields, Message, new_method_call

from . import wire
from .dbus import Bus, BusClosed, DBusError, NameOwner, sender_of
from .hostlink import HostLinkError, HostRequest
from .ipmi import (
    CMD_READ_EVENT_MESSAGE_BUFFER,
    HOSTIPMI_IFACE,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    NETFN_APP,
    CompletionCode,
)
from .ratelimit import RateLimitedLog

log = logging.getLogger("hiomapbridge")

IPMID_SERVICE: Final = "xyz.openbmc_project.Ipmi.Host"
IPMID_PATH: Final = "/xyz/openbmc_project/Ipmi"
IPMID_IFACE: Final = "xyz.openbmc_project.Ipmi.Server"
CHANNEL_PREFIX: Final = "xyz.openbmc_project.Ipmi.Channel."
#: OpenBMC's default channel_config.json names the system interface
#: (channel 15) "SMS".
DEFAULT_CHANNEL: Final = "SMS"

#: Forwarded calls waiting for ipmid at once; past this ipmid is not keeping
#: up (or is wedged) and further commands are answered NODE_BUSY, so memory
#: stays bounded whatever the host sends.
MAX_IN_FLIGHT: Final = 64

_DO_NOT_QUEUE: Final = 4
_PRIMARY_OWNER: Final = 1
_ALREADY_OWNER: Final = 4
_NO_OWNER_ERRORS: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        # The bus answers this for a callee that disconnected before it
        # replied (its own 25 s reply timeout never comes first: our
        # deadline is shorter): ipmid went away during the call.
        "org.freedesktop.DBus.Error.NoReply",
    }
)
_SET_ATTENTION_REPLY: Final = wire.pack_fixed("x", (0,))

#: Told the completion code and data the host is to get.
Answer = Callable[[int, bytes], None]


class Forwarder:
    """ipmid's side of a ``bt:`` bridge."""

    def __init__(
        self,
        bus: Bus,
        channel: str,
        timeout: float,
        on_attention: Callable[[], None],
    ) -> None:
        self.bus = bus
        self.channel_name = CHANNEL_PREFIX + channel
        self.timeout = timeout
        self._on_attention = on_attention
        self.ipmid = NameOwner(IPMID_SERVICE, self._ipmid_changed)
        #: ipmid raised SMS_ATN and no Read Event Message Buffer forwarded
        #: since has been answered.
        self.event_waiting = False
        self._event_generation = 0
        self.forwarded = 0
        self.in_flight = 0
        self.failures = RateLimitedLog(log, logging.WARNING)
        self.refused = RateLimitedLog(log, logging.WARNING)

    async def start(self) -> None:
        """Track ipmid, serve ``setAttention``, own the two names.

        Raises :class:`HostLinkError` if a name is owned by somebody else
        (btbridged still running, or a second bridge)."""
        await self.ipmid.start(self.bus)
        self.bus.export_inline(HOSTIPMI_PATH, self._call)
        for name in (self.channel_name, HOSTIPMI_SERVICE):
            try:
                reply = await self.bus.bus_call(
                    "RequestName", "su", name, _DO_NOT_QUEUE
                )
            except DBusError as exc:  # e.g. the D-Bus policy refuses it
                raise HostLinkError(f"cannot own {name}: {exc}") from exc
            if reply.body[0] not in (_PRIMARY_OWNER, _ALREADY_OWNER):
                owner = await self._owner_of(name)
                raise HostLinkError(
                    f"cannot own {name}: {owner} has it "
                    "(is btbridged or another bridge running?)"
                )

    async def _owner_of(self, name: str) -> str:
        try:
            return str((await self.bus.bus_call("GetNameOwner", "s", name)).body[0])
        except DBusError:
            return "another connection"

    def _ipmid_changed(self, old: str | None, new: str | None) -> None:
        if self.event_waiting:
            log.info("ipmid changed owner: its waiting event is gone with it")
            self.event_waiting = False

    # -- setAttention from ipmid --------------------------------------------

    def _call(self, msg: Message) -> None:
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        interface = fields.get(HeaderFields.interface)
        if member != "setAttention" or interface not in (HOSTIPMI_IFACE, None):
            self.bus.reply_error_nowait(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                f"{HOSTIPMI_PATH} serves only {HOSTIPMI_IFACE}.setAttention",
            )
            return
        sender = sender_of(msg)
        if sender is None or sender != self.ipmid.owner:
            self.refused(
                "refused setAttention from %s: only ipmid (%s) may call it",
                sender,
                self.ipmid.owner or "absent",
            )
            self.bus.reply_error_nowait(
                msg,
                "org.freedesktop.DBus.Error.AccessDenied",
                f"only the owner of {IPMID_SERVICE} may raise SMS_ATN here",
            )
            return
        self.event_waiting = True
        self._event_generation += 1
        log.debug("ipmid raised SMS_ATN: its event waits")
        self.bus.reply_nowait(msg, "x", _SET_ATTENTION_REPLY)
        self._on_attention()

    # -- execute --------------------------------------------------------------

    def forward(self, req: HostRequest, answer: Answer) -> None:
        """Call ipmid's ``execute`` for ``req``; ``answer`` gets what the host
        is to receive (synchronously if ipmid has no owner)."""
        if self.ipmid.owner is None:
            self.failures(
                "forwarding %s: ipmid (%s) is not on the bus: cc 0xD3",
                req.describe(),
                IPMID_SERVICE,
            )
            answer(CompletionCode.DESTINATION_UNAVAILABLE, b"")
            return
        if self.in_flight >= MAX_IN_FLIGHT:
            self.failures(
                "forwarding %s: %d calls already wait for ipmid: cc 0xC0",
                req.describe(),
                self.in_flight,
            )
            answer(CompletionCode.NODE_BUSY, b"")
            return
        self.forwarded += 1
        self.in_flight += 1
        pops_event = req.netfn == NETFN_APP and req.cmd == CMD_READ_EVENT_MESSAGE_BUFFER
        generation = self._event_generation
        msg = new_method_call(
            DBusAddress(IPMID_PATH, bus_name=IPMID_SERVICE, interface=IPMID_IFACE),
            "execute",
            "yyyaya{sv}",
            (req.netfn, req.lun, req.cmd, req.data, {}),
        )

        def done(reply: Message | Exception) -> None:
            self.in_flight -= 1
            if isinstance(reply, BusClosed):
                return
            cc, data = self._result(req, reply)
            if (
                pops_event
                and isinstance(reply, Message)
                and generation == self._event_generation
            ):
                self.event_waiting = False
            answer(cc, data)

        self.bus.call_nowait(msg, done, self.timeout)

    def _result(
        self, req: HostRequest, reply: Message | Exception
    ) -> tuple[int, bytes]:
        if isinstance(reply, trio.TooSlowError):
            self.failures(
                "ipmid did not answer %s within %ss: cc 0xC3",
                req.describe(),
                self.timeout,
            )
            return CompletionCode.TIMEOUT, b""
        if isinstance(reply, DBusError):
            if reply.name in _NO_OWNER_ERRORS:
                self.failures(
                    "forwarding %s: ipmid is gone (%s): cc 0xD3",
                    req.describe(),
                    reply.name,
                )
                return CompletionCode.DESTINATION_UNAVAILABLE, b""
            self.failures("ipmid failed %s: %s: cc 0xFF", req.describe(), reply)
            return CompletionCode.UNSPECIFIED, b""
        if isinstance(reply, Exception):
            self.failures("forwarding %s failed: %r: cc 0xFF", req.describe(), reply)
            return CompletionCode.UNSPECIFIED, b""
        signature = reply.header.fields.get(HeaderFields.signature, "")
        if signature != "yyyyay":
            self.failures(
                "ipmid answered %s with signature %r, not 'yyyyay': cc 0xFF",
                req.describe(),
                signature,
            )
            return CompletionCode.UNSPECIFIED, b""
        _netfn, _lun, _cmd, cc, data = reply.body
        return cc, bytes(data)
