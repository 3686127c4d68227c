from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge import hiomap
from hiomapbridge.hiomap import (
    IFACE_PROTOCOL,
    IFACE_V2,
    Command,
    Dispatcher,
    FlashInfo,
    HiomapCall,
    InfoV2,
    Rejected,
    Window,
    cc_for_errno,
    encode_error,
    encode_reply,
    errno_for_error_name,
    pack_request,
    unpack_flash_info,
    unpack_get_info,
    unpack_response,
    unpack_window,
    window_args,
)

C7, C9, CC = 0xC7, 0xC9, 0xCC
REJECT_CCS = {C7, C9, CC}


def test_names() -> None:
    assert hiomap.HIOMAPD_SERVICE == "xyz.openbmc_project.Hiomapd"
    assert hiomap.HIOMAPD_PATH == "/xyz/openbmc_project/Hiomapd"
    assert IFACE_PROTOCOL == "xyz.openbmc_project.Hiomapd.Protocol"
    assert IFACE_V2 == "xyz.openbmc_project.Hiomapd.Protocol.V2"
    assert [(c.name, int(c)) for c in Command] == [
        ("RESET", 1),
        ("GET_INFO", 2),
        ("GET_FLASH_INFO", 3),
        ("CREATE_READ_WINDOW", 4),
        ("CLOSE_WINDOW", 5),
        ("CREATE_WRITE_WINDOW", 6),
        ("MARK_DIRTY", 7),
        ("FLUSH", 8),
        ("ACK", 9),
        ("ERASE", 10),
    ]


# (command, request args, interface, member, signature, decoded args, reply sig)
CALLS: list[tuple[Command, bytes, str, str, str, tuple[int, ...], str]] = [
    (Command.RESET, b"", IFACE_PROTOCOL, "Reset", "", (), ""),
    (Command.GET_INFO, b"\x02", IFACE_PROTOCOL, "GetInfo", "y", (2,), "yyq"),
    (Command.GET_FLASH_INFO, b"", IFACE_V2, "GetFlashInfo", "", (), "qq"),
    (
        Command.CREATE_READ_WINDOW,
        b"\x34\x12\x02\x01",
        IFACE_V2,
        "CreateReadWindow",
        "qq",
        (0x1234, 0x0102),
        "qqq",
    ),
    (Command.CLOSE_WINDOW, b"\x01", IFACE_V2, "CloseWindow", "y", (1,), ""),
    (
        Command.CREATE_WRITE_WINDOW,
        b"\xff\xff\x00\x80",
        IFACE_V2,
        "CreateWriteWindow",
        "qq",
        (0xFFFF, 0x8000),
        "qqq",
    ),
    (
        Command.MARK_DIRTY,
        b"\x10\x00\x20\x00",
        IFACE_V2,
        "MarkDirty",
        "qq",
        (16, 32),
        "",
    ),
    (Command.FLUSH, b"", IFACE_V2, "Flush", "", (), ""),
    (Command.ACK, b"\x03", IFACE_V2, "Ack", "y", (3,), ""),
    (Command.ERASE, b"\x01\x00\x02\x00", IFACE_V2, "Erase", "qq", (1, 2), ""),
]


@pytest.mark.parametrize(
    ("command", "args", "interface", "member", "sig", "decoded", "reply_sig"), CALLS
)
def test_request_maps_to_dbus_call(
    command: Command,
    args: bytes,
    interface: str,
    member: str,
    sig: str,
    decoded: tuple[int, ...],
    reply_sig: str,
) -> None:
    call = Dispatcher().request(pack_request(command, 0x42, args))
    assert type(call) is HiomapCall  # a named tuple equals a plain tuple too
    assert call == HiomapCall(
        command=command,
        seq=0x42,
        interface=interface,
        member=member,
        signature=sig,
        args=decoded,
        reply_signature=reply_sig,
    )


@pytest.mark.parametrize(("command", "args"), [row[:2] for row in CALLS])
def test_extra_argument_bytes_are_ignored(command: Command, args: bytes) -> None:
    plain = Dispatcher().request(pack_request(command, 9, args))
    padded = Dispatcher().request(pack_request(command, 9, args + b"\xaa\xbb\xcc"))
    assert isinstance(plain, HiomapCall)
    assert padded == plain


def rejected_cc(result: HiomapCall | Rejected) -> int:
    assert isinstance(result, Rejected), result
    assert result.reason
    return result.cc


# Rule 1: fewer than 2 bytes.
@pytest.mark.parametrize("data", [b"", b"\x01", b"\x00", b"\xff"])
def test_short_request_is_c7(data: bytes) -> None:
    d = Dispatcher()
    assert rejected_cc(d.request(data)) == C7
    assert d.last_seq is None


