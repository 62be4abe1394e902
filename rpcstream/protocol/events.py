"""What :meth:`Protocol.receive_message` hands the I/O layer, besides frames.

Frames that need action come out as themselves: ``Call``, ``Notify`` and
``StreamCall`` (run a handler), ``Result``/``Error`` (only for a call of ours
still waiting), ``Cancel`` (only for a call of the peer's still running) and
``Fault`` (log it). Stream state changes come out as the small types below.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from ..messages import Call, Cancel, Error, Fault, Notify, Result, StreamCall, StreamId

__all__ = [
    "Empty",
    "Event",
    "Finished",
    "Side",
    "State",
    "StreamCancelled",
    "StreamReadable",
    "StreamWritable",
]


class Side(enum.IntEnum):
    """Which end of the connection: it fixes the parity of the stream ids we allocate."""

    ACCEPTING = 0  # even stream ids
    CONNECTING = 1  # odd stream ids


class State(enum.Enum):
    """The connection's state, as the protocol sees it: open, or closed for good."""

    OPEN = "open"
    CLOSED = "closed"


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
    """:meth:`StreamTable.pop_item` found no item yet; wait for :class:`StreamReadable`."""


class Finished(Exception):
    """:meth:`StreamTable.pop_item` found the stream ended cleanly."""
