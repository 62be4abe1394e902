"""rpcstream against raw websockets: the same work, in the same run, on each event loop.

Prints one JSON line per (workload, loop, implementation)::

    python -m benchmarks.bench_peer                        # asyncio, full sizes
    python -m benchmarks.bench_peer --loop all             # asyncio, uvloop and trio
    python -m benchmarks.bench_peer --quick                # a smoke run (about 10 s)
    python -m benchmarks.bench_peer --workloads W2,W3 --profile   # cProfile rpcstream

Workloads (full sizes; ``--quick`` scales them down):

* ``W1``: one stream of 200,000 items ``{"i": n, "tok": "hello world"}``, server to
  client: ``items_per_s``.
* ``W2``: 256 MiB in 64 KiB ``bytes`` chunks, server to client: ``mb_per_s`` (10^6 B/s).
* ``W3``: 20,000 sequential echo calls: ``p50_us``, ``p99_us``, ``calls_per_s``.
* ``W3f``: the same calls to an echo that is a plain function (it runs where the
  call arrives, with no task): what the cheapest call costs.
* ``W4``: 50,000 echo calls, 100 in flight (100 worker tasks): ``calls_per_s``.
* ``W5``: 1,000 concurrent streams of 200 W1 items on one connection: ``items_per_s``.
* ``slow``: a consumer reading 10 MB/s (it sleeps after each chunk to keep to the
  rate) from a sender that has 1 GiB to send, stopped after 20 s. Server and client
  each run in a fresh subprocess of this script, so each side's peak RSS (``VmHWM``,
  MiB) is its own; ``sender_ahead_mib`` is what the sender produced beyond what the
  consumer read (it sits in buffers somewhere).

The raw baseline uses websockets' own API (``websockets.asyncio`` on asyncio and
uvloop, ``websockets.trio`` on trio), ``compression=None`` on both sides, one binary
WebSocket message per item, msgpack framing by hand with msgspec: an item is
``encode(item)`` (``nil`` ends a stream), a call is ``[op, id, payload]`` and its
answer ``[id, payload]``, and a W5 item is ``[stream_id, item]``, demultiplexed by
the client into one memory object stream per stream id. The raw server answers echo
calls inline (no task per call); rpcstream starts a handler task per call.

rpcstream runs with its defaults except ``max_concurrent_handlers=2048`` on the
server (W5 needs 1,000 concurrent streaming handlers; the default is 256).

Except for ``slow``, server and client share one process and one event loop over
127.0.0.1, so every figure counts the work of both sides, and ``cpu_s`` is the CPU
time of both. Each in-process workload runs ``--repeat`` times (default 3), raw and
rpcstream alternately after a warm-up; a line reports the run with the median figure
and ``runs`` lists them all. ``ratio_to_raw`` (on ``rpcstream`` lines) is the
rpcstream figure divided by the raw figure, for the figure named by ``metric``: above
1 is better for throughputs, below 1 is better for ``p50_us`` and memory.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib.util
import io
import json
import math
import os
import pstats
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
import sniffio
import websockets
import websockets.exceptions
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import rpcstream

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
LOOPS = ("asyncio", "uvloop", "trio")
WORKLOAD_NAMES = ("W1", "W2", "W3", "W3f", "W4", "W5", "slow")
TOK = "hello world"
SERVER_OPTIONS: dict[str, Any] = {"max_concurrent_handlers": 2048}
MAX_MESSAGE_SIZE = 4 * MiB  # rpcstream's default, given to raw websockets too
CLOSE_BUDGET = 2.0  # seconds the slow consumer's client may spend closing

ENC = msgspec.msgpack.Encoder()
DEC = msgspec.msgpack.Decoder()
NIL = ENC.encode(None)
OP_ECHO, OP_ITEMS, OP_CHUNKS, OP_MULTI = range(4)

Figures = dict[str, Any]


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
)


@dataclass(frozen=True)
class Target:
    """What rpcstream should reach, as a ratio to raw of the workload's main figure."""

    metric: str
    ratio: float
    higher_is_better: bool = True

    def met(self, ratio: float) -> bool:
        return ratio >= self.ratio if self.higher_is_better else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.ratio}x raw"


TARGETS = {
    "W1": Target("items_per_s", 2.0),
    "W2": Target("mb_per_s", 0.9),
    "W3": Target("p50_us", 1.2, higher_is_better=False),
    "W3f": Target("p50_us", 1.2, higher_is_better=False),
    "W4": Target("calls_per_s", 0.8),
    "W5": Target("items_per_s", 2.0),
}


