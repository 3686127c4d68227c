"""A thin D-Bus layer on jeepney, with I/O and dispatch we control.

jeepney owns the connection set-up: the socket, authentication and
``Hello``.  Framing, reading, writing and dispatch are ours: jeepney's
``DBusRouter`` drops a message silently when a filter's buffer is full,
never answers a method call nobody filters for, and costs a lock and a
checkpoint per message.  Here:

* one receiver task reads and frames every message in wire order, decoding
  the hot shapes with :mod:`hiomapbridge.wire` and the rest with jeepney;
* a write is one non-blocking ``send``; what the socket does not take waits
  in order (bounded) for the sender task;
* a method reply wakes the task that made that call, or runs its callback
  in the receiver (matched by serial, accepted only from the connection the
  call went to);
* a signal is handed to the synchronous handlers registered for its
  (path, interface, member); handlers must not block, so nothing can stall
  the receiver and nothing is buffered behind our back;
* a method call goes to the handler exported at its path; calls to
  unexported paths are answered with an error, never dropped;
* when the bus goes away, every waiting caller gets :class:`BusClosed` and
  the receiver raises it, so the process can exit and be restarted.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from jeepney import (
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    new_error,
    new_method_call,
    new_method_return,
)
from jeepney.bus import get_connectable_addresses
from jeepney.bus_messages import message_bus
from jeepney.io.trio import open_dbus_connection

from . import wire
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
BUS_CALL_TIMEOUT = 10.0  # seconds for calls to the message bus itself
BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"
#: What may wait in our process for the bus to read it; past this the bus is
#: not reading and the connection is treated as lost.
MAX_UNSENT = 16 * 1024 * 1024
#: Messages dispatched back to back before the receiver lets others run.
FAIRNESS_BATCH = 64
#: Bytes asked of the socket per read.
RECV_SIZE = 65536
#: The D-Bus specification's limit on one message.
MAX_MESSAGE = 128 * 1024 * 1024

SignalHandler = Callable[[Message], None]
MethodHandler = Callable[[Message], Awaitable[None]]


class DBusError(Exception):
    """An error reply to one of our method calls."""

    def __init__(self, name: str, text: str = "") -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text


class BusClosed(Exception):
    """The connection to the bus is gone."""


def resolve_bus(spec: str) -> str:
    """Turn ``system``, ``session`` or a D-Bus address into an address.

    ``system`` honours ``DBUS_SYSTEM_BUS_ADDRESS`` like every D-Bus client.
    Raises :class:`ValueError` with a message fit for a user.
    """
    if spec == "system":
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
    elif spec == "session":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
        if not address:
            raise ValueError("--bus session: DBUS_SESSION_BUS_ADDRESS is not set")
    else:
        address = spec
    try:
        next(get_connectable_addresses(address))
    except (ValueError, RuntimeError, StopIteration) as exc:
        raise ValueError(
            f"not a usable D-Bus address: {address!r} (want system, session, "
            "or an address such as unix:path=/run/dbus/system_bus_socket)"
        ) from exc
    return address


def sender_of(msg: Message) -> str | None:
    sender: str | None = msg.header.fields.get(HeaderFields.sender)
    return sender


def signal_key(msg: Message) -> tuple[str, str, str]:
    fields = msg.header.fields
    return (
        fields.get(HeaderFields.path, ""),
        fields.get(HeaderFields.interface, ""),
        fields.get(HeaderFields.member, ""),
    )


ReplyCallback = Callable[["Message | Exception"], None]


class _PendingCall:
    """A call waiting for its reply: a task (``event``) or a ``callback``."""

    __slots__ = ("callback", "deadline", "event", "expect", "reply")

    def __init__(
        self,
        expect: str | None,
        callback: ReplyCallback | None = None,
        deadline: float = math.inf,
    ) -> None:
        self.expect = expect  # the only sender (besides the bus) to accept
        self.event: trio.Event | None = None if callback else trio.Event()
        self.callback = callback
        self.deadline = deadline
        self.reply: Message | BusClosed | None = None


def error_from_reply(reply: Message) -> DBusError:
    name = reply.header.fields.get(HeaderFields.error_name, "")
    body = reply.body
    text = body[0] if body and isinstance(body[0], str) else ""
    return DBusError(name, text)


class Bus:
    """One D-Bus connection and its dispatch.  Create with :func:`open_bus`."""

    def __init__(self, conn: Any, nursery: trio.Nursery) -> None:
        self._conn = conn
        self._nursery = nursery
        self._pending: dict[int, _PendingCall] = {}
        self._signal_handlers: dict[tuple[str, str, str], list[SignalHandler]] = {}
        self._exports: dict[str, Callable[[Message], None]] = {}
        self._owners: dict[str, NameOwner] = {}
        self._closed: BusClosed | None = None
        #: replies from a connection the call did not go to (counted, logged)
        self.stray_replies = RateLimitedLog(log, logging.WARNING)
        #: frames that are not readable messages (a bus never sends them)
        self.malformed = RateLimitedLog(log, logging.WARNING)
        self._next_expiry = math.inf
        # The expiry task sleeps in this scope; moving its deadline earlier
        # costs no task switch (a new call must not wake anybody).
        self._expiry_scope = trio.CancelScope()
        self.unique_name: str = conn.unique_name
        # jeepney connected, authenticated and said Hello; from here on we
        # frame, parse and write ourselves, on a non-blocking duplicate of its
        # socket: a send is one syscall, not a lock and a checkpoint, and the
        # hot message shapes skip jeepney's generic codec (wire.py).
        self._serials = conn.outgoing_serial
        self._sock = socket.socket(fileno=os.dup(conn.socket.fileno()))
        self._sock.setblocking(False)
        self._return_templates: dict[tuple[str | None, str], wire.ReturnTemplate] = {}
        self._unsent = bytearray()  # what the socket did not take yet
        self._unsent_wake = trio.Event()
        self._drained = trio.Event()

    # -- sending ---------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Write a serialised message now, or queue it behind what the
        socket has not taken yet (the sender task flushes in order)."""
        if self._closed is not None:
            raise self._closed
        if not self._unsent:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._close(f"sending failed: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
            self._unsent_wake.set()
        if len(self._unsent) + len(data) > MAX_UNSENT:
            raise self._close("the bus is not reading what we send")
        self._unsent += data

    def send_nowait(self, msg: Message) -> None:
        """Send a message that expects no reply (a signal, a method return)."""
        self.send_raw(msg.serialise(next(self._serials)))

    async def send(self, msg: Message) -> None:
        """:meth:`send_nowait`, waiting first while earlier output is queued
        (backpressure for peers that send in bulk)."""
        await self._wait_drained()
        self.send_nowait(msg)
        await trio.lowlevel.checkpoint()

    async def send_signal(self, template: wire.SignalTemplate, body: bytes) -> None:
        """:meth:`send` for a signal of a fixed shape (``body``: its encoded
        arguments)."""
        await self._wait_drained()
        self.send_raw(template.build(next(self._serials), body))
        await trio.lowlevel.checkpoint()

    async def _wait_drained(self) -> None:
        while self._unsent and self._closed is None:
            await self._drained.wait()

    def reply_nowait(
        self, call: Message, signature: str = "", body: bytes = b""
    ) -> None:
        """Send the method return for ``call`` now (``body``: its encoded
        arguments), unless the caller wants none."""
        if not _wants_reply(call):
            return
        key = (sender_of(call), signature)
        template = self._return_templates.get(key)
        if template is None:
            if len(self._return_templates) >= 64:  # callers come and go
                self._return_templates.clear()
            template = wire.ReturnTemplate(*key)
            self._return_templates[key] = template
        self.send_raw(template.build(next(self._serials), call.header.serial, body))

    def reply_error_nowait(self, call: Message, name: str, text: str = "") -> None:
        """Send an error reply for ``call`` now, unless the caller wants none."""
        if _wants_reply(call):
            self.send_nowait(new_error(call, name, "s", (text,)))

    async def run_sender(self) -> None:
        """Flush what the socket did not take at once."""
        while True:
            while not self._unsent:
                self._drained.set()
                self._drained = trio.Event()
                self._unsent_wake = trio.Event()
                await self._unsent_wake.wait()
            await trio.lowlevel.wait_writable(self._sock)
            try:
                sent = self._sock.send(self._unsent)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._close(f"sending failed: {exc}") from exc
            del self._unsent[:sent]

    def _register(
        self,
        serial: int,
        expect: str | None,
        callback: ReplyCallback | None,
        reply_within: float,
    ) -> _PendingCall:
        deadline = trio.current_time() + reply_within if callback else math.inf
        pending = _PendingCall(expect, callback, deadline)
        self._pending[serial] = pending
        if deadline < self._next_expiry:
            self._next_expiry = deadline
            self._expiry_scope.deadline = deadline
        return pending

    async def call(self, msg: Message) -> Message:
        """Call a method and return its method-return message.

        An error reply raises :class:`DBusError`; a lost bus raises
        :class:`BusClosed`.  Bound the wait with ``trio.fail_after``.
        """
        if self._closed is not None:
            raise self._closed
        serial = next(self._serials)
        return await self._call(
            serial, self._expected_sender(msg), msg.serialise(serial)
        )

    async def call_template(
        self, template: wire.CallTemplate, body: bytes = b""
    ) -> Message:
        """:meth:`call` for a call of a fixed shape (``body``: its encoded
        arguments)."""
        if self._closed is not None:
            raise self._closed
        serial = next(self._serials)
        expect = self._expected_for(template.destination)
        return await self._call(serial, expect, template.build(serial, body))

    async def _call(self, serial: int, expect: str | None, data: bytes) -> Message:
        pending = self._register(serial, expect, None, 0)
        assert pending.event is not None
        try:
            self.send_raw(data)
            await pending.event.wait()
        finally:
            self._pending.pop(serial, None)
        reply = pending.reply
        if isinstance(reply, BusClosed):
            raise reply
        assert reply is not None
        if reply.header.message_type == MessageType.error:
            raise error_from_reply(reply)
        return reply

    def call_nowait(
        self, msg: Message, callback: ReplyCallback, reply_within: float
    ) -> None:
        """Send a method call; ``callback`` later gets the method return, a
        :class:`DBusError`, ``trio.TooSlowError`` after ``reply_within``
        seconds, or :class:`BusClosed`.  It runs synchronously in the
        receiver, in wire order with signals, and must not block.  If the
        bus is already gone, this raises :class:`BusClosed` instead and
        ``callback`` is never called."""
        if self._closed is not None:
            raise self._closed
        serial = next(self._serials)
        self.send_raw(msg.serialise(serial))
        self._register(serial, self._expected_sender(msg), callback, reply_within)

    def call_template_nowait(
        self,
        template: wire.CallTemplate,
        body: bytes,
        callback: ReplyCallback,
        reply_within: float,
    ) -> None:
        """:meth:`call_nowait` for a call of a fixed shape (``body``: its
        encoded arguments): no generic serialisation on the hot path."""
        if self._closed is not None:
            raise self._closed
        serial = next(self._serials)
        # Sent first, waited for after: the reply cannot be dispatched before
        # this returns (the receiver is a task of this thread), and the call
        # leaves a few microseconds sooner.
        self.send_raw(template.build(serial, body))
        expect = self._expected_for(template.destination)
        self._register(serial, expect, callback, reply_within)

    def send_template_noreply(self, template: wire.CallTemplate, body: bytes) -> None:
        """Send a call of a fixed shape flagged NO_REPLY_EXPECTED: the
        callee (and the bus, on failure) sends nothing back."""
        self.send_raw(template.build(next(self._serials), body, no_reply=True))

    async def run_expiry(self) -> None:
        """Fail callback calls whose reply did not come in time."""
        while True:
            with trio.CancelScope(deadline=self._next_expiry) as scope:
                self._expiry_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            self._next_expiry = math.inf
            for serial, pending in list(self._pending.items()):
                if pending.callback is None:
                    continue
                if pending.deadline <= now:
                    self._pending.pop(serial, None)
                    _run_callback(pending.callback, trio.TooSlowError())
                elif pending.deadline < self._next_expiry:
                    self._next_expiry = pending.deadline

    def _expected_sender(self, msg: Message) -> str | None:
        """Who may answer ``msg``: its unique-name destination, or the
        tracked owner of its well-known one ("" while it has none, so that
        only the bus's own errors count).  None: not checked (a well-known
        name nobody tracks)."""
        return self._expected_for(msg.header.fields.get(HeaderFields.destination))

    def _expected_for(self, dest: str | None) -> str | None:
        if dest is None or dest.startswith(":") or dest == BUS_NAME:
            return dest
        tracker = self._owners.get(dest)
        if tracker is None:
            return None
        return tracker.owner or ""

    async def bus_call(self, method: str, signature: str = "", *args: Any) -> Message:
        """Call a method of the message bus itself."""
        msg = new_method_call(message_bus, method, signature or None, args)
        with trio.fail_after(BUS_CALL_TIMEOUT):
            return await self.call(msg)

    # -- receiving -------------------------------------------------------

    async def add_match(self, rule: MatchRule) -> None:
        """Subscribe on the bus side (``AddMatch``)."""
        await self.bus_call("AddMatch", "s", rule.serialise())

    def on_signal(
        self, path: str, interface: str, member: str, handler: SignalHandler
    ) -> Callable[[], None]:
        """Hand signals with exactly this path, interface and member to
        ``handler`` (synchronously, in the receiver task).  Returns a function
        that removes the handler.  A bus-side match is a separate step.
        """
        key = (path, interface, member)
        self._signal_handlers.setdefault(key, []).append(handler)

        def remove() -> None:
            handlers = self._signal_handlers.get(key, [])
            if handler in handlers:
                handlers.remove(handler)

        return remove

    async def subscribe(
        self, path: str, interface: str, member: str, handler: SignalHandler
    ) -> Callable[[], None]:
        """Register ``handler`` locally, then add the bus-side match."""
        remove = self.on_signal(path, interface, member, handler)
        await self.add_match(
            MatchRule(type="signal", path=path, interface=interface, member=member)
        )
        return remove

    def export(self, path: str, handler: MethodHandler) -> None:
        """Serve method calls to ``path``: each runs ``handler`` as a task,
        which must send exactly one reply (unless the caller wants none)."""

        def spawn(msg: Message) -> None:
            self.serve_later(handler, msg)

        self._exports[path] = spawn

    def serve_later(self, handler: MethodHandler, msg: Message) -> None:
        """Run ``handler(msg)`` as a task, as :meth:`export` does: a lost bus
        ends it quietly, any other exception is logged and answered
        ``Failed``.  For an inline export that defers some calls."""
        self._nursery.start_soon(self._serve_one, handler, msg)

    def export_inline(self, path: str, callback: Callable[[Message], None]) -> None:
        """Serve method calls to ``path`` by calling ``callback`` synchronously
        in the receiver task, in wire order (for a server that must process
        calls strictly in arrival order: trio does not promise to run new
        tasks in the order they were started).  It must not block; replying
        is up to whatever it hands the message to."""
        self._exports[path] = callback

    def unexport(self, path: str) -> None:
        self._exports.pop(path, None)

    def close_socket(self) -> None:
        """Close our duplicate of the connection's socket."""
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def _close(self, why: str) -> BusClosed:
        if self._closed is None:
            self._closed = BusClosed(why)
            self._drained.set()
            pendings, self._pending = self._pending, {}
            for pending in pendings.values():
                if pending.callback is not None:
                    _run_callback(pending.callback, self._closed)
                else:
                    assert pending.event is not None
                    pending.reply = self._closed
                    pending.event.set()
        return self._closed

    async def run_receiver(self) -> None:
        """Read, frame and dispatch every message, in wire order."""
        parser = self._conn.parser  # what jeepney read past the Hello reply
        while (first := parser.get_next_message()) is not None:
            self._dispatch(first)
        pipe = parser.buf
        buf = bytearray(pipe.read(pipe.bytes_buffered) if pipe.bytes_buffered else b"")
        sock = self._sock
        since_yield = 0
        drained = False  # the last read was short: the socket is likely empty
        try:
            while True:
                while len(buf) >= 16:
                    size = wire.message_size(buf)
                    if size > MAX_MESSAGE:
                        raise ValueError(f"message of {size} bytes")
                    if len(buf) < size:
                        break
                    frame = bytes(buf[:size])
                    del buf[:size]
                    self._received(frame)
                    since_yield += 1
                    if since_yield >= FAIRNESS_BATCH:  # a flood must not
                        since_yield = 0  # starve the other tasks
                        await trio.lowlevel.checkpoint()
                if drained:  # skip the read that would only say EAGAIN
                    since_yield = 0
                    await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    drained = True
                    continue
                if not data:
                    raise EOFError("closed by the bus")
                drained = len(data) < RECV_SIZE
                if (
                    drained
                    and not buf
                    and len(data) >= 16
                    and wire.message_size(data) == len(data)
                ):
                    # The usual read: one whole message, dispatched as read
                    # (and then a wait, which lets the other tasks run).
                    self._received(data)
                    continue
                buf += data
        except (EOFError, OSError, ValueError) as exc:
            raise self._close(f"connection to the bus lost: {exc}") from exc

    def _received(self, frame: bytes) -> None:
        """Parse and dispatch one framed message (an unreadable one is
        dropped: the framing still holds)."""
        try:
            msg = wire.parse(frame)
        except wire.Malformed as exc:
            self.malformed(
                "dropped an unreadable message of %d bytes: %s", len(frame), exc
            )
            return
        self._dispatch(msg)
        if self._closed is not None:  # a handler's send found the bus gone:
            raise self._closed  # stop here too

    def _dispatch(self, msg: Message) -> None:
        mtype = msg.header.message_type
        if mtype == MessageType.signal:
            for handler in self._signal_handlers.get(signal_key(msg), ()):
                try:
                    handler(msg)
                except Exception:
                    log.exception("signal handler failed on %s", signal_key(msg))
        elif mtype in (MessageType.method_return, MessageType.error):
            serial = msg.header.fields.get(HeaderFields.reply_serial)
            pending = self._pending.get(serial) if serial is not None else None
            if pending is None or pending.reply is not None:
                log.debug("ignoring reply to serial %s we do not wait for", serial)
            elif pending.expect is not None and sender_of(msg) not in (
                pending.expect,
                BUS_NAME,
            ):
                self.stray_replies(
                    "ignoring a reply to serial %s from %s: the call went to %s",
                    serial,
                    sender_of(msg),
                    pending.expect or "(no owner)",
                )
            elif pending.callback is not None:
                self._pending.pop(serial, None)
                if mtype == MessageType.error:
                    _run_callback(pending.callback, error_from_reply(msg))
                else:
                    _run_callback(pending.callback, msg)
            else:
                assert pending.event is not None
                pending.reply = msg
                pending.event.set()
        elif mtype == MessageType.method_call:
            path = msg.header.fields.get(HeaderFields.path, "")
            export = self._exports.get(path)
            if export is not None:
                try:
                    export(msg)
                except Exception:
                    log.exception("method handler failed")
                    self._nursery.start_soon(self._answer_failed, msg)
            else:
                self._nursery.start_soon(self._answer_unknown, msg)

    async def _answer_failed(self, msg: Message) -> None:
        await self.reply_error(
            msg, "org.freedesktop.DBus.Error.Failed", "internal error"
        )

    async def _serve_one(self, handler: MethodHandler, msg: Message) -> None:
        try:
            await handler(msg)
        except BusClosed:
            pass
        except Exception:
            log.exception("method handler failed")
            await self._answer_failed(msg)

    async def _answer_unknown(self, msg: Message) -> None:
        fields = msg.header.fields
        if fields.get(HeaderFields.interface) == "org.freedesktop.DBus.Peer":
            if fields.get(HeaderFields.member) == "Ping":
                await self.reply(msg)
                return
        await self.reply_error(
            msg,
            "org.freedesktop.DBus.Error.UnknownObject",
            f"no object at {fields.get(HeaderFields.path, '')}",
        )

    async def reply(self, call: Message, signature: str = "", *body: Any) -> None:
        """Send the method return for ``call``."""
        if _wants_reply(call):
            await self.send(new_method_return(call, signature or None, body))

    async def reply_error(self, call: Message, name: str, text: str = "") -> None:
        """Send an error reply for ``call``."""
        if _wants_reply(call):
            await self.send(new_error(call, name, "s", (text,)))


def _run_callback(callback: ReplyCallback, result: Message | Exception) -> None:
    try:
        callback(result)
    except Exception:
        log.exception("reply callback failed")


def _wants_reply(call: Message) -> bool:
    return not (call.header.flags & 1)  # NO_REPLY_EXPECTED


@asynccontextmanager
async def open_bus(address: str) -> AsyncIterator[Bus]:
    """Connect to the bus at ``address`` and run its receiver.

    Leaving the block cancels the receiver and closes the connection.  If the
    bus goes away, the body is cancelled and :class:`BusClosed` propagates.
    """
    try:
        conn = await open_dbus_connection(address)
    except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
        raise BusClosed(f"cannot connect to the bus at {address}: {exc}") from exc
    bus: Bus | None = None
    try:
        async with trio.open_nursery() as nursery:
            bus = Bus(conn, nursery)
            nursery.start_soon(bus.run_receiver)
            nursery.start_soon(bus.run_sender)
            nursery.start_soon(bus.run_expiry)
            try:
                yield bus
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if bus is not None:
            bus.close_socket()
        await conn.aclose()


async def watch_name_owners(
    bus: Bus, name: str, handler: SignalHandler, *, namespace: bool = False
) -> Callable[[], None]:
    """Hand the bus's ``NameOwnerChanged`` signals to ``handler``, the bus
    filtering on arg0: ``name`` exactly, or with ``namespace`` every name
    under it.  Returns what removes the handler."""
    remove = bus.on_signal(BUS_PATH, BUS_NAME, "NameOwnerChanged", handler)
    rule = MatchRule(
        type="signal",
        sender=BUS_NAME,
        interface=BUS_NAME,
        member="NameOwnerChanged",
        path=BUS_PATH,
    )
    rule.add_arg_condition(0, name, "namespace" if namespace else "string")
    await bus.add_match(rule)
    return remove


class NameOwner:
    """Tracks the unique name owning a well-known name.

    Subscribes to ``NameOwnerChanged`` (filtered on arg0 by the bus) before
    asking ``GetNameOwner``; dispatch is in wire order, so the answer is at
    least as new as every signal before it and later signals apply on top.
    """

    def __init__(
        self,
        name: str,
        on_change: Callable[[str | None, str | None], None] | None = None,
    ) -> None:
        self.name = name
        self.owner: str | None = None
        self._on_change = on_change

    async def start(self, bus: Bus) -> None:
        bus._owners[self.name] = self
        await watch_name_owners(bus, self.name, self._signal)
        try:
            reply = await bus.bus_call("GetNameOwner", "s", self.name)
            owner: str | None = reply.body[0]
        except DBusError as exc:
            if exc.name != "org.freedesktop.DBus.Error.NameHasNoOwner":
                raise
            owner = None
        self._set(owner)

    def _signal(self, msg: Message) -> None:
        if sender_of(msg) != "org.freedesktop.DBus":
            return
        if msg.header.fields.get(HeaderFields.signature) != "sss":
            return
        name, _old, new = msg.body
        if name == self.name:
            self._set(new or None)

    def _set(self, owner: str | None) -> None:
        old, self.owner = self.owner, owner
        if old != owner:
            log.info(
                "%s: owner %s -> %s", self.name, old or "(none)", owner or "(none)"
            )
            if self._on_change is not None:
                self._on_change(old, owner)


class SignalGuard:
    """Signals count only from a tracked peer's current owner and with the
    expected signature; anything else is counted and logged (rate-limited)."""

    def __init__(self, logger: logging.Logger) -> None:
        #: signals from a connection that does not own the peer's name
        self.forged = RateLimitedLog(logger, logging.WARNING)
        #: signals (or properties) of the wrong shape
        self.rejected = RateLimitedLog(logger, logging.WARNING)

    def accepted(self, msg: Message, peer: NameOwner, who: str, signature: str) -> bool:
        fields = msg.header.fields
        sender = fields.get(HeaderFields.sender)
        if sender is None or sender != peer.owner:
            member = fields.get(HeaderFields.member)
            self.forged("ignored %s from %s: %s is %s", member, sender, who, peer.owner)
            return False
        if fields.get(HeaderFields.signature) != signature:
            member = fields.get(HeaderFields.member)
            self.rejected("ignored %s with a bad signature", member)
            return False
        return True
