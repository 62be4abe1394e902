"""asyncio connections that hand each message over as it arrives
(``transport/asyncio_ws.py``): messages that come before the peer starts."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from rpcstream.messages import MSGPACK
from rpcstream.transport.websocket import WebSocketTransport
from tests.raw import raw_connect

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_messages_that_arrive_before_the_peer_starts_wait_then_come_first() -> None:
    from websockets.asyncio.server import serve

    from rpcstream.transport.asyncio_ws import DeliveringServerConnection

    paused = anyio.Event()

    class Watched(DeliveringServerConnection):
        def process_event(self, event: Any) -> None:
            super().process_event(event)
            if self._early_paused:
                paused.set()

    received: list[bytes] = []
    all_received = anyio.Event()
    lost = anyio.Event()

    def on_messages(messages: list[bytes]) -> None:
        received.extend(messages)
        if len(received) == 40:
            all_received.set()

    async def handler(ws: Any) -> None:
        with anyio.fail_after(10):
            await paused.wait()  # 16 messages queued: the socket is no longer read
        assert len(ws._early) >= 16  # and what the same read of the socket held
        assert not ws.transport.is_reading()
        assert WebSocketTransport(ws).deliver(on_messages, lost.set)
        assert ws.transport.is_reading()
        with anyio.fail_after(10):
            await all_received.wait()
        await ws.close()

    async with serve(handler, "127.0.0.1", 0, create_connection=Watched) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with raw_connect(f"ws://127.0.0.1:{port}", MSGPACK.subprotocol) as ws:
            for i in range(40):
                await ws.send(str(i).encode())
            with anyio.fail_after(10):
                await ws.wait_closed()
        with anyio.fail_after(10):
            await lost.wait()
    assert received == [str(i).encode() for i in range(40)]
