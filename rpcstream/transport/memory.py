"""Two transports joined in memory: fast tests of peers without sockets."""

from __future__ import annotations

import math

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import ConnectionClosed
from .base import Transport

__all__ = ["MemoryTransport", "memory_transport_pair"]


class MemoryTransport(Transport):
    """One end of an in-memory message pipe with a bounded buffer."""

    def __init__(
        self,
        send: MemoryObjectSendStream[bytes],
        receive: MemoryObjectReceiveStream[bytes],
    ) -> None:
        self._send = send
        self._receive = receive
        self._code: int | None = None

    async def send(self, message: bytes, *, text: bool) -> None:
        """Send one message; waits while the other end's buffer is full."""
        try:
            await self._send.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionClosed(self._code or 1006, "memory transport closed") from exc

    async def receive(self) -> bytes:
        """Receive one message."""
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            raise ConnectionClosed(self._code or 1000, "memory transport closed") from exc

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close both directions; the other end sees the end of its stream."""
        if self._code is None:
            self._code = code
        self._send.close()
        self._receive.close()

    @property
    def close_code(self) -> int | None:
        """The code given to :meth:`aclose`, once closed."""
        return self._code


def memory_transport_pair(max_messages: int = 64) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected transports, each buffering at most ``max_messages`` messages."""
    if max_messages == math.inf or max_messages < 1:
        raise ValueError("the buffer must be bounded and hold at least one message")
    a_send, b_receive = anyio.create_memory_object_stream[bytes](max_messages)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](max_messages)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)
