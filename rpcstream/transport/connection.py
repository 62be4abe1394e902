"""What the connections of both event loops (``asyncio_ws``, ``trio_ws``) share."""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Iterable
from typing import Any, TypeVar

from websockets.frames import Frame, Opcode
from websockets.protocol import State

__all__ = ["MESSAGE_OPCODES", "Assembly", "TextCheck", "never_requested"]

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


MESSAGE_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
"""The frames that make messages; the others (ping, pong, close) are websockets'."""


class Assembly:
    """Whole messages from the data frames of one connection, as they arrive:
    text checked for UTF-8 frame by frame (:class:`TextCheck`), fragments joined."""

    __slots__ = ("_fragments", "_text")

    def __init__(self) -> None:
        self._text = TextCheck()
        self._fragments: list[bytes] | None = None  # of the message being received

    def take(self, frame: Frame) -> bytes | None:
        """The message a data frame (one of :data:`MESSAGE_OPCODES`) completes, or
        ``None`` while it is incomplete. Raises ``UnicodeDecodeError`` for text
        that is not UTF-8."""
        opcode = frame.opcode
        if opcode is not Opcode.BINARY:  # binary: no check at all
            self._text.check(frame)
        if opcode is Opcode.CONT:
            assert self._fragments is not None  # websockets checked the order
            self._fragments.append(bytes(frame.data))
            if not frame.fin:
                return None
            message = b"".join(self._fragments)
            self._fragments = None
            return message
        if not frame.fin:
            self._fragments = [bytes(frame.data)]
            return None
        return bytes(frame.data)


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