# Rule 2: command 0 or above 10; checked before the seq rule, no seq update.
@pytest.mark.parametrize("cmd", [0, 11, 12, 0x5A, 0xFF])
def test_unknown_command_is_c9(cmd: int) -> None:
    d = Dispatcher()
    assert isinstance(d.request(pack_request(Command.FLUSH, 7)), HiomapCall)
    assert rejected_cc(d.request(pack_request(cmd, 7))) == C9  # not CC
    assert rejected_cc(d.request(pack_request(cmd, 8))) == C9
    assert d.last_seq == 7


VERSIONED = [c for c in Command if c not in hiomap.UNVERSIONED]
MIN_ARGS = {
    Command.RESET: 0,
    Command.GET_INFO: 1,
    Command.GET_FLASH_INFO: 0,
    Command.CREATE_READ_WINDOW: 4,
    Command.CLOSE_WINDOW: 1,
    Command.CREATE_WRITE_WINDOW: 4,
    Command.MARK_DIRTY: 4,
    Command.FLUSH: 0,
    Command.ACK: 1,
    Command.ERASE: 4,
}


def min_args(command: Command) -> bytes:
    """The shortest valid argument bytes (GET_INFO asks for version 2)."""
    if command is Command.GET_INFO:
        return b"\x02"
    return bytes(MIN_ARGS[command])


def test_unversioned_set() -> None:
    assert hiomap.UNVERSIONED == {Command.RESET, Command.GET_INFO, Command.ACK}


# Rule 3: repeated seq for versioned commands.
@pytest.mark.parametrize("command", VERSIONED)
def test_repeated_seq_is_cc_for_versioned(command: Command) -> None:
    d = Dispatcher()
    args = min_args(command)
    assert isinstance(d.request(pack_request(Command.RESET, 5)), HiomapCall)
    assert rejected_cc(d.request(pack_request(command, 5, args))) == CC
    assert isinstance(d.request(pack_request(command, 6, args)), HiomapCall)
    assert rejected_cc(d.request(pack_request(command, 6, args))) == CC


@pytest.mark.parametrize("command", sorted(hiomap.UNVERSIONED))
def test_unversioned_commands_ignore_the_seq_rule(command: Command) -> None:
    d = Dispatcher()
    args = min_args(command)
    for _ in range(3):
        assert isinstance(d.request(pack_request(command, 5, args)), HiomapCall)
    assert d.last_seq == 5


def test_seq_rule_compares_with_the_previous_request_only() -> None:
    d = Dispatcher()
    assert isinstance(d.request(pack_request(Command.FLUSH, 1)), HiomapCall)
    assert isinstance(d.request(pack_request(Command.FLUSH, 2)), HiomapCall)
    assert isinstance(d.request(pack_request(Command.FLUSH, 1)), HiomapCall)


def test_first_request_accepts_seq_zero() -> None:
    # Deliberate difference from the seed, which starts remembering 0.
    d = Dispatcher()
    before = d.last_seq
    assert isinstance(d.request(pack_request(Command.FLUSH, 0)), HiomapCall)
    assert (before, d.last_seq) == (None, 0)
    assert rejected_cc(d.request(pack_request(Command.FLUSH, 0))) == CC


def test_unversioned_request_sets_seq_for_the_next_check() -> None:
    d = Dispatcher()
    assert isinstance(d.request(pack_request(Command.ACK, 9, b"\x03")), HiomapCall)
    assert rejected_cc(d.request(pack_request(Command.FLUSH, 9))) == CC


# Rule 3 comes before rule 5.
def test_repeated_seq_beats_bad_length() -> None:
    d = Dispatcher()
    assert isinstance(
        d.request(pack_request(Command.CREATE_READ_WINDOW, 5, window_args(0, 1))),
        HiomapCall,
    )
    bad = pack_request(Command.CREATE_READ_WINDOW, 5, b"\x00")
    assert rejected_cc(d.request(bad)) == CC


# Rule 4: seq remembered even when rule 5 then fails.
def test_seq_updated_even_when_length_check_fails() -> None:
    d = Dispatcher()
    assert rejected_cc(d.request(pack_request(Command.MARK_DIRTY, 7, b"\x00"))) == C7
    assert d.last_seq == 7
    assert rejected_cc(d.request(pack_request(Command.FLUSH, 7))) == CC


