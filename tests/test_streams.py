"""Streams over a real WebSocket on 127.0.0.1, on asyncio and trio.

Nothing here sleeps to wait for something to happen: each test waits on the
event itself (an :class:`anyio.Event` set in a generator's ``finally``, a
counter reaching its target) under ``anyio.fail_after`` so that a missing event
fails the test quickly with a clear message instead of hanging.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream

pytestmark = pytest.mark.anyio

HOST = "127.0.0.1"
WAIT = 10  # seconds: how long any single awaited event may take before the test fails


def serving(router: rpcstream.Router, **options: Any) -> Any:
    return rpcstream.serve(router, HOST, 0, **options)


def idle(stats: dict[str, int]) -> bool:
    return stats.get("connections") == 0 and not any(stats.values())


class Closed:
    """Counts the generators that started and the ones whose ``finally`` ran;
    ``all_closed`` is set when every started one has closed."""

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0
        self.all_closed = anyio.Event()

    def start(self) -> None:
        self.started += 1
        if self.all_closed.is_set():
            self.all_closed = anyio.Event()

    def close(self) -> None:
        self.closed += 1
        if self.closed == self.started:
            self.all_closed.set()


async def endless(
    closed: Closed, reached: anyio.Event | None = None, at: int = 0
) -> AsyncGenerator[int, None]:
    """0, 1, 2... forever; marks ``closed`` in its ``finally``."""
    closed.start()
    try:
        i = 0
        while True:
            if reached is not None and i == at:
                reached.set()
            yield i
            i += 1
    finally:
        closed.close()


async def numbers(start: int, n: int) -> AsyncGenerator[int, None]:
    for i in range(start, start + n):
        yield i


async def failing(n: int, error: BaseException) -> AsyncGenerator[int, None]:
    for i in range(n):
        yield i
    raise error


# -- 1. multiplexing -----------------------------------------------------------------------

STREAMS = 1000
ITEMS = 200


async def test_a_thousand_streams_each_way_flow_at_once_over_one_connection_each_in_order() -> None:
    # Every generator, on both sides, waits until all 2,000 streams are open before
    # yielding its first item: the streams really are concurrent on one connection.
    opened = 0
    all_open = anyio.Event()

    def one_more() -> None:
        nonlocal opened
        opened += 1
        if opened == 2 * STREAMS:
            all_open.set()

    router = rpcstream.Router()

    @router.method
    async def count(start: int, n: int) -> AsyncIterator[int]:
        one_more()
        await all_open.wait()
        for i in range(start, start + n):
            yield i

    @router.method
    async def check(start: int, items: AsyncIterator[int]) -> int:
        expected = start
        async for item in items:
            if item != expected:
                raise ValueError(f"stream {start}: got {item}, expected {expected}")
            expected += 1
        return expected - start

    async def upload(start: int) -> AsyncIterator[int]:
        one_more()
        await all_open.wait()
        for i in range(start, start + ITEMS):
            yield i

    received: dict[int, list[int]] = {}
    checked: dict[int, int] = {}
    limit = 4 * STREAMS
    async with (
        serving(router, max_concurrent_handlers=limit, max_streams=limit) as server,
        rpcstream.connect(server.url, max_streams=limit) as peer,
    ):

        async def read(k: int) -> None:
            received[k] = [i async for i in peer.stream("count", k * ITEMS, ITEMS)]

        async def send(k: int) -> None:
            checked[k] = await peer.call("check", k * ITEMS, upload(k * ITEMS))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for k in range(STREAMS):
                    tg.start_soon(read, k)
                    tg.start_soon(send, k)
        assert server.stats["connections"] == 1
        assert peer.stats["streams"] == 0
    for k in range(STREAMS):
        assert received[k] == list(range(k * ITEMS, (k + 1) * ITEMS)), f"stream {k}"
        assert checked[k] == ITEMS, f"stream {k}"


async def test_a_handler_streams_from_its_caller_through_current_peer() -> None:
    client_router = rpcstream.Router()

    @client_router.method
    async def letters(n: int) -> AsyncIterator[str]:
        for i in range(n):
            yield chr(ord("a") + i % 26)

    router = rpcstream.Router()

    @router.method
    async def pull(n: int) -> str:
        peer = rpcstream.current_peer()
        return "".join([c async for c in peer.stream("letters", n, item_type=str)])

    async with (
        serving(router) as server,
        rpcstream.connect(server.url, router=client_router) as peer,
    ):
        assert await peer.call("pull", 30) == "abcdefghijklmnopqrstuvwxyzabcd"


# -- 2. errors and early stops -------------------------------------------------------------


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_a_failing_server_generator_raises_remote_error_after_the_items_before_it(
    codec: str,
) -> None:
    router = rpcstream.Router()

    @router.method
    async def broken(n: int) -> AsyncIterator[int]:
        async with contextlib.aclosing(failing(n, ValueError("the well ran dry"))) as source:
            async for i in source:
                yield i

    @router.method
    async def custom(n: int) -> AsyncIterator[int]:
        async with contextlib.aclosing(
            failing(n, rpcstream.RemoteError(1234, "custom", {"at": n}))
        ) as source:
            async for i in source:
                yield i

    # A small window: the items before the failure cross several credit rounds.
    async with (
        serving(router) as server,
        rpcstream.connect(server.url, codec=codec, window_items=8) as peer,
    ):
        got: list[int] = []
        # Only the type by default; the text stays in the server's log.
        with pytest.raises(rpcstream.InternalError, match=r"] ValueError: internal error"):
            async for i in peer.stream("broken", 100):
                got.append(i)
        assert got == list(range(100))

        got = []
        with pytest.raises(rpcstream.RemoteError) as info:
            async for i in peer.stream("custom", 5):
                got.append(i)
        assert got == list(range(5))
        assert (info.value.code, info.value.message, info.value.data) == (
            1234,
            "custom",
            {"at": 5},
        )


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_a_failing_client_argument_generator_raises_in_the_handlers_async_for(
    codec: str,
) -> None:
    router = rpcstream.Router()

    @router.method
    async def collect(items: AsyncIterator[int]) -> dict[str, Any]:
        got: list[int] = []
        try:
            async for i in items:
                got.append(i)
        except rpcstream.RemoteError as exc:
            return {"items": got, "error": type(exc).__name__, "message": exc.message}
        return {"items": got, "error": None}

    async with (
        serving(router, window_items=8) as server,
        # The client opts in to telling the server its generator's error text.
        rpcstream.connect(server.url, codec=codec, expose_errors=True) as peer,
    ):
        answer = await peer.call("collect", failing(100, KeyError("chunk 100")))
    assert answer["items"] == list(range(100))
    assert answer["error"] == "InternalError"
    assert "chunk 100" in answer["message"]


STOPS = [
    "break",
    "break out of async with",
    "cancel while waiting",
    "cancel in the loop body",
    "close_receiving_stream",
]


async def ticks(
    closed: Closed, pause_at: int = -1, paused: anyio.Event | None = None
) -> AsyncGenerator[int, None]:
    """0, 1, 2...; at ``pause_at`` it waits forever, so that its receiver waits for an
    item inside the stream's ``__anext__``. Marks ``closed`` in its ``finally``."""
    closed.start()
    try:
        for i in range(10**9):
            if i == pause_at:
                assert paused is not None
                paused.set()
                await anyio.sleep_forever()
            yield i
    finally:
        closed.close()


