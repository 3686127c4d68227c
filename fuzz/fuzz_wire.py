"""atheris harness: the bridge's D-Bus frame parser (hiomapbridge.wire).

Takes a well-formed message of one of the shapes the bridge sees (its hot
path and the rest), overwrites bytes of it as the input says, and parses the
frame.  ``wire.parse`` may only return a message or raise ``Malformed``
(the receiver drops such a frame and reads on); and where both our fast
decoder and jeepney's parser read the frame, they must agree.
"""

from __future__ import annotations

from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    new_method_call,
    new_method_return,
    new_signal,
)

from hiomapbridge import wire

try:
    from fuzz.fuzz_requests import Input, fuzz_main
except ImportError:  # run as a script from fuzz/
    from fuzz_requests import (  # type: ignore[no-redef,import-not-found]
        Input,
        fuzz_main,
    )


def _frames() -> list[bytes]:
    bt = DBusAddress("/org/openbmc/HostIpmi/1", interface="org.openbmc.HostIpmi")
    received = new_signal(
        bt, "ReceivedMessage", "yyyyay", (1, 0x3A, 0, 0x5A, b"\x04\x01")
    )
    received.header.fields[HeaderFields.sender] = ":1.4"
    changed = new_signal(
        DBusAddress(
            "/xyz/openbmc_project/Hiomapd", interface="org.freedesktop.DBus.Properties"
        ),
        "PropertiesChanged",
        "sa{sv}as",
        ("xyz.openbmc_project.Hiomapd.Protocol.V2", {"DaemonReady": ("b", True)}, []),
    )
    call = new_method_call(
        DBusAddress("/p", bus_name=":1.5", interface="a.b"),
        "CreateReadWindow",
        "qq",
        (1, 2),
    )
    call.header.serial = 9
    call.header.fields[HeaderFields.sender] = ":1.9"
    reply = new_method_return(call, "qqq", (1, 2, 3))
    owner = new_signal(
        DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus"),
        "NameOwnerChanged",
        "sss",
        ("org.openbmc.HostIpmi", "", ":1.7"),
    )
    return [m.serialise(n + 1) for n, m in enumerate((received, changed, reply, owner))]


FRAMES = _frames()


def same(a: Message, b: Message) -> bool:
    return bool(
        a.header.message_type == b.header.message_type
        and a.header.flags == b.header.flags
        and a.header.serial == b.header.serial
        and a.header.fields == b.header.fields
        and a.body == b.body
    )


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    frame = bytearray(FRAMES[inp.byte() % len(FRAMES)])
    for _ in range(inp.byte() % 6 + 1):
        at = (inp.byte() * 256 + inp.byte()) % len(frame)
        frame[at] = inp.byte()
    buf = bytes(frame)
    try:
        parsed = wire.parse(buf)
    except wire.Malformed:
        return
    assert isinstance(parsed, Message)
    try:
        fast = wire.decode(buf)
        reference = Message.from_buffer(buf)
    except Exception:
        return  # only one of them reads it: parse still answered
    if fast is not None:
        assert same(fast, reference), (buf.hex(), fast, reference)


if __name__ == "__main__":
    fuzz_main(test_one_input)
