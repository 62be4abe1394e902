"""trio connections (``transport/trio_ws.py``): messages handed over as each read
completes them (those that came before the peer started wait, then come first),
messages written at once (what the kernel does not take leaves whole, before what
follows; a broken socket ends the connection), and a reader that never waits on
the writer (what it leaves for the writer's lock still leaves before the socket
closes)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from rpcstream.errors import ConnectionClosed
from rpcstream.messages import MSGPACK
from rpcstream.transport.websocket import WebSocketTransport
from tests.raw import BINARY, frame, raw_connect, raw_socket

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Any], Awaitable[None]], **kwargs: Any) -> AsyncIterator[int]:
    """websockets' trio server with ``trio_ws``'s connections (or ``create_connection``)."""
    import trio
    from websockets.trio.server import serve

    from rpcstream.transport.trio_ws import ReadNeverWaitsServerConnection

    kwargs.setdefault("create_connection", ReadNeverWaitsServerConnection)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve(
                handler,
                0,
                host="127.0.0.1",
                subprotocols=[MSGPACK.subprotocol],
                compression=None,
                max_size=None,
                task_status=task_status,
                **kwargs,
            )
        )
        yield server.listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_the_messages_one_read_completes_are_handed_over_together() -> None:
    batches: list[list[bytes]] = []
    got_first, got_all = anyio.Event(), anyio.Event()

    def on_messages(messages: list[bytes]) -> None:
        batches.append(messages)
        got_first.set()
        if sum(map(len, batches)) == 4:
            got_all.set()

    async def handler(ws: Any) -> None:
        assert WebSocketTransport(ws).deliver(on_messages, lambda: None)
        with anyio.fail_after(10):
            await got_all.wait()

    async with serving(handler) as port, raw_socket(port, MSGPACK.subprotocol) as ws:
        await ws.send(frame(BINARY, b"alone"))
        with anyio.fail_after(10):
            await got_first.wait()  # the server read the lone message by itself
        # Three messages in one write, the second in two fragments: one read.
        await ws.send(
            frame(BINARY, b"a")
            + frame(BINARY, b"b1", fin=False)
            + frame(0x0, b"b2")
            + frame(BINARY, b"c")
        )
        with anyio.fail_after(10):
            await got_all.wait()
    assert batches == [[b"alone"], [b"a", b"b1b2", b"c"]]


async def test_messages_that_arrive_before_the_peer_starts_wait_then_come_first() -> None:
    from rpcstream.transport.trio_ws import ReadNeverWaitsServerConnection

    paused = anyio.Event()

    class Watched(ReadNeverWaitsServerConnection):
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
        assert ws.recv_flow_control is not None
        assert WebSocketTransport(ws).deliver(on_messages, lost.set)
        assert ws.recv_flow_control is None
        with anyio.fail_after(10):
            await all_received.wait()
        await ws.aclose()

    async with (
        serving(handler, create_connection=Watched) as port,
        raw_connect(f"ws://127.0.0.1:{port}", MSGPACK.subprotocol) as ws,
    ):
        for i in range(40):
            await ws.send(str(i).encode())
        with anyio.fail_after(10):
            await ws.wait_closed()
            await lost.wait()
    assert received == [str(i).encode() for i in range(40)]


async def test_what_the_kernel_does_not_take_at_once_leaves_whole_before_what_follows() -> None:
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than both socket buffers hold
    checked = anyio.Event()

    async def handler(ws: Any) -> None:
        transport = WebSocketTransport(ws)
        assert transport.can_send_now()
        transport.send_now(big, text=False)  # returns at once, whatever the kernel took
        assert 0 < transport.buffered_amount < len(big)  # the rest waits for the flush
        assert not transport.can_send_now()  # nothing may overtake it
        await transport.send(b"after", text=False)  # sends the rest first, in order
        assert transport.buffered_amount == 0
        with anyio.fail_after(10):
            await checked.wait()

    async with (
        serving(handler) as port,
        raw_connect(f"ws://127.0.0.1:{port}", MSGPACK.subprotocol, max_size=None) as ws,
    ):
        with anyio.fail_after(30):
            assert await ws.recv(decode=False) == big
            assert await ws.recv(decode=False) == b"after"
        checked.set()


async def test_a_write_at_once_to_a_broken_socket_ends_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    lost = anyio.Event()

    async def handler(ws: Any) -> None:
        transport = WebSocketTransport(ws)
        assert transport.deliver(lambda messages: None, lost.set)
        ws.stream.socket.shutdown(socket.SHUT_WR)  # writing now fails (EPIPE)
        assert transport.can_send_now()  # websockets does not know yet
        transport.send_now(b"lost", text=False)
        with anyio.fail_after(10):
            await lost.wait()
        assert isinstance(ws.connection_exc, BrokenPipeError)
        with pytest.raises(ConnectionClosed) as closed:
            await transport.receive()
        assert closed.value.code == 1006

    async with (
        serving(handler) as port,
        raw_connect(f"ws://127.0.0.1:{port}", MSGPACK.subprotocol) as ws,
    ):
        with anyio.fail_after(10):
            await ws.wait_closed()
        with anyio.fail_after(10):
            await lost.wait()
    assert [r.getMessage() for r in caplog.records] == []


async def test_a_close_frame_queued_behind_the_writer_leaves_before_the_socket_closes() -> None:
    import trio
    from websockets.trio.server import serve

    from rpcstream.transport.trio_ws import ReadNeverWaitsServerConnection

    locked = anyio.Event()
    closing = anyio.Event()

    class Watched(ReadNeverWaitsServerConnection):
        async def close_stream(self) -> None:
            closing.set()
            await super().close_stream()

    async def handler(ws: Any) -> None:
        # As a writer blocked on a full socket would: the lock stays taken while
        # the violation arrives and the client's EOF ends the reader.
        async with ws.send_lock:
            locked.set()
            with anyio.fail_after(10):
                await closing.wait()
        await ws.wait_closed()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve(
                handler,
                0,
                host="127.0.0.1",
                subprotocols=[MSGPACK.subprotocol],
                create_connection=Watched,
                task_status=task_status,
            )
        )
        port = server.listeners[0].socket.getsockname()[1]
        async with raw_socket(port, MSGPACK.subprotocol) as ws:
            with anyio.fail_after(10):
                await locked.wait()
            await ws.send(frame(BINARY, b"x", rsv=1))  # reserved bits: 1002
            await ws.stream.send_eof()  # type: ignore[attr-defined]
            with anyio.fail_after(10):
                assert await ws.close_code() == 1002
        nursery.cancel_scope.cancel()


async def test_bytes_left_for_a_socket_that_closed_are_dropped_without_an_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # websockets' reader flushes once more after the socket ends and logs
    # "unexpected internal error" for anything raised there; bytes the reader
    # left for the writer's lock (a close frame) can still be queued then.
    import trio
    from websockets.trio.server import serve

    from rpcstream.transport.trio_ws import ReadNeverWaitsServerConnection

    caplog.set_level(logging.WARNING)
    ended = anyio.Event()

    async def handler(ws: Any) -> None:
        ws.protocol.send_close(1002, "broken")  # queued, not flushed...
        await ws.stream.aclose()  # ...when the socket closes under the reader
        with anyio.fail_after(10):
            await ws.wait_closed()  # the reader has ended
        ended.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve(
                handler,
                0,
                host="127.0.0.1",
                subprotocols=[MSGPACK.subprotocol],
                create_connection=ReadNeverWaitsServerConnection,
                task_status=task_status,
            )
        )
        port = server.listeners[0].socket.getsockname()[1]
        async with raw_socket(port, MSGPACK.subprotocol) as ws:
            with anyio.fail_after(10):
                await ended.wait()
                assert await ws.close_code() is None  # closed before anything left
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records] == []
