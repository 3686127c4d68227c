"""Model-based tests (hypothesis).

* The whole request path: any IPMI netfn/lun/cmd/data sent by the btbridged
  stand-in over a real dbus-daemon, through the bridge (in-process), to a
  scripted hiomapd whose answer is drawn too, gets exactly the completion
  code and bytes an independent model of the seed's rules predicts.  One
  stack serves every example: it runs in its own trio thread and each
  example talks to it through ``trio.from_thread``.
* A stateful test of :class:`HostQueue` (post, flags, fetch, delivery
  success and failure, stale deliveries, completions, SMS_ATN timing under a
  MockClock) against a small model.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hiomapbridge.hostq import Fetch, HostQueue
from hiomapbridge.ipmi import HEARTBEAT_RECORD, event_record
from hiomapbridge.sim.btbridged import BtBridge, Response

from .bridgeutil import RunningBridge, drain_startup, run_bridge, run_btbridged
from .scripted_hiomapd import Reply, ScriptedHiomapd, scripted_hiomapd

T = TypeVar("T")

# -- running a trio stack in a thread -----------------------------------------


@attrs.define
class Portal:
    token: trio.lowlevel.TrioToken

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)


@contextlib.contextmanager
def trio_thread(
    setup: Callable[[], contextlib.AbstractAsyncContextManager[T]],
    clock: trio.abc.Clock | None = None,
) -> Iterator[tuple[T, Portal]]:
    """Run ``async with setup() as value`` in a trio loop on its own thread
    for the block; yield ``value`` and a portal into that loop."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = trio.Event()
        box["stop"] = stop
        box["token"] = trio.lowlevel.current_trio_token()
        async with setup() as value:
            box["value"] = value
            ready.set()
            await stop.wait()

    def runner() -> None:
        try:
            trio.run(main, clock=clock)
        except BaseException as exc:  # reported to the test below
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    assert ready.wait(60), "the trio thread did not start"
    if "error" in box:
        raise box["error"]
    portal = Portal(box["token"])
    try:
        yield box["value"], portal
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            portal.run_sync(box["stop"].set)
        thread.join(60)
        if "error" in box:
            raise box["error"]


# -- the request path ------------------------------------------------------------

HIOMAP_METHODS = {
    # cmd: (member, argument struct, reply signature, unversioned)
    1: ("Reset", "", "", True),
    2: ("GetInfo", "B", "yyq", True),
    3: ("GetFlashInfo", "", "qq", False),
    4: ("CreateReadWindow", "<HH", "qqq", False),
    5: ("CloseWindow", "B", "", False),
    6: ("CreateWriteWindow", "<HH", "qqq", False),
    7: ("MarkDirty", "<HH", "", False),
    8: ("Flush", "", "", False),
    9: ("Ack", "B", "", True),
    10: ("Erase", "<HH", "", False),
}

#: error names and the cc the seed's tables give them (written out by hand
#: from wire reference sections 4 and 6, not computed by the code under test)
ERRORS = {
    "System.Error.EBUSY": 0xC0,
    "System.Error.ENOTSUP": 0xC1,
    "System.Error.EOPNOTSUPP": 0xC1,
    "org.freedesktop.DBus.Error.NotSupported": 0xC1,
    "org.freedesktop.DBus.Error.Timeout": 0xC3,
    "org.freedesktop.DBus.Error.NoReply": 0xC3,
    "System.Error.ETIMEDOUT": 0xC3,
    "System.Error.ENOSPC": 0xC4,
    "org.freedesktop.DBus.Error.InvalidArgs": 0xC9,
    "System.Error.EINVAL": 0xC9,
    "System.Error.ENODEV": 0xCB,
    "org.freedesktop.DBus.Error.AccessDenied": 0xD4,
    "org.freedesktop.DBus.Error.Failed": 0xD4,
    "System.Error.EPERM": 0xD4,
    "System.Error.EPROTO": 0xFF,
    "org.freedesktop.DBus.Error.IOError": 0xFF,
    "org.freedesktop.DBus.Error.NoSuchThing": 0xFF,
    "System.Error.ENOTANERRNO": 0xFF,
    "com.example.Whatever": 0xFF,
}


