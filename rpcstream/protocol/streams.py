"""Every stream of one connection, both directions: ids, buffers, credit and windows.

Streams and credit. A stream has one sender and one receiver. The receiver opens
it by granting credit (``Credit(items, bytes)``); the sender may send while it
holds at least one item and one byte of credit, and each ``StreamData`` costs one
item and its payload's length. So the receiver's buffer is bounded by its window
(plus one item), whatever the sender has to send. As the consumer takes items,
the receiver grants what was consumed back, once half a window has been consumed
(like HTTP/2's WINDOW_UPDATE, batched so credit frames stay rare).

Window growth. A small window caps a stream at one window per round trip, so
windows grow while the window is what holds a stream back, never for a consumer
that lags: :mod:`.windows` says when and by how much, from a round trip it
measures on the connection's credit.

The receive budget. Every byte window draws from one budget per connection,
``max_receive_buffer``, so whatever the number of streams, the bytes granted
and buffered stay within it (a peer that sends beyond its credit has that
stream failed instead; the one exception the rules allow is a single item
larger than the credit left, which is what a window smaller than an item
needs). Each possible stream (``max_streams``) has a floor reserved for it, at
most half the budget, so a new stream always gets a window and a stream never
waits for another to be read; what a window holds above its floor comes from
the other half, the pool, and goes back to it when the stream closes. A stream
that opened while the pool ran low starts at its floor and grows back toward
its own window as its grants come and the pool allows.

Early frames. An id the *peer* allocates can carry frames before we register
it: credit and cancels for a stream we will send (the receiver allocated the id
and told us by a call), and the end of a stream argument we will receive
(``StreamEnd``/``StreamError`` need no credit, so an empty stream argument may
end in the very message that carries its call). Both are kept, each for at
most ``max_streams`` ids, until the stream is registered or refused. Data
before the first credit breaks the rules: that stream fails with
``PROTOCOL_ERROR`` when it is opened.

Ids. Stream ids are shared by both directions, so the connecting side allocates
odd ids and the accepting side even ones, as in HTTP/2.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import InvalidParams, LocalProtocolError, ProtocolViolation, RemoteError
from ..messages import (
    Codec,
    Credit,
    Frame,
    StreamCall,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
    StreamId,
)
from .events import (
    Empty,
    Event,
    Finished,
    Side,
    StreamCancelled,
    StreamReadable,
    StreamWritable,
)
from .outbox import Outbox
from .windows import Pace, RoundTrip, grown, shrunk
from .wire import MAX_CREDIT, overloaded_streams, wire_error

__all__ = ["StreamTable"]


class _Incoming:
    """A stream we receive: its buffer and the credit we granted."""

    __slots__ = (
        "consumed_bytes",
        "consumed_items",
        "credit_bytes",
        "credit_items",
        "decode",
        "done",
        "error",
        "grown",
        "items",
        "pace",
        "wanted_bytes",
        "window_bytes",
        "window_items",
    )

    def __init__(self, decode: Callable[[Any], Any], window_items: int, window_bytes: int):
        self.decode = decode
        self.pace = Pace()  # how its items come, for its windows' growth
        self.wanted_bytes = window_bytes  # its own window, which the budget may cut
        self.items: deque[tuple[Any, int]] = deque()
        self.window_items = window_items
        self.window_bytes = window_bytes
        self.credit_items = window_items
        self.credit_bytes = window_bytes
        self.consumed_items = 0
        self.consumed_bytes = 0
        self.grown = 0  # bytes of window above the floor, drawn from the connection's pool
        self.done = False  # no more frames will be accepted
        # A RemoteError from the sender, or ConnectionClosed from the I/O layer.
        self.error: BaseException | None = None


class _Outgoing:
    """A stream we send: the credit the receiver granted us."""

    __slots__ = ("cancelled", "credit_bytes", "credit_items", "finished")

    def __init__(self) -> None:
        self.credit_items = 0
        self.credit_bytes = 0
        self.cancelled = False
        self.finished = False


class StreamTable:
    """The streams of one connection (see the module docstring).

    Frames it answers by itself (``Credit``, ``StreamCancel``, ``Fault``) and the
    stream frames it is asked to send go to the connection's :class:`Outbox`.
    """

    def __init__(
        self,
        codec: Codec,
        side: Side,
        outbox: Outbox,
        *,
        window_items: int,
        window_bytes: int,
        max_streams: int,
        max_window_bytes: int,
        max_window_items: int,
        max_receive_buffer: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_items < 1 or window_bytes < 1:
            raise ValueError("stream windows must allow at least one item and one byte")
        if max_receive_buffer < 2 * max_streams:
            raise ValueError("max_receive_buffer must allow two bytes per stream (max_streams)")
        self.codec = codec
        self.side = side
        self.outbox = outbox
        self.window_items = window_items
        self.window_bytes = window_bytes
        self.max_streams = max_streams
        self.max_window_bytes = max_window_bytes
        self.max_window_items = max_window_items
        self.clock = clock  # read at grants and waits only: tests move it by hand
        self.rtt = RoundTrip()
        # The receive budget (see above): a floor for each possible stream, the
        # rest a pool that windows above their floors draw from.
        self.floor_bytes = max(1, min(window_bytes, max_receive_buffer // (2 * max_streams)))
        self.pool_left = max_receive_buffer - self.floor_bytes * max_streams
        self._next_id = 2 if side is Side.ACCEPTING else 1
        self._incoming: dict[int, _Incoming] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        # Early frames for peer-allocated ids we have not registered yet (see the
        # module docstring): credit and cancels for streams we will send, and how
        # streams we will receive ended (None: cleanly). Each bounded by max_streams.
        self._early_out: dict[int, _Outgoing] = {}
        self._early_in: dict[int, BaseException | None] = {}
        # Peer-allocated ids of streams that ended, so that a frame still in flight
        # for one is not taken for an early one.
        self._ended: set[int] = set()
        self._ended_order: deque[int] = deque()

    # -- ids ---------------------------------------------------------------------------

    def next_stream_id(self) -> StreamId:
        """Allocate a stream id of our parity."""
        sid = self._next_id
        self._next_id += 2
        return StreamId(sid)

    def is_ours(self, stream_id: int) -> bool:
        """Whether ``stream_id`` has our parity (we allocated it)."""
        return stream_id % 2 == self.side

    @property
    def count(self) -> int:
        """Streams open in either direction."""
        return len(self._incoming) + len(self._outgoing)

    def _check_new(self, stream_id: int) -> None:
        if stream_id <= 0 or stream_id in self._incoming or stream_id in self._outgoing:
            raise LocalProtocolError(f"stream id {stream_id} is invalid or already open")
        if self.count >= self.max_streams:
            raise overloaded_streams(self.max_streams)

    def _remember_ended(self, sid: int) -> None:
        if sid in self._ended:
            return
        self._ended.add(sid)
        self._ended_order.append(sid)
        if len(self._ended_order) > self.max_streams:
            self._ended.discard(self._ended_order.popleft())

    def _may_come_early(self, sid: int) -> bool:
        # Only the peer's own ids can carry frames before we register them; a
        # frame for one that already ended was simply in flight.
        return (
            sid > 0
            and not self.is_ours(sid)
            and sid not in self._ended
            and sid not in self._outgoing
        )

    # -- incoming streams --------------------------------------------------------------

    def open_incoming(
        self,
        stream_id: int,
        decode: Callable[[Any], Any],
        *,
        window_items: int | None = None,
        window_bytes: int | None = None,
    ) -> None:
        """Register a stream we receive and grant its first credit.

        ``decode`` converts each payload (``msgspec.Raw``) to an item. Raises
        :class:`LocalProtocolError` for an id in use, :class:`Overloaded` beyond
        ``max_streams``. A stream that ended before it was opened (see the module
        docstring) is registered ended, with no credit to grant.
        """
        self._check_new(stream_id)
        wanted = window_bytes or self.window_bytes
        st = _Incoming(decode, window_items or self.window_items, min(wanted, self.floor_bytes))
        st.wanted_bytes = wanted
        self._draw(st, wanted - st.window_bytes)
        st.credit_bytes = st.window_bytes
        self._incoming[stream_id] = st
        if stream_id in self._early_in:
            st.done = True
            st.error = self._early_in.pop(stream_id)
            return
        st.pace.granted_at = self.clock()
        self.outbox.send(Credit(stream_id, st.window_items, st.window_bytes))

    def refuse_incoming(self, stream_id: int) -> None:
        """A call ended without opening its stream argument ``stream_id``: tell the
        sender to stop, unless that stream already ended, and forget it."""
        if stream_id <= 0 or self.is_ours(stream_id) or stream_id in self._incoming:
            return
        ended = stream_id in self._early_in
        self._early_in.pop(stream_id, None)
        self._remember_ended(stream_id)
        if not ended:
            self.outbox.send(StreamCancel(stream_id))

    def pop_item(self, stream_id: int) -> Any:
        """Take the next item of an incoming stream.

        Raises :class:`Empty` when none is buffered yet, :class:`Finished` when the
        stream ended, or the stream's :class:`RemoteError`.
        """
        st = self._incoming[stream_id]
        if st.items:
            item, size = st.items.popleft()
            if not st.done:
                st.consumed_items += 1
                st.consumed_bytes += size
                if (
                    st.consumed_items * 2 >= st.window_items
                    or st.consumed_bytes * 2 >= st.window_bytes
                ):
                    self._grant(stream_id, st)
            return item
        if st.done:
            if st.error is not None:
                raise st.error
            raise Finished
        st.pace.waiting(self.clock())
        raise Empty

    def _grant(self, stream_id: int, st: _Incoming) -> None:
        """Grant back what the consumer took; grow the windows that hold it back."""
        grant, grant_items, now = st.consumed_bytes, st.consumed_items, self.clock()
        per_rtt = st.pace.growth(now, self.rtt.seconds)
        if per_rtt is not None:  # the window holds the stream back: it grows
            if st.consumed_bytes * 2 >= st.window_bytes:
                want = grown(st.window_bytes, st.consumed_bytes, per_rtt, self.max_window_bytes)
                grant += self._draw(st, want - st.window_bytes)
            if st.consumed_items * 2 >= st.window_items:
                want = grown(st.window_items, st.consumed_items, per_rtt, self.max_window_items)
                grant_items += want - st.window_items
                st.window_items = want
        if st.window_bytes < st.wanted_bytes:  # cut by the budget: grow back
            grant += self._draw(st, st.wanted_bytes - st.window_bytes)
        elif st.pace.lags(now, self.rtt.seconds):  # a consumer that lags: narrow it back
            grant += self._draw(st, -shrunk(st.window_bytes, st.wanted_bytes, grant))
        st.pace.granted(now, st.credit_bytes, st.credit_items)
        st.credit_items += grant_items
        st.credit_bytes += grant
        self.outbox.send(Credit(stream_id, grant_items, grant))
        st.consumed_items = st.consumed_bytes = 0

    def _draw(self, st: _Incoming, want: int) -> int:
        """Widen a stream's byte window by up to ``want`` bytes from the pool
        (narrow it if negative); return by how much."""
        extra = min(want, self.pool_left)  # negative: narrow it, back to the pool
        st.window_bytes += extra
        st.grown += extra
        self.pool_left -= extra
        return extra

    def window_bytes_of(self, stream_id: int) -> int:
        """The byte window an incoming stream has now (it may have grown)."""
        return self._incoming[stream_id].window_bytes

    def buffered_items(self, stream_id: int) -> int:
        """How many items an incoming stream holds, not yet taken."""
        return len(self._incoming[stream_id].items)

    def close_incoming(self, stream_id: int) -> None:
        """Forget an incoming stream; if its sender may still send, tell it to stop."""
        st = self._incoming.pop(stream_id, None)
        if st is None:
            return
        self.pool_left += st.grown
        if not self.is_ours(stream_id):
            self._remember_ended(stream_id)
        if not st.done:
            self.outbox.send(StreamCancel(stream_id))

    def _fail_incoming(self, stream_id: int, st: _Incoming, error: RemoteError) -> None:
        # Keep the items that arrived before the failure: they were sent before it.
        st.done = True
        st.error = error
        self.outbox.send(StreamCancel(stream_id))

    # -- outgoing streams --------------------------------------------------------------

    def open_outgoing(self, stream_id: int) -> None:
        """Register a stream we send. Nothing may be sent on it before its first credit."""
        self._check_new(stream_id)
        self._outgoing[stream_id] = self._take_early(stream_id)

    def can_send(self, stream_id: int) -> bool:
        """Whether the receiver's credit allows one more item now."""
        st = self._outgoing[stream_id]
        return st.credit_items > 0 and st.credit_bytes > 0 and not st.cancelled

    def is_cancelled(self, stream_id: int) -> bool:
        """Whether the receiver stopped the stream (or it is gone)."""
        st = self._outgoing.get(stream_id)
        return st is None or st.cancelled

    def send_item(self, stream_id: int, payload: msgspec.Raw) -> None:
        """Queue one item of an outgoing stream; requires :meth:`can_send`."""
        st = self._outgoing[stream_id]
        if st.credit_items <= 0 or st.credit_bytes <= 0 or st.cancelled or st.finished:
            raise LocalProtocolError(f"stream {stream_id} has no credit")
        size = len(payload)
        st.credit_items -= 1
        st.credit_bytes -= size
        self.outbox.send_data(StreamData(stream_id, payload), size)

    def end_outgoing(self, stream_id: int, error: RemoteError | None = None) -> None:
        """Finish an outgoing stream, cleanly or with ``error``, and forget it.

        Nothing is sent when the receiver already cancelled the stream.
        """
        st = self._outgoing.pop(stream_id, None)
        if st is not None and not self.is_ours(stream_id):
            self._remember_ended(stream_id)
        if st is None or st.cancelled or st.finished:
            return
        st.finished = True
        if error is None:
            frame: Frame = StreamEnd(stream_id)
        else:
            frame = StreamError(stream_id, *wire_error(self.codec, error))
        self.outbox.send_data(frame, 0)

    def _take_early(self, sid: int) -> _Outgoing:
        st = self._early_out.pop(sid, None)
        return _Outgoing() if st is None else st

    def _early_outgoing(self, sid: int) -> _Outgoing | None:
        if not self._may_come_early(sid):
            return None
        st = self._early_out.get(sid)
        if st is None:
            if len(self._early_out) >= self.max_streams:
                self.outbox.fault("too many streams announced but never opened")
                return None
            st = self._early_out[sid] = _Outgoing()
        return st

    # -- receiving ---------------------------------------------------------------------

    def receive_data(self, frame: StreamData, events: list[Event]) -> None:
        """A ``StreamData`` arrived (the hot path)."""
        sid = frame.stream_id
        st = self._incoming.get(sid)
        if st is None:
            self._receive_data_unopened(sid)
            return
        if st.done:
            return
        payload = frame.payload
        size = len(payload)
        if st.credit_items <= 0 or st.credit_bytes <= 0:
            self._fail_incoming(
                sid, st, ProtocolViolation(f"stream {sid}: data sent beyond the credit granted")
            )
            events.append(StreamReadable(StreamId(sid)))
            return
        if st.pace.probe_at is not None:  # a grant is being timed
            st.pace.arrived(self.clock(), size, self.rtt)
        st.credit_items -= 1
        st.credit_bytes -= size
        try:
            item = st.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._fail_incoming(sid, st, InvalidParams(f"stream {sid}: {exc}"))
            events.append(StreamReadable(StreamId(sid)))
            return
        st.items.append((item, size))
        if len(st.items) == 1:
            events.append(StreamReadable(StreamId(sid)))
            st.pace.came(self.clock)

    def _receive_data_unopened(self, sid: int) -> None:
        if sid in self._early_in:
            return  # it already ended or failed: later frames are ignored
        if self._may_come_early(sid):
            # Data before the first credit: the sender broke the rules, and the
            # stream fails with PROTOCOL_ERROR once it is opened (docs/protocol.md 7.6).
            error = ProtocolViolation(f"stream {sid}: data sent before the first credit")
            if not self._keep_early_end(sid, error):
                return
        # Otherwise data for a stream we closed (it was in flight): tell the
        # sender to stop, and drop the item.
        self.outbox.send(StreamCancel(sid))

    def _keep_early_end(self, sid: int, error: BaseException | None) -> bool:
        if len(self._early_in) >= self.max_streams:
            self.outbox.fault("too many streams ended before they were opened")
            return False
        self._early_in[sid] = error
        return True

    def receive_end(self, frame: StreamEnd | StreamError, events: list[Event]) -> None:
        """A ``StreamEnd`` or ``StreamError`` arrived."""
        sid = frame.stream_id
        error = None
        if type(frame) is StreamError:
            error = RemoteError.from_wire(frame.code, frame.message, frame.data)
        st = self._incoming.get(sid)
        if st is None:
            if sid not in self._early_in and self._may_come_early(sid):
                self._keep_early_end(sid, error)
            return
        if st.done:
            return
        st.done = True
        st.error = error
        events.append(StreamReadable(StreamId(sid)))

    def receive_credit(self, frame: Credit, events: list[Event]) -> None:
        """A ``Credit`` arrived for a stream we send (or will)."""
        sid = frame.stream_id
        if frame.items < 0 or frame.bytes < 0:
            self.outbox.fault(f"negative credit for stream {sid}")
            return
        st = self._outgoing.get(sid) or self._early_outgoing(sid)
        if st is None:
            return  # a stream that already finished: late credit is harmless
        was_blocked = st.credit_items <= 0 or st.credit_bytes <= 0
        st.credit_items += frame.items
        st.credit_bytes += frame.bytes
        if st.credit_items > MAX_CREDIT or st.credit_bytes > MAX_CREDIT:
            self.outbox.fault(f"outstanding credit for stream {sid} beyond 2**31")
            st.credit_items = min(st.credit_items, MAX_CREDIT)
            st.credit_bytes = min(st.credit_bytes, MAX_CREDIT)
        if was_blocked and st.credit_items > 0 and st.credit_bytes > 0 and sid in self._outgoing:
            events.append(StreamWritable(StreamId(sid)))

    def receive_cancel(self, frame: StreamCancel, events: list[Event]) -> None:
        """A ``StreamCancel`` arrived: the receiver of a stream we send stopped reading."""
        sid = frame.stream_id
        out = self._outgoing.get(sid) or self._early_outgoing(sid)
        if out is not None and not out.cancelled:
            out.cancelled = True
            events.append(StreamCancelled(StreamId(sid)))

    def receive_stream_call(self, frame: StreamCall, events: list[Event]) -> None:
        """A ``StreamCall`` arrived: register the stream we will send its items on."""
        sid = frame.stream_id
        # The caller allocates the id of the stream it will receive.
        if self.is_ours(sid) or sid in self._outgoing or sid in self._incoming or sid <= 0:
            self.outbox.fault(f"StreamCall with a stream id of the wrong side or in use: {sid}")
            return
        if self.count >= self.max_streams:
            self._outgoing[sid] = _Outgoing()
            self.end_outgoing(sid, overloaded_streams(self.max_streams))
            return
        self._outgoing[sid] = self._take_early(sid)
        events.append(frame)

    # -- closing -----------------------------------------------------------------------

    def close(self, error: BaseException) -> None:
        """The connection closed: fail every incoming stream that has not ended with
        ``error``, mark every outgoing one cancelled, forget early frames."""
        for st in self._incoming.values():
            if not st.done:
                st.done = True
                st.error = error
        for out in self._outgoing.values():
            out.cancelled = True
        self._early_in.clear()
        self._early_out.clear()
