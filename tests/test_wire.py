"""hiomapbridge.wire against jeepney's own serialiser and parser."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    new_error,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.low_level import MessageFlag, Parser

from hiomapbridge import wire

names = st.from_regex(r"\A[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8}){1,3}\Z")
uniques = st.integers(1, 10_000).map(lambda n: f":1.{n}")
paths = st.from_regex(r"\A(/[A-Za-z0-9_]{1,8}){1,4}\Z")
members = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_]{0,15}\Z")
serials = st.integers(1, 2**32 - 1)
y = st.integers(0, 0xFF)
q = st.integers(0, 0xFFFF)
text = st.text(max_size=40)

BODIES: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "": st.just(()),
    "yyyyay": st.tuples(y, y, y, y, st.binary(max_size=64)),
    "yyyyyay": st.tuples(y, y, y, y, y, st.binary(max_size=64)),
    "y": st.tuples(y),
    "qq": st.tuples(q, q),
    "qqq": st.tuples(q, q, q),
    "yyq": st.tuples(y, y, q),
    "x": st.tuples(st.integers(-(2**63), 2**63 - 1)),
    "u": st.tuples(st.integers(0, 2**32 - 1)),
    "s": st.tuples(text),
    "sss": st.tuples(text, text, text),
    "a{sv}": st.tuples(st.dictionaries(text, st.tuples(st.just("b"), st.booleans()))),
    "sa{sv}as": st.tuples(
        text,
        st.dictionaries(text, st.tuples(st.just("b"), st.booleans()), max_size=4),
        st.lists(text, max_size=3),
    ),
}
bodies = st.sampled_from(sorted(BODIES)).flatmap(
    lambda sig: st.tuples(st.just(sig), BODIES[sig])
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    signature, body = draw(bodies)
    sig = signature or None
    kind = draw(st.sampled_from(["call", "return", "error", "signal"]))
    if kind == "signal":
        msg = new_signal(
            DBusAddress(draw(paths), interface=draw(names)), draw(members), sig, body
        )
    else:
        address = DBusAddress(
            draw(paths),
            bus_name=draw(st.one_of(names, uniques)),
            interface=draw(st.one_of(st.none(), names)),
        )
        msg = new_method_call(address, draw(members), sig, body)
        if kind != "call":
            msg.header.serial = draw(serials)
            msg.header.fields[HeaderFields.sender] = draw(uniques)
            if kind == "return":
                msg = new_method_return(msg, sig, body)
            else:
                msg = new_error(msg, draw(names), sig, body)
    if draw(st.booleans()):
        msg.header.fields[HeaderFields.sender] = draw(uniques)
    if draw(st.booleans()):
        msg.header.fields[HeaderFields.destination] = draw(uniques)
    msg.header.flags = draw(st.sampled_from([0, 1, 2, 3, 4]))
    return msg


def jeepney_parse(data: bytes) -> Message:
    parser = Parser()
    parser.add_data(data)
    msg = parser.get_next_message()
    assert msg is not None
    return msg


def same(a: Message, b: Message) -> None:
    assert a.header.endianness == b.header.endianness
    assert a.header.message_type is b.header.message_type
    assert a.header.flags == b.header.flags
    assert type(a.header.flags) is type(b.header.flags)
    assert a.header.protocol_version == b.header.protocol_version
    assert a.header.body_length == b.header.body_length
    assert a.header.serial == b.header.serial
    assert a.header.fields == b.header.fields
    assert [type(k) for k in a.header.fields] == [type(k) for k in b.header.fields]
    assert a.body == b.body
    assert [type(v) for v in a.body] == [type(v) for v in b.body]


@given(messages(), serials)
def test_decode_matches_jeepney(msg: Message, serial: int) -> None:
    data = msg.serialise(serial)
    assert wire.message_size(data) == len(data)
    ours = wire.decode(data)
    assert ours is not None
    same(ours, jeepney_parse(data))


def test_decode_leaves_big_endian_to_jeepney() -> None:
    msg = new_signal(DBusAddress("/a", interface="a.b"), "M", "y", (1,))
    from jeepney import Endianness

    msg.header.endianness = Endianness.big
    data = msg.serialise(5)
    assert wire.message_size(data) == len(data)
    assert wire.decode(data) is None


@given(
    st.one_of(names, uniques),
    paths,
    st.one_of(st.none(), names),
    members,
    bodies,
    serials,
)
def test_call_template_matches_jeepney(
    destination: str,
    path: str,
    interface: str | None,
    member: str,
    sig_body: tuple[str, tuple[Any, ...]],
    serial: int,
) -> None:
    signature, body = sig_body
    expected = new_method_call(
        DBusAddress(path, bus_name=destination, interface=interface),
        member,
        signature or None,
        body,
    ).serialise(serial)
    template = wire.CallTemplate(destination, path, interface, member, signature)
    body_bytes = expected[len(expected) - jeepney_parse(expected).header.body_length :]
    assert template.build(serial, body_bytes) == expected
    no_reply = new_method_call(
        DBusAddress(path, bus_name=destination, interface=interface),
        member,
        signature or None,
        body,
    )
    no_reply.header.flags = MessageFlag.no_reply_expected
    assert template.build(serial, body_bytes, no_reply=True) == no_reply.serialise(
        serial
    )


@given(
    st.sampled_from(["", "y", "qq", "qqq", "yyq"]).flatmap(
        lambda s: st.tuples(st.just(s), BODIES[s])
    ),
    serials,
)
def test_pack_fixed_matches_jeepney(
    sig_body: tuple[str, tuple[int, ...]], serial: int
) -> None:
    signature, body = sig_body
    template = wire.CallTemplate(":1.1", "/p", "a.b", "M", signature)
    expected = new_method_call(
        DBusAddress("/p", bus_name=":1.1", interface="a.b"),
        "M",
        signature or None,
        body,
    ).serialise(serial)
    assert template.build(serial, wire.pack_fixed(signature, body)) == expected


@given(y, y, y, y, y, st.binary(max_size=64), serials)
def test_pack_send_message_matches_jeepney(
    seq: int, netfn: int, lun: int, cmd: int, cc: int, data: bytes, serial: int
) -> None:
    args = (seq, netfn, lun, cmd, cc, data)
    address = DBusAddress(
        "/org/openbmc/HostIpmi/1", bus_name=":1.7", interface="org.openbmc.HostIpmi"
    )
    expected = new_method_call(address, "sendMessage", "yyyyyay", args).serialise(
        serial
    )
    template = wire.CallTemplate(
        ":1.7",
        "/org/openbmc/HostIpmi/1",
        "org.openbmc.HostIpmi",
        "sendMessage",
        "yyyyyay",
    )
    assert template.build(serial, wire.pack_send_message(*args)) == expected


@given(paths, names, members, y, y, y, y, st.binary(max_size=64), serials)
def test_signal_template_matches_jeepney(
    path: str,
    interface: str,
    member: str,
    seq: int,
    netfn: int,
    lun: int,
    cmd: int,
    data: bytes,
    serial: int,
) -> None:
    args = (seq, netfn, lun, cmd, data)
    expected = new_signal(
        DBusAddress(path, interface=interface), member, "yyyyay", args
    ).serialise(serial)
    template = wire.SignalTemplate(path, interface, member, "yyyyay")
    assert template.build(serial, wire.pack_received_message(*args)) == expected


@given(
    st.one_of(st.none(), uniques),
    st.sampled_from(["", "x", "yyq", "qqq"]).flatmap(
        lambda s: st.tuples(st.just(s), BODIES[s])
    ),
    serials,
    serials,
)
def test_return_template_matches_jeepney(
    destination: str | None,
    sig_body: tuple[str, tuple[int, ...]],
    reply_serial: int,
    serial: int,
) -> None:
    signature, body = sig_body
    call = new_method_call(DBusAddress("/p", bus_name=":1.1", interface="a.b"), "M")
    call.header.serial = reply_serial
    if destination is not None:
        call.header.fields[HeaderFields.sender] = destination
    expected = new_method_return(call, signature or None, body).serialise(serial)
    template = wire.ReturnTemplate(destination, signature)
    packed = wire.pack_fixed(signature, body)
    assert template.build(serial, reply_serial, packed) == expected


@given(
    messages(),
    serials,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_parse_raises_only_malformed(
    msg: Message, serial: int, flips: list[tuple[int, int]]
) -> None:
    """Whatever a frame holds, parse returns a message or raises Malformed:
    the receiver drops such a frame and goes on (the framing still holds)."""
    frame = bytearray(msg.serialise(serial))
    for at, value in flips:
        frame[at % len(frame)] = value
    try:
        parsed = wire.parse(bytes(frame))
    except wire.Malformed:
        return
    assert isinstance(parsed, Message)


def test_decoded_header_fields_are_the_callers_own() -> None:
    """decode remembers header field arrays; what it hands out is a copy, so
    a caller changing one message's fields changes no other."""
    call = new_method_call(DBusAddress("/p", bus_name=":1.1", interface="a.b"), "M")
    call.header.serial = 7
    call.header.fields[HeaderFields.sender] = ":1.2"
    for msg in (call, new_method_return(call, "q", (5,))):
        data = msg.serialise(9)
        first = wire.decode(data)
        assert first is not None
        first.header.fields[HeaderFields.member] = "Changed"
        again = wire.decode(data)
        assert again is not None
        same(again, jeepney_parse(data))


