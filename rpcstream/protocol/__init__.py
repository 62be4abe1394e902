"""Sans-I/O connection state: messages in, events and messages out. No anyio, no sockets.

Theory of operation
-------------------
A :class:`Protocol` is one side of one connection. The I/O layer (``rpcstream.peer``)
feeds it every received message with :meth:`Protocol.receive_message` and gets
back a list of *events*: the frames it must act on (a ``Call`` to handle, the
``Result`` a caller waits for, a ``Cancel`` for a running handler), plus
:class:`StreamReadable`, :class:`StreamWritable` and :class:`StreamCancelled` for
the streams whose state changed. Whatever the protocol wants to send (answers it
generates itself, such as ``Credit`` or ``Fault`` frames, and everything the I/O
layer queued) comes out of :meth:`Protocol.data_to_send` as whole messages.

One owner for each piece of state:

* :mod:`.connection` (:class:`Protocol`): the connection's :class:`State` and the
  calls in flight both ways; :meth:`Protocol.close` fails all of it at once;
* :mod:`.streams` (:class:`StreamTable`): every stream, its credit and its window;
* :mod:`.windows`: the round trip measured from credit, and when a window grows;
* :mod:`.outbox` (:class:`Outbox`): the frames queued to send, control ahead of data.

Ids. Call ids are per direction (an answer always refers to the receiver's own
call). Stream ids are shared by both directions, so the connecting side allocates
odd ids and the accepting side even ones, as in HTTP/2.

This package imports only the standard library, msgspec and rpcstream's
``errors`` and ``messages``: it is tested with plain synchronous calls. Its one
clock (``Protocol(clock=...)``, ``time.monotonic`` by default) times credit round
trips; tests pass one they move by hand.
"""

from .connection import Protocol
from .events import (
    Empty,
    Event,
    Finished,
    Side,
    State,
    StreamCancelled,
    StreamReadable,
    StreamWritable,
)
from .outbox import Outbox
from .streams import StreamTable
from .wire import MAX_CREDIT, encodable, shorten, wire_error

__all__ = [
    "MAX_CREDIT",
    "Empty",
    "Event",
    "Finished",
    "Outbox",
    "Protocol",
    "Side",
    "State",
    "StreamCancelled",
    "StreamReadable",
    "StreamTable",
    "StreamWritable",
    "encodable",
    "shorten",
    "wire_error",
]
