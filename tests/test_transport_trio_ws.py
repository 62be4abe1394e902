"""trio connections whose reader never waits on their writer (``transport/trio_ws.py``):
what the reader leaves for the writer's lock still leaves before the socket closes."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from rpcstream.messages import MSGPACK
from tests.raw import BINARY, frame, raw_socket

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]


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
