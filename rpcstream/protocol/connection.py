"""The Sans-I/O connection: every id table of one side of one connection.

A :class:`Protocol` owns the connection's :class:`State`, the calls in flight
both ways (ours waiting for an answer, the peer's being handled), the
:class:`~rpcstream.protocol.streams.StreamTable` and the
:class:`~rpcstream.protocol.outbox.Outbox`. It checks every frame against those
tables before the I/O layer sees it, so the I/O layer never has to: an answer
for a call nobody waits for, a ``Cancel`` for a call that finished, a second
``Call`` with an id still in flight, are settled here. :meth:`close` fails all
of it in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from ..messages import (
    Call,
    Cancel,
    Codec,
    Credit,
    Error,
    Fault,
    Frame,
    Result,
    StreamCall,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
)
from .events import Event, Side, State
from .outbox import Outbox
from .streams import StreamTable

__all__ = ["Protocol"]


class Protocol:
    """The state of one side of an rpcstream connection (see the package docstring)."""

    def __init__(
        self,
        codec: Codec,
        side: Side,
        *,
        window_items: int = 256,
        window_bytes: int = 256 * 1024,
        max_streams: int = 4096,
        max_message_bytes: int = 256 * 1024,
        max_window_bytes: int = 16 * 1024 * 1024,
        max_window_items: int = 16384,
        max_receive_buffer: int = 32 * 1024 * 1024,
        on_data: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.codec = codec
        self.side = side
        self.outbox = Outbox(codec, max_message_bytes, on_data)
        self.streams = StreamTable(
            codec,
            side,
            self.outbox,
            window_items=window_items,
            window_bytes=window_bytes,
            max_streams=max_streams,
            max_window_bytes=max_window_bytes,
            max_window_items=max_window_items,
            max_receive_buffer=max_receive_buffer,
            clock=clock,
        )
        self.state = State.OPEN
        self.close_error: BaseException | None = None
        """Why the connection closed (what :meth:`close` was given)."""
        self._next_call_id = 1
        # Our calls still waiting: id -> the answer once it came (None until then).
        self._calls_out: dict[int, Result | Error | BaseException | None] = {}
        # The peer's calls being handled: id -> whether the peer cancelled it.
        self._calls_in: dict[int, bool] = {}
        self.faults_received = 0

    @property
    def queued_bytes(self) -> int:
        """Bytes queued in the outbox, not yet taken by :meth:`data_to_send`."""
        return self.outbox.queued_bytes

    @property
    def faults_sent(self) -> int:
        """How many ``Fault`` frames this side queued."""
        return self.outbox.faults_sent

    def send(self, frame: Frame) -> None:
        """Queue a frame that belongs to no table (``Notify``, ``StreamCall``)."""
        self.outbox.send(frame)

    # -- our calls ---------------------------------------------------------------------

    def send_call(
        self,
        method: str,
        args: msgspec.Raw,
        kwargs: msgspec.Raw,
        timeout: float | None = None,
        stream_args: list[int | str] | None = None,
        meta: dict[str, str] | None = None,  # observe: trace context
    ) -> int:
        """Queue a ``Call`` and register it as waiting; return its id."""
        cid = self._next_call_id
        self._next_call_id += 1
        self._calls_out[cid] = None
        self.outbox.send(Call(cid, method, args, kwargs, timeout, stream_args or [], meta))
        return cid

    def take_answer(self, call_id: int) -> Result | Error | BaseException | None:
        """Forget call ``call_id`` and return its answer: a ``Result`` or ``Error``, the
        connection's close error if it closed first, or ``None`` if none came yet,
        in which case the callee is told to stop (``Cancel``)."""
        answer = self._calls_out.pop(call_id, None)
        if answer is None and self.state is State.OPEN:
            self.outbox.send(Cancel(call_id))
        return answer

    @property
    def calls_waiting(self) -> int:
        """Our calls still waiting for an answer."""
        return len(self._calls_out)

    # -- the peer's calls --------------------------------------------------------------

    def end_call(self, call_id: int, answer: Result | Error | None) -> None:
        """The handler of the peer's call ``call_id`` finished: queue its answer,
        unless the call was cancelled or the connection closed (then no answer is
        due), and forget it."""
        cancelled = self._calls_in.pop(call_id, True)
        if answer is not None and not cancelled and self.state is State.OPEN:
            self.outbox.send(answer)

    # -- receiving ---------------------------------------------------------------------

    def receive_message(self, data: bytes | str) -> list[Event]:
        """Process one received message; return the events the I/O layer must act on."""
        try:
            frames = self.codec.decode_batch(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            # RecursionError: msgspec refuses nesting deeper than the C stack allows.
            self.outbox.fault(f"undecodable message: {exc}")
            return []
        events: list[Event] = []
        streams = self.streams
        for frame in frames:
            if type(frame) is StreamData:  # the hot path first
                streams.receive_data(frame, events)
            else:
                self._receive_other(frame, events)
        return events

    def _receive_other(self, frame: Frame, events: list[Event]) -> None:
        t = type(frame)
        if t is Call:
            cid = frame.id  # type: ignore[union-attr]
            if cid in self._calls_in:
                # Two handlers for one id would share its answer and its Cancel.
                self.outbox.fault(f"Call id {cid} is already in flight")
                return
            self._calls_in[cid] = False
            events.append(frame)  # type: ignore[arg-type]
        elif t is Result or t is Error:
            cid = frame.id  # type: ignore[union-attr]
            if cid in self._calls_out and self._calls_out[cid] is None:
                self._calls_out[cid] = frame  # type: ignore[assignment]
                events.append(frame)  # type: ignore[arg-type]
            # else: an answer to a call we gave up on, which crossed our Cancel
        elif t is StreamEnd or t is StreamError:
            self.streams.receive_end(frame, events)  # type: ignore[arg-type]
        elif t is Credit:
            self.streams.receive_credit(frame, events)  # type: ignore[arg-type]
        elif t is StreamCancel:
            self.streams.receive_cancel(frame, events)  # type: ignore[arg-type]
        elif t is StreamCall:
            self.streams.receive_stream_call(frame, events)  # type: ignore[arg-type]
        elif t is Cancel:
            cid = frame.id  # type: ignore[union-attr]
            if self._calls_in.get(cid) is False:  # in flight and not cancelled yet
                self._calls_in[cid] = True
                events.append(frame)  # type: ignore[arg-type]
        elif t is Fault:
            self.faults_received += 1
            events.append(frame)  # type: ignore[arg-type]
        else:  # Notify
            events.append(frame)  # type: ignore[arg-type]

    # -- output ------------------------------------------------------------------------

    def has_data(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return self.outbox.has_data()

    def data_to_send(self) -> bytes | None:
        """Take the next message to send (see :meth:`Outbox.data_to_send`)."""
        return self.outbox.data_to_send()

    # -- closing -----------------------------------------------------------------------

    def close(self, error: BaseException) -> None:
        """The connection closed (``error`` says how): every call of ours still
        waiting gets ``error`` as its answer, the peer's calls are due no answer,
        incoming streams fail with ``error`` and outgoing ones stop. Idempotent."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_error = error
        for cid, answer in self._calls_out.items():
            if answer is None:
                self._calls_out[cid] = error
        for cid in self._calls_in:
            self._calls_in[cid] = True
        self.streams.close(error)
