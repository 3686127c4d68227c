"""The host-command queue under trio's MockClock: no bus, exact timing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from hiomapbridge.hostq import HostQueue
from hiomapbridge.ipmi import HEARTBEAT_RECORD, event_record


class Attention:
    """Records setAttention calls with their (mock) times; can be made to fail."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.fail = False

    def __call__(self, done: Callable[[BaseException | None], None]) -> None:
        self.times.append(trio.current_time())
        done(RuntimeError("btbridged not there") if self.fail else None)


@pytest.fixture
def attention() -> Attention:
    return Attention()


@pytest.fixture
async def queue(attention: Attention) -> AsyncIterator[HostQueue]:
    q = HostQueue(attention, atn_interval=3.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(q.run_attention)
        yield q
        nursery.cancel_scope.cancel()


async def test_post_asserts_attention_and_flags(
    queue: HostQueue, attention: Attention
) -> None:
    assert queue.message_flags() == 0x00
    assert queue.fetch().record == HEARTBEAT_RECORD
    queue.post(0x81)
    await trio.testing.wait_all_tasks_blocked()
    assert len(attention.times) == 1
    assert queue.message_flags() == 0x02
    fetch = queue.fetch()
    assert fetch.record == event_record(0x81)
    assert fetch.byte == 0x81


async def test_completion_only_after_delivery(queue: HostQueue) -> None:
    gen = queue.post(0x81)
    done = trio.Event()

    async def waiter() -> None:
        await queue.wait_delivered(gen)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        fetch = queue.fetch()  # the response is built ("dequeued") ...
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # ... but that is not delivery
        assert queue.waiting
        queue.delivered(fetch)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    assert queue.last_delivered == 0x81
    assert queue.message_flags() == 0x00


async def test_coalescing_keeps_latest_and_completes_older(
    queue: HostQueue, attention: Attention
) -> None:
    gens = [queue.post(b) for b in (0x81, 0x80, 0xC0, 0x82)]
    await trio.testing.wait_all_tasks_blocked()
    assert len(attention.times) == 1  # one SMS_ATN for the whole burst
    fetch = queue.fetch()
    assert fetch.byte == 0x82
    queue.delivered(fetch)
    with trio.fail_after(1):
        for gen in gens:
            await queue.wait_delivered(gen)
    assert not queue.waiting


async def test_bounded_however_long_the_host_ignores_us(
    queue: HostQueue, attention: Attention
) -> None:
    for i in range(100_000):
        queue.post(i & 0xFF)
    assert vars(queue).keys() == vars(HostQueue(attention)).keys()
    assert queue.fetch().byte == (100_000 - 1) & 0xFF


async def test_attention_reasserted_every_interval(
    queue: HostQueue, attention: Attention, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    queue.post(0x81)
    await trio.sleep(10)
    offsets = [round(t - start, 6) for t in attention.times]
    assert offsets == [0.0, 3.0, 6.0, 9.0]
    queue.delivered(queue.fetch())
    await trio.sleep(10)
    assert len(attention.times) == 4  # silent once delivered


async def test_failed_send_stays_waiting_and_reasserts_now(
    queue: HostQueue, attention: Attention, autojump_clock: trio.testing.MockClock
) -> None:
    gen = queue.post(0x01)
    await trio.testing.wait_all_tasks_blocked()
    t0 = trio.current_time()
    fetch = queue.fetch()
    queue.failed(fetch, "sendMessage: timed out")
    await trio.testing.wait_all_tasks_blocked()
    assert queue.waiting and queue.delivered_generation < gen
    assert [t - t0 for t in attention.times[1:]] == [0.0]
    queue.delivered(queue.fetch())
    assert not queue.waiting


async def test_stale_delivery_leaves_newer_waiting_and_reasserts(
    queue: HostQueue, attention: Attention
) -> None:
    first = queue.post(0x81)
    old_fetch = queue.fetch()
    second = queue.post(0x01)  # arrives while the 0x81 response is in flight
    await trio.testing.wait_all_tasks_blocked()
    assert len(attention.times) == 1
    queue.delivered(old_fetch)
    await trio.testing.wait_all_tasks_blocked()
    assert queue.delivered_generation == first < second
    assert queue.waiting_byte == 0x01
    assert len(attention.times) == 2  # the newer byte is announced at once
    assert queue.last_delivered == 0x81


async def test_posting_what_the_host_holds_is_a_noop(
    queue: HostQueue, attention: Attention
) -> None:
    queue.post(0x80)
    queue.delivered(queue.fetch())
    await trio.testing.wait_all_tasks_blocked()
    calls = len(attention.times)
    gen = queue.post(0x80)
    await trio.testing.wait_all_tasks_blocked()
    assert not queue.waiting
    assert gen == queue.delivered_generation
    assert len(attention.times) == calls


async def test_same_byte_after_an_unfetched_change_is_delivered(
    queue: HostQueue,
) -> None:
    """0x81 delivered, the host ACKs (0x80 posted), then a reset again (0x81):
    the host cleared its reset bits on ACK, so 0x81 must reach it again."""
    queue.post(0x81)
    queue.delivered(queue.fetch())
    queue.post(0x80)
    queue.post(0x81)
    assert queue.waiting_byte == 0x81


async def test_attention_failure_retried_at_interval(
    queue: HostQueue, attention: Attention, autojump_clock: trio.testing.MockClock
) -> None:
    attention.fail = True
    start = trio.current_time()
    queue.post(0x81)
    await trio.sleep(7)
    assert [round(t - start, 6) for t in attention.times] == [0.0, 3.0, 6.0]


async def test_kick_reasserts_only_while_waiting(
    queue: HostQueue, attention: Attention
) -> None:
    queue.kick()
    await trio.testing.wait_all_tasks_blocked()
    assert attention.times == []
    queue.post(0x81)
    await trio.testing.wait_all_tasks_blocked()
    queue.kick()
    await trio.testing.wait_all_tasks_blocked()
    assert len(attention.times) == 2


async def test_reposting_the_waiting_byte_adds_no_generation(
    queue: HostQueue, attention: Attention
) -> None:
    """hiomapd re-emits its set bits on GET_INFO: the same byte posted while
    it waits (its response maybe in flight) must not cost the host a fetch."""
    gen = queue.post(0x80)
    await trio.testing.wait_all_tasks_blocked()
    in_flight = queue.fetch()
    assert queue.post(0x80) == gen
    queue.delivered(in_flight)
    await trio.testing.wait_all_tasks_blocked()
    assert not queue.waiting
    assert len(attention.times) == 1


class PendingAttention:
    """setAttention calls that complete only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[Callable[[BaseException | None], None]] = []

    def __call__(self, done: Callable[[BaseException | None], None]) -> None:
        self.calls.append(done)


async def test_one_set_attention_in_flight_none_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a setAttention is in flight (btbridged slow to answer), further
    requests for SMS_ATN are remembered, not sent; the first one goes out the
    moment the call ends, and the interval counts from the call's outcome."""
    attention = PendingAttention()
    queue = HostQueue(attention, atn_interval=3.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.run_attention)
        queue.post(0x81)
        assert len(attention.calls) == 1  # sent from post() itself
        queue.failed(queue.fetch(), "sendMessage: btbridged gone")
        queue.kick()
        await trio.sleep(10)  # longer than the interval: still one call
        assert len(attention.calls) == 1
        attention.calls[0](trio.TooSlowError())
        assert len(attention.calls) == 2  # the remembered request, at once
        attention.calls[1](None)
        await trio.sleep(2.9)
        assert len(attention.calls) == 2
        await trio.sleep(0.2)
        assert len(attention.calls) == 3  # 3 s after the second call's outcome
        queue.delivered(queue.fetch())
        attention.calls[2](None)
        await trio.sleep(10)
        assert len(attention.calls) == 3  # nothing waits: silent
        nursery.cancel_scope.cancel()
