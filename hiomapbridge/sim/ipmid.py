"""A fake ipmid: phosphor-host-ipmid's D-Bus face, for the ``bt:`` bridge.

With ``--host bt:PATH`` the bridge forwards every IPMI command it does not
own to ipmid. This stand-in serves what the bridge sees of ipmid (wire
reference sections 3 and 9), taken from phosphor-host-ipmid:

* service ``xyz.openbmc_project.Ipmi.Host``, object
  ``/xyz/openbmc_project/Ipmi``, interface ``xyz.openbmc_project.Ipmi.Server``,
  method ``execute(y netfn, y lun, y cmd, ay data, a{sv} options) ->
  (y netfn|1, y lun, y cmd, y cc, ay data)``;
* the channel comes from the caller (``ipmid-new.cpp``
  ``channelFromMessage``): a unique name that owns
  ``xyz.openbmc_project.Ipmi.Channel.<NAME>`` (tracked with
  ``NameOwnerChanged``, so the latest owner wins) is on the channel the
  channel table names ``<NAME>``; anyone else is on ``INTRABMC``; with no
  ``INTRABMC`` in the table such a caller is answered cc 0xD3;
* Read Event Message Buffer (App ``0x35``) answers only on the system
  interface channel (15), others get cc 0xC1 (``systemintfcmds.cpp``). It
  pops the head of the host-command queue and answers its 16-byte OEM SEL
  record; an empty queue answers a heartbeat record;
* Get Message Flags (App ``0x31``) answers ``0x00`` whatever is queued, as
  upstream has since 2021 (``message_flags="queue"`` answers ``0x02``
  exactly while a command waits instead);
* the host-command manager (``host-cmd-manager.cpp``): queueing the first
  command starts the SMS_ATN ack timer (3 s by default) and calls
  ``setAttention()`` on ``org.openbmc.HostIpmi`` ``/org/openbmc/HostIpmi/1``;
  Read Event Message Buffer stops the timer, pops the head (which counts as
  delivered), and when more remain restarts the timer and calls
  ``setAttention`` again *before* answering (upstream makes that call
  synchronously inside the handler); the timer expiring drops every queued
  command. SoftOff is SEL command ``0x04`` data ``0x00``, heartbeat ``0xFF``.

Canned answers: Get Device ID (App ``0x01``, 15 bytes), Chassis Control
(Chassis ``0x02``, recorded in :attr:`FakeIpmid.chassis_controls`); anything
else cc 0xC1 unless :meth:`FakeIpmid.set_answer` gave an answer. Faults for
the bridge's tests: :meth:`~FakeIpmid.wedge`, :meth:`~FakeIpmid.delay`,
:meth:`~FakeIpmid.fail`, :meth:`~FakeIpmid.bad_reply`; absence is not
starting it or :meth:`~FakeIpmid.stop`.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs
import trio
from jeepney import DBusAddress, HeaderFields, Message, new_method_call

from hiomapbridge.dbus import (
    Bus,
    BusClosed,
    DBusError,
    open_bus,
    sender_of,
    watch_name_owners,
)
from hiomapbridge.forward import CHANNEL_PREFIX as CHANNEL_NAME_PREFIX
from hiomapbridge.forward import IPMID_IFACE, IPMID_PATH, IPMID_SERVICE
from hiomapbridge.ipmi import (
    CMD_GET_MESSAGE_FLAGS,
    CMD_READ_EVENT_MESSAGE_BUFFER,
    HOSTIPMI_IFACE,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    NETFN_APP,
    SEL_CMD_HEARTBEAT,
    CompletionCode,
    message_flags,
    response_netfn,
    sel_record,
)
from hiomapbridge.sim.btbridged import Stamp

from .cli import print_row, run_on_bus

log = logging.getLogger(__name__)

SERVICE: Final = IPMID_SERVICE
PATH: Final = IPMID_PATH
INTERFACE: Final = IPMID_IFACE
CHANNEL_PREFIX: Final = CHANNEL_NAME_PREFIX.rstrip(".")
EXECUTE_SIGNATURE: Final = "yyyaya{sv}"
REPLY_SIGNATURE: Final = "yyyyay"

CHANNEL_SYSTEM_INTERFACE: Final = 0x0F
CHANNEL_INTRABMC: Final = 0x08
INTRABMC: Final = "INTRABMC"
DEFAULT_CHANNELS: Final[Mapping[str, int]] = {
    INTRABMC: CHANNEL_INTRABMC,
    "SMS": CHANNEL_SYSTEM_INTERFACE,
}
"""OpenBMC's default ``channel_config.json``, the names that matter here."""