async def consume_until_stopped(
    open_items: Callable[[], Any],
    how: str,
    n: int,
    paused: anyio.Event,
    close: Callable[[Any], None],
) -> list[int]:
    """Read the stream ``open_items()`` opens and stop after ``n`` items, as ``how``
    says; ``close(stream)`` is ``close_receiving_stream``. Returns what was read."""
    got: list[int] = []
    if how == "break":
        async for i in open_items():
            got.append(i)
            if len(got) == n:
                break
    elif how == "break out of async with":
        async with open_items() as items:
            async for i in items:
                got.append(i)
                if len(got) == n:
                    break
    elif how.startswith("cancel"):
        enough = anyio.Event()

        async def consume() -> None:
            async for i in open_items():
                got.append(i)
                if len(got) == n:
                    enough.set()
                    if how == "cancel in the loop body":
                        await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await enough.wait()
            if how == "cancel while waiting":
                # The sender paused after item n - 1: the consumer now waits in __anext__.
                await paused.wait()
            tg.cancel_scope.cancel()
    else:
        items = open_items()
        async for i in items:
            got.append(i)
            if len(got) == n:
                close(items)
        # The loop ended cleanly, with no item after the close.
    return got


@pytest.mark.parametrize("how", STOPS)
async def test_a_client_that_stops_reading_early_closes_the_server_generator(how: str) -> None:
    n = 21
    closed = Closed()
    paused = anyio.Event()
    router = rpcstream.Router()

    @router.method
    async def tick(pause_at: int) -> AsyncIterator[int]:
        async with contextlib.aclosing(ticks(closed, pause_at, paused)) as source:
            async for i in source:
                yield i

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with serving(router) as server:
        async with rpcstream.connect(server.url, window_items=8) as peer:
            pause_at = n if how == "cancel while waiting" else -1
            with anyio.fail_after(WAIT):
                got = await consume_until_stopped(
                    # The common form: the stream is only referenced by the loop.
                    lambda: peer.stream("tick", pause_at),
                    how,
                    n,
                    paused,
                    lambda stream: peer.close_receiving_stream(stream.stream_id),
                )
            # The server's generator is closed while the connection goes on.
            with anyio.fail_after(WAIT):
                await closed.all_closed.wait()
            assert got == list(range(n))
            assert closed.started == closed.closed == 1
            assert [i async for i in peer.stream("count", 5)] == list(range(5))
        await server.wait_idle()


