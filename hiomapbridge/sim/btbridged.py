"""A btbridged stand-in: the host's BT interface and btbridged in one object.

Real hardware: the host writes an IPMI request into the BT FIFO, btbridged
reads it from ``/dev/bt-host``, emits ``ReceivedMessage``, and writes the
response that arrives by ``sendMessage`` back to the FIFO. Here the host
side is an in-process Python API (:meth:`BtBridge.transact`), and the BMC
side is the real D-Bus API of ``openbmc/btbridge`` ``btbridged.c``
(wire reference section 2):

* service ``org.openbmc.HostIpmi``, object ``/org/openbmc/HostIpmi/1``,
  interface ``org.openbmc.HostIpmi``;
* signal ``ReceivedMessage(y seq, y netfn, y lun, y cmd, ay data)``;
* method ``sendMessage(y seq, y netfn, y lun, y cmd, y cc, ay data) -> x``,
  answered only once the response was handed to the host (btbridged defers
  its method return until it wrote the BT device). Errors, as btbridged:
  ``org.openbmc.error`` "No matching request" when no request with that seq
  is outstanding (unknown, already answered, or already timed out and
  answered with 0xCE); ``org.freedesktop.DBus.Error.Timeout`` (sd-bus's
  name for ETIMEDOUT) when the response was accepted but not yet written
  when the request's timer expired;
* method ``setAttention() -> x``: raises SMS_ATN towards the host.

A request not answered within ``timeout`` seconds is answered to the host
with cc 0xCE by the stand-in itself, as btbridged does.

Test hooks (:meth:`BtBridge.hold`, :meth:`drop`, :meth:`delay`,
:meth:`fail`) act on responses arriving by ``sendMessage``; every request
is recorded as a :class:`Transaction` and every ``setAttention`` as an
:class:`Attention`, with trio and monotonic timestamps.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal

import attrs
import trio
from jeepney import HeaderFields, Message

from hiomapbridge import wire
from hiomapbridge.dbus import Bus, BusClosed, open_bus
from hiomapbridge.ipmi import (
    HOSTIPMI_IFACE,
    HOSTIPMI_PATH,
    HOSTIPMI_SERVICE,
    CompletionCode,
    response_netfn,
)

from .cli import print_row, run_on_bus

log = logging.getLogger(__name__)

SERVICE: Final = HOSTIPMI_SERVICE
PATH: Final = HOSTIPMI_PATH
INTERFACE: Final = HOSTIPMI_IFACE
ERROR_NAME: Final = "org.openbmc.error"
TIMEOUT_ERROR_NAME: Final = "org.freedesktop.DBus.Error.Timeout"
IO_ERROR_NAME: Final = "org.freedesktop.DBus.Error.IOError"

DEFAULT_TIMEOUT: Final = 5.0
"""btbridged answers a request itself (cc 0xCE) after this many seconds."""

DEFAULT_HOST_TIMEOUT: Final = 6.0
"""How long the host waits for any answer (skiboot's BT layer: 3 s, one
retry) before giving up on a request whose response was lost."""

BT_MAX_MESSAGE: Final = 64
MAX_REQUEST_DATA: Final = BT_MAX_MESSAGE - 4  # length, netfn/lun, seq, cmd
MAX_RESPONSE_DATA: Final = BT_MAX_MESSAGE - 5  # ... and cc

_REQUEST_NAME_FLAGS: Final = 0x3  # ALLOW_REPLACEMENT | REPLACE_EXISTING
_RECEIVED_MESSAGE: Final = wire.SignalTemplate(
    PATH, INTERFACE, "ReceivedMessage", "yyyyay"
)
_ZERO: Final = wire.pack_fixed("x", (0,))  # btbridged's int64 return value


class BtTimeout(Exception):
    """The host got no answer at all within ``host_timeout`` (a lost response)."""


class NotServing(Exception):
    """:meth:`BtBridge.transact` was called before :meth:`BtBridge.serve` started."""


@attrs.frozen
class Stamp:
    """A point in time on both clocks: ``trio.current_time()`` and
    ``time.monotonic()`` (for timelines across processes)."""

    trio: float
    monotonic: float

    @classmethod
    def now(cls) -> Stamp:
        return cls(trio.current_time(), time.monotonic())


@attrs.frozen
class Response:
    """What the host received for one request."""

    cc: int
    data: bytes
    seq: int = 0
    netfn: int = 0
    lun: int = 0
    cmd: int = 0


Outcome = Literal["pending", "delivered", "timed_out", "dropped", "abandoned", "closed"]


@attrs.define(eq=False)
class Transaction:
    """One host request and what became of it (mutable while pending).

    ``response`` is what the BMC sent by ``sendMessage`` (None until then);
    ``delivered`` is what the host got (the BMC's response, or btbridged's
    own 0xCE on timeout). ``outcome``: ``pending``; ``delivered`` (host got
    it); ``timed_out`` (host got 0xCE); ``dropped`` (a drop hook ate the
    response); ``abandoned`` (the host stopped waiting before any answer);
    ``closed`` (the stand-in stopped).
    """

    seq: int
    netfn: int
    lun: int
    cmd: int
    data: bytes
    sent: Stamp
    response: Response | None = None
    responded: Stamp | None = None
    delivered: Response | None = None
    delivered_at: Stamp | None = None
    outcome: Outcome = "pending"
    send_message_calls: int = 0
    send_message_error: str | None = None
    reply_expected: bool | None = None
    """Whether the last ``sendMessage`` for it wanted a method return (None:
    none came)."""


@attrs.frozen
class Attention:
    """One ``setAttention`` call."""

    index: int
    at: Stamp
    sender: str | None


Predicate = Callable[[Transaction], bool]


def requests(
    netfn: int | None = None, cmd: int | None = None, prefix: bytes = b""
) -> Predicate:
    """A hook predicate: requests with this netfn, cmd and data prefix."""

    def match(tx: Transaction) -> bool:
        return (
            (netfn is None or tx.netfn == netfn)
            and (cmd is None or tx.cmd == cmd)
            and tx.data.startswith(prefix)
        )

    return match


def _any(_tx: Transaction) -> bool:
    return True


@attrs.define(eq=False)
class Hook:
    """An installed fault hook. ``count`` matches left (None: unlimited)."""

    kind: Literal["hold", "drop", "delay", "fail"]
    predicate: Predicate
    count: int | None
    owner: BtBridge
    matched: list[Transaction] = attrs.field(factory=list)
    # drop: whether sendMessage is answered with success or an error.
    reply: Literal["ok", "error"] = "ok"
    seconds: float = 0.0
    error: tuple[str, str] = (ERROR_NAME, "Internal error")

    def _take(self, tx: Transaction) -> bool:
        if self.count == 0 or not self.predicate(tx):
            return False
        if self.count is not None:
            self.count -= 1
        self.matched.append(tx)
        self.owner._changed()
        return True

    def remove(self) -> None:
        """Uninstall the hook (held responses stay held: see :class:`Hold`)."""
        if self in self.owner._hooks:
            self.owner._hooks.remove(self)

    async def wait_matched(self, n: int = 1) -> list[Transaction]:
        """Wait until the hook has matched ``n`` responses."""
        await self.owner.wait_until(lambda: len(self.matched) >= n)
        return self.matched[:n]


@attrs.define(eq=False)
class Hold(Hook):
    """Responses caught by a hold are neither handed to the host nor is their
    ``sendMessage`` answered, until :meth:`release` (or the request's timeout:
    then the caller gets the Timeout error and the host 0xCE)."""

    _parked: list[_Outstanding] = attrs.field(factory=list)

    @property
    def held(self) -> list[Transaction]:
        """Transactions currently parked by this hold."""
        return [o.tx for o in self._parked if o.tx.outcome == "pending"]

    async def wait_held(self, n: int = 1) -> list[Transaction]:
        """Wait until ``n`` responses have been caught (parked or not)."""
        return await self.wait_matched(n)

    def release(self) -> None:
        """Deliver every parked response (then answer its ``sendMessage``),
        and stop holding: later matches pass straight through."""
        self.remove()
        parked, self._parked = self._parked, []
        for o in parked:
            o.released.set()
        self.owner._changed()


class _Outstanding:
    """btbridged's queue entry for one request."""

    def __init__(self, tx: Transaction, deadline: float) -> None:
        self.tx = tx
        self.deadline = deadline
        self.answer: Response | None = None
        self.answered = trio.Event()  # the host has an answer (or none is coming)
        self.host_done = trio.Event()  # transact() stopped waiting
        self.released = trio.Event()  # a hold let go
        self.call: Message | None = None  # sendMessage waiting for its reply
        # sendMessage to answer once the host took the response (fast path)
        self.reply_when_taken: Message | None = None


