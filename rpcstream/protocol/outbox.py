"""The two outgoing queues of one connection, and the messages taken from them.

Control frames (calls, answers, credit, cancels) go ahead of stream data, so
bulk data never starves a call. ``StreamEnd``/``StreamError`` ride in the data
queue behind their stream's items, because they must not overtake them.
``queued_bytes`` counts what both queues hold: the I/O layer adds what the
transport holds and exposes the sum as ``buffered_amount``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import ErrorCode
from ..messages import (
    FRAME_OVERHEAD,
    Call,
    Codec,
    Fault,
    Frame,
    Notify,
    Result,
    StreamCall,
    StreamData,
)
from .wire import shorten

__all__ = ["Outbox"]


class Outbox:
    """Frames queued to send, batched into messages by :meth:`data_to_send`."""

    __slots__ = (
        "_control",
        "_data",
        "codec",
        "faults_sent",
        "max_message_bytes",
        "on_data",
        "queued_bytes",
    )

    def __init__(
        self, codec: Codec, max_message_bytes: int, on_data: Callable[[], None] | None
    ) -> None:
        self.codec = codec
        # A batch stops growing at this many payload bytes (a single larger
        # frame still goes out, alone).
        self.max_message_bytes = max_message_bytes
        # Called whenever a frame is queued, so the I/O layer can wake its writer.
        self.on_data = on_data or _nothing
        self._control: deque[Frame] = deque()
        self._data: deque[Frame] = deque()
        self.queued_bytes = 0
        self.faults_sent = 0

    def send(self, frame: Frame) -> None:
        """Queue a control frame: it goes ahead of stream data."""
        self._control.append(frame)
        self.queued_bytes += FRAME_OVERHEAD + _payload_size(frame)
        self.on_data()

    def send_data(self, frame: Frame, size: int) -> None:
        """Queue a stream frame (``StreamData``/``StreamEnd``/``StreamError``) in order
        behind its stream's earlier frames; ``size`` is its payload's length."""
        self._data.append(frame)
        self.queued_bytes += FRAME_OVERHEAD + size
        self.on_data()

    def fault(self, message: str) -> None:
        """Queue a ``Fault``: the peer sent something the protocol forbids."""
        self.faults_sent += 1
        self.send(Fault(ErrorCode.PROTOCOL_ERROR, shorten(message)))

    def has_data(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return bool(self._control or self._data)

    def frames_queued(self) -> int:
        """How many frames are queued (a burst's sender sends a piece at a time)."""
        return len(self._control) + len(self._data)

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

    def discard(self) -> None:
        """Drop every queued frame (the connection is being abandoned)."""
        self._control.clear()
        self._data.clear()
        self.queued_bytes = 0


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