# The handler stops reading but goes on running: these stop the sender at once.
STOPS_AT_ONCE = {"break out of async with", "cancel while waiting", "close_receiving_stream"}


@pytest.mark.parametrize("how", STOPS)
async def test_a_handler_that_stops_reading_early_closes_the_client_generator(how: str) -> None:
    n = 21
    closed = Closed()
    paused = anyio.Event()
    client_router = rpcstream.Router()

    @client_router.method
    async def sender_closed() -> bool:
        # Called back by the handler while it still runs.
        with anyio.move_on_after(WAIT):
            await closed.all_closed.wait()
        return closed.all_closed.is_set()

    router = rpcstream.Router()

    @router.method
    async def take(n: int, items: AsyncIterator[int]) -> dict[str, Any]:
        peer = rpcstream.current_peer()
        got = await consume_until_stopped(
            lambda: items,
            how,
            n,
            paused,
            lambda stream: peer.close_receiving_stream(stream.stream_id),
        )
        if how in STOPS_AT_ONCE:
            return {"got": got, "closed while the handler runs": await peer.call("sender_closed")}
        # `items` is a local of this running handler: a plain break or a cancelled
        # loop body leaves the stream open until the handler returns.
        return {"got": got, "closed while the handler runs": True}

    async with serving(router, window_items=8) as server:
        async with rpcstream.connect(server.url, router=client_router) as peer:
            pause_at = n if how == "cancel while waiting" else -1
            with anyio.fail_after(2 * WAIT):
                answer = await peer.call("take", n, ticks(closed, pause_at, paused))
            assert answer == {"got": list(range(n)), "closed while the handler runs": True}
            # Whatever happened, the sender is closed once the call is over.
            with anyio.fail_after(WAIT):
                await closed.all_closed.wait()
            assert closed.started == closed.closed == 1
        await server.wait_idle()


# -- 3. flow control -----------------------------------------------------------------------


