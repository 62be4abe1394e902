"""websockets on asyncio: connections that hand each message over as it arrives.

``websockets.asyncio`` parses frames in ``data_received()`` and queues each whole
message for ``recv()``, which then wakes the task waiting in it. For an RPC that
costs a task switch per message before the peer even looks at it, and another
for whatever the message wakes (the caller waiting for that answer): a round
trip took twice the event-loop iterations of a raw echo. The connections here
call a receiver registered with :meth:`~_Delivering.deliver` instead, from
``data_received()`` itself, with every message that one read of the socket
completed (so the receiver can tell a burst from a lone message), and report the
end of the connection to a second callback.

Until a receiver is registered (between the handshake and the peer starting)
messages wait in a small queue; past 16 of them the socket stops being read,
as websockets' own queue does. Fragmented messages are joined here: websockets'
protocol has already checked their order and their total size (``max_size``).
Text messages are checked for UTF-8 here too (websockets does it when ``recv()``
decodes, which this path skips): invalid ones fail the connection with 1007.

:func:`connect` and :func:`serve` are websockets' own, making these connections.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.frames import CloseCode, Frame

from .connection import MESSAGE_OPCODES, Assembly, never_requested, tracked

__all__ = [
    "UNREACHABLE",
    "DeliveringClientConnection",
    "DeliveringServerConnection",
    "connect",
    "serve",
]

UNREACHABLE: tuple[type[BaseException], ...] = (OSError, TimeoutError)
"""What ``connect`` raises when the server cannot be reached."""

_EARLY_MAX = 16  # messages held before a receiver is registered; then reading pauses


class _Delivering:
    """Mixed into websockets' asyncio connection classes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_messages: Callable[[list[bytes]], None] | None = None
        self._received: list[bytes] = []  # completed by the current read
        self._on_lost: Callable[[], None] | None = None
        self._early: deque[bytes] = deque()
        self._assembly = Assembly()
        self._failed = False  # invalid data: nothing more is delivered
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
        if self._failed:
            return  # what the same read held after invalid text (RFC 6455, 7.1.7)
        if event.opcode not in MESSAGE_OPCODES:  # ping, pong, close: websockets' business
            super().process_event(event)  # type: ignore[misc]
            return
        try:
            message = self._assembly.take(event)
        except UnicodeDecodeError as exc:
            self._fail_invalid_data(exc)
            return
        if message is None:
            return
        if self._on_messages is not None:
            self._received.append(message)
        else:
            self._early.append(message)
            if len(self._early) >= _EARLY_MAX and not self._early_paused:
                self._early_paused = True
                self.transport.pause_reading()  # type: ignore[attr-defined]

    def _fail_invalid_data(self, exc: UnicodeDecodeError) -> None:
        """Close with 1007 (RFC 6455, 8.1), as websockets' ``recv()`` would, and
        drop the TCP connection if the other side has not closed it in time."""
        self._failed = True
        ws: Any = self
        ws.set_connection_exc(exc)
        ws.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        try:
            ws.send_data()
        except Exception as send_exc:  # as in data_received(): the connection is broken
            ws.set_connection_exc(send_exc)
        if ws.close_timeout is not None:
            ws.loop.call_later(ws.close_timeout, self._close_overdue)

    def _close_overdue(self) -> None:
        if not self._lost:
            self.transport.abort()  # type: ignore[attr-defined]

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


class DeliveringClientConnection(_Delivering, ClientConnection):
    """A ``websockets.asyncio`` client connection that hands over each message as it arrives."""


class DeliveringServerConnection(_Delivering, ServerConnection):
    """A ``websockets.asyncio`` server connection that hands over each message as it arrives."""


def connect(url: str, **kwargs: Any) -> Any:
    """websockets' ``connect`` (an async context manager), making delivering connections."""
    return ws_connect(url, create_connection=DeliveringClientConnection, **kwargs)


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[Any], Awaitable[None]], host: str, port: int, **kwargs: Any
) -> AsyncIterator[int]:
    """websockets' ``serve`` with delivering connections; yields the bound port.
    On the way out, sockets that never sent their request are dropped at once."""
    opening, create_connection = tracked(DeliveringServerConnection)

    async with ws_serve(
        handler,
        host,
        port,
        create_connection=create_connection,
        **kwargs,
    ) as ws_server:
        try:
            yield int(ws_server.sockets[0].getsockname()[1])
        finally:
            for connection in never_requested(opening):
                if getattr(connection, "transport", None) is not None:  # TLS: set once it is up
                    connection.transport.abort()
            ws_server.close()
            with anyio.CancelScope(shield=True):
                await ws_server.wait_closed()
