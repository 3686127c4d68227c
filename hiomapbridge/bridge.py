"""The daemon's core: one nursery composing the host link, hiomapd, ipmid
and the shutdown sequence.

The core owns every rule; a host link (:mod:`hiomapbridge.hostlink`) only
moves bytes.  Everything on the hot path runs synchronously, in arrival
order, in whatever task read the request (the bus receiver for btbridged,
the BT reader for ``bt:``): messaging commands (Get/Clear Message Flags,
Read Event Message Buffer) and Get BT Interface Capabilities are answered
on the spot; anything else is answered cc 0xC1 (btbridged mode) or handed
to ipmid's ``execute`` (``bt:`` mode, :mod:`hiomapbridge.forward`) as a
call whose reply is a callback; a HIOMAP request goes straight on to
hiomapd as a call whose reply (or deadline) is a callback that sends the
response and starts the next queued request.  So HIOMAP requests reach
hiomapd strictly one at a time, in arrival order, without a task switch per
command, and nothing waits behind anything else.  The tasks (inside
``open_bus``, so the bus outlives every task that uses it)::

    bridge nursery
     ├ host link          its reader (and writer) tasks, if any
     ├ hiomapd watcher    GetAll whenever hiomapd gains an owner
     ├ SMS_ATN timer      HostQueue.run_attention (re-assertion; the first
     │                    SMS_ATN goes out from whatever posted the event)
     ├ log flusher        counts behind rate-limited log lines
     └ watchdog           WATCHDOG=1 when systemd asks for it

Callbacks never block: responses are written with one non-blocking send
(queued by the link only while the medium is full), and the HIOMAP queue is
bounded (overflow is answered NODE_BUSY, counted and logged).  The shutdown
sequence runs in :func:`run`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio
from jeepney import DBusAddress, HeaderFields, MatchRule, Message, new_method_call

from . import bt, systemd, wire
from .dbus import Bus, BusClosed, DBusError, NameOwner, SignalGuard, open_bus
from .events import Event, describe, fold
from .forward import DEFAULT_CHANNEL, Forwarder
from .hiomap import (
    HIOMAPD_PATH,
    HIOMAPD_SERVICE,
    IFACE_V2,
    Dispatcher,
    HiomapCall,
    Rejected,
    encode_error,
    encode_reply,
)
from .hostlink import HostGone, HostLink, HostLinkError, HostRequest, Outcome
from .hostq import HostQueue
from .ipmi import (
    CMD_CLEAR_MESSAGE_FLAGS,
    CMD_GET_BT_CAPABILITIES,
    CMD_GET_MESSAGE_FLAGS,
    CMD_HIOMAP,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    HOSTIPMI_IFACE,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    MESSAGE_FLAG_EVENT_BUFFER_FULL,
    NETFN_APP,
    NETFN_OEM_IBM,
    CompletionCode,
)
from .link_bt import BtLink
from .link_btbridged import BtbridgedLink
from .ratelimit import RateLimitedLog

log = logging.getLogger("hiomapbridge")

PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"

PROTOCOL_RESET = int(Event.PROTOCOL_RESET)
DAEMON_READY = int(Event.DAEMON_READY)

#: HIOMAP requests waiting behind the one at hiomapd.  The host has one
#: request in flight; anything deeper is a misbehaving peer, answered
#: NODE_BUSY at once.
HIOMAP_BACKLOG = 64


@attrs.frozen
class Config:
    """What the daemon runs with; :mod:`hiomapbridge.timing` says which
    combinations of deadlines the host's own timeouts allow."""

    bus: str = "system"
    #: ``btbridged`` or ``bt:PATH`` (the BT device, or the unix-socket seam).
    host: str = "btbridged"
    hiomapd_timeout: float = 2.5
    ipmid_timeout: float = 2.5
    #: Advertised in Get BT Interface Capabilities: the host times a request
    #: out (and retries it) after this many whole seconds.
    bt_transaction_time: int = 3
    ipmi_channel: str = DEFAULT_CHANNEL
    atn_interval: float = 3.0
    shutdown_timeout: float = 5.0
    reject_unknown: bool = True

    @property
    def bt_path(self) -> str | None:
        """PATH of ``bt:PATH``, or None in btbridged mode."""
        if self.host.startswith("bt:"):
            return self.host[3:]
        return None


