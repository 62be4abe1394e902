"""websockets' asyncio connections, changed to hand over each message as it arrives.

``websockets.asyncio`` parses frames in ``data_received()`` and queues each whole
message for ``recv()``, which then wakes the task waiting in it. For an RPC that
costs a task switch per message before the peer even looks at it, and another
for whatever the message wakes (the caller waiting for that answer): a round
trip took twice the event-loop iterations of a raw echo. These subclasses call
a receiver registered with :meth:`deliver` instead, from ``data_received()``
itself, with every message that one read of the socket completed (so the
receiver can tell a burst from a lone message), and report the end of the
connection to a second callback.

Until a receiver is registered (between the handshake and the peer starting)
messages wait in a small queue; past 16 of them the socket stops being read,
as websockets' own queue does. Fragmented messages are joined here: websockets'
protocol has already checked their order and their total size (``max_size``).

This relies on websockets internals (``process_event``, ``connection_lost``,
the ``Frame`` events); ``tests/test_transport.py`` pins the behaviour.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

__all__ = ["PushClientConnection", "PushServerConnection"]

_EARLY_MAX = 16  # messages held before a receiver is registered; then reading pauses
_DATA = (Opcode.TEXT, Opcode.BINARY)


class _Push:
    """Mixed into websockets' asyncio connection classes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_messages: Callable[[list[bytes]], None] | None = None
        self._received: list[bytes] = []  # completed by the current read
        self._on_lost: Callable[[], None] | None = None
        self._early: deque[bytes] = deque()
        self._fragments: list[bytes] | None = None
        self._lost = False
        self._early_paused = False

    def deliver(
        self, on_messages: Callable[[list[bytes]], None], on_lost: Callable[[], None]
    ) -> None:
        """From now on, call ``on_messages`` with the whole messages each read of
        the socket completes, in order, and ``on_lost`` once the connection is
        gone. Messages that came before are delivered first, at once."""
        self._on_messages = on_messages
        if self._early:
            early = list(self._early)
            self._early.clear()
            on_messages(early)
        if self._early_paused:
            self._early_paused = False
            self.transport.resume_reading()  # type: ignore[attr-defined]
        if self._lost:
            on_lost()
        else:
            self._on_lost = on_lost

    def process_event(self, event: Any) -> None:
        if type(event) is not Frame:  # the handshake's Request or Response
            super().process_event(event)  # type: ignore[misc]
            return
        opcode = event.opcode
        if opcode in _DATA:
            if not event.fin:
                self._fragments = [bytes(event.data)]
                return
            message = bytes(event.data)
        elif opcode is Opcode.CONT:
            assert self._fragments is not None  # websockets checked the order
            self._fragments.append(bytes(event.data))
            if not event.fin:
                return
            message = b"".join(self._fragments)
            self._fragments = None
        else:  # ping, pong, close: websockets' business
            super().process_event(event)  # type: ignore[misc]
            return
        if self._on_messages is not None:
            self._received.append(message)
        else:
            self._early.append(message)
            if len(self._early) >= _EARLY_MAX and not self._early_paused:
                self._early_paused = True
                self.transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        received = self._received
        if received and self._on_messages is not None:
            self._received = []
            self._on_messages(received)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        self._lost = True
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()


class PushClientConnection(_Push, ClientConnection):
    """A ``websockets.asyncio`` client connection that hands over each message as it arrives."""


class PushServerConnection(_Push, ServerConnection):
    """A ``websockets.asyncio`` server connection that hands over each message as it arrives."""