class HostSide:
    """What every simulated host end shares (:class:`BtBridge`, and
    :class:`~hiomapbridge.sim.bthost.BtHost`): the SMS_ATN latch and waiting
    on state.  Subclasses hold ``attentions``, ``_attention_latched`` and
    ``_change``, and call :meth:`_changed` on every change."""

    attentions: list[Attention]
    _attention_latched: bool
    _change: trio.Event

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` is true; re-checked on every change."""
        while not condition():
            await self._change.wait()

    async def wait_attention(self) -> None:
        """Wait for SMS_ATN and consume it (a latch, like the BT control
        register's SMS_ATN bit: several raises before one wait count once)."""
        await self.wait_until(lambda: self._attention_latched)
        self._attention_latched = False

    @property
    def attention_pending(self) -> bool:
        return self._attention_latched

    @property
    def attention_count(self) -> int:
        return len(self.attentions)


@attrs.define(eq=False)
class BtBridge(HostSide):
    """The host's BT interface plus btbridged, serving on one bus connection.

    Start with ``await nursery.start(bt.serve, bus)``. Requests carry 8-bit
    sequence numbers allocated like skiboot's BT driver (a counter
    incremented per message, wrapping at 256) and, like btbridged's queue
    lookup needs, distinct among outstanding requests (a busy number is
    skipped).
    """

    timeout: float = DEFAULT_TIMEOUT
    host_timeout: float = DEFAULT_HOST_TIMEOUT
    request_name: bool = True
    transactions: list[Transaction] = attrs.field(factory=list)
    attentions: list[Attention] = attrs.field(factory=list)
    attention_error: tuple[str, str] | None = None
    """When set, ``setAttention`` fails with this (name, text)."""
    unmatched: list[int] = attrs.field(factory=list)
    """Seqs of ``sendMessage`` calls refused with "No matching request"
    (appended once the error reply is sent)."""

    _bus: Bus | None = None
    _nursery: trio.Nursery | None = None
    _next_seq: int = 0
    _outstanding: dict[int, _Outstanding] = attrs.field(factory=dict)
    _hooks: list[Hook] = attrs.field(factory=list)
    _attention_latched: bool = False
    _change: trio.Event = attrs.field(factory=trio.Event)
    _timer: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    # -- serving ----------------------------------------------------------

    async def serve(
        self, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Export the object, own the name, and run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._bus = bus
            self._nursery = nursery
            bus.export_inline(PATH, self._call_arrived)
            nursery.start_soon(self._run_timer)
            try:
                if self.request_name:
                    reply = await bus.bus_call(
                        "RequestName", "su", SERVICE, _REQUEST_NAME_FLAGS
                    )
                    if reply.body[0] not in (1, 4):  # primary owner / already
                        raise RuntimeError(f"could not own {SERVICE}: {reply.body[0]}")
                task_status.started()
                await trio.sleep_forever()
            finally:
                bus.unexport(PATH)
                self._bus = None
                self._nursery = None
                for o in list(self._outstanding.values()):
                    self._finish(o, None, "closed")

    def _call_arrived(self, msg: Message) -> None:
        # The common case, a sendMessage with no hook installed, is handled
        # on the spot, as btbridged's C handler would: a task per call would
        # make this stand-in, not the bridge, the cost the benchmark sees.
        if not (self._send_message_now(msg) or self._set_attention_now(msg)):
            assert self._bus is not None
            self._bus.serve_later(self._handle_call, msg)

    async def _handle_call(self, msg: Message) -> None:
        assert self._bus is not None
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        interface = fields.get(HeaderFields.interface)
        if interface not in (None, INTERFACE):
            await self._bus.reply_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownInterface",
                f"unknown interface {interface}",
            )
        elif member == "sendMessage":
            await self._send_message(msg)
        elif member == "setAttention":
            await self._set_attention(msg)
        else:
            await self._bus.reply_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownMethod",
                f"unknown method {member}",
            )

    def _set_attention_now(self, msg: Message) -> bool:
        """Raise SMS_ATN for a well-formed ``setAttention``; False: leave it
        to :meth:`_handle_call`."""
        fields = msg.header.fields
        if (
            self.attention_error is not None
            or fields.get(HeaderFields.member) != "setAttention"
            or fields.get(HeaderFields.interface) not in (None, INTERFACE)
        ):
            return False
        self._raise_attention(msg)
        self._reply_taken(msg)
        return True

    def _raise_attention(self, msg: Message) -> None:
        self.attentions.append(
            Attention(
                len(self.attentions),
                Stamp.now(),
                msg.header.fields.get(HeaderFields.sender),
            )
        )
        self._attention_latched = True
        self._changed()
        log.debug("SMS_ATN (#%d)", len(self.attentions))

    async def _set_attention(self, msg: Message) -> None:
        assert self._bus is not None
        if self.attention_error is not None:
            await self._bus.reply_error(msg, *self.attention_error)
            return
        self._raise_attention(msg)
        await self._bus.reply(msg, "x", 0)

    def _send_message_now(self, msg: Message) -> bool:
        """Deliver a well-formed sendMessage for an outstanding request
        when no hook is installed; False: leave it to :meth:`_send_message`.
        The method return goes out once the host has taken the response."""
        fields = msg.header.fields
        if (
            self._hooks
            or fields.get(HeaderFields.member) != "sendMessage"
            or fields.get(HeaderFields.interface) not in (None, INTERFACE)
            or fields.get(HeaderFields.signature) != "yyyyyay"
        ):
            return False
        o = self._outstanding.get(msg.body[0])
        if o is None or o.call is not None or o.answer is not None:
            return False
        response = self._take_response(o, msg)
        self._finish(o, response, "delivered")
        if o.host_done.is_set():
            self._reply_taken(msg)
        else:
            o.reply_when_taken = msg
        return True

    def _reply_taken(self, msg: Message) -> None:
        """Answer ``msg`` with success (``x`` 0), as btbridged does."""
        if self._bus is not None:
            try:
                self._bus.reply_nowait(msg, "x", _ZERO)
            except BusClosed:
                pass

    def _take_response(self, o: _Outstanding, msg: Message) -> Response:
        seq, netfn, lun, cmd, cc, data = msg.body
        tx = o.tx
        tx.send_message_calls += 1
        tx.reply_expected = not msg.header.flags & 1  # NO_REPLY_EXPECTED
        response = Response(
            cc=cc, data=bytes(data[:MAX_RESPONSE_DATA]), seq=seq, netfn=netfn,
            lun=lun, cmd=cmd,
        )  # fmt: skip
        if len(data) > MAX_RESPONSE_DATA:
            log.warning(
                "seq %#04x: response data truncated to %d", seq, MAX_RESPONSE_DATA
            )
        tx.response = response
        tx.responded = Stamp.now()
        self._changed()
        return response

    async def _send_message(self, msg: Message) -> None:
        bus = self._bus
        assert bus is not None
        if msg.header.fields.get(HeaderFields.signature) != "yyyyyay":
            await bus.reply_error(msg, ERROR_NAME, "Bad message")
            return
        seq = msg.body[0]
        o = self._outstanding.get(seq)
        if o is None or o.call is not None or o.answer is not None:
            # Unknown, already answered, or already timed out (0xCE sent).
            log.info("sendMessage for seq %#04x: no matching request", seq)
            await bus.reply_error(msg, ERROR_NAME, "No matching request")
            self.unmatched.append(seq)
            self._changed()
            return
        tx = o.tx
        response = self._take_response(o, msg)
        hook = self._match_hook(tx)
        if hook is not None and hook.kind == "fail":
            # btbridged rejected the call: the request stays queued (it will
            # time out unless the bridge answers again).
            tx.response = None
            tx.send_message_error = hook.error[0]
            await bus.reply_error(msg, *hook.error)
            return
        if hook is not None and hook.kind == "drop":
            self._finish(o, None, "dropped")
            if hook.reply == "ok":
                await bus.reply(msg, "x", 0)
            else:
                tx.send_message_error = IO_ERROR_NAME
                await bus.reply_error(msg, IO_ERROR_NAME, "Input/output error")
            return
        o.call = msg
        if isinstance(hook, Hold):
            hook._parked.append(o)
            # The request timer (_expire) is the only one to time this out.
            await self.wait_until(lambda: o.released.is_set() or o.answered.is_set())
        elif hook is not None and hook.kind == "delay":
            with trio.move_on_after(hook.seconds):
                await o.answered.wait()
        if o.answered.is_set():  # timed out meanwhile: caller got ETIMEDOUT
            return
        o.call = None
        self._finish(o, response, "delivered")
        await o.host_done.wait()
        await bus.reply(msg, "x", 0)

    def _match_hook(self, tx: Transaction) -> Hook | None:
        for hook in list(self._hooks):
            if hook._take(tx):
                if hook.count == 0 and not isinstance(hook, Hold):
                    hook.remove()
                return hook
        return None

    def _finish(
        self, o: _Outstanding, answer: Response | None, outcome: Outcome
    ) -> None:
        """Take ``o`` off the queue; hand ``answer`` to the host (None: the
        host gets nothing)."""
        if self._outstanding.get(o.tx.seq) is o:
            del self._outstanding[o.tx.seq]
        if o.tx.outcome == "pending":
            o.tx.outcome = outcome
        if answer is not None and not o.answered.is_set():
            o.answer = answer
            o.tx.delivered = answer
            o.tx.delivered_at = Stamp.now()
            o.answered.set()
        elif outcome == "closed":
            o.answered.set()
        self._changed()

    async def _run_timer(self) -> None:
        """btbridged's request timer: one task for every outstanding request
        (its scope's deadline is the earliest request deadline)."""
        while True:
            deadline = min(
                (o.deadline for o in self._outstanding.values()), default=math.inf
            )
            with trio.CancelScope(deadline=deadline) as self._timer:
                await trio.sleep_forever()
            now = trio.current_time()
            for o in list(self._outstanding.values()):
                if o.deadline <= now:
                    self._expire(o)

    def _expire(self, o: _Outstanding) -> None:
        if o.answered.is_set():
            return
        tx = o.tx
        log.info(
            "seq %#04x timed out after %.3gs: answering 0xCE", tx.seq, self.timeout
        )
        call, o.call = o.call, None
        self._finish(
            o,
            Response(
                cc=CompletionCode.CANNOT_RESPOND, data=b"", seq=tx.seq,
                netfn=response_netfn(tx.netfn), lun=tx.lun, cmd=tx.cmd,
            ),
            "timed_out",
        )  # fmt: skip
        if call is not None and self._bus is not None:
            tx.send_message_error = TIMEOUT_ERROR_NAME
            bus = self._bus
            bus.serve_later(
                lambda call: bus.reply_error(call, TIMEOUT_ERROR_NAME, "Timed out"),
                call,
            )

    # -- the host side ----------------------------------------------------

    def _allocate_seq(self) -> int:
        for _ in range(256):
            seq, self._next_seq = self._next_seq, (self._next_seq + 1) & 0xFF
            if seq not in self._outstanding:
                return seq
        raise RuntimeError("256 requests outstanding: no free BT sequence number")

    async def transact(
        self, netfn: int, cmd: int, data: bytes = b"", lun: int = 0
    ) -> Response:
        """Send one request as the host and wait for its answer.

        Returns the BMC's response, or btbridged's own cc 0xCE after
        ``timeout``. Raises :class:`BtTimeout` if nothing at all arrives
        within ``host_timeout`` (a dropped response), ValueError for data
        longer than a BT message allows.
        """
        bus, nursery = self._bus, self._nursery
        if bus is None or nursery is None:
            # Torn down together with a cancelled host task that had just
            # been woken (an SMS_ATN latched at teardown): that is a
            # cancellation, not a host using a stand-in that never ran.
            await trio.lowlevel.checkpoint_if_cancelled()
            raise NotServing("BtBridge.serve() is not running")
        if len(data) > MAX_REQUEST_DATA:
            raise ValueError(f"request data {len(data)} bytes > {MAX_REQUEST_DATA}")
        seq = self._allocate_seq()
        tx = Transaction(
            seq, netfn & 0xFF, lun & 0x3, cmd & 0xFF, bytes(data), Stamp.now()
        )
        o = _Outstanding(tx, trio.current_time() + self.timeout)
        self._outstanding[seq] = o
        if o.deadline < self._timer.deadline:
            self._timer.deadline = o.deadline
        self.transactions.append(tx)
        self._changed()
        try:
            await bus.send_signal(
                _RECEIVED_MESSAGE,
                wire.pack_received_message(tx.seq, tx.netfn, tx.lun, tx.cmd, tx.data),
            )
            with trio.move_on_after(self.host_timeout):
                await o.answered.wait()
            if o.answer is None:
                if tx.outcome == "pending":
                    tx.outcome = "abandoned"
                raise BtTimeout(
                    f"no response to netfn {netfn:#04x} cmd {cmd:#04x} seq {seq:#04x}"
                )
            return o.answer
        finally:
            if tx.outcome == "pending":
                tx.outcome = "abandoned"
            o.host_done.set()
            if o.reply_when_taken is not None:
                self._reply_taken(o.reply_when_taken)

    @property
    def outstanding(self) -> list[Transaction]:
        return [o.tx for o in self._outstanding.values()]

    # -- hooks ------------------------------------------------------------

    def hold(self, predicate: Predicate = _any, count: int | None = 1) -> Hold:
        """Hold matching responses until ``release()`` (see :class:`Hold`)."""
        hook = Hold("hold", predicate, count, self)
        self._hooks.append(hook)
        return hook

    def drop(
        self,
        predicate: Predicate = _any,
        count: int | None = 1,
        *,
        reply: Literal["ok", "error"] = "ok",
    ) -> Hook:
        """Lose matching responses on the way to the host: ``reply="ok"``
        answers ``sendMessage`` with success anyway (the BMC believes it was
        delivered), ``"error"`` with an I/O error (a failed BT write). The
        request leaves the queue; the host gets :class:`BtTimeout`."""
        hook = Hook("drop", predicate, count, self, reply=reply)
        self._hooks.append(hook)
        return hook

    def delay(
        self, seconds: float, predicate: Predicate = _any, count: int | None = 1
    ) -> Hook:
        """Deliver matching responses (and answer ``sendMessage``) only after
        ``seconds`` more (a slow BT write); the request timeout still applies."""
        hook = Hook("delay", predicate, count, self, seconds=seconds)
        self._hooks.append(hook)
        return hook

    def fail(
        self,
        predicate: Predicate = _any,
        count: int | None = 1,
        *,
        name: str = ERROR_NAME,
        text: str = "Internal error",
    ) -> Hook:
        """Answer matching ``sendMessage`` calls with an error without taking
        the response; the request stays outstanding (a later ``sendMessage``
        may still answer it, else it times out with 0xCE)."""
        hook = Hook("fail", predicate, count, self, error=(name, text))
        self._hooks.append(hook)
        return hook

    # -- reports ----------------------------------------------------------

    def timeline(self) -> Iterator[dict[str, Any]]:
        """Transactions and attentions as dicts, ordered by time."""
        rows: list[dict[str, Any]] = []
        for tx in self.transactions:
            rows.append(_tx_row(tx))
        for att in self.attentions:
            rows.append(
                {
                    "t": att.at.trio,
                    "monotonic": att.at.monotonic,
                    "kind": "attention",
                    "index": att.index,
                }
            )
        return iter(sorted(rows, key=lambda r: float(r["t"])))


def _tx_row(tx: Transaction) -> dict[str, Any]:
    row: dict[str, Any] = {
        "t": tx.sent.trio,
        "monotonic": tx.sent.monotonic,
        "kind": "request",
        "seq": tx.seq,
        "netfn": tx.netfn,
        "lun": tx.lun,
        "cmd": tx.cmd,
        "data": tx.data.hex(),
        "outcome": tx.outcome,
    }
    if tx.delivered is not None and tx.delivered_at is not None:
        row["cc"] = tx.delivered.cc
        row["response"] = tx.delivered.data.hex()
        row["latency"] = tx.delivered_at.trio - tx.sent.trio
    return row


# -- CLI -------------------------------------------------------------------


def _parse_request(spec: str) -> tuple[int, int, bytes]:
    try:
        netfn, cmd, *rest = spec.split(":")
        return int(netfn, 0), int(cmd, 0), bytes.fromhex(rest[0] if rest else "")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"bad request {spec!r}: want NETFN:CMD[:HEXDATA], e.g. 0x3a:0x5a:0201"
        ) from exc


def add_parser(subparsers: Any) -> None:
    """Register the ``btbridged`` subcommand (a standalone stand-in)."""
    p = subparsers.add_parser(
        "btbridged",
        help="run the btbridged stand-in, printing transactions as JSON lines",
        description=(
            "Own org.openbmc.HostIpmi, send the given host requests in order, "
            "print each transaction and every setAttention as a JSON line, "
            "then keep serving until SIGINT/SIGTERM (unless --exit)."
        ),
    )
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="request timeout (s)"
    )
    p.add_argument(
        "--request", type=_parse_request, action="append", default=[],
        metavar="NETFN:CMD[:HEX]", help="a host request to send (repeatable)",
    )  # fmt: skip
    p.add_argument("--exit", action="store_true", help="exit after the requests")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_on_bus(args, "btbridged-sim", _main)


async def _main(address: str, args: argparse.Namespace) -> int:
    bt = BtBridge(timeout=args.timeout)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_bus(address) as bus, trio.open_nursery() as nursery:
            await nursery.start(bt.serve, bus)
            nursery.start_soon(_print_attentions, bt)
            for netfn, cmd, data in args.request:
                try:
                    await bt.transact(netfn, cmd, data)
                except BtTimeout:
                    pass
                print_row(_tx_row(bt.transactions[-1]))
            if not args.exit:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
    return 0


async def _print_attentions(bt: BtBridge) -> None:
    seen = 0

    def more() -> bool:
        return len(bt.attentions) > seen

    while True:
        await bt.wait_until(more)
        for att in bt.attentions[seen:]:
            print_row(
                {
                    "t": att.at.trio,
                    "monotonic": att.at.monotonic,
                    "kind": "attention",
                    "index": att.index,
                }
            )
        seen = len(bt.attentions)


__all__ = [
    "Attention",
    "BtBridge",
    "BtTimeout",
    "Hold",
    "Hook",
    "Response",
    "Stamp",
    "Transaction",
    "add_parser",
    "requests",
    "run",
]