def test_seq_not_updated_by_rejections_before_rule_4() -> None:
    d = Dispatcher()
    d.request(pack_request(Command.FLUSH, 3))
    d.request(b"\x08")  # rule 1
    d.request(pack_request(0, 4))  # rule 2
    d.request(pack_request(Command.FLUSH, 3))  # rule 3
    assert d.last_seq == 3


# Rule 5: argument length.
@pytest.mark.parametrize(
    ("command", "short"),
    [(c, n) for c, need in MIN_ARGS.items() for n in range(need)],
)
def test_short_arguments_are_c7(command: Command, short: int) -> None:
    d = Dispatcher()
    assert rejected_cc(d.request(pack_request(command, 1, bytes(short)))) == C7


@pytest.mark.parametrize("command", list(Command))
def test_exact_minimum_arguments_accepted(command: Command) -> None:
    call = Dispatcher().request(pack_request(command, 1, min_args(command)))
    assert isinstance(call, HiomapCall)
    assert len(call.args) == len(call.signature)


def test_last_seq_is_read_only() -> None:
    d = Dispatcher()
    with pytest.raises(AttributeError):
        d.last_seq = 3  # type: ignore[misc]


@given(st.lists(st.binary(max_size=8), max_size=8))
def test_any_request_gets_a_defined_answer(requests: list[bytes]) -> None:
    d = Dispatcher()
    for data in requests:
        result = d.request(data)
        if isinstance(result, Rejected):
            assert result.cc in REJECT_CCS
        else:
            assert isinstance(result, HiomapCall)
            assert (result.command, result.seq) == (data[0], data[1])
            assert d.last_seq == data[1]


# Success responses, byte for byte.
def call_for(command: Command, seq: int = 0x42) -> HiomapCall:
    call = Dispatcher().request(pack_request(command, seq, b"\x02" + bytes(3)))
    assert isinstance(call, HiomapCall)
    return call


@pytest.mark.parametrize(
    ("command", "sig", "body", "data"),
    [
        (Command.RESET, "", (), "0142"),
        (Command.GET_INFO, "yyq", (2, 12, 0x0102), "0242 02 0c 0201"),
        (Command.GET_INFO, "yyq", (3, 12, 30), "0242 03 0c 1e00"),
        (Command.GET_INFO, "yyq", (1, 12, 0x0100), "0242 01 0c 0001"),  # v2 layout
        (Command.GET_FLASH_INFO, "qq", (0x4000, 0x0010), "0342 0040 1000"),
        (
            Command.CREATE_READ_WINDOW,
            "qqq",
            (0xFC00, 0x0100, 0x0001),
            "0442 00fc 0001 0100",
        ),
        (Command.CLOSE_WINDOW, "", (), "0542"),
        (
            Command.CREATE_WRITE_WINDOW,
            "qqq",
            (0xFFFF, 0, 0x1234),
            "0642 ffff 0000 3412",
        ),
        (Command.MARK_DIRTY, "", (), "0742"),
        (Command.FLUSH, "", (), "0842"),
        (Command.ACK, "", (), "0942"),
        (Command.ERASE, "", (), "0a42"),
    ],
)
def test_success_response_bytes(
    command: Command, sig: str, body: tuple[int, ...], data: str
) -> None:
    assert encode_reply(call_for(command), sig, body) == (0, bytes.fromhex(data))


@pytest.mark.parametrize(
    ("command", "sig", "body"),
    [
        (Command.GET_INFO, "yyy", (2, 12, 1)),  # wrong signature
        (Command.GET_INFO, "yyq", (2, 12)),  # short body
        (Command.GET_INFO, "yyq", (2, 12, 1, 1)),  # long body
        (Command.GET_INFO, "yyq", (256, 12, 1)),  # y overflow
        (Command.GET_INFO, "yyq", (2, 12, 0x10000)),  # q overflow
        (Command.GET_INFO, "yyq", (2, -1, 0)),  # negative
        (Command.GET_INFO, "yyq", (2, 12, "30")),  # not an int
        (Command.GET_INFO, "yyq", (True, 12, 30)),  # bool is not a byte
        (Command.GET_FLASH_INFO, "qqq", (1, 2, 3)),
        (Command.CREATE_READ_WINDOW, "qq", (1, 2)),
        (Command.FLUSH, "b", (True,)),
        (Command.RESET, "", (1,)),
    ],
)
def test_bad_reply_is_ff(command: Command, sig: str, body: tuple[object, ...]) -> None:
    assert encode_reply(call_for(command), sig, body) == (0xFF, b"")


_signatures = st.one_of(
    st.sampled_from(["", "y", "q", "qq", "qqq", "yyq", "yyy", "s", "as"]),
    st.text(max_size=4),
)
_body_values = st.one_of(
    st.integers(-(2**17), 2**17),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.floats(allow_nan=True),
    st.binary(max_size=3),
)


