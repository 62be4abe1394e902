"""A websockets connection as a :class:`Transport`, on asyncio or on trio.

websockets ships one connection class per event loop (``websockets.asyncio`` and
``websockets.trio``) with the same ``send``/``recv`` API; this adapter takes
either, maps their ``ConnectionClosed`` to ours and reports the bytes the asyncio
transport still holds, so the peer's ``buffered_amount`` counts everything not
yet handed to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import websockets.exceptions
from websockets.asyncio.connection import Connection as AsyncioConnection
from websockets.protocol import State

from ..errors import ConnectionClosed
from .asyncio_push import _Push
from .base import Transport

__all__ = ["WebSocketTransport", "websockets_options"]


def websockets_options(
    *,
    compression: str | None,
    max_message_size: int | None,
    ping_interval: float | None,
    ping_timeout: float | None,
    close_timeout: float | None,
    open_timeout: float | None,
) -> dict[str, Any]:
    """The websockets options ``serve()`` and ``connect()`` share."""
    return {
        "compression": compression,
        "max_size": max_message_size,
        "ping_interval": ping_interval,
        "ping_timeout": ping_timeout,
        # A peer that missed its pong is dead: waiting long for its close frame
        # would only keep pending calls hanging. Default: the ping timeout.
        "close_timeout": close_timeout if close_timeout is not None else ping_timeout or 10.0,
        "open_timeout": open_timeout,
    }


class WebSocketTransport(Transport):
    """Wraps a ``websockets.asyncio`` or ``websockets.trio`` connection."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.subprotocol = ws.subprotocol
        # asyncio connections expose their transport's write buffer; trio's
        # send_all returns only once the kernel took the bytes, so nothing lingers.
        self._asyncio_transport = getattr(ws, "transport", None)
        self._close = getattr(ws, "close", None) or ws.aclose
        # On asyncio a message can be written without waiting (websockets' own
        # send() does exactly this, then awaits a drain only when paused).
        self._direct: AsyncioConnection | None = ws if isinstance(ws, AsyncioConnection) else None

    async def send(self, message: bytes, *, text: bool) -> None:
        """Send one message (a text frame when ``text``)."""
        try:
            await self.ws.send(message, text=text)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def receive(self) -> bytes:
        """Receive one message as bytes, whatever its frame type."""
        try:
            data = await self.ws.recv(decode=False)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _closed(exc) from exc
        return data  # type: ignore[no-any-return]

    def deliver(
        self, on_messages: Callable[[list[bytes]], None], on_lost: Callable[[], None]
    ) -> bool:
        """Have messages handed over as they arrive (asyncio connections made by
        :func:`rpcstream.serve` and :func:`rpcstream.connect`)."""
        if not isinstance(self.ws, _Push):
            return False
        self.ws.deliver(on_messages, on_lost)
        return True

    def can_send_now(self) -> bool:
        """asyncio only: open, not sending a fragmented message, and the socket's
        write buffer below its high-water mark (so nothing would wait)."""
        ws = self._direct
        return (
            ws is not None
            and ws.protocol.state is State.OPEN
            and ws.send_in_progress is None
            and not ws.paused
            and not ws.transport.is_closing()
        )

    def send_now(self, message: bytes, *, text: bool) -> None:
        """Write one message to the asyncio transport, as websockets' ``send()``
        does before it would wait for a drain."""
        ws = self._direct
        assert ws is not None
        try:
            if text:
                ws.protocol.send_text(message)
            else:
                ws.protocol.send_binary(message)
            ws.send_data()
        except Exception as exc:  # as in websockets' send(): the connection is broken
            ws.set_connection_exc(exc)
            ws.transport.abort()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Run the WebSocket closing handshake (bounded by websockets' close_timeout)."""
        await self._close(code, reason)

    async def abort(self) -> None:
        """Close the TCP connection at once (asyncio: abort the transport; trio:
        close the stream)."""
        if self._asyncio_transport is not None:
            self._asyncio_transport.abort()
        else:
            await self.ws.stream.aclose()

    @property
    def buffered_amount(self) -> int:
        """Bytes in the asyncio transport's write buffer (0 on trio)."""
        t = self._asyncio_transport
        if t is None:
            return 0
        try:
            return int(t.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return 0

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code, once closed."""
        code = self.ws.close_code
        return None if code is None else int(code)

    @property
    def remote_address(self) -> object:
        """The remote (host, port)."""
        try:
            return self.ws.remote_address
        except (AttributeError, OSError):
            return None


def _closed(exc: websockets.exceptions.ConnectionClosed) -> ConnectionClosed:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(int(frame.code), frame.reason)
