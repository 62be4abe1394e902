"""The Sans-I/O stream table and the codecs, with plain synchronous calls: no loop, no sockets."""

from __future__ import annotations

import pytest

from rpcstream.errors import ErrorCode, Overloaded, ProtocolViolation, RemoteError
from rpcstream.messages import (
    JSON,
    MSGPACK,
    Call,
    Codec,
    Credit,
    Fault,
    StreamCall,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
)
from rpcstream.protocol import (
    Empty,
    Finished,
    Protocol,
    Side,
    StreamCancelled,
    StreamReadable,
    StreamWritable,
)
from rpcstream.protocol.windows import SPREAD
from tests.sansio import deliver, frames, identity, pair


@pytest.mark.parametrize("codec", [MSGPACK, JSON], ids=["msgpack", "json"])
def test_a_batch_of_frames_round_trips_through_each_codec(codec: Codec) -> None:
    batch = [
        Call(1, "add", codec.encode_raw([1, 2]), codec.empty_map, 2.5, []),
        StreamData(3, codec.encode_raw({"i": 1})),
        StreamEnd(3),
    ]
    decoded = codec.decode_batch(codec.encode_batch(batch))
    assert [type(f) for f in decoded] == [Call, StreamData, StreamEnd]
    assert codec.decode(decoded[0].args) == [1, 2]
    assert decoded[0].timeout == 2.5
    assert codec.decode(decoded[1].payload) == {"i": 1}


def test_the_connecting_side_allocates_odd_stream_ids_and_the_accepting_side_even() -> None:
    a, b = pair()
    assert [a.streams.next_stream_id() for _ in range(3)] == [1, 3, 5]
    assert [b.streams.next_stream_id() for _ in range(3)] == [2, 4, 6]


def test_a_sender_sends_nothing_before_the_receivers_first_credit() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    assert not a.streams.can_send(1)
    b.streams.open_incoming(1, identity, window_items=2, window_bytes=1000)
    events = deliver(b, a)
    assert events == [StreamWritable(1)]
    assert a.streams.can_send(1)


def test_credit_holds_the_sender_at_the_window_and_consuming_reopens_it() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=4, window_bytes=10_000)
    deliver(b, a)
    sent = 0
    while a.streams.can_send(1):
        a.streams.send_item(1, MSGPACK.encode_raw(sent))
        sent += 1
    assert sent == 4
    events = deliver(a, b)
    assert events == [StreamReadable(1)]
    assert b.streams.buffered_items(1) == 4
    # Consuming half the window grants it back, in one Credit frame.
    assert [b.streams.pop_item(1), b.streams.pop_item(1)] == [0, 1]
    assert [type(f) for f in frames(b)] == [Credit]


def test_the_byte_window_bounds_the_receivers_buffer_too() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=1000, window_bytes=100)
    deliver(b, a)
    sent = 0
    while a.streams.can_send(1):
        a.streams.send_item(1, MSGPACK.encode_raw(b"x" * 30))
        sent += 1
    # 32 bytes an item: 4 items take the 100-byte window below zero.
    assert sent == 4


def test_data_beyond_the_credit_fails_the_stream_and_cancels_the_sender() -> None:
    _a, b = pair()
    b.streams.open_incoming(1, identity, window_items=1, window_bytes=1000)
    frames(b)
    bad = MSGPACK.encode_batch([StreamData(1, MSGPACK.encode_raw(i)) for i in range(3)])
    events = b.receive_message(bad)
    assert StreamReadable(1) in events
    assert b.streams.pop_item(1) == 0  # what was sent within the credit still arrives
    with pytest.raises(ProtocolViolation):
        b.streams.pop_item(1)
    assert StreamCancel(1) in frames(b)


def test_stream_end_never_overtakes_its_streams_data_but_control_frames_do() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10, window_bytes=10_000)
    deliver(b, a)
    a.streams.send_item(1, MSGPACK.encode_raw("x"))
    a.streams.end_outgoing(1)
    a.send_call("m", MSGPACK.empty_array, MSGPACK.empty_map)
    out = frames(a)
    assert [type(f) for f in out] == [Call, StreamData, StreamEnd]


def test_the_receiver_gets_the_items_then_the_senders_error() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity)
    deliver(b, a)
    a.streams.send_item(1, MSGPACK.encode_raw("first"))
    a.streams.end_outgoing(1, RemoteError(1234, "boom", {"why": "test"}))
    deliver(a, b)
    assert b.streams.pop_item(1) == "first"
    with pytest.raises(RemoteError) as info:
        b.streams.pop_item(1)
    assert (info.value.code, info.value.message, info.value.data) == (1234, "boom", {"why": "test"})