CC_DESTINATION_UNAVAILABLE: Final = 0xD3  # no channel for the caller

NETFN_CHASSIS: Final = 0x00
CMD_GET_DEVICE_ID: Final = 0x01
CMD_CHASSIS_CONTROL: Final = 0x02
SEL_CMD_POWER: Final = 0x04
SOFT_OFF: Final = 0x00

DEVICE_ID: Final = bytes(
    [
        0x20,  # device id
        0x81,  # provides SDRs, device revision 1
        0x02,  # firmware major 2, normal operation
        0x13,  # firmware minor (BCD)
        0x02,  # IPMI 2.0
        0xBF,  # additional device support
        0x00, 0x00, 0x00,  # manufacturer id (none configured)
        0x00, 0x00,  # product id
        0x00, 0x00, 0x00, 0x00,  # auxiliary firmware revision
    ]
)  # fmt: skip
"""A plausible Get Device ID answer (15 bytes)."""

DEFAULT_ACK_TIMEOUT: Final = 3.0
"""``ipmi-sms-atn-ack-timeout-secs``: queued commands are dropped when the
host has not read one this long after SMS_ATN."""
DEFAULT_ATTENTION_TIMEOUT: Final = 25.0  # sd-bus's default method timeout

_REQUEST_NAME_FLAGS: Final = 0x3  # ALLOW_REPLACEMENT | REPLACE_EXISTING
_HOSTIPMI: Final = DBusAddress(
    HOSTIPMI_PATH, bus_name=HOSTIPMI_SERVICE, interface=HOSTIPMI_IFACE
)

Answer = tuple[int, bytes]
AnswerFunc = Callable[["ExecuteCall"], Answer]


@attrs.define(eq=False)
class ExecuteCall:
    """One ``execute`` call and what became of it.

    ``channel`` is the channel ipmid derived (None: none, answered 0xD3);
    ``options`` maps each key to the variant's value; ``outcome`` is
    ``pending``, ``answered``, ``error`` (a D-Bus error reply),
    ``bad_reply`` (a reply of the wrong signature) or ``wedged``.
    """

    netfn: int
    lun: int
    cmd: int
    data: bytes
    channel: int | None
    sender: str
    options: dict[str, Any]
    at: Stamp
    cc: int | None = None
    response: bytes = b""
    answered: Stamp | None = None
    outcome: Literal["pending", "answered", "error", "bad_reply", "wedged"] = "pending"


@attrs.define(eq=False)
class HostCommand:
    """One command in the host-command queue (SEL command and data byte).

    ``outcome``: ``waiting``; ``delivered`` (popped by Read Event Message
    Buffer: upstream's callback gets success then); ``timed_out`` (dropped
    when the ack timer expired); ``stopped``.
    """

    cmd: int
    data: int
    queued: Stamp
    outcome: Literal["waiting", "delivered", "timed_out", "stopped"] = "waiting"
    done: Stamp | None = None

    @property
    def record(self) -> bytes:
        return sel_record(self.cmd, self.data)


@attrs.define(eq=False)
class AttentionCall:
    """One ``setAttention`` call ipmid made: ``outcome`` is None while it
    waits, then ``"ok"``, the error name, ``"timeout"`` or ``"closed"``."""

    at: Stamp
    outcome: str | None = None
    done: Stamp | None = None


@attrs.define(eq=False)
class Fault:
    """An installed fault: matches ``execute`` calls with this netfn/cmd
    (None: any); ``count`` matches left (None: unlimited)."""

    kind: Literal["wedge", "delay", "error", "signature"]
    netfn: int | None
    cmd: int | None
    count: int | None
    seconds: float = 0.0
    error: tuple[str, str] = ("org.freedesktop.DBus.Error.Failed", "injected")
    signature: str = "yyyy"
    body: tuple[Any, ...] | None = None
    matched: list[ExecuteCall] = attrs.field(factory=list)

    def _take(self, call: ExecuteCall) -> bool:
        if self.count == 0:
            return False
        if self.netfn is not None and call.netfn != self.netfn:
            return False
        if self.cmd is not None and call.cmd != self.cmd:
            return False
        if self.count is not None:
            self.count -= 1
        self.matched.append(call)
        return True


