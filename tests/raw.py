"""Clients for tests that send what an rpcstream peer never would.

``raw_connect``: a plain websockets connection, with no rpcstream peer to correct
what it sends. ``RawSocket``: a WebSocket spoken by hand over TCP, for frames no
WebSocket library would write (invalid UTF-8 in a text frame, reserved bits).
"""

from __future__ import annotations

import base64
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from rpcstream.transport import is_trio

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


@contextlib.asynccontextmanager
async def raw_connect(url: str, subprotocol: str, **options: Any) -> AsyncIterator[Any]:
    """A websockets connection on the running loop (asyncio or trio), offering
    ``subprotocol``; ``options`` go to websockets' ``connect``."""
    options = {"subprotocols": [subprotocol], "compression": None, **options}
    if is_trio():
        from websockets.trio.client import connect as trio_connect

        async with trio_connect(url, **options) as ws:
            yield ws
    else:
        from websockets.asyncio.client import connect as asyncio_connect

        async with asyncio_connect(url, **options) as ws:
            yield ws


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One WebSocket frame, masked as a client's must be (RFC 6455, 5.2)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    stream = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ stream).to_bytes(n, "big")


class RawSocket:
    """A WebSocket client spoken by hand: frames go out as given."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, data: bytes) -> None:
        """Write bytes as they are (one or more frames from :func:`frame`)."""
        await self.stream.send(data)

    async def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += await self.stream.receive()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def receive_frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload); ``EndOfStream`` at
        the end of the TCP connection."""
        b0, b1 = await self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read(8))
        return b0 & 0x0F, await self._read(n)

    async def close_code(self) -> int | None:
        """Read until the server's close frame: its code; ``None`` when the TCP
        connection ends (or breaks) without one."""
        try:
            while True:
                opcode, payload = await self.receive_frame()
                if opcode == CLOSE:
                    return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None


@contextlib.asynccontextmanager
async def raw_socket(
    port: int, subprotocol: str, host: str = "127.0.0.1"
) -> AsyncIterator[RawSocket]:
    """A hand-spoken WebSocket to ``host:port``, upgraded offering ``subprotocol``."""
    async with await anyio.connect_tcp(host, port) as tcp:
        key = base64.b64encode(os.urandom(16)).decode()
        await tcp.send(
            (
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
            ).encode()
        )
        ws = RawSocket(tcp)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await tcp.receive()
        head, _, ws._buffer = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"not upgraded: {head.decode(errors='replace')}")
        yield ws