def emit(record: Figures) -> None:
    """Print one result line."""
    print(json.dumps(record), flush=True)


# -- memory ------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """The current resident set size in MiB (Linux only)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else round(kib / 1024, 1)


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux and BSD, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
    return round(kib / 1024, 1)


# -- servers -----------------------------------------------------------------------------

_produced = 0  # bytes the chunk senders produced, for the slow-consumer server


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
        global _produced
        chunk = bytes(size)
        sent = 0
        while sent < total:
            yield chunk
            sent += size
            _produced += size

    return router


async def _raw_chunks(ws: Any, total: int, size: int) -> None:
    global _produced
    chunk = bytes(size)
    sent = 0
    while sent < total:
        await ws.send(ENC.encode(chunk))
        sent += size
        _produced += size
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


@contextlib.asynccontextmanager
async def raw_server() -> AsyncIterator[str]:
    """Serve :func:`raw_handler` on 127.0.0.1 with websockets' own API; yield its URL."""
    options: dict[str, Any] = {"compression": None, "max_size": MAX_MESSAGE_SIZE}
    if sniffio.current_async_library() == "trio":
        from websockets.trio.server import serve as trio_serve

        async with anyio.create_task_group() as tg:
            server = await tg.start(
                functools.partial(trio_serve, raw_handler, 0, host="127.0.0.1", **options)
            )
            try:
                yield f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"
            finally:
                with anyio.CancelScope(shield=True):
                    await server.aclose()
                tg.cancel_scope.cancel()
    else:
        from websockets.asyncio.server import serve as asyncio_serve

        async with asyncio_serve(raw_handler, "127.0.0.1", 0, **options) as server:
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


