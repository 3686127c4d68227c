"""A hiomapd stand-in with scripted replies, for the bridge's own tests.

The full emulator (hiomapbridge.sim.hiomapd) has real flash semantics; this
one answers exactly what a test scripts, so a test can make hiomapd hang,
fail, answer with a wrong signature or emit any PropertiesChanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from jeepney import DBusAddress, HeaderFields, Message, new_signal

from hiomapbridge.dbus import Bus, open_bus
from hiomapbridge.hiomap import HIOMAPD_PATH, HIOMAPD_SERVICE, IFACE_V2

#: (signature, body) for a method return, or ("error", error name)
Reply = tuple[str, tuple[Any, ...]]
HANG: Reply = ("hang", ())


def error(name: str) -> Reply:
    return ("error", (name,))


DEFAULT_REPLIES: dict[str, Reply] = {
    "Reset": ("", ()),
    "GetInfo": ("yyq", (2, 12, 30)),
    "GetFlashInfo": ("qq", (0x4000, 1)),
    "CreateReadWindow": ("qqq", (0x0FFE, 0x10, 0x20)),
    "CreateWriteWindow": ("qqq", (0x0FF0, 0x08, 0x22)),
    "CloseWindow": ("", ()),
    "MarkDirty": ("", ()),
    "Flush": ("", ()),
    "Ack": ("", ()),
    "Erase": ("", ()),
}


@attrs.define
class ScriptedHiomapd:
    bus: Bus
    properties: dict[str, bool] = attrs.field(
        factory=lambda: {
            "DaemonReady": True,
            "FlashControlLost": False,
            "WindowReset": False,
            "ProtocolReset": True,
        }
    )
    replies: dict[str, Reply] = attrs.field(factory=lambda: dict(DEFAULT_REPLIES))
    #: (interface, member, args) of every call received
    calls: list[tuple[str, str, tuple[Any, ...]]] = attrs.field(factory=list)
    on_call: Callable[[str], None] | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, msg: Message) -> None:
        fields = msg.header.fields
        iface = fields.get(HeaderFields.interface, "")
        member = fields.get(HeaderFields.member, "")
        if iface == "org.freedesktop.DBus.Properties" and member == "GetAll":
            props = {k: ("b", v) for k, v in self.properties.items()}
            await self.bus.reply(msg, "a{sv}", props)
            return
        self.calls.append((iface, member, tuple(msg.body)))
        self._changed.set()
        self._changed = trio.Event()
        kind, body = self.replies.get(member, error("UnknownMethod"))
        if kind == "hang":
            await trio.sleep_forever()
        if kind == "error":
            await self.bus.reply_error(msg, body[0], "scripted")
        else:
            await self.bus.reply(msg, kind, *body)

    async def wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            await self._changed.wait()

    async def emit(self, changed: dict[str, tuple[str, Any]]) -> None:
        for name, (sig, value) in changed.items():
            if sig == "b" and name in self.properties:
                self.properties[name] = value
        await self.bus.send(
            new_signal(
                DBusAddress(HIOMAPD_PATH, interface="org.freedesktop.DBus.Properties"),
                "PropertiesChanged",
                "sa{sv}as",
                (IFACE_V2, changed, []),
            )
        )


@asynccontextmanager
async def scripted_hiomapd(
    address: str, *, own_name: bool = True, **options: Any
) -> AsyncIterator[ScriptedHiomapd]:
    async with open_bus(address) as bus:
        hiomapd = ScriptedHiomapd(bus, **options)
        bus.export(HIOMAPD_PATH, hiomapd.handle)
        if own_name:
            await bus.bus_call("RequestName", "su", HIOMAPD_SERVICE, 4)
        yield hiomapd
