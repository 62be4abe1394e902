"""The fan-out baseline: raw websockets sending each event to every connection.

The floor the ``fanout`` workload of :mod:`benchmarks.runs_deployed` is measured
against: the same events at the same pace to as many connections, with no
RunServer, no store and no peer: a websockets server (every setting at
websockets' default, no compression, as rpcstream's) that, per tick, encodes
one msgpack message shaped like a run event and hands it to every open
connection with websockets' own ``broadcast`` (on asyncio it writes to each
connection without waiting, the cheapest way websockets offers).

* ``--raw-serve``: prints ``{"url", "pid"}``, sends each new connection a
  ``started`` event (id 1), then reads commands from stdin, one JSON line each:
  ``{"n": N, "rate": R}`` ticks N events (ids 2 to N + 1, ``data.t`` the
  ``time.monotonic()`` taken just before the broadcast) and a ``complete``
  event (id N + 2) to every connection open then. With ``"each": true`` every
  connection gets its own run instead: N ticks at R from a random phase, each
  sent with ``await ws.send`` (the baseline of the ``runs`` workload: one run
  and one subscriber per connection). Ends when stdin closes.
* ``--raw-client SPEC``: opens ``SPEC["connections"]`` connections, prints
  ``{"ready": true}`` once each has its ``started`` event, reads to
  ``complete`` and prints the same figures as the rpcstream client child
  (:func:`benchmarks.runs_procs.client_child`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from typing import Any

import anyio
import msgspec
import sniffio

from .peer_workloads import raw_connect, serve_raw

Figures = dict[str, Any]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def _event(event_id: int, type_: str, data: Any) -> bytes:
    # The fields and sizes of a RunEvent as rpcstream sends it.
    return _encode(
        {
            "id": event_id,
            "type": type_,
            "data": data,
            "timestamp": "2026-12-03T12:00:00.000Z",
            "run_id": "0123456789abcdef0123456789abcdef",
            "flow": "paced",
        }
    )


async def _broadcast(connections: set[Any], message: bytes) -> None:
    if sniffio.current_async_library() == "trio":
        from websockets.trio.connection import broadcast as trio_broadcast

        await trio_broadcast(connections, message)
    else:
        from websockets.asyncio.server import broadcast

        broadcast(connections, message)


async def serve_child() -> None:
    """Child: the raw fan-out server (see the module docstring)."""
    from .runs_procs import emit

    connections: set[Any] = set()
    started = _event(1, "started", None)

    async def handler(ws: Any) -> None:
        await ws.send(started)
        connections.add(ws)
        try:
            async for _ in ws:  # until the client closes
                pass
        except Exception:  # a client that went away: nothing to fan out to
            pass
        finally:
            connections.discard(ws)

    async with serve_raw(handler) as url:
        emit({"url": url, "pid": os.getpid()})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            command = json.loads(line)
            n, rate = int(command["n"]), float(command["rate"])
            targets = set(connections)
            if command.get("each"):
                async with anyio.create_task_group() as tg:
                    for ws in targets:
                        tg.start_soon(_tick_one, ws, n, rate)
                continue
            start = time.monotonic()
            for i in range(n):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                await _broadcast(targets, _event(i + 2, "tick", {"t": time.monotonic()}))
            await _broadcast(targets, _event(n + 2, "complete", None))


async def _tick_one(ws: Any, n: int, rate: float) -> None:
    """One connection's own run: ``n`` ticks at ``rate`` from a random phase, as the
    ``paced`` flow of :mod:`benchmarks.runs_procs` ticks (the ``runs`` baseline)."""
    start = time.monotonic() + random.random() / rate
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)
        await ws.send(_event(i + 2, "tick", {"t": time.monotonic()}))
    await ws.send(_event(n + 2, "complete", None))


async def client_child(spec: Figures) -> None:
    """Child: ``spec["connections"]`` raw connections to ``spec["url"]``, read to the end."""
    from .runs_procs import Subscriber, client_record, emit

    count = spec["connections"]
    subs = [Subscriber() for _ in range(count)]
    waiting = count
    all_ready = anyio.Event()
    messages = 0

    async def read(ws: Any, sub: Subscriber) -> None:
        nonlocal waiting, messages
        sub.take(_decode(await ws.recv()), time.monotonic())
        waiting -= 1
        if waiting == 0:
            all_ready.set()
        monotonic = time.monotonic
        while not sub.ended:
            message = await ws.recv()
            now = monotonic()
            messages += 1
            sub.take(_decode(message), now)

    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(raw_connect(spec["url"])) for _ in range(count)]
        async with anyio.create_task_group() as tg:
            for ws, sub in zip(sockets, subs, strict=True):
                tg.start_soon(read, ws, sub)
            await all_ready.wait()
            cpu = time.process_time()
            start = time.monotonic()
            emit({"ready": True})
        wall = time.monotonic() - start
        cpu = time.process_time() - cpu
        emit(client_record(subs, messages, cpu, wall))