async def rpc_w1(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    count = 0
    start = time.perf_counter()
    async for _item in peer.stream("items", s.w1_items):
        count += 1
    seconds = time.perf_counter() - start
    assert count == s.w1_items
    return _item_rate(count, seconds)


async def rpc_w2(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    received = 0
    start = time.perf_counter()
    async for chunk in peer.stream("chunks", s.w2_bytes, s.w2_chunk):
        received += len(chunk)
    seconds = time.perf_counter() - start
    assert received >= s.w2_bytes
    return _bytes_rate(received, s.w2_chunk, seconds)


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
        await peer.call(method, payload)
        samples.append(clock() - t0)
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
        await peer.call("echo", payload)

    seconds = await _workers(s.w4_concurrency, s.w4_calls, one)
    return {
        "calls": s.w4_calls,
        "in_flight": s.w4_concurrency,
        "seconds": round(seconds, 3),
        "calls_per_s": round(s.w4_calls / seconds),
    }


async def rpc_w5(peer: rpcstream.RpcPeer, s: Sizes) -> Figures:
    total = 0

    async def consume() -> None:
        nonlocal total
        count = 0
        async for _item in peer.stream("items", s.w5_items):
            count += 1
        total += count

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(s.w5_streams):
            tg.start_soon(consume)
    seconds = time.perf_counter() - start
    assert total == s.w5_streams * s.w5_items
    return {"streams": s.w5_streams, **_item_rate(total, seconds)}


# -- the workloads, raw side -------------------------------------------------------------


async def raw_w1(ws: Any, s: Sizes) -> Figures:
    count = 0
    start = time.perf_counter()
    await ws.send(ENC.encode((OP_ITEMS, 0, s.w1_items)))
    while DEC.decode(await ws.recv(decode=False)) is not None:
        count += 1
    seconds = time.perf_counter() - start
    assert count == s.w1_items
    return _item_rate(count, seconds)


async def raw_w2(ws: Any, s: Sizes) -> Figures:
    received = 0
    start = time.perf_counter()
    await ws.send(ENC.encode((OP_CHUNKS, 0, s.w2_bytes, s.w2_chunk)))
    while (chunk := DEC.decode(await ws.recv(decode=False))) is not None:
        received += len(chunk)
    seconds = time.perf_counter() - start
    assert received >= s.w2_bytes
    return _bytes_rate(received, s.w2_chunk, seconds)


async def raw_w3(ws: Any, s: Sizes) -> Figures:
    payload = {"i": 0, "tok": TOK}
    samples: list[int] = []
    clock = time.perf_counter_ns
    start = time.perf_counter()
    for cid in range(s.w3_calls):
        t0 = clock()
        await ws.send(ENC.encode((OP_ECHO, cid, payload)))
        answer_id, _answer = DEC.decode(await ws.recv(decode=False))
        samples.append(clock() - t0)
        assert answer_id == cid
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
    assert total == s.w5_streams * s.w5_items
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


# -- in-process runs ---------------------------------------------------------------------


class _Profiler:
    """cProfile the rpcstream measurements of one workload, when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.prof = cProfile.Profile() if enabled else None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.prof is None:
            yield
            return
        self.prof.enable()
        try:
            yield
        finally:
            self.prof.disable()

    def report(self, title: str, top: int = 30) -> None:
        """Print the top functions by own time to stderr."""
        if self.prof is None:
            return
        out = io.StringIO()
        stats = pstats.Stats(self.prof, stream=out).strip_dirs().sort_stats("tottime")
        stats.print_stats(top)
        if os.environ.get("BENCH_CALLERS"):  # who calls these (a regex), when asked
            stats.print_callers(os.environ["BENCH_CALLERS"])
        print(f"== profile: {title} (sorted by tottime)\n{out.getvalue()}", file=sys.stderr)


async def _timed(work: Awaitable[Figures]) -> Figures:
    """Run one measurement; add the CPU time the process spent (both sides)."""
    cpu = time.process_time()
    figures = await work
    return {**figures, "cpu_s": round(time.process_time() - cpu, 3)}


def _median(runs: list[Figures], metric: str) -> Figures:
    """The run with the median ``metric``, and every run's ``metric``."""
    ordered = sorted(runs, key=lambda r: r[metric])
    return {**ordered[len(ordered) // 2], "runs": [r[metric] for r in runs]}


async def run_in_process(
    loop: str, workloads: list[str], sizes: Sizes, repeat: int, profile: bool
) -> None:
    """Run ``workloads`` (not ``slow``) with both implementations on the running loop.

    Each workload runs ``repeat`` times, raw and rpcstream alternately, after a
    warm-up; the line reports the run with the median figure.
    """
    warm = sizes.warmup()
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0, **SERVER_OPTIONS) as server,
        raw_server() as raw_url,
    ):
        for name in workloads:
            target = TARGETS[name]
            profiler = _Profiler(profile)
            raws: list[Figures] = []
            rpcs: list[Figures] = []
            async with raw_connect(raw_url) as ws, rpcstream.connect(server.url) as peer:
                await RAW_WORKLOADS[name](ws, warm)
                await RPC_WORKLOADS[name](peer, warm)
                for _ in range(repeat):
                    raws.append(await _timed(RAW_WORKLOADS[name](ws, sizes)))
                    with profiler.measure():
                        rpcs.append(await _timed(RPC_WORKLOADS[name](peer, sizes)))
            profiler.report(f"{name} rpcstream on {loop}, {repeat} run(s)")
            raw, rpc = _median(raws, target.metric), _median(rpcs, target.metric)
            base = {"workload": name, "loop": loop, "metric": target.metric}
            emit({**base, "impl": "raw", **raw})
            ratio = rpc[target.metric] / raw[target.metric]
            emit(
                {
                    **base,
                    "impl": "rpcstream",
                    **rpc,
                    "ratio_to_raw": round(ratio, 2),
                    "target": str(target),
                    "target_met": target.met(ratio),
                }
            )


# -- the slow consumer: one subprocess per side ------------------------------------------


async def slow_server(impl: str) -> None:
    """Child process: serve, print the URL, and on stdin EOF print this side's figures."""
    start_rss = rss_mib()
    async with contextlib.AsyncExitStack() as stack:
        if impl == "rpcstream":
            server = await stack.enter_async_context(
                rpcstream.serve(make_router(), "127.0.0.1", 0, **SERVER_OPTIONS)
            )
            url = server.url
        else:
            url = await stack.enter_async_context(raw_server())
        print(json.dumps({"url": url}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        print(
            json.dumps(
                {
                    "rss_start_mib": start_rss,
                    "peak_rss_mib": peak_rss_mib(),
                    "produced_mib": round(_produced / MiB, 1),
                }
            ),
            flush=True,
        )


async def slow_client(impl: str, url: str, s: Sizes) -> None:
    """Child process: read ``slow_bytes`` at ``slow_rate`` for at most ``slow_seconds``."""
    start_rss = rss_mib()
    received = 0
    start = time.perf_counter()

    async def pace(n: int) -> bool:
        """Account for ``n`` bytes read; sleep to keep to the rate; False to stop."""
        nonlocal received
        received += n
        now = time.perf_counter()
        if now - start >= s.slow_seconds:
            return False
        delay = start + received / s.slow_rate - now
        if delay > 0:
            await anyio.sleep(delay)
        return True

    # The close handshake may wait behind data the server still sends (raw
    # websockets stops reading while its queue is full): bound it.
    with anyio.CancelScope() as scope:
        if impl == "rpcstream":
            async with rpcstream.connect(url) as peer:
                async with peer.stream("chunks", s.slow_bytes, s.slow_chunk) as stream:
                    async for chunk in stream:
                        if not await pace(len(chunk)):
                            break
                seconds = time.perf_counter() - start
                scope.deadline = anyio.current_time() + CLOSE_BUDGET
        else:
            async with raw_connect(url) as ws:
                await ws.send(ENC.encode((OP_CHUNKS, 0, s.slow_bytes, s.slow_chunk)))
                while (chunk := DEC.decode(await ws.recv(decode=False))) is not None:
                    if not await pace(len(chunk)):
                        break
                seconds = time.perf_counter() - start
                scope.deadline = anyio.current_time() + CLOSE_BUDGET
    closing = time.perf_counter() - start - seconds
    print(
        json.dumps(
            {
                "consumed_mib": round(received / MiB, 1),
                "seconds": round(seconds, 2),
                "consumer_mb_per_s": round(received / seconds / 1e6, 2),
                "rss_start_mib": start_rss,
                "peak_rss_mib": peak_rss_mib(),
                "close_s": round(closing, 2),
            }
        ),
        flush=True,
    )


def _child(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_peer", *args]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_slow(loop: str, impl: str, quick: bool) -> Figures:
    """Run the slow consumer for ``impl`` with each side in its own fresh process."""
    s = QUICK if quick else FULL
    env, common = _child_env(), ["--loop", loop, *(["--quick"] if quick else [])]
    server = subprocess.Popen(
        _child(["--serve-slow", impl, *common]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        url = json.loads(server.stdout.readline())["url"]
        client = subprocess.run(
            _child(["--slow-client", impl, "--url", url, *common]),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=s.slow_seconds + CLOSE_BUDGET + 60,
            check=True,
        )
        client_figures = json.loads(client.stdout.splitlines()[-1])
        server.stdin.close()
        server_figures = json.loads(server.stdout.readline())
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    ahead = server_figures["produced_mib"] - client_figures["consumed_mib"]
    return {
        "sender_has_mib": s.slow_bytes // MiB,
        "target_rate_mb_per_s": s.slow_rate / 1e6,
        "time_cap_s": s.slow_seconds,
        **{k: client_figures[k] for k in ("consumed_mib", "seconds", "consumer_mb_per_s")},
        "sender_produced_mib": server_figures["produced_mib"],
        "sender_ahead_mib": round(ahead, 1),
        "server_rss_start_mib": server_figures["rss_start_mib"],
        "server_peak_rss_mib": server_figures["peak_rss_mib"],
        "client_rss_start_mib": client_figures["rss_start_mib"],
        "client_peak_rss_mib": client_figures["peak_rss_mib"],
        "client_close_s": client_figures["close_s"],
    }


def run_slow_pair(loop: str, quick: bool) -> None:
    """The slow-consumer workload, raw then rpcstream, one JSON line each."""
    metric = "server_peak_rss_mib"
    base = {"workload": "slow", "loop": loop, "metric": metric}
    raw = run_slow(loop, "raw", quick)
    emit({**base, "impl": "raw", **raw})
    rpc = run_slow(loop, "rpcstream", quick)
    emit({**base, "impl": "rpcstream", **rpc, "ratio_to_raw": round(rpc[metric] / raw[metric], 2)})


# -- Markdown tables from the JSON lines ------------------------------------------------

_ROWS = [  # workload, figure, unit shown
    ("W1", "items_per_s", "items/s"),
    ("W2", "mb_per_s", "MB/s"),
    ("W3", "p50_us", "p50 µs"),
    ("W3", "p99_us", "p99 µs"),
    ("W3", "calls_per_s", "calls/s"),
    ("W3f", "p50_us", "p50 µs"),
    ("W4", "calls_per_s", "calls/s"),
    ("W5", "items_per_s", "items/s"),
]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown_tables(records: list[Figures]) -> str:
    """One table per loop (rpcstream beside raw), then the slow-consumer table."""
    by_key = {(r["workload"], r["loop"], r["impl"]): r for r in records if "workload" in r}
    out: list[str] = []
    for loop in LOOPS:
        rows = []
        for workload, figure, unit in _ROWS:
            raw = by_key.get((workload, loop, "raw"))
            rpc = by_key.get((workload, loop, "rpcstream"))
            if raw is None or rpc is None:
                continue
            ratio = rpc[figure] / raw[figure]
            target = TARGETS[workload]
            met = ""
            if figure == target.metric:
                met = f"{target.ratio}x: {'met' if target.met(ratio) else '**missed**'}"
            rows.append(
                f"| {workload} | {unit} | {_fmt(raw[figure])} | {_fmt(rpc[figure])} "
                f"| {ratio:.2f} | {met} |"
            )
        if rows:
            out += [
                f"**{loop}**",
                "",
                "| workload | figure | raw | rpcstream | ratio | target |",
                "|---|---|--:|--:|--:|---|",
                *rows,
                "",
            ]
    slow = [r for r in records if r.get("workload") == "slow"]
    if slow:
        out += [
            "| loop | impl | consumed MiB | sender ahead MiB | sender RSS MiB (start → peak) "
            "| consumer RSS MiB (start → peak) | consumer close s |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in slow:
            out.append(
                f"| {r['loop']} | {r['impl']} | {r['consumed_mib']} | {r['sender_ahead_mib']} "
                f"| {r['server_rss_start_mib']} → {r['server_peak_rss_mib']} "
                f"| {r['client_rss_start_mib']} → {r['client_peak_rss_mib']} "
                f"| {r['client_close_s']} |"
            )
        out.append("")
    return "\n".join(out)


# -- entry point -------------------------------------------------------------------------


def loop_available(loop: str) -> bool:
    """Whether ``loop``'s event loop package is importable."""
    return loop == "asyncio" or importlib.util.find_spec(loop) is not None


def run_on(loop: str, func: Callable[[], Awaitable[None]]) -> None:
    """Run ``func`` on the named event loop."""
    if loop == "trio":
        anyio.run(func, backend="trio")
    else:
        anyio.run(func, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_peer",
        description="Benchmark rpcstream against raw websockets (one JSON line per result).",
    )
    parser.add_argument("--loop", choices=[*LOOPS, "all"], default="asyncio")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per in-process workload, the median reported (default: 3, 1 with --quick)",
    )
    parser.add_argument(
        "--table",
        metavar="JSONL",
        help="print Markdown tables from a file of this script's output, and run nothing",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the rpcstream runs (top functions: stderr)"
    )
    # Internal: the two sides of the slow-consumer workload.
    parser.add_argument("--serve-slow", choices=["rpcstream", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--slow-client", choices=["rpcstream", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_key = {w.lower(): w for w in WORKLOAD_NAMES}
    try:
        args.workloads = [by_key[w.strip().lower()] for w in args.workloads.split(",") if w]
    except KeyError as exc:
        parser.error(f"unknown workload {exc.args[0]!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.loop == "all" and (args.serve_slow or args.slow_client):
        parser.error("--serve-slow and --slow-client need one --loop")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks that ``argv`` selects; print one JSON line per result."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.table:
        lines = Path(args.table).read_text().splitlines()
        print(markdown_tables([json.loads(line) for line in lines if line.startswith("{")]))
        return 0
    if args.serve_slow:
        run_on(args.loop, functools.partial(slow_server, args.serve_slow))
        return 0
    if args.slow_client:
        run_on(args.loop, functools.partial(slow_client, args.slow_client, args.url, sizes))
        return 0
    loops = list(LOOPS) if args.loop == "all" else [args.loop]
    in_process = [w for w in args.workloads if w != "slow"]
    for loop in loops:
        if not loop_available(loop):
            emit({"loop": loop, "skipped": f"{loop} is not importable"})
            continue
        if in_process:
            work = functools.partial(
                run_in_process, loop, in_process, sizes, args.repeat, args.profile
            )
            run_on(loop, work)
        if "slow" in args.workloads:
            run_slow_pair(loop, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
