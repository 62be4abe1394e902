"""Instructions per fan-out delivery, counted by valgrind: figures a shared machine cannot move.

The ``fanout`` workload of :mod:`benchmarks.runs_deployed` measures latency and CPU
time, which on a machine shared with other work swing by 2x from one minute to
the next. This counts the instructions the *server* executes instead (as
:mod:`benchmarks.bench_instructions` does for calls), for the same shape of work:
one run, ``--connections`` connections with one subscriber each, events sent in
lock-step (the next event leaves once every connection has the previous one, so
each delivery is one WebSocket message however slow valgrind makes things).

* ``raw``: the baseline, a websockets server that ``broadcast``s each event to
  every connection (the floor: framing and one write per connection);
* ``rpcstream``: a ``RunServer`` on the memory store, every setting at its
  default, whose flow sends each event with ``ctx.client.send``; the subscribers
  ask ``runs.subscribe(run_id, after=0, batch=True)``.

The server runs in the main thread on ``--loop``; the clients (raw websockets
connections that count messages and decode none, the same for both servers) run
in a second thread on an asyncio loop of their own, and callgrind counts each
thread apart (``--separate-threads``): only the main thread's count is used.
Each figure is the difference of two runs, one with ``--events`` more events,
over the deliveries it adds::

    python -m benchmarks.fanout_instructions                    # asyncio, 100 connections
    python -m benchmarks.fanout_instructions --loop all --connections 50 --events 20
    PYTHONPATH=/tmp/other:. python -P -m benchmarks.fanout_instructions   # another rpcstream/

Caution: the counts still move by 10-30% between repeats of the same code (see
docs/benchmarks_runs.md, "Fifth session"): repeat each figure before comparing two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec
import sniffio

import rpcstream
from rpcstream.messages import MSGPACK, Credit, StreamCall, StreamData
from rpcstream.store.memory import MemoryStore

from .peer_workloads import MAX_MESSAGE_SIZE
from .runs_raw import serve_raw

__all__ = ["main"]

WARMUP = 5  # events before counting starts, in both runs of a pair
IMPLS = ("raw", "rpcstream")
RUNS_IMPLS = ("runs_raw", "runs_rpcstream")  # --impls runs_raw,runs_rpcstream
_TOTALS = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)

_ROOT = str(Path(__file__).resolve().parent.parent)  # the repository


class Clients:
    """The subscribers, in a thread with an asyncio loop of its own. :meth:`round`
    (in the server's loop) waits until every connection has one more message."""

    def __init__(self, url: str, connections: int, hello: bytes | list[bytes] | None) -> None:
        self.url, self.connections, self.hello = url, connections, hello
        self.token = anyio.lowlevel.current_token()
        self.ready = anyio.Event()  # set in the server's loop, from the clients' thread
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._left = connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def _got(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._left = self.connections
            anyio.from_thread.run_sync(self.ready.set, token=self.token)

    def _subscribed(self, message: bytes) -> bool:
        if self.hello is None:
            return True
        return any(type(f) is StreamData for f in MSGPACK.decode_batch(message))

    async def _read(self, ws: Any) -> None:
        # The messages before the subscription's first event are not counted.
        while not self._subscribed(await ws.recv(decode=False)):
            pass
        self._got()
        with contextlib.suppress(Exception):  # closed at the end
            async for _ in ws:
                self._got()

    async def _main(self) -> None:
        from websockets.asyncio.client import connect

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        options: dict[str, Any] = {"compression": None, "max_size": MAX_MESSAGE_SIZE}
        if self.hello is not None:
            options["subprotocols"] = [MSGPACK.subprotocol]
        async with contextlib.AsyncExitStack() as stack:
            tasks = []
            for i in range(self.connections):
                ws = await stack.enter_async_context(connect(self.url, **options))
                if isinstance(self.hello, list):  # one subscription each (``runs``)
                    await ws.send(self.hello[i])
                elif self.hello is not None:
                    await ws.send(self.hello)
                tasks.append(asyncio.create_task(self._read(ws)))
            await self._stop.wait()
            for task in tasks:
                task.cancel()

    async def start(self) -> None:
        """Connect and subscribe every client; return once each has its first event."""
        self.thread.start()
        await self.ready.wait()
        # What set-up left behind stays out of the collector's way: a full
        # collection of it landing inside or outside the counted events moved
        # the figures by a third from one run to the next.
        gc.collect()
        gc.freeze()

    async def round(self, send: Callable[[], Awaitable[None]]) -> None:
        """Send one event and wait until every connection received it."""
        self.ready = anyio.Event()
        await send()
        await self.ready.wait()

    async def stop(self) -> None:
        """Close the clients and end their thread."""
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        await anyio.to_thread.run_sync(self.thread.join, 30)


async def fanout_raw(connections: int, events: int) -> None:
    """The baseline: websockets' ``broadcast`` of each event to every connection."""
    sockets: set[Any] = set()
    encode = msgspec.msgpack.Encoder().encode

    async def handler(ws: Any) -> None:
        sockets.add(ws)
        await ws.send(encode({"id": 1, "type": "started"}))
        with contextlib.suppress(Exception):  # the clients drop at the end: nothing to report
            async for _ in ws:
                pass

    async def send(i: int) -> None:
        message = encode({"id": i, "type": "tick", "data": {"i": i}})
        if sniffio.current_async_library() == "trio":
            from websockets.trio.connection import broadcast as trio_broadcast

            await trio_broadcast(sockets, message)
        else:
            from websockets.asyncio.server import broadcast

            broadcast(sockets, message)

    async with serve_raw(handler) as url:
        clients = Clients(url, connections, None)
        await clients.start()
        for i in range(WARMUP + events):
            await clients.round(functools.partial(send, i + 2))
        await clients.stop()


async def fanout_rpcstream(connections: int, events: int) -> None:
    """A RunServer's flow sending each event, ``connections`` raw subscribers."""
    total = WARMUP + events
    ticks = [anyio.Event() for _ in range(total)]
    runs = rpcstream.RunServer(MemoryStore())

    @runs.flow("lockstep")
    async def lockstep(ctx: rpcstream.RunContext, n: int) -> None:
        for i in range(n):
            await ticks[i].wait()
            await ctx.client.send("tick", {"i": i})

    async def send(tick: anyio.Event) -> None:
        tick.set()

    async with (
        rpcstream.serve(runs, "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as control,
    ):
        run_id = (await control.call("runs.start", "lockstep", {"n": total}))["run_id"]
        args = MSGPACK.encode_raw([run_id])
        kwargs = MSGPACK.encode_raw({"after": 0, "batch": True})
        call = StreamCall(1, "runs.subscribe", args, kwargs)
        credit = Credit(1, 1 << 30, 1 << 30)  # never runs out: no credit frames
        clients = Clients(server.url, connections, MSGPACK.encode_batch([call, credit]))
        await clients.start()  # every subscriber has the run's started event
        for tick in ticks:
            await clients.round(functools.partial(send, tick))
        await clients.stop()


async def runs_raw(connections: int, events: int) -> None:
    """The baseline of ``runs`` (one run per connection): each connection's own
    task sends each event with ``await ws.send``, as ``runs_raw`` does."""
    encode = msgspec.msgpack.Encoder().encode
    total = WARMUP + events
    ticks = [anyio.Event() for _ in range(total)]

    async def handler(ws: Any) -> None:
        await ws.send(encode({"id": 1, "type": "started"}))
        with contextlib.suppress(Exception):  # the clients drop at the end
            for i, tick in enumerate(ticks):
                await tick.wait()
                await ws.send(encode({"id": i + 2, "type": "tick", "data": {"i": i}}))
            async for _ in ws:
                pass

    async def send(tick: anyio.Event) -> None:
        tick.set()

    async with serve_raw(handler) as url:
        clients = Clients(url, connections, None)
        await clients.start()
        for tick in ticks:
            await clients.round(functools.partial(send, tick))
        await clients.stop()


async def runs_rpcstream(connections: int, events: int) -> None:
    """``runs``: as many runs as connections, each with one subscriber on its own
    connection; every round each run's flow sends one event."""
    total = WARMUP + events
    ticks = [anyio.Event() for _ in range(total)]
    runs = rpcstream.RunServer(MemoryStore())

    @runs.flow("lockstep")
    async def lockstep(ctx: rpcstream.RunContext, n: int) -> None:
        for i in range(n):
            await ticks[i].wait()
            await ctx.client.send("tick", {"i": i})

    async def send(tick: anyio.Event) -> None:
        tick.set()

    async with (
        rpcstream.serve(runs, "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as control,
    ):
        hellos = []
        for _ in range(connections):
            run_id = (await control.call("runs.start", "lockstep", {"n": total}))["run_id"]
            args = MSGPACK.encode_raw([run_id])
            kwargs = MSGPACK.encode_raw({"after": 0, "batch": True})
            call = StreamCall(1, "runs.subscribe", args, kwargs)
            credit = Credit(1, 1 << 30, 1 << 30)  # never runs out: no credit frames
            hellos.append(MSGPACK.encode_batch([call, credit]))
        clients = Clients(server.url, connections, hellos)
        await clients.start()
        for tick in ticks:
            await clients.round(functools.partial(send, tick))
        await clients.stop()


CHILDREN: dict[str, Callable[[int, int], Awaitable[None]]] = {
    "raw": fanout_raw,
    "rpcstream": fanout_rpcstream,
    "runs_raw": runs_raw,
    "runs_rpcstream": runs_rpcstream,
}


def count(impl: str, loop: str, connections: int, events: int) -> int:
    """Instructions of the main thread (the server) of one child run under callgrind."""
    with tempfile.TemporaryDirectory(prefix="fanout-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
        # -P: with -m, the working directory would come first on sys.path, ahead of
        # PYTHONPATH, and hide another rpcstream/ named there (see the docstring).
        command += [f"--callgrind-out-file={out}", sys.executable, "-P", "-m"]
        command += ["benchmarks.fanout_instructions", "--child"]
        command.append(f"{impl}:{loop}:{connections}:{events}")
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # same dict layouts in both runs
        # benchmarks/ after whatever PYTHONPATH names first (-P: not found by the cwd)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _ROOT]))
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        main_thread = Path(f"{out}-01")
        if done.returncode != 0 or not main_thread.exists():
            raise RuntimeError(f"{impl} on {loop} failed:\n{done.stderr[-2000:]}")
        found = _TOTALS.search(main_thread.read_text())
        if found is None:
            raise RuntimeError(f"{impl} on {loop}: no totals in {main_thread.name}")
        return int(found.group(1))


def measure(
    loop: str, connections: int, events: int, impls: tuple[str, ...] = IMPLS
) -> list[dict[str, Any]]:
    """Instructions per delivery of each implementation, the first the baseline."""
    records: list[dict[str, Any]] = []
    base: float | None = None
    for impl in impls:
        added = count(impl, loop, connections, events) - count(impl, loop, connections, 0)
        per = added / (events * connections)
        record: dict[str, Any] = {
            "bench": "fanout_instructions",
            "loop": loop,
            "impl": impl,
            "connections": connections,
            "events": events,
            "instructions_per_delivery": round(per),
        }
        if base is None:
            base = per
        else:
            record["ratio_to_baseline"] = round(per / base, 2)
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    """Count instructions per delivery for each implementation; one JSON line each."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout_instructions")
    parser.add_argument("--loop", choices=["asyncio", "trio", "all"], default="asyncio")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--events", type=int, default=30, help="counted events per run")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help="raw (the baseline), rpcstream; or runs_raw, runs_rpcstream (a run per connection)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    impls = tuple(x for x in args.impls.split(",") if x)
    if not set(impls) <= set(IMPLS + RUNS_IMPLS):
        parser.error(f"--impls: choose from {', '.join(IMPLS + RUNS_IMPLS)}")
    if args.child:
        impl, loop, connections, events = args.child.split(":")
        anyio.run(CHILDREN[impl], int(connections), int(events), backend=loop)
        return 0
    if shutil.which("valgrind") is None:
        print("fanout_instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    for loop in ("asyncio", "trio") if args.loop == "all" else (args.loop,):
        measure(loop, args.connections, args.events, impls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