class Lag:
    """How far a sender ran ahead of its receiver: ``produced - consumed``, at its max."""

    def __init__(self) -> None:
        self.produced = 0
        self.consumed = 0
        self.max = 0

    async def produce(self, n: int, size: int) -> AsyncGenerator[bytes, None]:
        for i in range(n):
            self.produced += 1
            self.max = max(self.max, self.produced - self.consumed)
            yield i.to_bytes(4, "big") * (size // 4)

    async def consume(self, items: AsyncIterator[bytes]) -> int:
        count = 0
        async for item in items:
            assert item[:4] == count.to_bytes(4, "big")
            count += 1
            self.consumed += 1
            # A slow reader: give every other task ample chance to run ahead.
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
        return count


# (peer option, its value, item size): the window is 8 items either way.
WINDOWS = [("window_items", 8, 64), ("window_bytes", 8 * 1024, 1024)]


@pytest.mark.parametrize(("option", "value", "size"), WINDOWS, ids=["items", "bytes"])
@pytest.mark.parametrize("direction", ["server to client", "client to server"])
async def test_a_slow_reader_holds_its_sender_within_the_window(
    option: str, value: int, size: int, direction: str
) -> None:
    window = 8
    n = 300
    lag = Lag()
    router = rpcstream.Router()

    @router.method
    async def produce(n: int, size: int) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(lag.produce(n, size)) as source:
            async for item in source:
                yield item

    @router.method
    async def consume(items: AsyncIterator[bytes]) -> int:
        return await lag.consume(items)

    # Generous limits everywhere but the window under test.
    opts: dict[str, Any] = {"window_items": 10_000, "window_bytes": 1 << 24, option: value}
    server_opts = opts if direction == "client to server" else {}
    client_opts = opts if direction == "server to client" else {}
    async with (
        serving(router, **server_opts) as server,
        rpcstream.connect(server.url, **client_opts) as peer,
    ):
        with anyio.fail_after(WAIT * 2):
            if direction == "server to client":
                count = await lag.consume(peer.stream("produce", n, size))
            else:
                count = await peer.call("consume", lag.produce(n, size))
    assert count == lag.produced == lag.consumed == n
    # The one item produced while waiting for credit, plus one of slack.
    assert lag.max <= window + 2, lag.max
    # ...and the sender did run ahead as far as the window let it (the test has teeth).
    assert lag.max >= window // 2, lag.max


async def test_a_window_that_holds_a_fast_reader_back_grows_and_a_slow_readers_does_not() -> None:
    router = rpcstream.Router()

    @router.method
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield i.to_bytes(4, "big") * 4096  # 16 KiB

    opts = {"window_bytes": 64 * 1024, "max_window_bytes": 512 * 1024}
    async with serving(router) as server, rpcstream.connect(server.url, **opts) as peer:
        with anyio.fail_after(WAIT):
            async with peer.stream("chunks", 400) as fast:
                assert fast.window_bytes == 64 * 1024
                count = 0
                async for item in fast:
                    assert item[:4] == count.to_bytes(4, "big")
                    count += 1
                    if count == 399:
                        assert fast.window_bytes == 512 * 1024  # 64 KiB, doubled 3 times
            assert count == 400
            async with peer.stream("chunks", 100) as slow:
                count = 0
                async for _item in slow:
                    count += 1
                    for _ in range(20):  # a slow reader: the sender always runs ahead
                        await anyio.lowlevel.checkpoint()
                    assert slow.window_bytes == 64 * 1024
            assert count == 100


async def test_a_stream_nobody_reads_does_not_stall_the_other_streams_or_calls() -> None:
    lag = Lag()
    hold_released = anyio.Event()
    holding = anyio.Event()
    router = rpcstream.Router()

    @router.method
    async def produce(n: int, size: int) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(lag.produce(n, size)) as source:
            async for item in source:
                yield item

    @router.method
    async def count(start: int, n: int) -> AsyncIterator[int]:
        async with contextlib.aclosing(numbers(start, n)) as source:
            async for i in source:
                yield i

    @router.method
    async def hold(items: AsyncIterator[int]) -> None:
        # Receives a stream and never reads it.
        holding.set()
        await hold_released.wait()

    @router.method
    async def total(items: AsyncIterator[int]) -> int:
        return sum([i async for i in items])

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    unread_sent = Lag()
    async with (
        serving(router, window_items=8) as server,
        rpcstream.connect(server.url, window_items=8) as peer,
    ):
        with anyio.fail_after(WAIT * 2):
            # server -> client: opened, never read.
            unread = peer.stream("produce", 10_000, 64)
            async with anyio.create_task_group() as tg:
                # client -> server: a call whose stream argument is never read.
                tg.start_soon(peer.call, "hold", unread_sent.produce(10_000, 64))
                await holding.wait()
                assert [i async for i in peer.stream("count", 0, 2_000)] == list(range(2_000))
                assert await peer.call("total", numbers(0, 2_000)) == sum(range(2_000))
                for i in range(50):
                    assert await peer.call("add", i, 1) == i + 1
                hold_released.set()
            # Both unread senders filled their window, and went no further.
            assert 8 <= lag.produced <= 8 + 2, lag.produced
            assert 8 <= unread_sent.produced <= 8 + 2, unread_sent.produced
            unread.close()


# -- 4. backpressure -----------------------------------------------------------------------

BATCH = 256 * 1024
CHUNK = 16 * 1024


class Bulk:
    """A bulk sender that samples its own peer's ``buffered_amount`` before each item."""

    def __init__(self) -> None:
        self.max_buffered = 0
        self.sent = 0

    async def items(
        self, peer: rpcstream.RpcPeer, n: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        chunk = b"x" * CHUNK
        i = 0
        while n is None or i < n:
            self.max_buffered = max(self.max_buffered, peer.buffered_amount)
            yield chunk
            self.sent += 1
            i += 1


@pytest.mark.parametrize("direction", ["server to client", "client to server"])
async def test_a_bulk_sender_waits_for_the_socket_while_calls_still_complete(
    direction: str,
) -> None:
    max_buffered = 64 * 1024
    bulk = Bulk()
    received = 0
    flowing = anyio.Event()
    calls_done = anyio.Event()
    router = rpcstream.Router()

    @router.method
    async def download() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(bulk.items(rpcstream.current_peer())) as source:
            async for chunk in source:
                yield chunk

    @router.method
    async def upload(items: AsyncIterator[bytes]) -> int:
        return await sink(items)

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    async def sink(items: AsyncIterator[bytes]) -> int:
        nonlocal received
        async for chunk in items:
            received += len(chunk)
            if received >= 4 * BATCH:
                flowing.set()
            if calls_done.is_set():
                break
        return received

    async def bulk_until_calls_done(peer: rpcstream.RpcPeer) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(bulk.items(peer)) as source:
            async for chunk in source:
                yield chunk
                if calls_done.is_set():
                    return

    # Huge windows: only max_buffered_amount holds the sender back.
    windows: dict[str, Any] = {"window_items": 1 << 20, "window_bytes": 1 << 30}
    sender_opts: dict[str, Any] = {"max_buffered_amount": max_buffered}
    server_opts = {**windows, **(sender_opts if direction == "server to client" else {})}
    client_opts = {**windows, **(sender_opts if direction == "client to server" else {})}
    async with (
        serving(router, **server_opts) as server,
        rpcstream.connect(server.url, **client_opts) as peer,
    ):
        with anyio.fail_after(WAIT * 3):
            async with anyio.create_task_group() as tg:
                if direction == "server to client":
                    tg.start_soon(sink, peer.stream("download"))
                else:
                    tg.start_soon(peer.call, "upload", bulk_until_calls_done(peer))
                await flowing.wait()
                sent_before = bulk.sent
                for i in range(200):
                    assert await peer.call("add", i, 1) == i + 1
                sent_during = bulk.sent - sent_before
                calls_done.set()
    # The bulk stream kept flowing while the calls went through...
    assert sent_during > 0
    # ...yet what waited for the socket stayed bounded...
    assert bulk.max_buffered <= max_buffered + BATCH + CHUNK + 1024, bulk.max_buffered
    # ...by max_buffered_amount, which the sender did reach (the test has teeth).
    assert bulk.max_buffered >= max_buffered // 2, bulk.max_buffered


def _shrink_send_buffer(peer: rpcstream.RpcPeer, size: int) -> None:
    """Make the kernel take little at a time, as over a slow link."""
    ws = peer.transport.ws  # type: ignore[attr-defined]
    transport = getattr(ws, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else ws.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


async def test_a_bulk_sender_held_by_a_slow_socket_resumes_once_the_socket_drains() -> None:
    items = 400
    router = rpcstream.Router()

    @router.method
    async def download(n: int) -> AsyncIterator[bytes]:
        peer = rpcstream.current_peer()
        _shrink_send_buffer(peer, 4096)
        chunk = b"x" * CHUNK
        for _ in range(n):
            yield chunk

    async with (
        serving(router, max_buffered_amount=64 * 1024) as server,
        rpcstream.connect(server.url) as peer,
    ):
        received = 0
        with anyio.fail_after(WAIT):
            async for chunk in peer.stream("download", items):
                received += len(chunk)
        assert received == items * CHUNK


# -- 5. closing and leaks ------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
async def test_closing_the_connection_closes_outgoing_iterators_and_fails_incoming_streams(
    closer: str,
) -> None:
    n = 10
    server_sent = Closed()  # server generators (server -> client streams)
    client_sent = Closed()  # client generators (client -> server streams)
    handlers = Closed()  # server handlers reading client streams
    server_reading = anyio.Event()
    router = rpcstream.Router()
    reading = 0

    @router.method
    async def ticks() -> AsyncIterator[int]:
        async with contextlib.aclosing(endless(server_sent)) as source:
            async for i in source:
                yield i

    @router.method
    async def drain(items: AsyncIterator[int]) -> None:
        nonlocal reading
        handlers.start()
        try:
            first = True
            async for _ in items:
                if first:
                    first = False
                    reading += 1
                    if reading == n:
                        server_reading.set()
        finally:
            handlers.close()

    @router.method
    async def close_me() -> None:
        await rpcstream.current_peer().aclose()

    outcomes: list[BaseException | None] = []
    async with serving(router, window_items=8) as server:
        async with rpcstream.connect(server.url, window_items=8) as peer:
            client_reading = 0
            client_all_reading = anyio.Event()

            async def consume() -> None:
                nonlocal client_reading
                try:
                    first = True
                    async for _ in peer.stream("ticks"):
                        if first:
                            first = False
                            client_reading += 1
                            if client_reading == n:
                                client_all_reading.set()
                except BaseException as exc:
                    outcomes.append(exc)
                    raise
                outcomes.append(None)

            async def upload() -> None:
                try:
                    await peer.call("drain", endless(client_sent))
                except BaseException as exc:
                    outcomes.append(exc)
                    raise
                outcomes.append(None)

            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:

                    async def guarded(func: Callable[[], Any]) -> None:
                        with pytest.raises(rpcstream.ConnectionClosed):
                            await func()

                    for _ in range(n):
                        tg.start_soon(guarded, consume)
                        tg.start_soon(guarded, upload)
                    await client_all_reading.wait()
                    await server_reading.wait()
                    if closer == "client":
                        await peer.aclose()
                    else:
                        with pytest.raises(rpcstream.ConnectionClosed):
                            await peer.call("close_me")
                await client_sent.all_closed.wait()
                await server_sent.all_closed.wait()
                await handlers.all_closed.wait()
            assert peer.closed
        with anyio.fail_after(WAIT):
            await server.wait_idle()
        assert idle(server.stats), server.stats
    assert len(outcomes) == 2 * n
    assert all(isinstance(exc, rpcstream.ConnectionClosed) for exc in outcomes), outcomes
    assert client_sent.started == client_sent.closed == n
    assert server_sent.started == server_sent.closed == n
    assert handlers.started == handlers.closed == n


def _abort(peer: rpcstream.RpcPeer) -> None:
    """Drop the TCP connection at once, with no closing handshake."""
    ws = peer.transport.ws  # type: ignore[attr-defined]
    transport = getattr(ws, "transport", None)
    if transport is not None:
        transport.abort()
    else:
        ws.stream.socket.close()


async def test_a_thousand_connections_dropped_mid_stream_leave_nothing_behind_on_the_server() -> (
    None
):
    server_sent = Closed()
    handlers = Closed()
    router = rpcstream.Router()

    @router.method
    async def ticks() -> AsyncIterator[int]:
        async with contextlib.aclosing(endless(server_sent)) as source:
            async for i in source:
                yield i

    @router.method
    async def drain(items: AsyncIterator[int]) -> None:
        handlers.start()
        try:
            async for _ in items:
                pass
        finally:
            handlers.close()

    async def one(url: str, abort: bool) -> None:
        client_sent = Closed()
        uploading = anyio.Event()
        async with rpcstream.connect(url, window_items=8) as peer, anyio.create_task_group() as tg:
            tg.start_soon(peer.call, "drain", endless(client_sent, uploading, 3))
            # Read a few items of a stream from the server...
            async for i in peer.stream("ticks"):
                if i == 3:
                    break
            # ...while the upload flows, then drop everything: leave the block (a
            # closing handshake) or, for one connection in four, cut the TCP connection.
            await uploading.wait()
            if abort:
                _abort(peer)
            tg.cancel_scope.cancel()

    tasks_before_serving = len(anyio.get_running_tasks())
    async with serving(router) as server:
        with anyio.fail_after(50):
            for batch in range(0, 1000, 50):
                async with anyio.create_task_group() as tg:
                    for i in range(batch, batch + 50):
                        tg.start_soon(one, server.url, i % 4 == 0)
            await server.wait_idle()
            await server_sent.all_closed.wait()
            await handlers.all_closed.wait()
        assert idle(server.stats), server.stats
        assert server.connections_accepted == 1000
        assert server_sent.started == handlers.started == 1000
        # No rpcstream task is left (websockets may still be closing TCP connections)
        # but trio's one per run that writes what connections queued in a turn.
        left = [t.name for t in anyio.get_running_tasks() if "rpcstream" in (t.name or "")]
        assert left in ([], ["rpcstream next turn"])
    # ...and once the server is gone, no task at all.
    assert len(anyio.get_running_tasks()) == tasks_before_serving + len(left)


# -- 6. the raw API ------------------------------------------------------------------------


async def test_send_stream_with_its_own_id_reaches_receive_stream_on_the_other_side() -> None:
    router = rpcstream.Router()
    sent_to_client = Closed()

    @router.method
    async def collect(sid: int) -> list[int]:
        _, incoming = rpcstream.current_peer().receive_stream(sid, item_type=int)
        return [i async for i in incoming]

    @router.method
    async def push(n: int) -> int:
        async def items() -> AsyncIterator[int]:
            sent_to_client.start()
            try:
                async with contextlib.aclosing(numbers(0, n)) as source:
                    async for i in source:
                        yield i
            finally:
                sent_to_client.close()

        return await rpcstream.current_peer().send_stream(items())

    async with (
        serving(router, window_items=8) as server,
        rpcstream.connect(server.url, window_items=8) as peer,
    ):
        # client -> server: the sender allocates the id (odd: the connecting side).
        sid = await peer.send_stream(numbers(0, 100))
        assert sid % 2 == 1
        assert await peer.call("collect", sid) == list(range(100))

        # server -> client: the server allocates the id (even) and returns it.
        sid = await peer.call("push", 100)
        assert sid % 2 == 0
        got_sid, incoming = peer.receive_stream(sid, item_type=int)
        assert got_sid == sid
        assert [i async for i in incoming] == list(range(100))
        with anyio.fail_after(WAIT):
            await sent_to_client.all_closed.wait()
        assert peer.stats["streams"] == 0


async def test_receive_stream_allocates_an_id_the_sender_then_sends_on() -> None:
    client_router = rpcstream.Router()

    @client_router.method
    async def send_to(sid: int, n: int) -> None:
        await rpcstream.current_peer().send_stream(numbers(0, n), stream_id=sid)

    router = rpcstream.Router()

    @router.method("send_to")
    async def server_send_to(sid: int, n: int) -> None:
        await rpcstream.current_peer().send_stream(numbers(1000, n), stream_id=sid)

    @router.method
    async def pull(n: int) -> list[int]:
        # The server, as receiver, allocates the id and asks the client to send on it.
        peer = rpcstream.current_peer()
        sid, incoming = peer.receive_stream(item_type=int)
        assert sid % 2 == 0
        await peer.call("send_to", sid, n)
        return [i async for i in incoming]

    async with (
        serving(router, window_items=8) as server,
        rpcstream.connect(server.url, router=client_router, window_items=8) as peer,
    ):
        # The client, as receiver, allocates the id; its credit is already on its
        # way before the sender registers the stream.
        sid, incoming = peer.receive_stream(item_type=int)
        assert sid % 2 == 1
        await peer.call("send_to", sid, 100)
        assert [i async for i in incoming] == list(range(1000, 1100))

        assert await peer.call("pull", 100) == list(range(100))
        assert peer.stats["streams"] == 0


async def test_abort_stream_raises_cancelled_in_the_receiver_both_ways() -> None:
    client_sent = Closed()
    server_sent = Closed()
    server_reached = anyio.Event()
    router = rpcstream.Router()

    @router.method
    async def collect(sid: int) -> dict[str, Any]:
        _, incoming = rpcstream.current_peer().receive_stream(sid, item_type=int)
        got: list[int] = []
        try:
            async for i in incoming:
                got.append(i)
                if i == 5:
                    server_reached.set()
        except rpcstream.RemoteError as exc:
            return {"count": len(got), "error": type(exc).__name__}
        return {"count": len(got), "error": None}

    @router.method
    async def start() -> int:
        return await rpcstream.current_peer().send_stream(endless(server_sent))

    @router.method
    async def abort(sid: int) -> None:
        rpcstream.current_peer().abort_stream(sid)

    async with (
        serving(router, window_items=8) as server,
        rpcstream.connect(server.url, window_items=8) as peer,
    ):
        with anyio.fail_after(WAIT):
            # client -> server, aborted by the client.
            sid = await peer.send_stream(endless(client_sent))
            async with anyio.create_task_group() as tg:

                async def call_collect() -> None:
                    answer = await peer.call("collect", sid)
                    assert answer["error"] == "Cancelled"
                    assert answer["count"] >= 6

                tg.start_soon(call_collect)
                await server_reached.wait()
                peer.abort_stream(sid)
            await client_sent.all_closed.wait()

            # server -> client, aborted by the server.
            sid = await peer.call("start")
            _, incoming = peer.receive_stream(sid, item_type=int)
            got: list[int] = []
            with pytest.raises(rpcstream.Cancelled):
                async for i in incoming:
                    got.append(i)
                    if i == 5:
                        await peer.call("abort", sid)
            assert got[:6] == list(range(6))
            await server_sent.all_closed.wait()
        assert peer.stats["streams"] == 0


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_a_bidirectional_method_answers_each_line_as_it_arrives(codec: str) -> None:
    router = rpcstream.Router()

    @router.method
    async def shout(lines: AsyncIterator[str]) -> AsyncIterator[str]:
        async for line in lines:
            yield line.upper() + "!"

    async with serving(router) as server, rpcstream.connect(server.url, codec=codec) as peer:
        # Lock step: each line is only sent once the reply to the previous one
        # arrived, so nothing works unless both directions flow item by item.
        send, receive = anyio.create_memory_object_stream[str](1)

        async def lines() -> AsyncIterator[str]:
            async with receive:
                async for line in receive:
                    yield line

        words = ["héllo", "wörld", "streams", "go", "both", "ways"]
        replies: list[str] = []
        with anyio.fail_after(WAIT):
            async with send:
                replies_it = peer.stream("shout", lines(), item_type=str)
                for word in words:
                    await send.send(word)
                    replies.append(await replies_it.__anext__())
            with pytest.raises(StopAsyncIteration):
                await replies_it.__anext__()
        assert replies == [w.upper() + "!" for w in words]


# -- 7. the JSON codec ---------------------------------------------------------------------


class Tick(msgspec.Struct):
    seq: int
    label: str
    tags: list[str] = []


async def test_typed_items_stream_both_ways_with_the_json_codec() -> None:
    router = rpcstream.Router()

    @router.method
    async def ticks(n: int) -> AsyncIterator[Tick]:
        for i in range(n):
            yield Tick(i, f"tick «{i}»", ["even"] if i % 2 == 0 else [])

    @router.method
    async def labels(items: AsyncIterator[Tick]) -> list[str]:
        return [f"{t.seq}:{t.label}" async for t in items]

    async def send(n: int) -> AsyncIterator[Tick]:
        for i in range(n):
            yield Tick(i, f"up {i}")

    async with (
        serving(router, window_items=8) as server,
        rpcstream.connect(server.url, codec="json", window_items=8) as peer,
    ):
        assert peer.codec.name == "json"
        got = [t async for t in peer.stream("ticks", 50, item_type=Tick)]
        assert got == [Tick(i, f"tick «{i}»", ["even"] if i % 2 == 0 else []) for i in range(50)]
        assert await peer.call("labels", send(50)) == [f"{i}:up {i}" for i in range(50)]