@attrs.define
class RequestModel:
    """The seed's dispatch (wire reference 4), written independently."""

    last_seq: int | None = None

    def answer(
        self, netfn: int, cmd: int, data: bytes, reply: Reply
    ) -> tuple[int, bytes, tuple[str, tuple[int, ...]] | None]:
        """-> (cc, response data, the hiomapd call expected or None)."""
        if (netfn, cmd) == (0x06, 0x31):
            return 0, b"\x00", None  # nothing waits in this stack
        if (netfn, cmd) == (0x06, 0x30):
            return 0, b"", None
        if (netfn, cmd) == (0x06, 0x35):
            return 0, HEARTBEAT_RECORD, None
        if (netfn, cmd) == (0x06, 0x36):  # 1 request, 64-byte FIFOs, 3 s, 1 retry
            return 0, b"\x01\x3f\x3f\x03\x01", None
        if (netfn, cmd) != (0x3A, 0x5A):
            return 0xC1, b"", None
        if len(data) < 2:
            return 0xC7, b"", None
        hcmd, seq = data[0], data[1]
        if hcmd not in HIOMAP_METHODS:
            return 0xC9, b"", None
        member, layout, reply_sig, unversioned = HIOMAP_METHODS[hcmd]
        if not unversioned and seq == self.last_seq:
            return 0xCC, b"", None
        self.last_seq = seq
        size = struct.calcsize(layout) if layout else 0
        if len(data) - 2 < size:
            return 0xC7, b"", None
        args = struct.unpack_from(layout, data, 2) if layout else ()
        if hcmd == 2 and args[0] < 2:
            return 0xC9, b"", None  # the v1 guard: never forwarded
        call = (member, tuple(args))
        kind, body = reply
        if kind == "error":
            return ERRORS[body[0]], b"", call
        if kind != reply_sig:
            return 0xFF, b"", call
        payload = b"".join(
            struct.pack("<B" if c == "y" else "<H", v)
            for c, v in zip(reply_sig, body, strict=True)
        )
        return 0, bytes([hcmd, seq]) + payload, call


def _values(signature: str) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*(st.integers(0, 0xFF if c == "y" else 0xFFFF) for c in signature))


@st.composite
def replies(draw: st.DrawFn, reply_sig: str) -> Reply:
    kind = draw(st.sampled_from(["ok", "ok", "error", "wrong"]))
    if kind == "error":
        return ("error", (draw(st.sampled_from(sorted(ERRORS))),))
    if kind == "wrong":
        sig = draw(st.sampled_from(["u", "s", "yy", "qqqq", "y", "", "yyq", "qq"]))
        if sig == reply_sig:
            sig = "uu"
        body = tuple(
            "x" if c == "s" else draw(st.integers(0, 0xFF if c == "y" else 0xFFFF))
            for c in sig
        )
        return (sig, body)
    if reply_sig == "yyq":
        version = draw(st.sampled_from([1, 2, 2, 3]))
        rest = draw(_values("yq"))
        return (reply_sig, (version, *rest))
    return (reply_sig, draw(_values(reply_sig)))


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, bytes, Reply]:
    kind = draw(st.sampled_from(["hiomap", "hiomap", "hiomap", "app", "any"]))
    lun = draw(st.integers(0, 3))
    if kind == "hiomap":
        netfn, cmd = 0x3A, 0x5A
        shape = draw(st.sampled_from(["valid", "valid", "raw"]))
        if shape == "raw":
            data = draw(st.binary(max_size=60))
        else:
            hcmd = draw(st.integers(0, 12))
            seq = draw(st.integers(0, 3))
            args = draw(st.binary(max_size=6))
            data = bytes([hcmd, seq]) + args
    elif kind == "app":
        netfn = 0x06
        cmd = draw(st.sampled_from([0x30, 0x31, 0x35, 0x34, 0x01]))
        data = draw(st.binary(max_size=4))
    else:
        netfn = draw(st.integers(0, 0xFF))
        cmd = draw(st.integers(0, 0xFF))
        data = draw(st.binary(max_size=60))
    hcmd = data[0] if data else 0
    reply_sig = HIOMAP_METHODS.get(hcmd, ("", "", "", False))[2]
    return netfn, lun, cmd, data, draw(replies(reply_sig))