@given(
    st.sampled_from(list(Command)),
    st.integers(0, 255),
    _signatures,
    st.lists(_body_values, max_size=4).map(tuple),
)
def test_encode_reply_never_raises(
    command: Command, seq: int, sig: str, body: tuple[object, ...]
) -> None:
    cc, data = encode_reply(call_for(command, seq), sig, body)
    assert cc in (0x00, 0xFF)
    if cc == 0:
        assert data[:2] == bytes([command, seq])
    else:
        assert data == b""


@given(st.sampled_from(list(Command)), st.integers(0, 255), st.data())
def test_valid_replies_round_trip_through_host_helpers(
    command: Command, seq: int, data: st.DataObject
) -> None:
    call = call_for(command, seq)
    body = tuple(
        data.draw(st.integers(0, 0xFF if c == "y" else 0xFFFF))
        for c in call.reply_signature
    )
    cc, response = encode_reply(call, call.reply_signature, body)
    assert cc == 0
    rcmd, rseq, payload = unpack_response(response)
    assert (rcmd, rseq) == (command, seq)
    if command is Command.GET_INFO:
        # Always the v2 layout, as the seed packs it (v1 is never forwarded);
        # the host helper reads a leading 1 as v1, so compare the bytes.
        assert payload == struct.pack("<BBH", *body)
        if body[0] != 1:
            assert unpack_get_info(payload) == InfoV2(*body)
    elif command is Command.GET_FLASH_INFO:
        assert unpack_flash_info(payload) == FlashInfo(*body)
    elif command in (Command.CREATE_READ_WINDOW, Command.CREATE_WRITE_WINDOW):
        assert unpack_window(payload) == Window(*body)
    else:
        assert payload == b""


# Errors: names -> errno -> cc.
@pytest.mark.parametrize(
    ("err", "cc"),
    [
        (0, 0x00),
        (errno.EBUSY, 0xC0),
        (errno.ENOTSUP, 0xC1),
        (errno.EOPNOTSUPP, 0xC1),
        (errno.ETIMEDOUT, 0xC3),
        (errno.ENOSPC, 0xC4),
        (errno.EINVAL, 0xC9),
        (errno.ENODEV, 0xCB),
        (errno.EPERM, 0xD4),
        (errno.EACCES, 0xD4),
        (errno.EIO, 0xFF),
        (errno.ENOMEM, 0xFF),
        (errno.ENOENT, 0xFF),
        (errno.EBADR, 0xFF),
        (-1, 0xFF),
        (99999, 0xFF),
    ],
)
def test_cc_for_errno(err: int, cc: int) -> None:
    assert cc_for_errno(err) == cc


D = "org.freedesktop.DBus.Error."
DBUS_ERRORS = [
    ("NoMemory", errno.ENOMEM, 0xFF),
    ("ServiceUnknown", errno.EHOSTUNREACH, 0xFF),
    ("NameHasNoOwner", errno.ENXIO, 0xFF),
    ("NoReply", errno.ETIMEDOUT, 0xC3),
    ("Timeout", errno.ETIMEDOUT, 0xC3),
    ("TimedOut", errno.ETIMEDOUT, 0xC3),
    ("IOError", errno.EIO, 0xFF),
    ("BadAddress", errno.EADDRNOTAVAIL, 0xFF),
    ("NotSupported", errno.EOPNOTSUPP, 0xC1),
    ("LimitsExceeded", errno.ENOBUFS, 0xFF),
    ("AccessDenied", errno.EACCES, 0xD4),
    ("AuthFailed", errno.EACCES, 0xD4),
    ("NoServer", errno.EHOSTDOWN, 0xFF),
    ("NoNetwork", errno.ENONET, 0xFF),
    ("AddressInUse", errno.EADDRINUSE, 0xFF),
    ("Disconnected", errno.ECONNRESET, 0xFF),
    ("InvalidArgs", errno.EINVAL, 0xC9),
    ("InvalidSignature", errno.EINVAL, 0xC9),
    ("FileNotFound", errno.ENOENT, 0xFF),
    ("FileExists", errno.EEXIST, 0xFF),
    ("UnknownMethod", errno.EBADR, 0xFF),
    ("UnknownObject", errno.EBADR, 0xFF),
    ("UnknownInterface", errno.EBADR, 0xFF),
    ("UnknownProperty", errno.EBADR, 0xFF),
    ("PropertyReadOnly", errno.EROFS, 0xFF),
    ("UnixProcessIdUnknown", errno.ESRCH, 0xFF),
    ("InconsistentMessage", errno.EBADMSG, 0xFF),
    ("MatchRuleInvalid", errno.EINVAL, 0xC9),
    ("MatchRuleNotFound", errno.ENOENT, 0xFF),
    ("ObjectPathInUse", errno.EBUSY, 0xC0),
    ("Failed", errno.EACCES, 0xD4),
]


