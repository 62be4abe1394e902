"""Sans-I/O connection state: messages in, events and messages out. No anyio, no sockets.

Theory of operation
-------------------
A :class:`Protocol` is one side of one connection. The I/O layer (``peer.py``)
feeds it every received message with :meth:`Protocol.receive_message` and gets
back a list of *events* (the frames it must act on, plus :class:`StreamReadable`,
:class:`StreamWritable` and :class:`StreamCancelled` for the streams whose state
changed). Whatever the protocol wants to send (answers it generates itself, such
as ``Credit`` or ``Fault`` frames, and everything the I/O layer queued with the
``send_*`` methods) comes out of :meth:`Protocol.data_to_send` as whole messages.

Streams and credit. A stream has one sender and one receiver. The receiver opens
it by granting credit (``Credit(items, bytes)``); the sender may send while it
holds at least one item and one byte of credit, and each ``StreamData`` costs one
item and its payload's length. So the receiver's buffer is bounded by its window
(plus one item), whatever the sender has to send. As the consumer takes items,
the receiver grants what was consumed back, once half a window has been consumed
(like HTTP/2's WINDOW_UPDATE, batched so credit frames stay rare).

Window growth. A small window caps a stream at one window per round trip, so
streams start at ``window_bytes`` and grow, as QUIC and HTTP/2 stacks auto-tune
theirs: a grant that half a window of *bytes* triggered (not half a window of
items), when the consumer found nothing waiting since the last grant (waiting
for the first items does not count), doubles the window, up to
``max_window_bytes``. A consumer that lags always has items
waiting, so its window never grows and the memory it can be made to hold stays
one window; streams of small items (tokens) fill the item window first and keep
theirs too. A sender that trickles large items to a waiting consumer does grow
its window, which costs memory only if that consumer later stops reading.
What streams grew is charged to one budget per connection,
``max_window_growth``, and given back when they close, so a connection's
receive buffers stay within ``max_streams * window_bytes + max_window_growth``.

Two outgoing queues. Control frames (calls, answers, credit, cancels) go ahead
of stream data, so bulk data never starves a call. ``StreamEnd``/``StreamError``
ride in the data queue behind their stream's items, because they must not
overtake them. ``queued_bytes`` counts what both queues hold: the I/O layer adds
what the transport holds and exposes the sum as ``buffered_amount``.

Ids. Call ids are per direction (an answer always refers to the receiver's own
call). Stream ids are shared by both directions, so the connecting side allocates
odd ids and the accepting side even ones, as in HTTP/2.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgspec

from .errors import (
    ErrorCode,
    InvalidParams,
    LocalProtocolError,
    Overloaded,
    ProtocolViolation,
    RemoteError,
)
from .messages import (
    FRAME_OVERHEAD,
    Call,
    Cancel,
    Codec,
    Credit,
    Error,
    Fault,
    Frame,
    Notify,
    Result,
    StreamCall,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
    StreamId,
)

__all__ = [
    "Event",
    "Protocol",
    "Side",
    "StreamCancelled",
    "StreamReadable",
    "StreamWritable",
]

MAX_CREDIT: Final = 2**31  # credit beyond this is a protocol violation (overflow guard)


class Side(enum.IntEnum):
    """Which end of the connection: it fixes the parity of the stream ids we allocate."""

    ACCEPTING = 0  # even stream ids
    CONNECTING = 1  # odd stream ids


class StreamReadable(NamedTuple):
    """Items, an end or an error arrived for an incoming stream whose buffer was empty."""

    stream_id: StreamId


class StreamWritable(NamedTuple):
    """Credit arrived for an outgoing stream that had none."""

    stream_id: StreamId


class StreamCancelled(NamedTuple):
    """The receiver of an outgoing stream stopped reading: close the sender's iterator."""

    stream_id: StreamId


Event = (
    Call
    | Notify
    | StreamCall
    | Result
    | Error
    | Cancel
    | Fault
    | StreamReadable
    | StreamWritable
    | StreamCancelled
)


class Empty(Exception):
    """:meth:`Protocol.pop_item` found no item yet; wait for :class:`StreamReadable`."""