@attrs.define
class Stack:
    hiomapd: ScriptedHiomapd
    bt: BtBridge
    running: RunningBridge


def request_stack(
    address: str,
) -> Callable[[], contextlib.AbstractAsyncContextManager[Stack]]:
    @contextlib.asynccontextmanager
    async def setup() -> AsyncIterator[Stack]:
        async with (
            scripted_hiomapd(address) as hiomapd,
            run_btbridged(address, timeout=3.0) as bt,
            run_bridge(address, hiomapd_timeout=2.0) as running,
        ):
            await drain_startup(bt, running)
            yield Stack(hiomapd, bt, running)

    return setup


def test_request_path_matches_model(bus_address: str) -> None:
    """Any request, any hiomapd answer: the host gets exactly the model's
    cc and bytes, with the response netfn/lun/cmd of the request, and hiomapd
    sees exactly the model's call (or none)."""
    model = RequestModel()
    with trio_thread(request_stack(bus_address)) as (stack, portal):

        @settings(
            max_examples=80,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(st.lists(requests(), min_size=1, max_size=4))
        def check(batch: list[tuple[int, int, int, bytes, Reply]]) -> None:
            for netfn, lun, cmd, data, reply in batch:
                member = HIOMAP_METHODS.get(data[0] if data else 0, ("",))[0]

                async def one(
                    member: str = member,
                    reply: Reply = reply,
                    request: tuple[int, int, bytes, int] = (netfn, cmd, data, lun),
                ) -> tuple[Response, int, Any]:
                    if member:
                        stack.hiomapd.replies[member] = reply
                    calls = len(stack.hiomapd.calls)
                    with trio.fail_after(10):
                        response = await stack.bt.transact(*request)
                    made = stack.hiomapd.calls[calls:]
                    return response, len(made), made

                response, ncalls, made = portal.run(one)
                cc, want, call = model.answer(netfn, cmd, data, reply)
                assert (response.cc, response.data) == (cc, want), (
                    f"netfn={netfn:#x} cmd={cmd:#x} data={data.hex()} reply={reply}"
                )
                assert (response.netfn, response.lun, response.cmd) == (
                    netfn | 1,
                    lun,
                    cmd,
                )
                if call is None:
                    assert ncalls == 0
                else:
                    assert ncalls == 1
                    assert (made[0][1], made[0][2]) == call
                last_seq = portal.run_sync(
                    lambda: stack.running.bridge.dispatcher.last_seq
                )
                assert last_seq == model.last_seq

        check()
        bridge = stack.running.bridge
        assert bridge.overflow.count == 0
        assert bridge.forged.count == 0


# -- the host queue --------------------------------------------------------------

INTERVAL = 3.0


@attrs.define
class QueueModel:
    posted: int = 0
    delivered: int = 0
    byte: int | None = None
    last_delivered: int | None = None
    now: float = 0.0
    attentions: int = 0
    due: bool = False
    woke: bool = False
    next_at: float = float("inf")
    sleep_until: float = float("inf")
    deferred: bool = False  # setAttention calls stay in flight until finished
    in_flight: bool = False

    @property
    def waiting(self) -> bool:
        return self.delivered < self.posted

    def request_attention(self) -> None:
        self.due = True
        self.woke = True

    def post(self, byte: int) -> int:
        if not self.waiting:
            if byte == self.last_delivered:
                return self.delivered
            self.request_attention()
        elif byte == self.byte:
            return self.posted  # that very state already waits
        self.posted += 1
        self.byte = byte
        return self.posted

    def fetch(self) -> tuple[bytes, int, int | None]:
        if not self.waiting:
            return HEARTBEAT_RECORD, 0, None
        assert self.byte is not None
        return event_record(self.byte), self.posted, self.byte

    def delivered_fetch(self, generation: int, byte: int | None) -> None:
        if generation <= self.delivered:
            return  # stale: a newer generation already reached the host
        self.delivered = generation
        self.last_delivered = byte
        if self.waiting:
            self.request_attention()

    def failed_fetch(self, generation: int) -> None:
        if generation:
            self.request_attention()

    def kick(self) -> None:
        if self.waiting:
            self.request_attention()

    def _loop(self) -> None:
        """What the SMS_ATN logic does once woken, until it sleeps again."""
        if self.in_flight:
            return  # a request stays due until the call in flight ends
        if self.due and self.waiting:
            self.attentions += 1
            if self.deferred:
                self.in_flight = True
                self.next_at = float("inf")  # the interval runs from the outcome
            else:
                self.next_at = self.now + INTERVAL
        self.due = False
        self.sleep_until = self.next_at if self.waiting else float("inf")

    def finish_attention(self) -> None:
        """The setAttention in flight ends (success or failure alike)."""
        self.in_flight = False
        self.next_at = self.now + INTERVAL
        self.sleep_until = self.next_at if self.waiting else float("inf")
        if self.due:
            self._loop()

    def settle(self) -> None:
        if self.woke:
            self.woke = False
            self._loop()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        if self.now >= self.sleep_until:
            self.due = True
            self._loop()


class QueueMachine(RuleBasedStateMachine):
    """HostQueue against QueueModel; every step is followed by letting the
    SMS_ATN task run until it blocks (time moves only in ``advance``)."""

    fetches = Bundle("fetches")

    def __init__(self) -> None:
        super().__init__()
        self.model = QueueModel()
        self.clock = trio.testing.MockClock()
        self.attention_calls = 0
        self.attention_fails = False
        self.attention_deferred = False
        self.in_flight: list[Callable[[BaseException | None], None]] = []
        self.waiters: list[tuple[int, list[bool]]] = []
        self._cm = trio_thread(self._setup, clock=self.clock)
        self.queue, self.portal = self._cm.__enter__()

    @contextlib.asynccontextmanager
    async def _setup(self) -> AsyncIterator[HostQueue]:
        def set_attention(done: Callable[[BaseException | None], None]) -> None:
            self.attention_calls += 1
            if self.attention_deferred:
                self.in_flight.append(done)
            else:
                done(
                    RuntimeError("btbridged said no") if self.attention_fails else None
                )

        queue = HostQueue(set_attention, INTERVAL)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(queue.run_attention)
            await trio.testing.wait_all_tasks_blocked()
            yield queue
            nursery.cancel_scope.cancel()

    def teardown(self) -> None:
        self._cm.__exit__(None, None, None)

    def _do(
        self, fn: Callable[[], T], model_fn: Callable[[], Any] = lambda: None
    ) -> tuple[T, Any]:
        """Run ``fn`` on the queue and ``model_fn`` on the model, then let
        both SMS_ATN logics (real and modelled) run until they block."""

        async def step() -> T:
            result = fn()
            await trio.testing.wait_all_tasks_blocked()
            return result

        result = self.portal.run(step)
        expected = model_fn()
        self.model.settle()
        return result, expected

    @rule(byte=st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x40, 0x80, 0x81, 0xC3]))
    def post(self, byte: int) -> None:
        got, want = self._do(
            lambda: self.queue.post(byte), lambda: self.model.post(byte)
        )
        assert got == want

    @rule()
    def flags(self) -> None:
        want = 0x02 if self.model.waiting else 0x00
        assert self._do(self.queue.message_flags)[0] == want

    @rule(target=fetches)
    def fetch(self) -> Fetch:
        fetch, want = self._do(self.queue.fetch, self.model.fetch)
        assert (fetch.record, fetch.generation, fetch.byte) == want
        return fetch

    @rule(fetch=fetches)
    def deliver(self, fetch: Fetch) -> None:
        self._do(
            lambda: self.queue.delivered(fetch),
            lambda: self.model.delivered_fetch(fetch.generation, fetch.byte),
        )

    @rule(fetch=fetches)
    def fail(self, fetch: Fetch) -> None:
        self._do(
            lambda: self.queue.failed(fetch, "test"),
            lambda: self.model.failed_fetch(fetch.generation),
        )

    @rule()
    def kick(self) -> None:
        self._do(self.queue.kick, self.model.kick)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 3.0, 7.0]))
    def advance(self, seconds: float) -> None:
        self.model.advance(seconds)

        async def step() -> None:
            self.clock.jump(seconds)
            await trio.testing.wait_all_tasks_blocked()

        self.portal.run(step)

    @rule(fails=st.booleans())
    def attention_outcome(self, fails: bool) -> None:
        self.attention_fails = fails

    @initialize(deferred=st.booleans())
    def start(self, deferred: bool) -> None:
        self.attention_in_flight(deferred)

    @rule(deferred=st.booleans())
    def attention_in_flight(self, deferred: bool) -> None:
        """From now on setAttention calls stay in flight until finished
        (a btbridged slow to answer), or complete at once."""
        self.attention_deferred = self.model.deferred = deferred

    @precondition(lambda self: bool(self.in_flight))
    @rule(fails=st.booleans())
    def finish_attention(self, fails: bool) -> None:
        done = self.in_flight.pop(0)
        self._do(
            lambda: done(RuntimeError("btbridged said no") if fails else None),
            self.model.finish_attention,
        )

    @rule(ahead=st.integers(0, 2))
    def wait_delivered(self, ahead: int) -> None:
        generation = self.model.posted + ahead
        done: list[bool] = []

        async def waiter() -> None:
            await self.queue.wait_delivered(generation)
            done.append(True)

        self._do(lambda: self.nursery.start_soon(waiter))
        self.waiters.append((generation, done))

    @invariant()
    def matches_model(self) -> None:
        queue, model = self.queue, self.model
        state = self.portal.run_sync(
            lambda: (
                queue.waiting,
                queue.waiting_byte,
                queue.posted_generation,
                queue.delivered_generation,
                queue.last_delivered,
                queue.attention_count,
            )
        )
        assert state == (
            model.waiting,
            model.byte if model.waiting else None,
            model.posted,
            model.delivered,
            model.last_delivered,
            model.attentions,
        )
        assert self.attention_calls == model.attentions
        assert len(self.in_flight) == int(model.in_flight)  # one at a time
        for generation, done in self.waiters:
            # a completion fires exactly when its generation (or a newer one)
            # was delivered: never on fetch, never on a failed send
            assert bool(done) == (model.delivered >= generation), generation


def test_host_queue_against_model() -> None:
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.parametrize("byte", [0x01, 0x81])
def test_queue_model_smoke(byte: int) -> None:
    """The model itself: post, fetch, deliver, and the host holds the byte."""
    model = QueueModel()
    generation = model.post(byte)
    model.settle()
    assert model.attentions == 1 and model.waiting
    record, fetched, got = model.fetch()
    assert (record, fetched, got) == (event_record(byte), generation, byte)
    model.delivered_fetch(fetched, got)
    assert not model.waiting and model.last_delivered == byte
    assert model.post(byte) == generation  # the host already holds it
