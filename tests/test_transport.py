"""The WebSocket transport under the peer: messages handed over as they arrive on
asyncio (``transport/asyncio_ws.py``), written at once when nothing waits, and
the same behaviour seen from the wire on both loops: what websockets' internals
we build on must still do (see the pin in pyproject.toml), and what a client
that breaks the WebSocket protocol gets back (a close frame with the right code)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.messages import JSON, MSGPACK, Call
from rpcstream.peer.driver import BURST_PIECE
from rpcstream.transport import is_trio
from tests.raw import BINARY, CONT, TEXT, frame, raw_connect, raw_socket

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
                if frame[:2] == [2, "rpcstream.settings"]:
                    continue  # the server's limits, its first frame
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


async def test_the_answers_to_a_burst_of_calls_leave_in_pieces() -> None:
    # Calls that arrive in one read start their handlers at once; the answers leave
    # in pieces of BURST_PIECE frames: not one write each (50), and not all in one
    # message, which would leave the caller idle until the last answer is made
    # (W4 ran with each side idle half the time). Where the writer wakes among
    # the handlers (trio runs a batch of tasks in either order) it takes what is
    # queued, a smaller piece, or a larger one where answers queued while its
    # send awaited; so the first piece is the one whose size is fixed.
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        raw_connect(server.url, MSGPACK.subprotocol) as ws,
    ):
        for round_ in range(5):
            base = 100 * round_
            calls = [
                Call(base + i, "echo", MSGPACK.encode_raw([i]), MSGPACK.empty_map, None, [])
                for i in range(1, 51)
            ]
            await ws.send(MSGPACK.encode_batch(calls))  # one message, one read
            got: dict[int, Any] = {}
            sizes: list[int] = []
            with anyio.fail_after(10):
                while len(got) < 50:
                    frames = [
                        f
                        for f in msgspec.msgpack.decode(await ws.recv(decode=False))
                        if f[:2] != [2, "rpcstream.settings"]
                    ]
                    if frames:
                        sizes.append(len(frames))
                    got.update((f[1], f[2]) for f in frames)
            assert got == {base + i: i for i in range(1, 51)}
            assert sizes[0] <= BURST_PIECE < 50, sizes
            assert 2 <= len(sizes) <= 12, sizes


# -- what a client that breaks the protocol gets back ----------------------------------

INVALID_TEXT = {
    "in one frame": [frame(TEXT, b'[[1, 1, "echo", ["\xff"], {}]]')],
    "across fragments": [
        frame(TEXT, b'[[1, 1, "echo", ["\xc3', fin=False),
        frame(CONT, b'("], {}]]'),  # 0xC3 must be followed by a continuation byte
    ],
    "cut at the end": [frame(TEXT, b"\xe2\x82", fin=False), frame(CONT, b"")],
}


@pytest.mark.parametrize("frames", INVALID_TEXT.values(), ids=INVALID_TEXT.keys())
async def test_invalid_utf8_in_a_text_message_closes_with_1007(frames: list[bytes]) -> None:
    async with rpcstream.serve(make_router(), "127.0.0.1", 0) as server:
        async with raw_socket(server.port, JSON.subprotocol) as ws:
            await ws.send(b"".join(frames))
            with anyio.fail_after(10):
                assert await ws.close_code() == 1007
        await server.wait_idle()


async def test_a_character_split_across_fragments_of_a_text_message_is_accepted() -> None:
    call = '[[1, 7, "echo", ["caf\u00e9 \u20ac"], {}]]'.encode()
    cut = call.index(b"\xe2") + 1  # inside the euro sign's three bytes
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        raw_socket(server.port, JSON.subprotocol) as ws,
    ):
        await ws.send(frame(TEXT, call[:cut], fin=False) + frame(CONT, call[cut:]))
        with anyio.fail_after(10):
            opcode, payload = await ws.receive_frame()
            if b"rpcstream.settings" in payload:  # the server's first frame
                opcode, payload = await ws.receive_frame()
        assert opcode == TEXT
        assert msgspec.json.decode(payload) == [[4, 7, "caf\u00e9 \u20ac"]]


async def test_a_client_closes_with_1007_when_the_server_sends_invalid_utf8() -> None:
    closed: list[int | None] = []
    done = anyio.Event()

    async def handler(ws: Any) -> None:
        await ws.send(b'[[12, "\xff"]]', text=True)  # websockets sends bytes unchecked
        with anyio.fail_after(10):
            await ws.wait_closed()
        closed.append(ws.close_code)
        done.set()

    async with _plain_server(handler, JSON.subprotocol) as url:
        async with rpcstream.connect(url, codec="json") as peer:
            with anyio.fail_after(10):
                await peer.wait_closed()
        with anyio.fail_after(10):
            await done.wait()
    assert closed == [1007]


@contextlib.asynccontextmanager
async def _plain_server(handler: Any, subprotocol: str) -> AsyncIterator[str]:
    """A websockets server on the running loop, with no rpcstream peer in it."""
    if is_trio():
        import trio
        from websockets.trio.server import serve as trio_serve

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio_serve(
                    handler,
                    0,
                    host="127.0.0.1",
                    subprotocols=[subprotocol],
                    task_status=task_status,
                )
            )
            yield f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"
            nursery.cancel_scope.cancel()
    else:
        from websockets.asyncio.server import serve as asyncio_serve

        async with asyncio_serve(handler, "127.0.0.1", 0, subprotocols=[subprotocol]) as server:
            yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


VIOLATIONS = {
    "1002 reserved bits": (frame(BINARY, b"x", rsv=1), 1002),
    "1002 unmasked": (frame(BINARY, b"x", mask=False), 1002),
    "1009 too big": (frame(BINARY, b"x" * 20_000), 1009),
}


@pytest.mark.parametrize("violation", VIOLATIONS.values(), ids=VIOLATIONS.keys())
async def test_every_connection_that_breaks_the_protocol_gets_its_close_frame_and_one_log_line(
    violation: tuple[bytes, int], caplog: pytest.LogCaptureFixture
) -> None:
    # The violation arrives while the server is busy writing answers to earlier
    # calls, and the client half-closes right after it: on trio the close frame
    # then waited for the writer while the client's EOF closed the socket.
    bad, code = violation
    n, answers = 36, 10
    caplog.set_level(logging.WARNING)
    calls = [frame(BINARY, call_message(i, b"y" * 5000)) for i in range(answers)]
    codes: list[int | None] = []
    async with rpcstream.serve(make_router(), "127.0.0.1", 0, max_message_size=10_000) as server:

        async def one() -> None:
            async with raw_socket(server.port, MSGPACK.subprotocol) as ws:
                for message in calls:
                    await ws.send(message)
                await ws.send(bad)
                await ws.stream.send_eof()  # type: ignore[attr-defined]
                with anyio.fail_after(20):
                    codes.append(await ws.close_code())

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
        with anyio.fail_after(20):
            await server.wait_idle()
    assert codes == [code] * n
    assert len(caplog.records) <= n, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_client_offering_no_rpcstream_subprotocol_is_closed_with_1002() -> None:
    async with rpcstream.serve(make_router(), "127.0.0.1", 0) as server:
        async with raw_socket(server.port, "chat.v2") as ws:
            with anyio.fail_after(10):
                opcode, payload = await ws.receive_frame()
        assert opcode == 0x8  # close
        assert int.from_bytes(payload[:2], "big") == 1002
        assert b"no rpcstream subprotocol" in payload
        assert server.connections_accepted == 0