class FakeIpmid:
    """ipmid's ``execute`` and host-command manager on one bus connection.

    Start with ``await nursery.start(ipmid.serve, bus)``; :meth:`stop` makes
    ``serve`` release the name and return (``serve`` may be started again:
    an ipmid restart).
    """

    def __init__(
        self,
        *,
        channels: Mapping[str, int] | None = None,
        ack_timeout: float | None = DEFAULT_ACK_TIMEOUT,
        attention_timeout: float = DEFAULT_ATTENTION_TIMEOUT,
        message_flags: Literal["upstream", "queue"] = "upstream",
        request_name: bool = True,
    ) -> None:
        self.channels: dict[str, int] = dict(
            DEFAULT_CHANNELS if channels is None else channels
        )
        self.ack_timeout = ack_timeout
        self.attention_timeout = attention_timeout
        self.message_flags = message_flags
        self.request_name = request_name

        self.calls: list[ExecuteCall] = []
        self.chassis_controls: list[int] = []
        self.host_commands: list[HostCommand] = []
        """Every command ever queued, in order."""
        self.attentions: list[AttentionCall] = []
        self.faults: list[Fault] = []
        self.answers: dict[tuple[int, int], Answer | AnswerFunc] = {}

        self._queue: list[HostCommand] = []
        self._owners: dict[str, int] = {}  # unique name -> channel
        self._bus: Bus | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._ack_deadline = math.inf
        self._timer = trio.CancelScope()
        self._change = trio.Event()
        self._remove_signal: Callable[[], None] | None = None

    # -- serving ----------------------------------------------------------

    async def serve(
        self, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Track channel names, export the object, own the name; run until
        cancelled or :meth:`stop`."""
        self._stop = trio.Event()
        self._stopped = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._bus = bus
                self._nursery = nursery
                await self._track_channels(bus)
                bus.export(PATH, self._handle_call)
                nursery.start_soon(self._run_timer)
                if self.request_name:
                    reply = await bus.bus_call(
                        "RequestName", "su", SERVICE, _REQUEST_NAME_FLAGS
                    )
                    if reply.body[0] not in (1, 4):  # primary owner / already
                        raise RuntimeError(f"could not own {SERVICE}: {reply.body[0]}")
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            bus.unexport(PATH)
            if self._remove_signal is not None:
                self._remove_signal()
                self._remove_signal = None
            self._bus = None
            self._nursery = None
            self._owners.clear()
            if self.request_name and self._stop.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await bus.bus_call("ReleaseName", "s", SERVICE)
                    except (BusClosed, DBusError):
                        pass
            for command in self._queue:
                self._finish(command, "stopped")
            self._queue.clear()
            self._stopped.set()
            self._changed()

    async def stop(self) -> None:
        """Release the name and stop serving ("ipmid exited"); returns once
        :meth:`serve` has returned."""
        self._stop.set()
        if self._bus is not None:
            await self._stopped.wait()

    async def _track_channels(self, bus: Bus) -> None:
        """Map unique names to channels as ipmid does: NameOwnerChanged for
        the channel namespace, then every current owner."""
        self._remove_signal = await watch_name_owners(
            bus, CHANNEL_PREFIX, self._name_owner_changed, namespace=True
        )
        names = (await bus.bus_call("ListNames")).body[0]
        for name in sorted(names):
            if name.startswith(CHANNEL_PREFIX + "."):
                try:
                    owner = (await bus.bus_call("GetNameOwner", "s", name)).body[0]
                except DBusError:
                    continue
                self._map(name, owner)

    def _name_owner_changed(self, msg: Message) -> None:
        if sender_of(msg) != "org.freedesktop.DBus":
            return
        if msg.header.fields.get(HeaderFields.signature) != "sss":
            return
        name, old, new = msg.body
        if not name.startswith(CHANNEL_PREFIX + "."):
            return
        if old:
            self._owners.pop(old, None)
        if new:
            self._map(name, new)

    def _map(self, name: str, owner: str) -> None:
        channel = self.channels.get(name[len(CHANNEL_PREFIX) + 1 :])
        if channel is None:
            log.info("no channel named by %s", name)
            return
        self._owners[owner] = channel
        log.info("%s (%s) -> channel %d", name, owner, channel)
        self._changed()

    def channel_of(self, sender: str) -> int | None:
        """The channel ipmid puts a call from ``sender`` on (None: none)."""
        channel = self._owners.get(sender)
        if channel is not None:
            return channel
        return self.channels.get(INTRABMC)

    # -- execute ----------------------------------------------------------

    async def _handle_call(self, msg: Message) -> None:
        bus = self._bus
        if bus is None:
            return
        fields = msg.header.fields
        interface = fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        if interface not in (None, INTERFACE) or member != "execute":
            await bus.reply_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                f"unknown method {interface}.{member}",
            )
            return
        if fields.get(HeaderFields.signature) != EXECUTE_SIGNATURE:
            await bus.reply_error(
                msg,
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"execute wants {EXECUTE_SIGNATURE}",
            )
            return
        netfn, lun, cmd, data, options = msg.body
        sender = sender_of(msg) or ""
        call = ExecuteCall(
            netfn, lun, cmd, bytes(data), self.channel_of(sender), sender,
            {key: value for key, (_sig, value) in options.items()}, Stamp.now(),
        )  # fmt: skip
        self.calls.append(call)
        self._changed()
        fault = self._match_fault(call)
        if fault is not None and fault.kind == "wedge":
            call.outcome = "wedged"
            self._changed()
            log.info("execute %#04x/%#04x wedged", netfn, cmd)
            await trio.sleep_forever()
        if fault is not None and fault.kind == "delay":
            await trio.sleep(fault.seconds)
        if fault is not None and fault.kind == "error":
            call.outcome = "error"
            call.answered = Stamp.now()
            self._changed()
            await bus.reply_error(msg, *fault.error)
            return
        cc, response = await self._answer(call)
        call.cc, call.response = cc, response
        call.answered = Stamp.now()
        if fault is not None and fault.kind == "signature":
            call.outcome = "bad_reply"
            self._changed()
            body = fault.body
            if body is None:  # the default "yyyy": the data left out
                body = (response_netfn(netfn), lun, cmd, cc)
            await bus.reply(msg, fault.signature, *body)
            return
        call.outcome = "answered"
        self._changed()
        await bus.reply(
            msg, REPLY_SIGNATURE, response_netfn(netfn), lun, cmd, cc, response
        )

    def _match_fault(self, call: ExecuteCall) -> Fault | None:
        for fault in list(self.faults):
            if fault._take(call):
                if fault.count == 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _answer(self, call: ExecuteCall) -> Answer:
        if call.channel is None:
            return CC_DESTINATION_UNAVAILABLE, b""
        custom = self.answers.get((call.netfn, call.cmd))
        if custom is not None:
            return custom(call) if callable(custom) else custom
        key = (call.netfn, call.cmd)
        if key == (NETFN_APP, CMD_GET_DEVICE_ID):
            return CompletionCode.OK, DEVICE_ID
        if key == (NETFN_CHASSIS, CMD_CHASSIS_CONTROL):
            if len(call.data) != 1:
                return CompletionCode.REQ_DATA_LEN_INVALID, b""
            self.chassis_controls.append(call.data[0])
            return CompletionCode.OK, b""
        if key == (NETFN_APP, CMD_GET_MESSAGE_FLAGS):
            waiting = self.message_flags == "queue" and bool(self._queue)
            return CompletionCode.OK, message_flags(waiting)
        if key == (NETFN_APP, CMD_READ_EVENT_MESSAGE_BUFFER):
            if call.channel != CHANNEL_SYSTEM_INTERFACE:
                return CompletionCode.INVALID_COMMAND, b""
            return CompletionCode.OK, await self._next_command()
        return CompletionCode.INVALID_COMMAND, b""

    def set_answer(
        self,
        netfn: int,
        cmd: int,
        cc: int = 0,
        data: bytes = b"",
        *,
        handler: AnswerFunc | None = None,
    ) -> None:
        """Answer ``netfn``/``cmd`` with ``(cc, data)``, or with what
        ``handler(call)`` returns (it runs on every such call)."""
        self.answers[(netfn, cmd)] = handler if handler is not None else (cc, data)

    # -- faults -----------------------------------------------------------

    def _fault(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def wedge(
        self, netfn: int | None = None, cmd: int | None = None, count: int | None = 1
    ) -> Fault:
        """Never reply to matching ``execute`` calls."""
        return self._fault(Fault("wedge", netfn, cmd, count))

    def delay(
        self,
        seconds: float,
        netfn: int | None = None,
        cmd: int | None = None,
        count: int | None = 1,
    ) -> Fault:
        """Reply to matching calls only after ``seconds``."""
        return self._fault(Fault("delay", netfn, cmd, count, seconds=seconds))

    def fail(
        self,
        netfn: int | None = None,
        cmd: int | None = None,
        count: int | None = 1,
        *,
        name: str = "org.freedesktop.DBus.Error.Failed",
        text: str = "injected",
    ) -> Fault:
        """Answer matching calls with a D-Bus error."""
        return self._fault(Fault("error", netfn, cmd, count, error=(name, text)))

    def bad_reply(
        self,
        netfn: int | None = None,
        cmd: int | None = None,
        count: int | None = 1,
        *,
        signature: str = "yyyy",
        body: tuple[Any, ...] | None = None,
    ) -> Fault:
        """Reply to matching calls with ``signature`` and ``body`` instead
        of ``yyyyay``; the default is the right reply without its data."""
        if body is None and signature != "yyyy":
            raise ValueError("a signature other than 'yyyy' needs a body")
        return self._fault(
            Fault("signature", netfn, cmd, count, signature=signature, body=body)
        )

    # -- the host-command manager ---------------------------------------

    def queue_event(self, cmd: int, data: int = 0) -> HostCommand:
        """Queue a host command as ``Manager::execute`` does; the first one
        in an empty queue starts the ack timer and calls ``setAttention``
        (in a task: see :attr:`attentions` for its outcome)."""
        if self._nursery is None:
            raise RuntimeError("FakeIpmid.serve() is not running")
        command = HostCommand(cmd & 0xFF, data & 0xFF, Stamp.now())
        self.host_commands.append(command)
        self._queue.append(command)
        self._changed()
        if len(self._queue) == 1:
            self._start_timer()
            self._nursery.start_soon(self._set_attention)
        return command

    def soft_off(self) -> HostCommand:
        """Queue SoftOff (SEL command 0x04, data 0x00)."""
        return self.queue_event(SEL_CMD_POWER, SOFT_OFF)

    def heartbeat(self) -> HostCommand:
        """Queue a heartbeat (SEL command 0xFF)."""
        return self.queue_event(SEL_CMD_HEARTBEAT, 0)

    @property
    def events_waiting(self) -> int:
        return len(self._queue)

    async def _next_command(self) -> bytes:
        """``Manager::getNextCommand``: the record for the head (delivered),
        or a heartbeat for an empty queue."""
        self._stop_timer()
        if not self._queue:
            log.debug("host-command queue empty: heartbeat")
            return sel_record(SEL_CMD_HEARTBEAT, 0)
        command = self._queue.pop(0)
        self._finish(command, "delivered")
        if self._queue:
            self._start_timer()
            await self._set_attention()
        return command.record

    def _finish(
        self,
        command: HostCommand,
        outcome: Literal["delivered", "timed_out", "stopped"],
    ) -> None:
        command.outcome = outcome
        command.done = Stamp.now()
        self._changed()

    async def _set_attention(self) -> AttentionCall:
        attention = AttentionCall(Stamp.now())
        self.attentions.append(attention)
        self._changed()
        bus = self._bus
        try:
            if bus is None:
                raise BusClosed("not serving")
            with trio.fail_after(self.attention_timeout):
                await bus.call(new_method_call(_HOSTIPMI, "setAttention"))
            attention.outcome = "ok"
        except DBusError as exc:
            attention.outcome = exc.name
        except trio.TooSlowError:
            attention.outcome = "timeout"
        except BusClosed:
            attention.outcome = "closed"
        if attention.outcome != "ok":
            log.error("setAttention failed: %s", attention.outcome)
        attention.done = Stamp.now()
        self._changed()
        return attention

    def _start_timer(self) -> None:
        if self.ack_timeout is None:
            return
        self._ack_deadline = trio.current_time() + self.ack_timeout
        self._timer.deadline = self._ack_deadline

    def _stop_timer(self) -> None:
        self._ack_deadline = math.inf
        self._timer.deadline = math.inf

    async def _run_timer(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._ack_deadline) as self._timer:
                await trio.sleep_forever()
            if trio.current_time() >= self._ack_deadline:
                self._ack_deadline = math.inf
                log.error("host control timeout: dropping %d", len(self._queue))
                for command in self._queue:
                    self._finish(command, "timed_out")
                self._queue.clear()

    # -- waiting on state -------------------------------------------------

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_attentions(self, n: int = 1) -> list[AttentionCall]:
        """Wait until ``n`` ``setAttention`` calls have an outcome."""
        await self.wait_until(
            lambda: sum(a.outcome is not None for a in self.attentions) >= n
        )
        return self.attentions[:n]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` is true; re-checked on every change
        (call, answer, queue, attention, channel mapping)."""
        while not condition():
            await self._change.wait()


# -- CLI -------------------------------------------------------------------


def _parse_channel(spec: str) -> tuple[str, int]:
    try:
        name, number = spec.split("=", 1)
        value = int(number, 0)
        if not name or not 0 <= value <= 0x0F:
            raise ValueError(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"bad channel {spec!r}: want NAME=NUMBER (0-15), e.g. SMS=15"
        ) from exc
    return name, value


def add_parser(subparsers: Any) -> None:
    """Register the ``ipmid`` subcommand."""
    p = subparsers.add_parser(
        "ipmid",
        help="run a fake ipmid (execute, channels, SoftOff/heartbeat events)",
        description=(
            "Own xyz.openbmc_project.Ipmi.Host and serve execute as "
            "phosphor-host-ipmid does for the commands a bt: bridge forwards; "
            "print each execute call and setAttention as a JSON line."
        ),
    )
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument(
        "--channel", type=_parse_channel, action="append", default=[],
        metavar="NAME=NUM",
        help="add or change a channel_config.json name (default INTRABMC=8 SMS=15)",
    )  # fmt: skip
    p.add_argument(
        "--soft-off-after", type=float, default=None, metavar="S",
        help="queue SoftOff (SMS_ATN to the host) S seconds after start",
    )  # fmt: skip
    p.add_argument(
        "--heartbeat-every", type=float, default=None, metavar="S",
        help="queue a heartbeat every S seconds",
    )  # fmt: skip
    p.add_argument(
        "--ack-timeout", type=float, default=DEFAULT_ACK_TIMEOUT, metavar="S",
        help="drop queued commands the host has not read S seconds after SMS_ATN",
    )  # fmt: skip
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_on_bus(args, "ipmid-sim", _main)


def _call_row(call: ExecuteCall) -> dict[str, Any]:
    return {
        "t": call.at.monotonic,
        "kind": "execute",
        "sender": call.sender,
        "channel": call.channel,
        "netfn": call.netfn,
        "lun": call.lun,
        "cmd": call.cmd,
        "data": call.data.hex(),
        "outcome": call.outcome,
        "cc": call.cc,
        "response": call.response.hex(),
    }


async def _main(address: str, args: argparse.Namespace) -> int:
    channels = dict(DEFAULT_CHANNELS)
    channels.update(args.channel)
    ipmid = FakeIpmid(channels=channels, ack_timeout=args.ack_timeout)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_bus(address) as bus, trio.open_nursery() as nursery:
            await nursery.start(ipmid.serve, bus)
            nursery.start_soon(_report, ipmid)
            if args.soft_off_after is not None:
                nursery.start_soon(_later, args.soft_off_after, ipmid.soft_off)
            if args.heartbeat_every is not None:
                nursery.start_soon(_every, args.heartbeat_every, ipmid.heartbeat)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return 0


async def _later(seconds: float, action: Callable[[], HostCommand]) -> None:
    await trio.sleep(seconds)
    action()


async def _every(seconds: float, action: Callable[[], HostCommand]) -> None:
    while True:
        await trio.sleep(seconds)
        action()


async def _report(ipmid: FakeIpmid) -> None:
    """A line per finished execute call, setAttention and host command."""
    calls = attentions = commands = 0
    while True:
        await ipmid._change.wait()
        while calls < len(ipmid.calls) and ipmid.calls[calls].outcome != "pending":
            print_row(_call_row(ipmid.calls[calls]))
            calls += 1
        while (
            attentions < len(ipmid.attentions)
            and ipmid.attentions[attentions].outcome is not None
        ):
            att = ipmid.attentions[attentions]
            print_row(
                {"t": att.at.monotonic, "kind": "setAttention", "outcome": att.outcome}
            )
            attentions += 1
        while (
            commands < len(ipmid.host_commands)
            and ipmid.host_commands[commands].outcome != "waiting"
        ):
            hc = ipmid.host_commands[commands]
            print_row(
                {
                    "t": hc.queued.monotonic,
                    "kind": "host-command",
                    "cmd": hc.cmd,
                    "data": hc.data,
                    "outcome": hc.outcome,
                }
            )
            commands += 1


__all__ = [
    "CHANNEL_SYSTEM_INTERFACE",
    "DEFAULT_CHANNELS",
    "DEVICE_ID",
    "INTERFACE",
    "PATH",
    "SERVICE",
    "AttentionCall",
    "ExecuteCall",
    "FakeIpmid",
    "Fault",
    "HostCommand",
    "add_parser",
    "run",
]
