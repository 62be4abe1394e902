"""The WebSocket transport under the peer: messages handed over as they arrive on
asyncio (``transport/asyncio_push.py``), written at once when nothing waits, and
the same behaviour seen from the wire on both loops."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.messages import MSGPACK, Call
from rpcstream.transport.websocket import WebSocketTransport
from tests.raw import raw_connect

pytestmark = pytest.mark.anyio

request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="unset")


def make_router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def echo(x: Any) -> Any:
        return x

    @router.method
    async def tag() -> str:
        return request_tag.get()

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @router.method
    async def forever() -> None:
        await anyio.sleep_forever()

    return router


def call_message(call_id: int, value: Any) -> bytes:
    args = MSGPACK.encode_raw([value])
    return MSGPACK.encode_batch([Call(call_id, "echo", args, MSGPACK.empty_map, None, [])])


async def answers(ws: Any, count: int) -> dict[int, Any]:
    """Read Result frames until ``count`` answers came: call id -> value."""
    got: dict[int, Any] = {}
    with anyio.fail_after(10):
        while len(got) < count:
            for frame in msgspec.msgpack.decode(await ws.recv(decode=False)):
                assert frame[0] == 4, frame  # Result
                got[frame[1]] = frame[2]
    return got


async def test_a_fragmented_message_reaches_the_peer_whole() -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        raw_connect(server.url, MSGPACK.subprotocol) as ws,
    ):
        message = call_message(7, "x" * 5000)
        # websockets sends an iterable as one message in several frames.
        await ws.send([message[:10], message[10:4000], message[4000:]])
        await ws.send(call_message(8, "after"))
        assert await answers(ws, 2) == {7: "x" * 5000, 8: "after"}


async def test_handlers_see_the_context_of_the_task_that_runs_the_peer() -> None:
    # On asyncio the messages arrive in websockets' protocol callbacks; the
    # handlers they start must still inherit the connection task's context.
    router = make_router()

    async def authenticate(request: rpcstream.HandshakeRequest) -> str:
        request_tag.set("set-by-the-connection")  # runs in the connection's task
        return "someone"

    async with (
        rpcstream.serve(router, "127.0.0.1", 0, authenticate=authenticate) as server,
        rpcstream.connect(server.url) as peer,
    ):
        assert await peer.call("tag") == "set-by-the-connection"


def test_a_peer_runs_under_plain_asyncio_run() -> None:
    # No anyio.run here, so nothing names the event loop in the context; anyio
    # cannot detect it inside websockets' protocol callbacks, where messages
    # are handled on asyncio, unless the peer names it there.
    import asyncio

    async def main() -> None:
        async with (
            rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
            rpcstream.connect(server.url) as peer,
        ):
            assert await peer.call("echo", 1) == 1
            assert [i async for i in peer.stream("count", 3)] == [0, 1, 2]
            with pytest.raises(rpcstream.DeadlineExceeded):
                await peer.call("forever", timeout=0.05)
            assert await peer.call("echo", 2) == 2

    asyncio.run(asyncio.wait_for(main(), 30))


async def test_calls_and_answers_keep_their_order_under_a_burst() -> None:
    # Many calls in flight: they leave in few messages (coalesced), some written
    # at once and some by the writer; every answer must still come back.
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await peer.call("echo", i)

        async with anyio.create_task_group() as tg:
            for i in range(200):  # within max_concurrent_handlers (256)
                tg.start_soon(one, i)
        assert results == {i: i for i in range(200)}
        assert peer.stats["pending_calls"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_messages_that_arrive_before_the_peer_starts_wait_then_come_first() -> None:
    from websockets.asyncio.server import serve

    from rpcstream.transport.asyncio_push import PushServerConnection

    paused = anyio.Event()

    class Watched(PushServerConnection):
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