class Finished(Exception):
    """:meth:`Protocol.pop_item` found the stream ended cleanly."""


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
        "regranted",
        "starved",
        "window_bytes",
        "window_items",
    )

    def __init__(self, decode: Callable[[Any], Any], window_items: int, window_bytes: int):
        self.decode = decode
        self.items: deque[tuple[Any, int]] = deque()
        self.window_items = window_items
        self.window_bytes = window_bytes
        self.credit_items = window_items
        self.credit_bytes = window_bytes
        self.consumed_items = 0
        self.consumed_bytes = 0
        self.starved = False  # the consumer found no item waiting since the last grant
        self.regranted = False  # a grant was made: waiting from now on counts as starving
        self.grown = 0  # bytes the window grew by, charged to the connection's budget
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


class Protocol:
    """The state of one side of an rpcstream connection (see the module docstring)."""

    def __init__(
        self,
        codec: Codec,
        side: Side,
        *,
        window_items: int = 256,
        window_bytes: int = 256 * 1024,
        max_streams: int = 4096,
        max_message_bytes: int = 256 * 1024,
        max_window_bytes: int = 4 * 1024 * 1024,
        max_window_growth: int = 16 * 1024 * 1024,
        on_data: Callable[[], None] | None = None,
    ) -> None:
        if window_items < 1 or window_bytes < 1:
            raise ValueError("stream windows must allow at least one item and one byte")
        if max_window_growth < 0:
            raise ValueError("max_window_growth must not be negative")
        self.codec = codec
        self.side = side
        self.window_items = window_items
        self.window_bytes = window_bytes
        self.max_streams = max_streams
        self.max_window_bytes = max_window_bytes
        self.window_growth_left = max_window_growth  # the connection's budget (see above)
        # A batch stops growing at this many payload bytes (a single larger
        # frame still goes out, alone).
        self.max_message_bytes = max_message_bytes
        self._next_call_id = 1
        self._next_stream_id = 2 if side is Side.ACCEPTING else 1
        self._incoming: dict[int, _Incoming] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        # Credit and cancels that arrive for a peer-allocated stream id before we
        # registered it as outgoing (the receiver allocated the id and told us by
        # a call). Bounded by max_streams.
        self._early: dict[int, _Outgoing] = {}
        # Peer-allocated ids of outgoing streams that ended, so that a Credit or
        # StreamCancel still in flight for one is not taken for an early one.
        self._ended: set[int] = set()
        self._ended_order: deque[int] = deque()
        self._control: deque[Frame] = deque()
        self._data: deque[Frame] = deque()
        self.queued_bytes = 0
        # Called whenever a frame is queued, so the I/O layer can wake its writer.
        self._on_data = on_data or _nothing
        self.faults_received = 0
        self.faults_sent = 0

    # -- ids -------------------------------------------------------------------------

    def next_call_id(self) -> int:
        """Allocate the id of a call we make."""
        cid = self._next_call_id
        self._next_call_id += 1
        return cid

    def next_stream_id(self) -> StreamId:
        """Allocate a stream id of our parity."""
        sid = self._next_stream_id
        self._next_stream_id += 2
        return StreamId(sid)

    @property
    def stream_count(self) -> int:
        """Streams open in either direction."""
        return len(self._incoming) + len(self._outgoing)

    # -- sending: control --------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Queue a control frame (calls, answers, cancels): it goes ahead of stream data."""
        self._control.append(frame)
        self.queued_bytes += FRAME_OVERHEAD + _payload_size(frame)
        self._on_data()

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
        ``max_streams``.
        """
        self._check_new(stream_id)
        st = _Incoming(
            decode,
            window_items or self.window_items,
            window_bytes or self.window_bytes,
        )
        self._incoming[stream_id] = st
        self.send(Credit(stream_id, st.window_items, st.window_bytes))

    def _check_new(self, stream_id: int) -> None:
        if stream_id <= 0 or stream_id in self._incoming or stream_id in self._outgoing:
            raise LocalProtocolError(f"stream id {stream_id} is invalid or already open")
        if self.stream_count >= self.max_streams:
            raise _overloaded_streams(self.max_streams)

    def is_ours(self, stream_id: int) -> bool:
        """Whether ``stream_id`` has our parity (we allocated it)."""
        return stream_id % 2 == self.side

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
                    grant = st.consumed_bytes
                    if st.starved and st.consumed_bytes * 2 >= st.window_bytes:
                        # Bytes, not items, filled the window, and the consumer
                        # waited for more: the window holds the stream back.
                        grant += self._grow(st)
                    st.starved = False
                    st.regranted = True
                    st.credit_items += st.consumed_items
                    st.credit_bytes += grant
                    self.send(Credit(stream_id, st.consumed_items, grant))
                    st.consumed_items = st.consumed_bytes = 0
            return item
        if st.done:
            if st.error is not None:
                raise st.error
            raise Finished
        st.starved = st.regranted  # waiting for the first items is no sign
        raise Empty

    def _grow(self, st: _Incoming) -> int:
        """Double a stream's byte window within both limits; return the growth."""
        extra = min(
            st.window_bytes, self.max_window_bytes - st.window_bytes, self.window_growth_left
        )
        if extra <= 0:
            return 0
        st.window_bytes += extra
        st.grown += extra
        self.window_growth_left -= extra
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
        self.window_growth_left += st.grown
        if not st.done:
            self.send(StreamCancel(stream_id))

    def _fail_incoming(self, stream_id: int, st: _Incoming, error: RemoteError) -> None:
        # Keep the items that arrived before the failure: they were sent before it.
        st.done = True
        st.error = error
        self.send(StreamCancel(stream_id))

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
        self._data.append(StreamData(stream_id, payload))
        self.queued_bytes += FRAME_OVERHEAD + size
        self._on_data()

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
        self._data.append(frame)
        self.queued_bytes += FRAME_OVERHEAD
        self._on_data()

    # -- receiving ---------------------------------------------------------------------

    def receive_message(self, data: bytes | str) -> list[Event]:
        """Process one received message; return the events the I/O layer must act on."""
        try:
            frames = self.codec.decode_batch(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            # RecursionError: msgspec refuses nesting deeper than the C stack allows.
            self._fault(f"undecodable message: {exc}")
            return []
        events: list[Event] = []
        for frame in frames:
            if type(frame) is StreamData:  # the hot path first
                self._receive_data(frame, events)
            else:
                self._receive_other(frame, events)
        return events

    def _receive_data(self, frame: StreamData, events: list[Event]) -> None:
        sid = frame.stream_id
        st = self._incoming.get(sid)
        if st is None:
            # Data for a stream we closed (it was in flight) or never opened:
            # tell the sender to stop, and drop the item.
            self.send(StreamCancel(sid))
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

    def _receive_other(self, frame: Frame, events: list[Event]) -> None:
        t = type(frame)
        if t is StreamEnd or t is StreamError:
            sid = frame.stream_id  # type: ignore[union-attr]
            st = self._incoming.get(sid)
            if st is None or st.done:
                return
            st.done = True
            if t is StreamError:
                assert isinstance(frame, StreamError)
                st.error = RemoteError.from_wire(frame.code, frame.message, frame.data)
            events.append(StreamReadable(StreamId(sid)))
        elif t is Credit:
            assert isinstance(frame, Credit)
            self._receive_credit(frame, events)
        elif t is StreamCancel:
            assert isinstance(frame, StreamCancel)
            sid = frame.stream_id
            out = self._outgoing.get(sid) or self._early_outgoing(sid)
            if out is not None and not out.cancelled:
                out.cancelled = True
                events.append(StreamCancelled(StreamId(sid)))
        elif t is StreamCall:
            assert isinstance(frame, StreamCall)
            sid = frame.stream_id
            # The caller allocates the id of the stream it will receive.
            if self.is_ours(sid) or sid in self._outgoing or sid in self._incoming or sid <= 0:
                self._fault(f"StreamCall with a stream id of the wrong side or in use: {sid}")
                return
            if self.stream_count >= self.max_streams:
                self._outgoing[sid] = _Outgoing()
                self.end_outgoing(sid, _overloaded_streams(self.max_streams))
                return
            self._outgoing[sid] = self._take_early(sid)
            events.append(frame)
        elif t is Fault:
            self.faults_received += 1
            events.append(frame)  # type: ignore[arg-type]
        else:
            events.append(frame)  # type: ignore[arg-type]

    def _receive_credit(self, frame: Credit, events: list[Event]) -> None:
        sid = frame.stream_id
        if frame.items < 0 or frame.bytes < 0:
            self._fault(f"negative credit for stream {sid}")
            return
        st = self._outgoing.get(sid) or self._early_outgoing(sid)
        if st is None:
            return  # a stream that already finished: late credit is harmless
        was_blocked = st.credit_items <= 0 or st.credit_bytes <= 0
        st.credit_items += frame.items
        st.credit_bytes += frame.bytes
        if st.credit_items > MAX_CREDIT or st.credit_bytes > MAX_CREDIT:
            self._fault(f"credit overflow for stream {sid}")
            st.credit_items = min(st.credit_items, MAX_CREDIT)
            st.credit_bytes = min(st.credit_bytes, MAX_CREDIT)
        if was_blocked and st.credit_items > 0 and st.credit_bytes > 0 and sid in self._outgoing:
            events.append(StreamWritable(StreamId(sid)))

    def _remember_ended(self, sid: int) -> None:
        self._ended.add(sid)
        self._ended_order.append(sid)
        if len(self._ended_order) > self.max_streams:
            self._ended.discard(self._ended_order.popleft())

    def _take_early(self, sid: int) -> _Outgoing:
        st = self._early.pop(sid, None)
        return _Outgoing() if st is None else st

    def _early_outgoing(self, sid: int) -> _Outgoing | None:
        # Only the peer's own ids can be announced before we register them; a
        # frame for one that already ended was simply in flight.
        if self.is_ours(sid) or sid <= 0 or sid in self._ended:
            return None
        st = self._early.get(sid)
        if st is None:
            if len(self._early) >= self.max_streams:
                self._fault("too many streams announced but never opened")
                return None
            st = self._early[sid] = _Outgoing()
        return st

    def _fault(self, message: str) -> None:
        self.faults_sent += 1
        self.send(Fault(ErrorCode.PROTOCOL_ERROR, shorten(message)))

    # -- output ------------------------------------------------------------------------

    def has_data(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return bool(self._control or self._data)

    def data_to_send(self) -> bytes | None:
        """Take the next message to send: every queued control frame, then stream data
        up to ``max_message_bytes``. ``None`` when nothing is queued."""
        control, data = self._control, self._data
        if not control and not data:
            return None
        batch: list[Frame] = list(control)
        size = sum(FRAME_OVERHEAD + _payload_size(f) for f in control) if control else 0
        control.clear()
        limit = self.max_message_bytes
        while data and size < limit:
            frame = data.popleft()
            if type(frame) is StreamData:
                size += FRAME_OVERHEAD + len(frame.payload)
            else:
                size += FRAME_OVERHEAD
            batch.append(frame)
        self.queued_bytes -= size
        return self.codec.encode_batch(batch)

    def discard_queued(self) -> None:
        """Drop every queued frame (the connection is being abandoned)."""
        self._control.clear()
        self._data.clear()
        self.queued_bytes = 0

    def cancel_all_outgoing(self) -> None:
        """Mark every outgoing stream cancelled (the connection closed)."""
        for st in self._outgoing.values():
            st.cancelled = True

    def fail_all_incoming(self, error: BaseException) -> None:
        """Fail every incoming stream that has not ended (the connection closed)."""
        for st in self._incoming.values():
            if not st.done:
                st.done = True
                st.error = error


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: peer-supplied text in our own
    messages and logs must not let a peer make them arbitrarily large."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _nothing() -> None:
    pass


def _payload_size(frame: Frame) -> int:
    t = type(frame)
    if t is Call or t is Notify or t is StreamCall:
        return len(frame.args) + len(frame.kwargs)  # type: ignore[union-attr]
    if t is Result:
        return len(frame.value)  # type: ignore[union-attr]
    if t is StreamData:
        return len(frame.payload)  # type: ignore[union-attr]
    return 0


def wire_error(codec: Codec, error: RemoteError) -> tuple[int, str, Any]:
    """``error``'s code, message and data in a form every codec can encode: an
    error from a handler must never make a whole batch unencodable (and so end
    the connection). A lone surrogate (``os.fsdecode`` of a bad file name) is
    escaped; a code outside 64 bits becomes ``internal_error``."""
    code = error.code if -(2**63) <= error.code < 2**64 else int(ErrorCode.INTERNAL_ERROR)
    message = error.message
    if not message.isascii():
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return code, message, encodable(codec, error.data)


def encodable(codec: Codec, data: Any) -> Any:
    """``data`` if the codec can encode it, else ``None``: error details must never
    make a whole batch unencodable."""
    if data is None:
        return None
    try:
        codec.encode(data)
    except (TypeError, ValueError, OverflowError):
        return None
    return data


def _overloaded_streams(limit: int) -> RemoteError:
    return Overloaded(f"too many open streams on this connection (max_streams={limit})")