@pytest.mark.parametrize(("suffix", "err", "cc"), DBUS_ERRORS)
def test_dbus_error_names(suffix: str, err: int, cc: int) -> None:
    assert errno_for_error_name(D + suffix) == err
    assert encode_error(D + suffix) == cc


@pytest.mark.parametrize(
    ("name", "err", "cc"),
    [
        ("System.Error.EBUSY", errno.EBUSY, 0xC0),
        ("System.Error.ENOTSUP", errno.ENOTSUP, 0xC1),
        ("System.Error.EOPNOTSUPP", errno.EOPNOTSUPP, 0xC1),
        ("System.Error.ETIMEDOUT", errno.ETIMEDOUT, 0xC3),
        ("System.Error.ENOSPC", errno.ENOSPC, 0xC4),
        ("System.Error.EINVAL", errno.EINVAL, 0xC9),
        ("System.Error.ENODEV", errno.ENODEV, 0xCB),
        ("System.Error.EPERM", errno.EPERM, 0xD4),
        ("System.Error.EACCES", errno.EACCES, 0xD4),
        ("System.Error.ENOENT", errno.ENOENT, 0xFF),
        ("System.Error.EAGAIN", errno.EAGAIN, 0xFF),
        ("System.Error.EWOULDBLOCK", errno.EAGAIN, 0xFF),
        ("System.Error.EFOOBAR", errno.EIO, 0xFF),
        ("System.Error.errorcode", errno.EIO, 0xFF),
        ("System.Error.", errno.EIO, 0xFF),
        ("System.Error.ebusy", errno.EIO, 0xFF),
    ],
)
def test_system_error_names(name: str, err: int, cc: int) -> None:
    assert errno_for_error_name(name) == err
    assert encode_error(name) == cc


@pytest.mark.parametrize(
    "name",
    [
        "",
        "org.openbmc.error",
        D + "NoSuchThing",
        D,
        "org.freedesktop.DBus.Error",
        "System.Error",
        "xyz.openbmc_project.Common.Error.InternalFailure",
        "EBUSY",
        "NoMemory",
    ],
)
def test_other_error_names_are_eio(name: str) -> None:
    assert errno_for_error_name(name) == errno.EIO
    assert encode_error(name) == 0xFF


@given(st.text(max_size=40))
def test_encode_error_is_total(name: str) -> None:
    cc = encode_error(name)
    assert cc in {0xC0, 0xC1, 0xC3, 0xC4, 0xC9, 0xCB, 0xD4, 0xFF}


# Host-side helpers.
def test_pack_request_and_window_args() -> None:
    assert pack_request(4, 7, window_args(0x1234, 0x10)) == bytes.fromhex(
        "04 07 3412 1000"
    )
    assert pack_request(Command.FLUSH, 1) == b"\x08\x01"


@pytest.mark.parametrize(
    ("func", "payload"),
    [
        (unpack_get_info, b"\x02\x0c\x00"),
        (unpack_get_info, b"\x01\x00\x01\x00"),
        (unpack_get_info, b""),
        (unpack_flash_info, b"\x00\x01\x02"),
        (unpack_window, b"\x00" * 7),
        (unpack_response, b"\x01"),
    ],
)
def test_unpack_rejects_wrong_lengths(func: Any, payload: bytes) -> None:
    with pytest.raises(ValueError):
        func(payload)


# The v1 guard: a deliberate departure from the seed (hiomap.MIN_VERSION).


@pytest.mark.parametrize("version", [0, 1])
def test_get_info_below_v2_is_answered_here_and_never_forwarded(version: int) -> None:
    d = Dispatcher()
    plan = d.request(pack_request(Command.GET_INFO, 9, bytes([version])))
    assert isinstance(plan, Rejected)
    assert plan.cc == C9
    assert f"version {version}" in plan.reason
    assert d.last_seq == 9  # the seq rule still saw it


@pytest.mark.parametrize("version", [2, 3, 0xFF])
def test_get_info_v2_and_above_go_to_hiomapd(version: int) -> None:
    plan = Dispatcher().request(pack_request(Command.GET_INFO, 1, bytes([version])))
    assert isinstance(plan, HiomapCall)
    assert plan.args == (version,)
