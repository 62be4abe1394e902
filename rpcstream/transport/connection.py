"""What the connections of both event loops (``asyncio_ws``, ``trio_ws``) share."""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Iterable
from typing import Any, TypeVar

from websockets.frames import Frame, Opcode
from websockets.protocol import State

__all__ = ["TextCheck", "never_requested"]

_utf8 = codecs.getincrementaldecoder("utf-8")


class TextCheck:
    """Checks that text messages are UTF-8, frame by frame as they arrive.

    RFC 6455 (8.1) has the receiver of invalid UTF-8 in a text message fail the
    connection with 1007. websockets checks it when ``recv()`` decodes, which
    our connections skip (messages stay bytes, or never go through ``recv()``),
    so they check here, in the task or callback that reads the socket: the
    close frame is then queued before anything that follows (the other side's
    EOF) can end the connection.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder: Any = None  # of the fragmented text message being received

    def check(self, frame: Frame) -> None:
        """Raise ``UnicodeDecodeError`` if this data frame makes its message
        invalid UTF-8 (an incomplete character may still end a later fragment)."""
        opcode, data = frame.opcode, frame.data
        if opcode is Opcode.TEXT:
            if frame.fin and isinstance(data, bytes) and data.isascii():
                return  # ASCII is UTF-8: the common case costs one scan
            self._decoder = _utf8()
        elif opcode is not Opcode.CONT or self._decoder is None:
            return  # binary, control, or the rest of a binary message
        decoder = self._decoder
        if frame.fin:
            self._decoder = None
        decoder.decode(data, final=frame.fin)


_C = TypeVar("_C")


def never_requested(connections: Iterable[Any]) -> list[Any]:
    """Connections that never sent their opening request: browsers open such
    sockets ahead of need. Closing the server would otherwise wait for each
    one's ``open_timeout``; they have nothing to finish, so they are dropped."""
    return [
        c
        for c in list(connections)
        if c.protocol.state is State.CONNECTING and getattr(c, "request", None) is None
    ]


def tracked(cls: type[_C]) -> tuple[weakref.WeakSet[_C], Any]:
    """A connection factory for websockets' ``serve`` (``create_connection``) that
    remembers what it made, for :func:`never_requested` when the server closes."""
    made: weakref.WeakSet[_C] = weakref.WeakSet()

    def create(*args: Any, **kwargs: Any) -> _C:
        connection = cls(*args, **kwargs)
        made.add(connection)
        return connection

    return made, create  # websockets only calls it, as it would the class
