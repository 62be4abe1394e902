"""The Sans-I/O connection's call tables and its one close, with plain synchronous calls."""

from __future__ import annotations

from typing import Any

import pytest

from rpcstream.errors import ConnectionClosed, ProtocolViolation
from rpcstream.messages import (
    MSGPACK,
    Call,
    Cancel,
    Credit,
    Error,
    Fault,
    Result,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
)
from rpcstream.protocol import Empty, Finished, Protocol, State
from tests.sansio import deliver, frames, identity, pair


def receive(proto: Protocol, *batch: Any) -> list[Any]:
    return proto.receive_message(MSGPACK.encode_batch(list(batch)))


def call(cid: int, method: str = "m", stream_args: list[int | str] | None = None) -> Call:
    return Call(cid, method, MSGPACK.empty_array, MSGPACK.empty_map, None, stream_args or [])


def test_a_call_is_answered_once_and_a_late_answer_after_giving_up_is_ignored() -> None:
    a, b = pair()
    cid = a.send_call("m", MSGPACK.empty_array, MSGPACK.empty_map)
    [incoming] = deliver(a, b)
    assert isinstance(incoming, Call) and incoming.id == cid
    b.end_call(cid, Result(cid, MSGPACK.encode_raw(3)))
    [answer] = deliver(b, a)
    assert a.take_answer(cid) == answer
    assert a.calls_waiting == 0

    cid = a.send_call("m", MSGPACK.empty_array, MSGPACK.empty_map)
    deliver(a, b)
    assert a.take_answer(cid) is None  # gave up: the callee is told to stop
    assert deliver(a, b) == [Cancel(cid)]
    b.end_call(cid, Result(cid, MSGPACK.encode_raw(4)))  # cancelled: no answer goes out
    assert frames(b) == []
    assert receive(a, Result(cid, MSGPACK.encode_raw(4))) == []


def test_a_second_call_with_an_id_in_flight_is_a_fault_and_not_handled() -> None:
    _a, b = pair()
    assert receive(b, call(1)) == [call(1)]
    assert receive(b, call(1)) == []
    [fault] = frames(b)
    assert isinstance(fault, Fault) and "already in flight" in fault.message
    assert receive(b, Cancel(1)) == [Cancel(1)]
    assert receive(b, Cancel(1)) == []  # cancelled once is enough
    b.end_call(1, None)
    assert receive(b, Cancel(1)) == []  # finished: nothing to cancel
    assert receive(b, call(1)) == [call(1)]  # the id is free again


def test_close_fails_waiting_calls_and_suppresses_answers_to_the_peers_calls() -> None:
    a, b = pair()
    cid = a.send_call("m", MSGPACK.empty_array, MSGPACK.empty_map)
    deliver(a, b)
    closed = ConnectionClosed(1006, "lost")
    a.close(closed)
    b.close(closed)
    assert a.state is State.CLOSED and a.close_error is closed
    assert a.take_answer(cid) is closed
    assert frames(a) == []  # no Cancel once closed
    b.end_call(cid, Result(cid, MSGPACK.encode_raw(1)))
    assert frames(b) == []


def test_a_stream_argument_ending_before_it_is_opened_opens_ended_without_credit() -> None:
    _a, b = pair()
    assert receive(b, call(1, stream_args=[0]), StreamEnd(3)) == [call(1, stream_args=[0])]
    b.streams.open_incoming(3, identity)
    assert frames(b) == []  # nothing to grant: it ended
    with pytest.raises(Finished):
        b.streams.pop_item(3)

    receive(b, StreamError(5, 1234, "failed"))
    b.streams.open_incoming(5, identity)
    with pytest.raises(Exception, match="failed") as info:
        b.streams.pop_item(5)
    assert getattr(info.value, "code", None) == 1234


def test_data_before_the_first_credit_fails_the_stream_and_cancels_its_sender_once() -> None:
    _a, b = pair()
    receive(b, StreamData(3, MSGPACK.encode_raw(1)), StreamData(3, MSGPACK.encode_raw(2)))
    assert frames(b) == [StreamCancel(3)]
    b.streams.open_incoming(3, identity)
    assert frames(b) == []
    with pytest.raises(ProtocolViolation, match="before the first credit"):
        b.streams.pop_item(3)


def test_a_refused_stream_argument_is_cancelled_unless_it_already_ended() -> None:
    _a, b = pair()
    receive(b, StreamEnd(3))
    b.streams.refuse_incoming(3)
    b.streams.refuse_incoming(5)
    assert frames(b) == [StreamCancel(5)]
    # Refused ids are ended: a late frame for one is stale, not kept as early.
    receive(b, StreamEnd(5))
    b.streams.open_incoming(5, identity)
    [credit] = frames(b)
    assert isinstance(credit, Credit) and credit.stream_id == 5
    with pytest.raises(Empty):
        b.streams.pop_item(5)


def test_early_ends_are_kept_for_at_most_max_streams_ids() -> None:
    _a, b = pair(max_streams=2)
    receive(b, StreamEnd(1), StreamEnd(3), StreamEnd(5))
    [fault] = frames(b)
    assert isinstance(fault, Fault) and "before they were opened" in fault.message


def test_answers_in_flight_when_closing_are_errors_of_the_right_kind() -> None:
    a, b = pair()
    cid = a.send_call("m", MSGPACK.empty_array, MSGPACK.empty_map)
    deliver(a, b)
    b.end_call(cid, Error(cid, 3, "bad", None))
    [answer] = deliver(b, a)
    assert a.take_answer(cid) == answer