@attrs.define
class Stats:
    requests: int = 0
    hiomap: int = 0
    #: New event states handed to the queue (a repeat of the state the host
    #: holds or that already waits is not one: the queue ignores it).
    events_posted: int = 0


class Bridge:
    """hiomapbridge's state and tasks on one bus connection."""

    #: Tests substitute a queue with ipmid's completion-on-dequeue to show
    #: that the shutdown tests detect the race it leaves open.
    queue_class: type[HostQueue] = HostQueue

    def __init__(self, bus: Bus, config: Config) -> None:
        self.bus = bus
        self.config = config
        self.guard = SignalGuard(log)
        self.forged = self.guard.forged
        self.rejected_signals = self.guard.rejected
        path = config.bt_path
        self.link: HostLink
        self.forwarder: Forwarder | None = None
        if path is None:
            self.link = BtbridgedLink(bus, self.guard)
        else:
            self.link = BtLink(path)
            self.forwarder = Forwarder(
                bus, config.ipmi_channel, config.ipmid_timeout, self._ipmid_attention
            )
        self.queue = self.queue_class(self._start_attention, config.atn_interval)
        self.dispatcher = Dispatcher()
        self.hiomapd = NameOwner(HIOMAPD_SERVICE, self._hiomapd_changed)
        self.events = 0  # the event byte as hiomapd last told us
        self.shutting_down = False
        self.stats = Stats()
        self.overflow = RateLimitedLog(log, logging.WARNING)
        self.oversized = RateLimitedLog(log, logging.WARNING)
        self._capabilities = bt.capabilities(config.bt_transaction_time)
        self._hiomap_backlog: deque[HostRequest] = deque()
        self._hiomap_busy = False
        self._hiomapd_templates: dict[tuple[str, str], wire.CallTemplate] = {}
        self._refresh_wanted = trio.Event()
        self._state_read = trio.Event()

    @property
    def btbridged(self) -> NameOwner:
        """Who owns ``org.openbmc.HostIpmi`` (btbridged mode only)."""
        if not isinstance(self.link, BtbridgedLink):
            raise AttributeError("no btbridged in bt: mode")
        return self.link.owner

    # -- start-up ----------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Subscribe, open the host link, learn the peers and hiomapd's
        state, start the tasks.

        Returns when the daemon is ready to be announced READY=1 (which
        does not wait for a ``bt:`` socket's host to connect).  Raises
        :class:`HostLinkError` if the host link cannot be used.
        """
        bus = self.bus
        bus.on_signal(
            HIOMAPD_PATH, PROPERTIES_IFACE, "PropertiesChanged", self._properties
        )
        rule = MatchRule(
            type="signal",
            interface=PROPERTIES_IFACE,
            member="PropertiesChanged",
            path=HIOMAPD_PATH,
        )
        rule.add_arg_condition(0, IFACE_V2)
        await bus.add_match(rule)
        if self.forwarder is not None:
            await self.forwarder.start()
        await self.hiomapd.start(bus)
        # Last: a host request may arrive at once, and the peers it needs
        # must be known by then (a reply from a connection not yet known to
        # own hiomapd's name would be refused as stray).
        await self.link.start(nursery, self._received, self._host_connected)
        nursery.start_soon(self.queue.run_attention)
        nursery.start_soon(self._hiomapd_watcher)
        nursery.start_soon(self._flush_logs)
        interval = systemd.watchdog_interval()
        if interval is not None:
            nursery.start_soon(_watchdog, interval)
        if self.hiomapd.owner is None:
            log.info("hiomapd is not running; waiting for it to appear")
        else:
            await self._state_read.wait()

    def describe_peers(self) -> str:
        peers = [self.link.peer(), f"hiomapd {self.hiomapd.owner or '(absent)'}"]
        if self.forwarder is not None:
            peers.append(f"ipmid {self.forwarder.ipmid.owner or '(absent)'}")
        return ", ".join(peers)

    # -- hiomapd state -----------------------------------------------------

    def _hiomapd_changed(self, old: str | None, new: str | None) -> None:
        if new is not None:
            self._refresh_wanted.set()
        elif self.events & DAEMON_READY:
            log.warning(
                "hiomapd vanished with DAEMON_READY set (crash?): "
                "telling the host PROTOCOL_RESET"
            )
            self._post(PROTOCOL_RESET)

    async def _hiomapd_watcher(self) -> None:
        """Read hiomapd's whole state whenever it gains an owner."""
        while True:
            await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()
            owner = self.hiomapd.owner
            if owner is None:
                continue
            msg = new_method_call(
                DBusAddress(HIOMAPD_PATH, bus_name=owner, interface=PROPERTIES_IFACE),
                "GetAll",
                "s",
                (IFACE_V2,),
            )
            done = trio.Event()

            def got(
                reply: Message | Exception, owner: str = owner, done: trio.Event = done
            ) -> None:
                done.set()
                self._state_read.set()
                if isinstance(reply, Exception):
                    log.error("reading hiomapd's state failed: %r", reply)
                elif owner != self.hiomapd.owner:
                    log.info("ignoring state of hiomapd %s: no longer the owner", owner)
                elif reply.header.fields.get(HeaderFields.signature) != "a{sv}":
                    log.error("hiomapd GetAll: unexpected reply signature")
                else:
                    self._apply(0, reply.body[0], "GetAll")

            # The reply is handled in the receiver, in wire order with
            # PropertiesChanged, so a newer signal is never overwritten by an
            # older snapshot.
            self.bus.call_nowait(msg, got, self.config.hiomapd_timeout)
            await done.wait()

    def _properties(self, msg: Message) -> None:
        if not self.guard.accepted(msg, self.hiomapd, "hiomapd", "sa{sv}as"):
            return
        interface, changed, _invalidated = msg.body
        if interface != IFACE_V2:
            return
        self._apply(self.events, changed, "PropertiesChanged")

    def _apply(self, base: int, changed: Any, source: str) -> None:
        folded = fold(base, changed)
        if folded.ignored:
            self.rejected_signals(
                "hiomapd %s: ignored %s", source, "; ".join(folded.ignored)
            )
        self.events = folded.byte
        log.debug("hiomapd %s: events now %s", source, describe(folded.byte))
        self._post(folded.byte)

    def _post(self, byte: int) -> None:
        self.events = byte
        if self.shutting_down:
            log.info(
                "shutting down: not forwarding event %s to the host", describe(byte)
            )
            return
        before = self.queue.posted_generation
        self.queue.post(byte)
        if self.queue.posted_generation != before:  # not a repeat
            self.stats.events_posted += 1

    # -- host side ---------------------------------------------------------

    def _host_connected(self) -> None:
        """A (new) host peer: announce again whatever waits for it."""
        self.queue.kick()
        if self.forwarder is not None and self.forwarder.event_waiting:
            self._ipmid_attention()

    def _received(self, req: HostRequest) -> None:
        """One host request: the responder table."""
        self.stats.requests += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("host request %s data=%s", req.describe(), req.data.hex())
        netfn, cmd = req.netfn, req.cmd
        if netfn == NETFN_OEM_IBM and cmd == CMD_HIOMAP:
            self._hiomap_request(req)
        elif netfn != NETFN_APP:
            self._not_ours(req)
        elif cmd == CMD_GET_MESSAGE_FLAGS:
            self._respond(req, 0, bytes([self._message_flags()]))
        elif cmd == CMD_READ_EVENT_MESSAGE_BUFFER:
            self._read_event(req)
        elif cmd == CMD_CLEAR_MESSAGE_FLAGS:
            self._respond(req, 0)
        elif cmd == CMD_GET_BT_CAPABILITIES:
            self._respond(req, 0, self._capabilities)
        else:
            self._not_ours(req)

    def _message_flags(self) -> int:
        """Event Message Buffer Full while the bridge's event or ipmid's waits."""
        flags = self.queue.message_flags()
        if self.forwarder is not None and self.forwarder.event_waiting:
            flags |= MESSAGE_FLAG_EVENT_BUFFER_FULL
        return flags

    def _read_event(self, req: HostRequest) -> None:
        """The bridge's HIOMAP event first; otherwise ipmid's queue (bt:
        mode), or a heartbeat record."""
        if self.forwarder is not None and not self.queue.waiting:
            self._forward(req)
            return
        fetch = self.queue.fetch()
        if not fetch.generation:  # a heartbeat: nothing to complete
            self._respond(req, 0, fetch.record)
            return

        def outcome(failed: BaseException | None) -> None:
            if failed is not None:
                self.queue.failed(fetch, repr(failed))
                return
            self.queue.delivered(fetch)
            if self.forwarder is not None and self.forwarder.event_waiting:
                self._ipmid_attention()  # one Read Event per SMS_ATN

        self._respond(req, 0, fetch.record, outcome)

    def _not_ours(self, req: HostRequest) -> None:
        if self.forwarder is not None:
            self._forward(req)
        elif self.config.reject_unknown:
            self._respond(req, CompletionCode.INVALID_COMMAND)
        else:
            log.debug("not answering %s (--no-reject-unknown)", req.describe())

    def _forward(self, req: HostRequest) -> None:
        assert self.forwarder is not None

        def answer(cc: int, data: bytes) -> None:
            self._respond(req, cc, data)

        self.forwarder.forward(req, answer)

    def _respond(
        self,
        req: HostRequest,
        cc: int,
        data: bytes = b"",
        on_outcome: Outcome | None = None,
    ) -> None:
        if len(data) > bt.MAX_RESPONSE_DATA:
            self.oversized(
                "response to %s has %d data bytes, more than the 64-byte BT FIFO "
                "carries (%d): answered cc 0xCA instead",
                req.describe(),
                len(data),
                bt.MAX_RESPONSE_DATA,
            )
            cc, data = CompletionCode.CANNOT_RETURN_DATA, b""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("response %s cc=%#04x data=%s", req.describe(), cc, data.hex())
        self.link.respond(req, cc, data, on_outcome)

    def _ipmid_attention(self) -> None:
        def done(failed: BaseException | None) -> None:
            if isinstance(failed, HostGone):  # re-announced on reconnect
                log.debug("SMS_ATN for ipmid's event not raised: %s", failed)
            elif failed is not None:
                log.warning("SMS_ATN for ipmid's event failed: %s", failed)

        self.link.attention(done)

    # HIOMAP requests run as a chain of callbacks: request -> hiomapd call ->
    # its reply (or deadline) -> response -> the next one.  One is at
    # hiomapd at a time, in arrival order; no task switch per command.

    def _hiomap_request(self, req: HostRequest) -> None:
        if self._hiomap_busy:
            if len(self._hiomap_backlog) >= HIOMAP_BACKLOG:
                self.overflow(
                    "HIOMAP backlog full (%d waiting for hiomapd): answered %s "
                    "NODE_BUSY",
                    HIOMAP_BACKLOG,
                    req.describe(),
                )
                self._respond(req, CompletionCode.NODE_BUSY)
            else:
                self._hiomap_backlog.append(req)
            return
        self._hiomap_busy = True
        while True:
            if self._hiomap_start(req):
                return  # at hiomapd: its callback continues the chain
            if not self._hiomap_backlog:
                break
            req = self._hiomap_backlog.popleft()
        self._hiomap_busy = False

    def _hiomap_next(self) -> None:
        self._hiomap_busy = False
        if self._hiomap_backlog:
            self._hiomap_request(self._hiomap_backlog.popleft())

    def _hiomap_start(self, req: HostRequest) -> bool:
        """Dispatch ``req``; True if it went to hiomapd, False if answered
        (or dropped: its host disconnected while it waited in the backlog,
        and a window command for a host that is gone must not change
        hiomapd's state)."""
        self.stats.hiomap += 1
        if not self.link.current(req):
            log.info("HIOMAP %s dropped: its host disconnected", req.describe())
            return False
        plan = self.dispatcher.request(req.data)
        if isinstance(plan, Rejected):
            log.info("HIOMAP %s rejected: %s", req.describe(), plan.reason)
            self._respond(req, plan.cc, b"")
            return False
        key = (plan.interface, plan.member)
        template = self._hiomapd_templates.get(key)
        if template is None:
            template = self._hiomapd_templates[key] = wire.CallTemplate(
                HIOMAPD_SERVICE,
                HIOMAPD_PATH,
                plan.interface,
                plan.member,
                plan.signature,
            )

        def done(reply: Message | Exception) -> None:
            if isinstance(reply, BusClosed):
                return
            cc, data = self._hiomapd_result(plan, reply)
            try:
                self._respond(req, cc, data)
            finally:
                self._hiomap_next()

        self.bus.call_template_nowait(
            template,
            wire.pack_fixed(plan.signature, plan.args),
            done,
            self.config.hiomapd_timeout,
        )
        return True

    def _hiomapd_result(
        self, plan: HiomapCall, reply: Message | Exception
    ) -> tuple[int, bytes]:
        if isinstance(reply, Message):
            signature = reply.header.fields.get(HeaderFields.signature, "")
            cc, data = encode_reply(plan, signature, reply.body)
            if cc != CompletionCode.OK:
                log.error(
                    "hiomapd %s: unexpected reply %r (signature %r, wanted %r)",
                    plan.member,
                    reply.body,
                    signature,
                    plan.reply_signature,
                )
            return cc, data
        if isinstance(reply, trio.TooSlowError):
            log.error(
                "hiomapd %s: no reply within %ss",
                plan.member,
                self.config.hiomapd_timeout,
            )
            return CompletionCode.TIMEOUT, b""
        if isinstance(reply, DBusError):
            cc = encode_error(reply.name)
            log.info("hiomapd %s failed: %s -> cc %#04x", plan.member, reply, cc)
            return cc, b""
        log.error("hiomapd %s failed: %r", plan.member, reply)
        return CompletionCode.UNSPECIFIED, b""

    def _limited_logs(self) -> list[tuple[RateLimitedLog, str]]:
        logs = [
            (self.forged, "signals from impostors ignored"),
            (self.rejected_signals, "malformed signals or properties ignored"),
            (self.overflow, "HIOMAP requests answered NODE_BUSY (backlog full)"),
            (self.oversized, "responses too long for the BT FIFO (cc 0xCA)"),
            (self.bus.stray_replies, "replies from connections we did not call"),
            (self.bus.malformed, "unreadable messages from the bus dropped"),
        ]
        if isinstance(self.link, BtLink):
            logs.append((self.link.dropped, "bad host frames or unsent responses"))
        if self.forwarder is not None:
            logs.append((self.forwarder.failures, "forwarded commands that failed"))
            logs.append((self.forwarder.refused, "setAttention calls refused"))
        return logs

    async def _flush_logs(self) -> None:
        """Bursts are logged once per interval: report what was suppressed."""
        while True:
            await trio.sleep(RateLimitedLog.INTERVAL)
            for limited, what in self._limited_logs():
                limited.flush(what)

    def report(self) -> None:
        """Log what this run handled and what it refused (at exit)."""
        for limited, what in self._limited_logs():
            limited.flush(what)
        counts = ", ".join(
            f"{limited.count} {what}" for limited, what in self._limited_logs()
        )
        forwarded = (
            f", forwarded {self.forwarder.forwarded} to ipmid"
            if self.forwarder is not None
            else ""
        )
        log.info(
            "handled %d host requests (%d HIOMAP%s), posted %d events; %s",
            self.stats.requests,
            self.stats.hiomap,
            forwarded,
            self.stats.events_posted,
            counts,
        )

    def _start_attention(self, done: Callable[[BaseException | None], None]) -> None:
        """Raise SMS_ATN for the queue's event; ``done`` gets None or what
        went wrong."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("asserting SMS_ATN (event %s waits)", _waiting(self.queue))
        self.link.attention(done)

    # -- shutdown ----------------------------------------------------------

    async def shut_down(self) -> bool:
        """Deliver what is posted, then PROTOCOL_RESET, within the deadline.

        Returns True when the host holds PROTOCOL_RESET.  hiomapd's events
        after this point are not forwarded: the host is about to lose the
        bridge, so "daemon gone, protocol reset" is the truth it must end on.
        """
        systemd.notify("STOPPING=1")
        self.shutting_down = True
        queue = self.queue
        with trio.move_on_after(self.config.shutdown_timeout):
            if queue.waiting:
                log.info("shutdown: waiting for the host to fetch %s", _waiting(queue))
            await queue.wait_all_delivered()
            if queue.last_delivered != PROTOCOL_RESET:
                log.info("shutdown: telling the host PROTOCOL_RESET")
                await queue.wait_delivered(queue.post(PROTOCOL_RESET))
            log.info("shutdown: the host holds PROTOCOL_RESET")
            return True
        log.error(
            "shutdown: the host did not fetch event %s within %ss; exiting anyway",
            _waiting(queue),
            self.config.shutdown_timeout,
        )
        return False


def _waiting(queue: HostQueue) -> str:
    byte = queue.waiting_byte
    return describe(byte) if byte is not None else "(none)"


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


#: Exit statuses (see README, "Exit status").
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # a second SIGINT: left at once


async def run(
    config: Config,
    signals: Any,
    on_ready: Callable[[Bridge], None] | None = None,
    bridge_class: type[Bridge] = Bridge,
) -> int:
    """Run the bridge until a signal; return the exit status.

    ``signals`` is an async iterator of signal numbers (trio's signal
    receiver, opened by the caller before anything else).
    """
    import signal as _signal

    async with open_bus(config.bus) as bus:
        bridge = bridge_class(bus, config)
        async with trio.open_nursery() as nursery:
            await bridge.start(nursery)
            log.info(
                "ready: %s, events %s", bridge.describe_peers(), describe(bridge.events)
            )
            systemd.notify("READY=1")
            if on_ready is not None:
                on_ready(bridge)
            status = EXIT_OK
            async for first in signals:
                log.info("%s received: shutting down", _signal.Signals(first).name)
                break
            async with trio.open_nursery() as shutdown:

                async def more_signals() -> None:
                    nonlocal status
                    async for signum in signals:
                        if signum == _signal.SIGINT:
                            log.warning("second SIGINT: leaving at once")
                            status = EXIT_INTERRUPTED
                            shutdown.cancel_scope.cancel()
                            return
                        log.info(
                            "%s during shutdown: already shutting down",
                            _signal.Signals(signum).name,
                        )

                async def sequence() -> None:
                    await bridge.shut_down()
                    shutdown.cancel_scope.cancel()

                shutdown.start_soon(more_signals)
                shutdown.start_soon(sequence)
            bridge.report()
            nursery.cancel_scope.cancel()
    return status


__all__ = [
    "HOSTIPMI_IFACE",
    "HOSTIPMI_PATH",
    "HOSTIPMI_SERVICE",
    "Bridge",
    "BusClosed",
    "Config",
    "HostLinkError",
    "run",
]