def test_replies_differing_only_in_reply_serial_decode_apart() -> None:
    call = new_method_call(DBusAddress("/p", bus_name=":1.1", interface="a.b"), "M")
    call.header.fields[HeaderFields.sender] = ":1.2"
    for reply_serial in (1, 2, 0xFFFFFFFF, 3):
        call.header.serial = reply_serial
        data = new_method_return(call, "qqq", (1, 2, 3)).serialise(40)
        ours = wire.decode(data)
        assert ours is not None
        assert ours.header.fields[HeaderFields.reply_serial] == reply_serial
        same(ours, jeepney_parse(data))


def test_the_header_cache_is_bounded() -> None:
    """Peers choose header bytes: the cache keeps at most its entry count,
    and no array longer than its size limit."""
    wire._FIELDS_CACHE.clear()
    for i in range(3 * wire._FIELDS_CACHE_ENTRIES):
        data = new_signal(DBusAddress(f"/p{i}", interface="a.b"), "S").serialise(1)
        assert wire.decode(data) is not None
        assert len(wire._FIELDS_CACHE) <= wire._FIELDS_CACHE_ENTRIES
    wire._FIELDS_CACHE.clear()
    long_path = "/" + "x" * wire._FIELDS_CACHE_MAX_BYTES
    data = new_signal(DBusAddress(long_path, interface="a.b"), "S").serialise(1)
    ours = wire.decode(data)
    assert ours is not None
    same(ours, jeepney_parse(data))
    assert not wire._FIELDS_CACHE