def test_an_ended_stream_reports_finished_and_an_empty_one_reports_empty() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity)
    with pytest.raises(Empty):
        b.streams.pop_item(1)
    deliver(b, a)
    a.streams.end_outgoing(1)
    deliver(a, b)
    with pytest.raises(Finished):
        b.streams.pop_item(1)


def test_closing_a_receiving_stream_tells_the_sender_which_sees_it_cancelled() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity)
    deliver(b, a)
    b.streams.close_incoming(1)
    events = deliver(b, a)
    assert events == [StreamCancelled(1)]
    assert a.streams.is_cancelled(1)
    a.streams.end_outgoing(1)  # nothing is sent for a cancelled stream
    assert frames(a) == []


def test_credit_for_a_receiver_allocated_id_waits_until_the_sender_registers_it() -> None:
    a, b = pair()
    sid = b.streams.next_stream_id()  # the receiver allocates; it will tell the sender by a call
    b.streams.open_incoming(sid, identity, window_items=5, window_bytes=100)
    deliver(b, a)
    a.streams.open_outgoing(sid)
    assert a.streams.can_send(sid)


def test_data_for_an_unknown_stream_is_dropped_and_its_sender_told_to_stop() -> None:
    _a, b = pair()
    events = b.receive_message(MSGPACK.encode_batch([StreamData(99, MSGPACK.encode_raw(1))]))
    assert events == []
    assert frames(b) == [StreamCancel(99)]


@pytest.mark.parametrize(
    "message",
    [b"\xc1garbage", b"\x91\x92\x63\x01", b"not msgpack", b"\x92\x01"],
    ids=["garbage", "unknown-tag", "text", "not-a-batch"],
)
def test_an_undecodable_message_is_answered_with_a_fault(message: bytes) -> None:
    _, b = pair()
    assert b.receive_message(message) == []
    [fault] = frames(b)
    assert isinstance(fault, Fault)
    assert fault.code == ErrorCode.PROTOCOL_ERROR
    assert fault.message.startswith("undecodable message")


def test_negative_or_overflowing_credit_is_a_fault() -> None:
    a, _b = pair()
    a.streams.open_outgoing(1)
    a.receive_message(MSGPACK.encode_batch([Credit(1, -1, 5)]))
    a.receive_message(MSGPACK.encode_batch([Credit(1, 2**40, 2**40)]))
    faults = [f for f in frames(a) if isinstance(f, Fault)]
    assert [f.message.split(" ")[0] for f in faults] == ["negative", "outstanding"]


def test_a_stream_call_with_our_own_parity_is_a_fault() -> None:
    _a, b = pair()
    bad = StreamCall(2, "m", MSGPACK.empty_array, MSGPACK.empty_map)  # even: b's own parity
    assert b.receive_message(MSGPACK.encode_batch([bad])) == []
    assert isinstance(frames(b)[0], Fault)


def test_stream_calls_beyond_max_streams_are_refused_as_overloaded() -> None:
    a, b = pair(max_streams=1)
    empty = (MSGPACK.empty_array, MSGPACK.empty_map)
    calls = [StreamCall(a.streams.next_stream_id(), "m", *empty) for _ in range(2)]
    events = b.receive_message(MSGPACK.encode_batch(calls))
    assert [type(e) for e in events] == [StreamCall]
    [refusal] = frames(b)
    assert isinstance(refusal, StreamError)
    assert (refusal.stream_id, refusal.code) == (3, ErrorCode.OVERLOADED)


def test_queued_bytes_count_what_waits_and_drop_to_zero_once_taken() -> None:
    a, b = pair()
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=100, window_bytes=1 << 20)
    deliver(b, a)
    for _ in range(10):
        a.streams.send_item(1, MSGPACK.encode_raw(b"x" * 1000))
    assert a.queued_bytes >= 10_000
    frames(a)
    assert a.queued_bytes == 0


def test_a_batch_stops_growing_at_max_message_bytes() -> None:
    a, b = pair(max_message_bytes=4096)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=100, window_bytes=1 << 20)
    deliver(b, a)
    for _ in range(10):
        a.streams.send_item(1, MSGPACK.encode_raw(b"x" * 1000))
    sizes = []
    while (message := a.data_to_send()) is not None:
        sizes.append(len(MSGPACK.decode_batch(message)))
    assert len(sizes) > 1 and sum(sizes) == 10


