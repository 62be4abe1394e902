"""The workloads of ``bench_peer``: the servers, and each workload done twice, once over
rpcstream (public API only, every setting at its default) and once over raw websockets
doing the same work by hand.

Every workload checks its answers and raises :class:`WrongAnswer` when they are wrong,
so a figure is only ever reported for work that was done right.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import msgspec
import sniffio
import websockets
import websockets.exceptions
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import rpcstream

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
LOOPS = ("asyncio", "uvloop", "trio")
WORKLOAD_NAMES = ("W1", "W2", "W3", "W3f", "W4", "W5", "slow")
TOK = "hello world"
MAX_MESSAGE_SIZE = 4 * MiB  # rpcstream's default, given to raw websockets too

ENC = msgspec.msgpack.Encoder()
DEC = msgspec.msgpack.Decoder()
NIL = ENC.encode(None)
OP_ECHO, OP_ITEMS, OP_CHUNKS, OP_MULTI = range(4)

Figures = dict[str, Any]


class WrongAnswer(RuntimeError):
    """A workload got an answer other than the one the work must produce."""


class WorkloadFailed(RuntimeError):
    """A workload could not finish; ``details`` go into its JSON line."""

    def __init__(self, message: str, details: Figures) -> None:
        super().__init__(message)
        self.details = details


def check(ok: bool, what: str) -> None:
    """Raise :class:`WrongAnswer` unless ``ok`` (not ``assert``: ``-O`` would drop it)."""
    if not ok:
        raise WrongAnswer(what)


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does."""

    w1_items: int = 200_000
    w2_bytes: int = 256 * MiB
    w2_chunk: int = 64 * KiB
    w3_calls: int = 20_000
    w4_calls: int = 50_000
    w4_concurrency: int = 100
    w5_streams: int = 1_000
    w5_items: int = 200
    slow_bytes: int = 1 * GiB
    slow_chunk: int = 64 * KiB
    slow_rate: float = 10e6  # bytes per second the consumer reads
    slow_seconds: float = 20.0  # the run stops after this long
    w3_link_seconds: float = 10.0  # on a link, W3 makes about this many seconds of calls

    def warmup(self) -> Sizes:
        """A small version of the same work, run before each measurement."""
        return replace(
            self,
            w1_items=max(1, self.w1_items // 20),
            w2_bytes=max(self.w2_chunk, self.w2_bytes // 32),
            w3_calls=max(1, self.w3_calls // 20),
            w4_calls=max(self.w4_concurrency, self.w4_calls // 20),
            w5_streams=max(1, self.w5_streams // 10),
        )

    def on_link(self, rtt: float) -> Sizes:
        """The same work on a link of round trip ``rtt`` (s): fewer sequential calls.

        A sequential call costs at least one round trip, so W3 at 100 ms would take
        ``w3_calls`` x 0.1 s; its p50 needs far fewer samples than that.
        """
        if rtt <= 0:
            return self
        return replace(
            self, w3_calls=min(self.w3_calls, max(10, round(self.w3_link_seconds / rtt)))
        )


FULL = Sizes()
QUICK = Sizes(
    w1_items=10_000,
    w2_bytes=32 * MiB,
    w3_calls=1_000,
    w4_calls=3_000,
    w5_streams=100,
    w5_items=50,
    slow_bytes=64 * MiB,
    slow_rate=20e6,
    slow_seconds=1.0,
    w3_link_seconds=2.0,
)
TINY = Sizes(  # for tests: everything runs and checks its answers, in a second or two
    w1_items=200,
    w2_bytes=1 * MiB,
    w3_calls=20,
    w4_calls=100,
    w4_concurrency=10,
    w5_streams=5,
    w5_items=10,
    slow_bytes=4 * MiB,
    slow_rate=50e6,
    slow_seconds=0.2,
    w3_link_seconds=0.2,
)
SIZES = {"full": FULL, "quick": QUICK, "tiny": TINY}


def emit(record: Figures) -> None:
    """Print one result line."""
    print(json.dumps(record), flush=True)


# -- servers -----------------------------------------------------------------------------


class _Produced:
    """Bytes the chunk senders of this process produced (the slow-consumer server's)."""

    bytes = 0


produced = _Produced()


def make_router() -> rpcstream.Router:
    """The rpcstream methods the workloads call."""
    router = rpcstream.Router()

    @router.method
    async def echo(x: Any) -> Any:
        return x

    @router.method
    def echo_plain(x: Any) -> Any:
        return x

    @router.method
    async def items(n: int) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {"i": i, "tok": TOK}

    @router.method
    async def chunks(total: int, size: int) -> AsyncIterator[bytes]:
        chunk = bytes(size)
        sent = 0
        while sent < total:
            yield chunk
            sent += size
            produced.bytes += size

    return router


async def _raw_chunks(ws: Any, total: int, size: int) -> None:
    chunk = bytes(size)
    sent = 0
    while sent < total:
        await ws.send(ENC.encode(chunk))
        sent += size
        produced.bytes += size
    await ws.send(NIL)


async def _raw_stream(ws: Any, sid: int, n: int) -> None:
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        for i in range(n):
            await ws.send(ENC.encode((sid, {"i": i, "tok": TOK})))
        await ws.send(ENC.encode((sid, None)))


async def raw_handler(ws: Any) -> None:
    """The raw server: ``[op, id, args...]`` requests, msgpack by hand."""
    async with anyio.create_task_group() as tg:
        while True:
            try:
                req = DEC.decode(await ws.recv(decode=False))
                op = req[0]
                if op == OP_ECHO:
                    await ws.send(ENC.encode((req[1], req[2])))
                elif op == OP_ITEMS:
                    for i in range(req[2]):
                        await ws.send(ENC.encode({"i": i, "tok": TOK}))
                    await ws.send(NIL)
                elif op == OP_CHUNKS:
                    await _raw_chunks(ws, req[2], req[3])
                elif op == OP_MULTI:
                    tg.start_soon(_raw_stream, ws, req[1], req[2])
            except websockets.exceptions.ConnectionClosed:
                break


def raw_server() -> contextlib.AbstractAsyncContextManager[str]:
    """Serve :func:`raw_handler` on 127.0.0.1 with websockets' own API; yield its URL."""
    return serve_raw(raw_handler)


@contextlib.asynccontextmanager
async def serve_raw(handler: Callable[[Any], Awaitable[None]]) -> AsyncIterator[str]:
    """Serve ``handler`` on 127.0.0.1 with websockets' own API; yield its URL."""
    options: dict[str, Any] = {"compression": None, "max_size": MAX_MESSAGE_SIZE}
    if sniffio.current_async_library() == "trio":
        from websockets.trio.server import serve as trio_serve

        async with anyio.create_task_group() as tg:
            server = await tg.start(
                functools.partial(trio_serve, handler, 0, host="127.0.0.1", **options)
            )
            try:
                yield f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"
            finally:
                with anyio.CancelScope(shield=True):
                    await server.aclose()
                tg.cancel_scope.cancel()
    else:
        from websockets.asyncio.server import serve as asyncio_serve

        async with asyncio_serve(handler, "127.0.0.1", 0, **options) as server:
            yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_connect(url: str) -> AsyncIterator[Any]:
    """A raw websockets client connection on the current event loop."""
    options: dict[str, Any] = {"compression": None, "max_size": MAX_MESSAGE_SIZE}
    if sniffio.current_async_library() == "trio":
        from websockets.trio.client import connect as trio_connect

        async with trio_connect(url, **options) as ws:
            yield ws
    else:
        from websockets.asyncio.client import connect as asyncio_connect

        async with asyncio_connect(url, **options) as ws:
            yield ws


# -- the workloads, rpcstream side -------------------------------------------------------


def _item_rate(items: int, seconds: float) -> Figures:
    return {"items": items, "seconds": round(seconds, 3), "items_per_s": round(items / seconds)}


def _latencies(samples: list[int], seconds: float) -> Figures:
    samples.sort()
    n = len(samples)
    return {
        "calls": n,
        "seconds": round(seconds, 3),
        "calls_per_s": round(n / seconds),
        "p50_us": round(samples[n // 2] / 1000, 1),
        "p99_us": round(samples[min(n - 1, math.ceil(n * 0.99) - 1)] / 1000, 1),
    }


def _w1_item(i: int) -> dict[str, Any]:
    return {"i": i, "tok": TOK}


async def rpc_w1(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    count = 0
    last: Any = None
    start = time.perf_counter()
    async for item in peer.stream("items", s.w1_items):
        count += 1
        last = item
    seconds = time.perf_counter() - start
    check(count == s.w1_items and last == _w1_item(count - 1), f"W1: {count} items, last {last}")
    return _item_rate(count, seconds)


async def rpc_w2(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    received = 0
    start = time.perf_counter()
    async for chunk in peer.stream("chunks", s.w2_bytes, s.w2_chunk):
        received += len(chunk)
    seconds = time.perf_counter() - start
    check(received == _w2_total(s), f"W2: {received} bytes, not {_w2_total(s)}")
    return _bytes_rate(received, s.w2_chunk, seconds)


def _w2_total(s: Sizes) -> int:
    """What the chunk senders send: whole chunks, at least ``w2_bytes``."""
    return -(-s.w2_bytes // s.w2_chunk) * s.w2_chunk


def _bytes_rate(received: int, chunk: int, seconds: float) -> Figures:
    return {
        "mib": round(received / MiB, 1),
        "chunk_kib": chunk // KiB,
        "seconds": round(seconds, 3),
        "mb_per_s": round(received / seconds / 1e6, 1),
    }


async def rpc_w3(peer: rpcstream.RpcPeer, s: Sizes, method: str = "echo") -> Figures:
    payload = {"i": 0, "tok": TOK}
    samples: list[int] = []
    clock = time.perf_counter_ns
    start = time.perf_counter()
    for _ in range(s.w3_calls):
        t0 = clock()
        answer = await peer.call(method, payload)
        samples.append(clock() - t0)
        check(answer == payload, f"W3: echo answered {answer!r}")
    return _latencies(samples, time.perf_counter() - start)


async def rpc_w3f(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    return await rpc_w3(peer, s, "echo_plain")


async def _workers(n: int, calls: int, work: Callable[[int], Awaitable[None]]) -> float:
    """Run ``calls`` calls of ``work`` spread over ``n`` tasks; return the seconds taken."""
    per, extra = divmod(calls, n)

    async def worker(count: int) -> None:
        for _ in range(count):
            await work(count)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(n):
            tg.start_soon(worker, per + (w < extra))
    return time.perf_counter() - start


async def rpc_w4(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    payload = {"i": 0, "tok": TOK}

    async def one(_: int) -> None:
        answer = await peer.call("echo", payload)
        check(answer == payload, f"W4: echo answered {answer!r}")

    seconds = await _workers(s.w4_concurrency, s.w4_calls, one)
    return {
        "calls": s.w4_calls,
        "in_flight": s.w4_concurrency,
        "seconds": round(seconds, 3),
        "calls_per_s": round(s.w4_calls / seconds),
    }


async def rpc_w5(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    total = 0
    failed: dict[str, int] = {}  # error name -> streams that failed with it

    async def consume() -> None:
        nonlocal total
        count = 0
        try:
            async for _item in peer.stream("items", s.w5_items):
                count += 1
        except rpcstream.RpcStreamError as exc:
            # At the defaults the server may refuse streams (Overloaded): a finding
            # to report with how many, not a reason to abandon the other streams.
            name = type(exc).__name__
            failed[name] = failed.get(name, 0) + 1
            return
        total += count

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(s.w5_streams):
            tg.start_soon(consume)
    seconds = time.perf_counter() - start
    if failed:
        summary = ", ".join(f"{n} {name}" for name, n in sorted(failed.items()))
        raise WorkloadFailed(
            f"W5: {sum(failed.values())} of {s.w5_streams} streams failed ({summary})",
            {"streams": s.w5_streams, "failed_streams": failed},
        )
    check(total == s.w5_streams * s.w5_items, f"W5: {total} items")
    return {"streams": s.w5_streams, **_item_rate(total, seconds)}


# -- the workloads, raw side -------------------------------------------------------------


async def raw_w1(ws: Any, s: Sizes) -> Figures:
    count = 0
    start = time.perf_counter()
    await ws.send(ENC.encode((OP_ITEMS, 0, s.w1_items)))
    last: Any = None
    while (item := DEC.decode(await ws.recv(decode=False))) is not None:
        count += 1
        last = item
    seconds = time.perf_counter() - start
    check(count == s.w1_items and last == _w1_item(count - 1), f"W1: {count} items, last {last}")
    return _item_rate(count, seconds)


async def raw_w2(ws: Any, s: Sizes) -> Figures:
    received = 0
    start = time.perf_counter()
    await ws.send(ENC.encode((OP_CHUNKS, 0, s.w2_bytes, s.w2_chunk)))
    while (chunk := DEC.decode(await ws.recv(decode=False))) is not None:
        received += len(chunk)
    seconds = time.perf_counter() - start
    check(received == _w2_total(s), f"W2: {received} bytes, not {_w2_total(s)}")
    return _bytes_rate(received, s.w2_chunk, seconds)


async def raw_w3(ws: Any, s: Sizes) -> Figures:
    payload = {"i": 0, "tok": TOK}
    samples: list[int] = []
    clock = time.perf_counter_ns
    start = time.perf_counter()
    for cid in range(s.w3_calls):
        t0 = clock()
        await ws.send(ENC.encode((OP_ECHO, cid, payload)))
        answer_id, answer = DEC.decode(await ws.recv(decode=False))
        samples.append(clock() - t0)
        check(answer_id == cid and answer == payload, f"W3: call {cid} answered {answer!r}")
    return _latencies(samples, time.perf_counter() - start)


class _Pending:
    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.answer: Any = None


async def raw_w4(ws: Any, s: Sizes) -> Figures:
    payload = {"i": 0, "tok": TOK}
    pending: dict[int, _Pending] = {}
    next_id = 0

    async def reader() -> None:
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                cid, answer = DEC.decode(await ws.recv(decode=False))
                p = pending.pop(cid)
                p.answer = answer
                p.event.set()

    async def one(_: int) -> None:
        nonlocal next_id
        cid = next_id = next_id + 1
        p = pending[cid] = _Pending()
        await ws.send(ENC.encode((OP_ECHO, cid, payload)))
        await p.event.wait()
        check(p.answer == payload, f"W4: echo answered {p.answer!r}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        seconds = await _workers(s.w4_concurrency, s.w4_calls, one)
        tg.cancel_scope.cancel()
    return {
        "calls": s.w4_calls,
        "in_flight": s.w4_concurrency,
        "seconds": round(seconds, 3),
        "calls_per_s": round(s.w4_calls / seconds),
    }


async def raw_w5(ws: Any, s: Sizes) -> Figures:
    total = 0
    inboxes: dict[int, MemoryObjectSendStream[Any]] = {}
    remaining = s.w5_streams

    async def reader() -> None:
        nonlocal remaining
        decode = msgspec.msgpack.Decoder(tuple[int, Any]).decode
        while remaining:
            sid, item = decode(await ws.recv(decode=False))
            inboxes[sid].send_nowait(item)
            if item is None:
                remaining -= 1

    async def consume(inbox: MemoryObjectReceiveStream[Any]) -> None:
        nonlocal total
        count = 0
        async with inbox:
            async for item in inbox:
                if item is None:
                    break
                count += 1
        total += count

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        for sid in range(s.w5_streams):
            send, receive = anyio.create_memory_object_stream[Any](math.inf)
            inboxes[sid] = send
            tg.start_soon(consume, receive)
            await ws.send(ENC.encode((OP_MULTI, sid, s.w5_items)))
    seconds = time.perf_counter() - start
    for inbox in inboxes.values():
        inbox.close()
    check(total == s.w5_streams * s.w5_items, f"W5: {total} items")
    return {"streams": s.w5_streams, **_item_rate(total, seconds)}


RPC_WORKLOADS: dict[str, Callable[[rpcstream.RpcPeer, Sizes], Awaitable[Figures]]] = {
    "W1": rpc_w1,
    "W2": rpc_w2,
    "W3": rpc_w3,
    "W3f": rpc_w3f,
    "W4": rpc_w4,
    "W5": rpc_w5,
}
RAW_WORKLOADS: dict[str, Callable[[Any, Sizes], Awaitable[Figures]]] = {
    "W1": raw_w1,
    "W2": raw_w2,
    "W3": raw_w3,
    "W3f": raw_w3,
    "W4": raw_w4,
    "W5": raw_w5,
}
