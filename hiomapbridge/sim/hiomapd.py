"""A hiomapd emulator on D-Bus, for the demo, tests, benchmarks and fault
experiments.

It serves ``xyz.openbmc_project.Hiomapd`` at ``/xyz/openbmc_project/Hiomapd``
as the real daemon does (wire reference section 5): the ``Protocol`` and
``Protocol.V2`` interfaces, the four event properties with
``PropertiesChanged``, plus ``Properties``, ``Introspectable`` and ``Peer``.
The protocol itself lives in :mod:`hiomapbridge.sim.hiomapd_core`, which
documents how closely it follows real hiomapd: what each
``PropertiesChanged`` carries (every property of the operation's bit mask,
changed or not), that ``GetInfo(1)`` fails ``UnknownMethod`` yet switches
to v1, and the calls that crash real hiomapd. Such a crash drops the
emulator off the bus without a word (under :func:`run_emulator`), or, as
the ``hiomapbridge-sim hiomapd`` process, kills the process with SIGSEGV.
SIGHUP is hiomapd's protocol reset (the process keeps running).

Method calls are processed one at a time in arrival order, like the
single-threaded daemon, except calls to the test control interface
``org.hiomapbridge.Sim.Control`` (same object), which are served at once so
that a stalled emulator can still be un-stalled:

* ``SuspendFlashControl()``, ``ResumeFlashControl()``,
  ``ResumeFlashControlModified()`` (hiomapd's ``--resume modified``: drops
  the window cache and raises WindowReset if a window was open),
  ``ForceWindowReset()``, ``ProtocolReset()`` (what SIGHUP does);
* ``SetFault(s mode, s member, u count)``: see :func:`parse_fault`;
* ``EmitProperties(a{sv})``: emit an arbitrary ``PropertiesChanged`` on
  ``Protocol.V2`` (to test what a peer does with bad types or names).

In-process use::

    async with run_emulator(bus_address, tmp_path, flash_size=1 << 20) as emu:
        ...  # emu.flash_path, emu.read_flash(), emu.set_fault(), ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn
from xml.sax.saxutils import quoteattr

import attrs
import trio
from jeepney import DBusAddress, HeaderFields, Message, new_signal

from hiomapbridge.dbus import Bus, BusClosed, open_bus
from hiomapbridge.events import describe
from hiomapbridge.hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_PROTOCOL, IFACE_V2
from hiomapbridge.sim.hiomapd_core import (
    Config,
    Hiomapd,
    HiomapdCrash,
    HiomapdError,
    WindowInfo,
)
from hiomapbridge.systemd import notify

__all__ = [
    "IFACE_CONTROL",
    "Config",
    "Emulator",
    "Fault",
    "add_parser",
    "parse_fault",
    "run",
    "run_emulator",
]

log = logging.getLogger(__name__)

IFACE_CONTROL: Final = "org.hiomapbridge.Sim.Control"
IFACE_PROPERTIES: Final = "org.freedesktop.DBus.Properties"
IFACE_INTROSPECTABLE: Final = "org.freedesktop.DBus.Introspectable"
IFACE_PEER: Final = "org.freedesktop.DBus.Peer"

_ERR: Final = "org.freedesktop.DBus.Error."
_DO_NOT_QUEUE: Final = 4
_PRIMARY_OWNER: Final = 1


@attrs.frozen
class _Method:
    args: tuple[tuple[str, str], ...] = ()  # (name, type) in
    out: tuple[tuple[str, str], ...] = ()  # (name, type) out

    @property
    def signature(self) -> str:
        return "".join(t for _, t in self.args)

    @property
    def out_signature(self) -> str:
        return "".join(t for _, t in self.out)


_WINDOW_ARGS: Final = (("offset", "q"), ("size", "q"))
_WINDOW_OUT: Final = (("lpc_address", "q"), ("size", "q"), ("offset", "q"))
_RESET = _Method()
_GET_INFO = _Method(
    (("version", "y"),),
    (("version", "y"), ("block_size_shift", "y"), ("timeout", "q")),
)
_ACK = _Method((("flags", "y"),))

_INTERFACES: Final[Mapping[str, Mapping[str, _Method]]] = {
    IFACE_PROTOCOL: {"Reset": _RESET, "GetInfo": _GET_INFO, "Ack": _ACK},
    IFACE_V2: {
        "Reset": _RESET,
        "GetInfo": _GET_INFO,
        "GetFlashInfo": _Method((), (("flash_size", "q"), ("erase_size", "q"))),
        "CreateReadWindow": _Method(_WINDOW_ARGS, _WINDOW_OUT),
        "CloseWindow": _Method((("flags", "y"),)),
        "CreateWriteWindow": _Method(_WINDOW_ARGS, _WINDOW_OUT),
        "MarkDirty": _Method(_WINDOW_ARGS),
        "Flush": _Method(),
        "Ack": _ACK,
        "Erase": _Method(_WINDOW_ARGS),
    },
    IFACE_PROPERTIES: {
        "Get": _Method(
            (("interface_name", "s"), ("property_name", "s")), (("value", "v"),)
        ),
        "GetAll": _Method((("interface_name", "s"),), (("props", "a{sv}"),)),
        "Set": _Method(
            (("interface_name", "s"), ("property_name", "s"), ("value", "v"))
        ),
    },
    IFACE_INTROSPECTABLE: {"Introspect": _Method((), (("xml_data", "s"),))},
    IFACE_PEER: {
        "Ping": _Method(),
        "GetMachineId": _Method((), (("machine_uuid", "s"),)),
    },
    IFACE_CONTROL: {
        "SuspendFlashControl": _Method(),
        "ResumeFlashControl": _Method(),
        "ResumeFlashControlModified": _Method(),
        "ForceWindowReset": _Method(),
        "ProtocolReset": _Method(),
        "SetFault": _Method((("mode", "s"), ("member", "s"), ("count", "u"))),
        "EmitProperties": _Method((("changed", "a{sv}"),)),
    },
}
_PROTOCOL_IFACES: Final = (IFACE_PROTOCOL, IFACE_V2)
_PROPERTIES: Final = ("DaemonReady", "FlashControlLost", "WindowReset", "ProtocolReset")
_PARENT_PATHS: Final = ("/", "/xyz", "/xyz/openbmc_project")


def introspection_xml(path: str = HIOMAPD_PATH) -> str:
    """The ``Introspect`` answer for ``path`` (the object or one of its parents)."""
    head = (
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection'
        ' 1.0//EN"\n "http://www.freedesktop.org/standards/dbus/1.0/'
        'introspect.dtd">\n<node>\n'
    )
    if path != HIOMAPD_PATH:
        child = HIOMAPD_PATH[len(path.rstrip("/")) + 1 :].split("/")[0]
        return f"{head} <node name={quoteattr(child)}/>\n</node>\n"
    lines = [head]
    for iface, methods in _INTERFACES.items():
        lines.append(f" <interface name={quoteattr(iface)}>\n")
        for member, method in methods.items():
            lines.append(f"  <method name={quoteattr(member)}>\n")
            for name, typ in method.args:
                lines.append(f'   <arg name="{name}" type="{typ}" direction="in"/>\n')
            for name, typ in method.out:
                lines.append(f'   <arg name="{name}" type="{typ}" direction="out"/>\n')
            lines.append("  </method>\n")
        if iface == IFACE_PROPERTIES:
            lines.append(
                '  <signal name="PropertiesChanged">\n'
                '   <arg name="interface_name" type="s"/>\n'
                '   <arg name="changed_properties" type="a{sv}"/>\n'
                '   <arg name="invalidated_properties" type="as"/>\n'
                "  </signal>\n"
            )
        if iface == IFACE_V2:
            for prop in _PROPERTIES:
                lines.append(
                    f'  <property name="{prop}" type="b" access="read">\n'
                    '   <annotation name="org.freedesktop.DBus.Property.'
                    'EmitsChangedSignal" value="true"/>\n'
                    "  </property>\n"
                )
        lines.append(" </interface>\n")
    lines.append("</node>\n")
    return "".join(lines)


# -- faults -------------------------------------------------------------------

FAULT_MODES: Final = ("hang", "stall", "wrong-signature", "error:", "delay:", "clear")


@attrs.define
class Fault:
    """A fault applied to the next calls of a Protocol/Protocol.V2 method.

    ``member`` "" matches every method; ``remaining`` 0 means until cleared.
    """

    mode: str  # "hang", "stall", "wrong-signature", "error" or "delay"
    member: str = ""
    remaining: int = 0
    error_name: str = ""
    delay: float = 0.0

    def matches(self, member: str) -> bool:
        return self.member in ("", member)


def parse_fault(mode: str, member: str = "", count: int = 0) -> Fault | None:
    """Parse a fault (None for ``clear``). Raises ValueError for a bad mode.

    Modes: ``hang`` (swallow the call: no reply, no effect), ``stall`` (stop
    processing at this call, as a wedged daemon: it and every later call
    wait until the fault is cleared or the emulator stops, then the call is
    processed), ``wrong-signature`` (process, but reply with a wrong
    signature: ``u`` for every field, or ``s`` for an empty reply),
    ``error:<dbus.Error.Name>`` (reply that error, no effect),
    ``delay:<seconds>`` (hold processing that long, then process), ``clear``
    (remove the faults for ``member``, all of them for "").
    """
    if mode == "clear":
        return None
    if mode in ("hang", "stall", "wrong-signature"):
        return Fault(mode, member, count)
    if mode.startswith("error:"):
        name = mode.removeprefix("error:")
        parts = name.split(".")
        if len(parts) < 2 or not all(p.replace("_", "a").isalnum() for p in parts):
            raise ValueError(f"not a D-Bus error name: {name!r}")
        return Fault("error", member, count, error_name=name)
    if mode.startswith("delay:"):
        try:
            seconds = float(mode.removeprefix("delay:"))
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < 3600:
            raise ValueError(f"bad delay in {mode!r}")
        return Fault("delay", member, count, delay=seconds)
    raise ValueError(
        f"unknown fault mode {mode!r} (want one of {', '.join(FAULT_MODES)})"
    )


def _wrong_signature(
    out_signature: str, body: tuple[Any, ...]
) -> tuple[str, tuple[Any, ...]]:
    if not out_signature:
        return "s", ("unexpected",)
    return "u" * len(body), body


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if len(text) == 32:
                return text
    return hashlib.md5(socket.gethostname().encode(), usedforsecurity=False).hexdigest()


# -- the emulator -------------------------------------------------------------


@attrs.define(eq=False)
class Emulator:
    """The emulated daemon. Serve it on a bus with :meth:`serve`.

    ``calls`` records ``(member, args)`` of every Protocol/V2 call received,
    faulted ones included, for tests to inspect. ``crashed`` tells that a
    call crashed it as it would crash real hiomapd.
    """

    config: Config
    calls: list[tuple[str, tuple[Any, ...]]] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    _core: Hiomapd | None = attrs.field(default=None, init=False)
    _bus: Bus | None = attrs.field(default=None, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _unstall: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _crash_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    crashed: bool = attrs.field(default=False, init=False)

    # -- introspection for tests -------------------------------------------

    @property
    def flash_path(self) -> Path:
        return self.config.flash_path

    @property
    def lpc_path(self) -> Path:
        return self.config.lpc_path

    @property
    def core(self) -> Hiomapd:
        if self._core is None:
            raise RuntimeError("the emulator is not serving")
        return self._core

    @property
    def events(self) -> int:
        """The current event byte."""
        return self.core.events

    @property
    def version(self) -> int:
        """The protocol version in force (2 from start-up, as hiomapd)."""
        return self.core.version

    @property
    def current_window(self) -> WindowInfo | None:
        return self.core.current_window

    def read_flash(self, offset: int = 0, size: int | None = None) -> bytes:
        """Read the flash file (what Flush wrote)."""
        with self.config.flash_path.open("rb") as f:
            f.seek(offset)
            return f.read(-1 if size is None else size)

    def read_lpc(self, offset: int, size: int) -> bytes:
        return self.core.read_lpc(offset, size)

    def write_lpc(self, offset: int, data: bytes) -> None:
        """Write into the LPC space, as the host does through a window."""
        self.core.write_lpc(offset, data)

    # -- fault hooks ----------------------------------------------------------

    def set_fault(self, mode: str, member: str = "", count: int = 0) -> None:
        """Add a fault (see :func:`parse_fault`); ``clear`` removes them."""
        fault = parse_fault(mode, member, count)
        if fault is None:
            self.clear_faults(member)
        else:
            self.faults.append(fault)

    def clear_faults(self, member: str = "") -> None:
        self.faults = [f for f in self.faults if member and f.member != member]
        if not any(f.mode == "stall" for f in self.faults):
            self._unstall.set()

    def _take_fault(self, member: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(member):
                if fault.remaining:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                return fault
        return None

    # -- control hooks --------------------------------------------------------

    async def suspend_flash_control(self) -> None:
        async with self._lock:
            self.core.suspend()
            await self._emit()

    async def resume_flash_control(self, modified: bool = False) -> None:
        async with self._lock:
            self.core.resume(modified)
            await self._emit()

    async def force_window_reset(self) -> None:
        async with self._lock:
            self.core.force_window_reset()
            await self._emit()

    async def protocol_reset(self) -> None:
        """hiomapd's protocol reset (its SIGHUP): DaemonReady false, then
        DaemonReady and ProtocolReset true; the windows are dropped."""
        async with self._lock:
            self.core.protocol_reset()
            await self._emit()

    async def emit_properties(self, changed: Mapping[str, tuple[str, Any]]) -> None:
        """Emit ``PropertiesChanged(V2, changed, [])``; values are
        ``(signature, value)`` pairs, e.g. ``{"DaemonReady": ("s", "yes")}``."""
        await self._send_properties_changed(dict(changed))

    # -- serving ------------------------------------------------------------

    async def serve(
        self, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the files, export the object, own the name, announce 0x81,
        then report started; runs until :meth:`stop_cleanly` has finished (or
        it is cancelled, which is a crash: nothing is emitted)."""
        if self._core is not None:
            raise RuntimeError("already serving")
        self._core = Hiomapd(self.config)
        send_channel, receive_channel = trio.open_memory_channel[Message](1 << 16)
        try:
            async with trio.open_nursery() as nursery:

                def on_call(msg: Message) -> None:
                    if msg.header.fields.get(HeaderFields.interface) == IFACE_CONTROL:
                        nursery.start_soon(self._handle_control, msg)
                    else:
                        send_channel.send_nowait(msg)

                self._bus = bus
                bus.export_inline(HIOMAPD_PATH, on_call)
                for parent in _PARENT_PATHS:
                    bus.export(parent, self._handle_parent)
                nursery.start_soon(self._process, receive_channel)
                reply = await bus.bus_call(
                    "RequestName", "su", HIOMAPD_SERVICE, _DO_NOT_QUEUE
                )
                if reply.body[0] != _PRIMARY_OWNER:
                    raise RuntimeError(f"{HIOMAPD_SERVICE} is already owned")
                async with self._lock:
                    self.core.start()
                    await self._emit()
                log.info("serving %s as %s", HIOMAPD_SERVICE, bus.unique_name)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            bus.unexport(HIOMAPD_PATH)
            for parent in _PARENT_PATHS:
                bus.unexport(parent)
            self._core.close()
            self._bus = None

    async def stop_cleanly(self) -> None:
        """hiomapd's clean exit: once the call in progress is done, emit the
        three PropertiesChanged (DaemonReady false; DaemonReady and
        ProtocolReset true; all four properties with DaemonReady false and
        ProtocolReset true), release the name, stop serving."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._unstall.set()
        try:
            async with self._lock:
                self.core.stop()
                await self._emit()
                if self._bus is not None:
                    self._bus.unexport(HIOMAPD_PATH)
                    await self._bus.bus_call("ReleaseName", "s", HIOMAPD_SERVICE)
                log.info("stopped cleanly: %s", describe(self.core.events))
        finally:
            self._stopped.set()

    async def crash(self) -> None:
        """Vanish without a word (only under :func:`run_emulator`): the bus
        connection closes, nothing is emitted, as after SIGKILL."""
        if self._crash_scope is None:
            raise RuntimeError("crash() needs run_emulator()")
        self._stopping = True
        self._unstall.set()
        self._crash_scope.cancel()
        await self._stopped.wait()

    async def _segfault(self, why: HiomapdCrash) -> None:
        """A call that kills real hiomapd: drop off the bus at once, emitting
        nothing (the process runner then ends with SIGSEGV)."""
        log.critical("segmentation fault, as hiomapd: %s", why)
        self.crashed = True
        self._stopping = True
        self._unstall.set()
        if self._crash_scope is None:
            raise RuntimeError(f"hiomapd crash without a crash scope: {why}")
        self._crash_scope.cancel()
        await trio.sleep_forever()

    # -- internals ----------------------------------------------------------

    async def _emit(self) -> None:
        for emission in self.core.take_emissions():
            await self._send_properties_changed(
                {k: ("b", v) for k, v in emission.items()}
            )

    async def _send_properties_changed(
        self, changed: dict[str, tuple[str, Any]]
    ) -> None:
        if self._bus is None:
            raise RuntimeError("the emulator is not serving")
        log.debug("PropertiesChanged %s", changed)
        msg = new_signal(
            DBusAddress(HIOMAPD_PATH, interface=IFACE_PROPERTIES),
            "PropertiesChanged",
            "sa{sv}as",
            (IFACE_V2, changed, []),
        )
        await self._bus.send(msg)

    async def _process(self, calls: trio.MemoryReceiveChannel[Message]) -> None:
        async for msg in calls:
            async with self._lock:
                await self._handle(msg)

    async def _reply(self, msg: Message, signature: str = "", *body: Any) -> None:
        assert self._bus is not None
        await self._bus.reply(msg, signature, *body)

    async def _error(self, msg: Message, name: str, text: str = "") -> None:
        assert self._bus is not None
        await self._bus.reply_error(msg, name, text)

    def _lookup(self, msg: Message) -> tuple[str, str, _Method] | str:
        """(interface, member, method), or the error name to answer with."""
        fields = msg.header.fields
        member = fields.get(HeaderFields.member, "")
        iface = fields.get(HeaderFields.interface)
        if iface is None:  # any interface with that member (V2 first)
            iface = next(
                (i for i in (IFACE_V2, *_INTERFACES) if member in _INTERFACES[i]), ""
            )
        method = _INTERFACES.get(iface, {}).get(member)
        if method is None:
            return _ERR + "UnknownMethod"
        if fields.get(HeaderFields.signature, "") != method.signature:
            return _ERR + "InvalidArgs"
        return iface, member, method

    async def _handle(self, msg: Message) -> None:
        found = self._lookup(msg)
        if isinstance(found, str):
            fields = msg.header.fields
            text = (
                f"{fields.get(HeaderFields.interface, '')}."
                f"{fields.get(HeaderFields.member, '')}"
                f"({fields.get(HeaderFields.signature, '')})"
            )
            await self._error(msg, found, f"cannot call {text}")
            return
        iface, member, method = found
        if iface in _PROTOCOL_IFACES:
            await self._handle_protocol(msg, member, method)
        elif iface == IFACE_PROPERTIES:
            await self._handle_properties(msg, member)
        elif iface == IFACE_INTROSPECTABLE:
            await self._reply(msg, "s", introspection_xml())
        elif member == "Ping":
            await self._reply(msg)
        elif member == "GetMachineId":
            await self._reply(msg, "s", _machine_id())
        else:  # the control interface called with no interface field
            await self._control(msg, member)

    async def _handle_protocol(
        self, msg: Message, member: str, method: _Method
    ) -> None:
        args = tuple(msg.body)
        self.calls.append((member, args))
        fault = self._take_fault(member)
        if fault is not None:
            log.info("fault %s on %s%s", fault.mode, member, args)
            if fault.mode == "hang":
                return
            if fault.mode == "error":
                await self._error(msg, fault.error_name, "injected fault")
                return
            if fault.mode == "stall":
                if not self._stopping:
                    self._unstall = trio.Event()
                    await self._unstall.wait()
            elif fault.mode == "delay":
                await trio.sleep(fault.delay)
        core = self.core
        try:
            body = self._run_command(core, member, args)
        except HiomapdCrash as exc:
            await self._segfault(exc)
            return  # pragma: no cover - _segfault never returns
        except HiomapdError as exc:
            log.info("%s%s -> %s", member, args, exc)
            await self._emit()
            await self._error(msg, exc.dbus_name, exc.text)
            return
        except OSError as exc:
            log.error("%s%s: %s", member, args, exc)
            await self._emit()
            await self._error(msg, _ERR + "IOError", str(exc))
            return
        log.debug("%s%s -> %s", member, args, body)
        await self._emit()
        signature = method.out_signature
        if fault is not None and fault.mode == "wrong-signature":
            signature, body = _wrong_signature(signature, body)
        await self._reply(msg, signature, *body)

    @staticmethod
    def _run_command(
        core: Hiomapd, member: str, args: tuple[Any, ...]
    ) -> tuple[int, ...]:
        if member == "Reset":
            core.reset()
        elif member == "GetInfo":
            return core.get_info(args[0])
        elif member == "GetFlashInfo":
            return core.get_flash_info()
        elif member == "CreateReadWindow":
            return core.create_window(args[0], args[1], write=False)
        elif member == "CreateWriteWindow":
            return core.create_window(args[0], args[1], write=True)
        elif member == "CloseWindow":
            core.close_window(args[0])
        elif member == "MarkDirty":
            core.mark_dirty(args[0], args[1])
        elif member == "Flush":
            core.flush()
        elif member == "Ack":
            core.ack(args[0])
        elif member == "Erase":
            core.erase(args[0], args[1])
        else:  # pragma: no cover - the method table has no other member
            raise AssertionError(member)
        return ()

    async def _handle_properties(self, msg: Message, member: str) -> None:
        values = self.core.property_values()
        known = (IFACE_PROTOCOL, IFACE_PROPERTIES, IFACE_INTROSPECTABLE, IFACE_PEER)
        iface = msg.body[0]
        if member == "GetAll":
            if iface in (IFACE_V2, ""):
                await self._reply(
                    msg, "a{sv}", {k: ("b", v) for k, v in values.items()}
                )
            elif iface in known or iface == IFACE_CONTROL:
                await self._reply(msg, "a{sv}", {})
            else:
                await self._error(
                    msg, _ERR + "UnknownInterface", f"no interface {iface}"
                )
            return
        name = msg.body[1]
        if iface not in (IFACE_V2, "") or name not in values:
            await self._error(
                msg, _ERR + "UnknownProperty", f"no property {iface}.{name}"
            )
        elif member == "Get":
            await self._reply(msg, "v", ("b", values[name]))
        else:
            await self._error(msg, _ERR + "PropertyReadOnly", f"{name} is read-only")

    async def _handle_control(self, msg: Message) -> None:
        found = self._lookup(msg)
        if isinstance(found, str):
            await self._error(msg, found, "bad control call")
            return
        await self._control(msg, found[1])

    async def _control(self, msg: Message, member: str) -> None:
        if self._core is None or self._stopping:
            await self._error(msg, _ERR + "Failed", "the emulator is stopping")
            return
        if member == "SetFault":
            mode, target, count = msg.body
            try:
                self.set_fault(mode, target, count)
            except ValueError as exc:
                await self._error(msg, _ERR + "InvalidArgs", str(exc))
                return
        elif member == "EmitProperties":
            await self.emit_properties(msg.body[0])
        elif member == "SuspendFlashControl":
            await self.suspend_flash_control()
        elif member == "ResumeFlashControl":
            await self.resume_flash_control()
        elif member == "ResumeFlashControlModified":
            await self.resume_flash_control(modified=True)
        elif member == "ForceWindowReset":
            await self.force_window_reset()
        elif member == "ProtocolReset":
            await self.protocol_reset()
        await self._reply(msg)

    async def _handle_parent(self, msg: Message) -> None:
        fields = msg.header.fields
        iface = fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        if member == "Introspect" and iface in (None, IFACE_INTROSPECTABLE):
            await self._reply(msg, "s", introspection_xml(fields[HeaderFields.path]))
        elif member == "Ping" and iface in (None, IFACE_PEER):
            await self._reply(msg)
        else:
            await self._error(msg, _ERR + "UnknownMethod", f"no method {member}")


@contextlib.asynccontextmanager
async def run_emulator(
    bus_address: str, directory: Path, **config: Any
) -> AsyncIterator[Emulator]:
    """Serve an emulator on its own bus connection for the block.

    Files default to ``directory/flash.img`` and ``directory/lpc.img``
    (``directory`` is created if needed);
    ``config`` holds the other :class:`Config` fields (e.g. ``flash_size``).
    Leaving the block stops it cleanly (three signals), unless the body
    already did, called :meth:`Emulator.crash`, or made it crash as real
    hiomapd would (:attr:`Emulator.crashed`).
    """
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    config.setdefault("flash_path", directory / "flash.img")
    config.setdefault("lpc_path", directory / "lpc.img")
    emu = Emulator(Config(**config))
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        emu._crash_scope = scope

        async def connection(task_status: trio.TaskStatus[None]) -> None:
            # serve() runs inside the crash scope, so that a crash cancels it
            # together with its connection (never a send on a closed bus).
            try:
                with scope:
                    async with open_bus(bus_address) as bus:
                        async with trio.open_nursery() as inner:
                            await inner.start(emu.serve, bus)
                            task_status.started()
            finally:
                emu._stopped.set()

        await nursery.start(connection)
        if emu._core is None:
            raise RuntimeError("the emulator did not start")
        try:
            yield emu
        finally:
            if not emu._stopped.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await emu.stop_cleanly()
            scope.cancel()


# -- command line ---------------------------------------------------------------


def _bytes(text: str, *, zero: bool) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(number, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _size(text: str) -> int:
    """``4096``, ``0x1000``, ``64K``, ``32M``, ``1G``."""
    return _bytes(text, zero=False)


def _address(text: str) -> int:
    """``0x0C000000``, ``192M``, ``0``: a byte address."""
    return _bytes(text, zero=True)


def add_parser(subparsers: Any) -> None:
    """Register the ``hiomapd`` subcommand (``func=run``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "hiomapd",
        help="emulate hiomapd (xyz.openbmc_project.Hiomapd) on D-Bus",
        description="A hiomapd emulator: hiomapd's D-Bus API (mboxd with the "
        "file backend, its quirks included), a flash file and an mmap'ed LPC "
        f"window file, with test controls on {IFACE_CONTROL}. SIGTERM/SIGINT "
        "stop it cleanly, SIGHUP is a protocol reset; a call that crashes real "
        "hiomapd (Erase after GetInfo(1); a window before the first GetInfo) "
        "ends it with SIGSEGV.",
    )
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument("--flash", type=Path, required=True, help="flash image file")
    p.add_argument(
        "--lpc", type=Path, required=True, help="LPC window space file (mmap'ed)"
    )
    p.add_argument(
        "--flash-size", type=_size, default=32 << 20,
        help="size of a new flash file, filled with 0xFF (default 32M)",
    )  # fmt: skip
    p.add_argument(
        "--block-size-shift", type=int, default=12,
        help="v2 block (= erase) size as a power of two (default 12)",
    )  # fmt: skip
    p.add_argument("--window-size", type=_size, default=1 << 20, help="default 1M")
    p.add_argument("--window-count", type=int, default=8, help="default 8")
    p.add_argument(
        "--timeout", type=int, default=None,
        help="GET_INFO timeout hint in seconds (default: hiomapd's 8 s per MiB)",
    )  # fmt: skip
    p.add_argument(
        "--strict-ack", action="store_true",
        help="ACK bits other than 0x03 are EINVAL (hiomapd ignores them)",
    )  # fmt: skip
    p.add_argument(
        "--lpc-base", type=_address, default=0, metavar="ADDRESS",
        help="LPC firmware address of the window space: a window's LPC address "
        "is ADDRESS + its offset in the --lpc file (default 0; real hiomapd "
        "maps its memory at the top of the 28-bit LPC space)",
    )  # fmt: skip
    p.add_argument(
        "--direct-map", action="store_true",
        help="one window covering the whole flash, at LPC address --lpc-base + "
        "flash offset (--window-size/--window-count unused): for a host that "
        "maps its own PNOR linearly, e.g. QEMU powernv with --lpc-base "
        "0x0C000000. The host then reads and writes its own copy, so keep "
        "--flash a separate file",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the emulator until SIGTERM/SIGINT, then exit cleanly (status 0);
    SIGHUP is a protocol reset. A crash as real hiomapd's ends the process
    with SIGSEGV (no core file)."""
    from .cli import start

    address = start(args, "hiomapd-sim")
    if address is None:
        return 2
    try:
        config = Config(
            flash_path=args.flash,
            lpc_path=args.lpc,
            flash_size=args.flash_size,
            block_size_shift=args.block_size_shift,
            window_size=args.window_size,
            window_count=args.window_count,
            timeout=args.timeout,
            strict_ack=args.strict_ack,
            lpc_base=args.lpc_base,
            direct_map=args.direct_map,
        )
    except (ValueError, TypeError) as exc:
        log.error("%s", exc)
        return 2
    # A signal repeated during the clean exit is redelivered when the signal
    # receiver closes; ignoring them underneath keeps the exit status 0 (as
    # hiomapd, which blocks them, ignores them once its loop has ended).
    old = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        status = trio.run(_main, address, config)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    if status == _SEGFAULT:
        _die_of_sigsegv()
    return status


_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_SEGFAULT: Final = -int(signal.SIGSEGV)


async def _main(address: str, config: Config) -> int:
    status = 0
    emu = Emulator(config)
    emu._crash_scope = trio.CancelScope()
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        try:
            with emu._crash_scope:
                async with open_bus(address) as bus, trio.open_nursery() as nursery:
                    await nursery.start(emu.serve, bus)
                    notify("READY=1")
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: protocol reset")
                            await emu.protocol_reset()
                            continue
                        log.info("%s: stopping cleanly", signal.Signals(signum).name)
                        break
                    notify("STOPPING=1")
                    await emu.stop_cleanly()
        except* (OSError, ValueError, RuntimeError, BusClosed) as group:
            for exc in _leaves(group):
                log.error("%s", exc)
            status = 1
    return _SEGFAULT if emu.crashed else status


def _die_of_sigsegv() -> NoReturn:
    """End as a segfaulting hiomapd does (the bus connection is already
    closed): killed by SIGSEGV, without leaving a core file behind."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
    raise SystemExit(128 + signal.SIGSEGV)  # pragma: no cover - not reached


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