def test_late_credit_and_cancels_for_an_ended_peer_allocated_stream_leave_nothing_behind() -> None:
    a, b = pair()
    sid = a.streams.next_stream_id()  # the caller allocates the stream of a StreamCall
    a.streams.open_incoming(sid, identity)
    a.send(StreamCall(sid, "m", MSGPACK.empty_array, MSGPACK.empty_map))
    deliver(a, b)
    b.streams.end_outgoing(sid)
    deliver(b, a)
    # Frames the caller sent before it saw the end arrive afterwards:
    b.receive_message(MSGPACK.encode_batch([Credit(sid, 5, 500), StreamCancel(sid)]))
    assert b.streams._early_out == {}
    assert b.streams.count == 0


def test_opening_streams_beyond_max_streams_raises_overloaded_locally() -> None:
    a, _b = pair(max_streams=1)
    a.streams.open_incoming(a.streams.next_stream_id(), identity)
    with pytest.raises(Overloaded):
        a.streams.open_incoming(a.streams.next_stream_id(), identity)


class Clock:
    """A clock the test moves by hand: a round trip takes no real time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


RTT = 0.02


def _clocked(**kw: int) -> tuple[Protocol, Protocol, Clock]:
    clock = Clock()
    a, b = pair(**kw)
    b.streams.clock = clock  # an attribute, as the stream table reads it at each grant
    return a, b, clock


def _run_rounds(
    a: Protocol,
    b: Protocol,
    sid: int,
    rounds: int,
    *,
    send: int | None,
    take: str,
    payload: bytes = b"x" * 98,  # 100 bytes encoded
    clock: Clock | None = None,
    think: float = 0.0,
) -> list[int]:
    """Each round: a sends (everything its credit allows, or ``send`` items),
    b consumes (``take``: "all" until Empty, or "half" of what waits, after
    ``think`` seconds) and its credit goes back; each way takes half of ``RTT``
    on ``clock``. Returns how many items a sent in each round."""
    sent_per_round = []
    for _ in range(rounds):
        sent = 0
        while a.streams.can_send(sid) and (send is None or sent < send):
            a.streams.send_item(sid, MSGPACK.encode_raw(payload))
            sent += 1
        sent_per_round.append(sent)
        if clock is not None:
            clock.now += RTT / 2
        deliver(a, b)
        if clock is not None:
            clock.now += think
        waiting = b.streams.buffered_items(sid)
        for _ in range(waiting if take == "all" else waiting // 2):
            b.streams.pop_item(sid)
        if take == "all":
            with pytest.raises(Empty):
                b.streams.pop_item(sid)
        deliver(b, a)
        if clock is not None:
            clock.now += RTT / 2
    return sent_per_round


def test_a_window_that_holds_a_fast_stream_back_doubles_up_to_its_maximum() -> None:
    a, b, clock = _clocked(max_window_bytes=8000)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    pool = b.streams.pool_left
    sent = _run_rounds(a, b, 1, 12, send=None, take="all", clock=clock)
    assert b.streams.rtt.seconds == pytest.approx(RTT)  # measured from the credit round trips
    assert b.streams.window_bytes_of(1) == 8000
    assert sent[0] == 10 and max(sent) == 80  # 1000 then 8000 bytes a round
    assert b.streams.pool_left == pool - 7000


def test_an_item_window_that_holds_a_stream_of_small_items_back_doubles_too() -> None:
    a, b, clock = _clocked(max_window_items=64)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=4, window_bytes=100_000)
    deliver(b, a)
    sent = _run_rounds(a, b, 1, 12, send=None, take="all", payload=b"t", clock=clock)
    assert sent[0] == 4 and max(sent) == 64  # tokens: the item window was the limit


def test_no_window_grows_before_a_round_trip_was_measured() -> None:
    # The consumer keeps up and waits, but the sender never ran out of credit, so
    # no grant was timed: the window stays.
    a, b, clock = _clocked(max_window_bytes=8000)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    _run_rounds(a, b, 1, 3, send=2, take="all", clock=clock)
    assert b.streams.rtt.seconds is None
    assert b.streams.window_bytes_of(1) == 1000


@pytest.mark.parametrize("size", [600, 1500], ids=["over half the window", "over the window"])
def test_a_sender_that_trickles_large_items_to_a_waiting_consumer_keeps_its_window(
    size: int,
) -> None:
    a, b, clock = _clocked(max_window_bytes=8000)
    # Stream 1 is held back by its window: its credit round trips time the link.
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    _run_rounds(a, b, 1, 4, send=None, take="all", clock=clock)
    assert b.streams.window_bytes_of(1) > 1000
    # Stream 3 trickles: one large item a second, each taken at once by a consumer
    # that then waits for the next. It is starved, but the window is not what
    # holds it back: a grant every second, 50 round trips apart.
    a.streams.open_outgoing(3)
    b.streams.open_incoming(3, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    for _ in range(12):
        clock.now += 1.0
        a.streams.send_item(3, MSGPACK.encode_raw(b"x" * (size - 3)))
        deliver(a, b)
        b.streams.pop_item(3)
        with pytest.raises(Empty):
            b.streams.pop_item(3)
        deliver(b, a)
    assert b.streams.window_bytes_of(3) == 1000
    # The trickle's own samples are longer: they count for SPREAD round trips at most.
    assert b.streams.rtt.least == pytest.approx(RTT)
    assert RTT <= b.streams.rtt.seconds <= SPREAD * RTT


@pytest.mark.parametrize("send", [1, 2])
def test_a_steady_sender_slower_than_its_window_alone_on_a_connection_keeps_it(
    send: int,
) -> None:
    # Nothing else on the connection times the link: what its own grants time is
    # the sender's pace, which must not pass for a round trip.
    a, b, clock = _clocked(max_window_bytes=8000)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    _run_rounds(a, b, 1, 60, send=send, take="all", clock=clock)
    assert b.streams.window_bytes_of(1) == 1000
    assert b.streams.rtt.seconds is None


def test_a_window_grown_for_a_fast_consumer_narrows_back_once_it_lags() -> None:
    a, b, clock = _clocked(max_window_bytes=8000)
    a.streams.open_outgoing(1)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    deliver(b, a)
    pool = b.streams.pool_left
    _run_rounds(a, b, 1, 12, send=None, take="all", clock=clock)
    assert b.streams.window_bytes_of(1) == 8000
    # Now the consumer takes half of what waits, a round every five round trips:
    # it lags, and the window goes back to its first size, its bytes to the pool.
    _run_rounds(a, b, 1, 12, send=None, take="half", clock=clock, think=4 * RTT)
    assert b.streams.window_bytes_of(1) == 1000
    assert b.streams.pool_left == pool
    sent = _run_rounds(a, b, 1, 6, send=None, take="half", clock=clock)
    assert b.streams.buffered_items(1) <= 11 and max(sent) <= 10  # one window, no more


def test_a_lagging_consumer_never_grows_a_window() -> None:
    a, b, clock = _clocked(max_window_bytes=8000, max_window_items=64)
    for sid in (1, 3):
        a.streams.open_outgoing(sid)
    b.streams.open_incoming(1, identity, window_items=10_000, window_bytes=1000)
    b.streams.open_incoming(3, identity, window_items=4, window_bytes=1000)
    deliver(b, a)
    pool = b.streams.pool_left
    b.streams.rtt.note(RTT)  # a round trip known (a ping's): the lag alone holds it
    # The consumer takes half of what waits, so it never waits itself.
    _run_rounds(a, b, 1, 12, send=None, take="half", clock=clock)
    sent = _run_rounds(a, b, 3, 12, send=None, take="half", payload=b"t", clock=clock)
    assert b.streams.window_bytes_of(1) == b.streams.window_bytes_of(3) == 1000
    assert max(sent) <= 4
    assert b.streams.buffered_items(1) <= 11  # the lagging consumer's buffer: the window
    assert b.streams.pool_left == pool


def test_windows_draw_from_one_receive_budget_per_connection_and_give_it_back() -> None:
    # 16,000 bytes for 4 streams: a floor of 2,000 each (8,000) and a pool of 8,000.
    a, b = pair(max_streams=4, max_receive_buffer=16_000, max_window_bytes=6000)
    assert (b.streams.floor_bytes, b.streams.pool_left) == (2000, 8000)
    for sid in (1, 3, 5):
        a.streams.open_outgoing(sid)
        b.streams.open_incoming(sid, identity, window_items=10_000, window_bytes=6000)
    assert [b.streams.window_bytes_of(sid) for sid in (1, 3, 5)] == [6000, 6000, 2000]
    assert b.streams.pool_left == 0
    deliver(b, a)
    sent = _run_rounds(a, b, 5, 3, send=None, take="all")
    assert max(sent) == 20  # 2,000 bytes a round: its floor, the pool being spent
    b.streams.close_incoming(1)
    assert b.streams.pool_left == 4000
    sent = _run_rounds(a, b, 5, 4, send=None, take="all")
    assert b.streams.window_bytes_of(5) == 6000 and max(sent) == 60  # grew back
    total = sum(b.streams.window_bytes_of(sid) for sid in (3, 5))
    assert total + 2 * b.streams.floor_bytes <= 16_000  # and two floors still free


def test_a_receive_budget_too_small_for_its_streams_is_refused() -> None:
    with pytest.raises(ValueError, match="two bytes per stream"):
        Protocol(MSGPACK, Side.ACCEPTING, max_streams=4096, max_receive_buffer=4096)
