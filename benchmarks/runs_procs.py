"""The children of ``bench_runs --deployed``: a RunServer alone in its process, and clients.

* ``--serve STORE [--gc POLICY]``: a RunServer (every setting at its default) on
  ``memory``, ``sqlite:PATH`` or ``redis://...`` with the benchmark's flows (``paced``:
  ticks at a rate; ``emit``: sends as fast as it can) and the methods the parent drives
  it with (``bench.arm``, ``bench.go``, ``bench.arrived``, ``bench.finished``,
  ``bench.replay_run``) or reads figures through (``bench.gc_pauses``,
  ``bench.commits``, ``bench.census``). Prints ``{"url", "pid", "package"}`` and serves
  until its stdin closes. ``--gc``: the process's collector policy (:func:`collector_policy`).
* ``--client SPEC``: opens its share of the connections, subscribes, prints
  ``{"ready": true}`` once every subscription has its run's ``started`` event, reads
  every subscription to its terminal event, checks the ids (contiguous from 1, one
  terminal event last), and prints its figures: latency samples, deliveries, the
  WebSocket messages they came in, and its own CPU time.

Latency is receipt minus the ``t`` each ``tick`` event carries: ``time.monotonic()``
(CLOCK_MONOTONIC, one clock for every process on the host), taken by the flow just
before ``ctx.client.send``.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import random
import sys
import time
import types as types_
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio

import rpcstream

from .bench_runs import Barrier, send_tokens
from .bench_store import settle

Figures = dict[str, Any]

# -- the server child ----------------------------------------------------------------------


class Gate:
    """What every flow waits on: the parent opens it once all clients are ready."""

    def __init__(self, expected: int = 0) -> None:
        self.barrier = Barrier(expected)
        """``expected``: the ``emit`` flows, which count themselves in and out of it."""


class _GCPauses:
    """Times the cyclic garbage collector's full collections (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.full, self.longest, self.total, self._start = 0, 0.0, 0.0, 0.0
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        self.full += 1
        self.longest = max(self.longest, took)
        self.total += took

    def take(self) -> list[float]:
        """``[count, longest ms, total ms]`` since the last take; starts over."""
        figures = [self.full, round(self.longest * 1000, 1), round(self.total * 1000, 1)]
        self.full, self.longest, self.total = 0, 0.0, 0.0
        return figures


def _task_stacks() -> collections.Counter[str]:
    """What each task of the loop (asyncio) is waiting in: its chain of coroutines."""
    import asyncio

    if sniffio.current_async_library() != "asyncio":
        return collections.Counter()
    stacks: collections.Counter[str] = collections.Counter()
    for task in asyncio.all_tasks():
        names, coro = [], task.get_coro()
        while coro is not None and hasattr(coro, "cr_code"):
            names.append(coro.cr_code.co_qualname)
            coro = coro.cr_await
        stacks[" > ".join(names)] += 1
    return stacks


def make_server(store: Any) -> rpcstream.RunServer:
    """The RunServer the benchmark serves: flows ``paced`` and ``emit``, ``bench.*`` methods."""
    gate = Gate()
    router = rpcstream.Router()
    pauses = _GCPauses()  # in the server only: what bench.gc_pauses reports

    async def arm(expected: int = 0) -> None:
        gate.barrier = Barrier(expected)

    async def go() -> None:
        gate.barrier.go.set()

    async def arrived() -> None:
        await gate.barrier.all_arrived.wait()

    async def finished() -> None:
        await gate.barrier.all_finished.wait()
        await settle(runs.store)  # SQLite's pipelined appends return before their commit

    async def replay_run(events: int) -> str:
        run_id = f"replay-{events}-{random.getrandbits(32):08x}"
        await runs.store.create_run(run_id, "replay", None)
        payload = json.dumps({"token": "x" * 16, "i": 0}).encode()
        for _ in range(events - 1):
            await runs.store.append(run_id, "token", payload)
        await runs.store.append(run_id, "complete", b"null", terminal=True)
        return run_id

    async def gc_pauses() -> list[float]:
        """Full (generation 2) collections of the cyclic garbage collector in this
        process since the last call: how many, the longest and the sum in ms. Each
        stops the event loop for as long as it takes to visit every tracked object."""
        return pauses.take()

    async def census(top: int = 0) -> Figures:
        """The objects the cyclic collector tracks in this process (what a full
        collection visits), and with ``top`` the most common types and the
        coroutines among them by name."""
        objects = gc.get_objects()
        figures: Figures = {"tracked": len(objects), "threshold": gc.get_threshold()[0],
                            "frozen": gc.get_freeze_count()}  # fmt: skip
        if top:
            by_type = collections.Counter(type(o).__qualname__ for o in objects)
            coros = collections.Counter(
                o.cr_code.co_qualname for o in objects if type(o) is types_.CoroutineType
            )
            figures["types"] = by_type.most_common(top)
            figures["coroutines"] = coros.most_common(top)
            figures["tasks"] = _task_stacks().most_common(top)
        del objects
        return figures

    async def commits() -> list[int] | None:
        """The store's group commits and the appends in them so far (SQLite, Redis),
        which say whether the server commits a few appends at a time or hundreds."""
        group_commit = getattr(runs.store, "_appends", None)
        if group_commit is None:
            return None
        return [group_commit.groups, group_commit.requests]

    for method in (arm, go, arrived, finished, replay_run, commits, gc_pauses, census):
        router.add(method, f"bench.{method.__name__}")
    runs = rpcstream.RunServer(store, router=router)

    @runs.flow("emit")
    async def emit(ctx: rpcstream.RunContext, n: int) -> None:
        barrier = gate.barrier
        await barrier.wait()
        await send_tokens(ctx, n)
        barrier.done()

    @runs.flow("paced")
    async def paced(ctx: rpcstream.RunContext, n: int, rate: float) -> None:
        await gate.barrier.go.wait()
        # A random phase: runs started together do not all tick at the same instant.
        start = time.monotonic() + random.random() / rate
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            await ctx.client.send("tick", {"t": time.monotonic()})

    return runs


def make_store(spec: str) -> Any:
    """``memory``, ``sqlite:PATH`` or ``redis://...``, as ``rpcstream serve --store`` takes."""
    from rpcstream.cli import make_store as from_spec

    return from_spec(spec)


def collector_policy(spec: str) -> None:
    """Set this process's cyclic garbage collector as ``spec`` says, before it
    serves: comma-separated ``threshold=N`` (the youngest generation's threshold;
    the interpreter's default is 700) and ``freeze`` (``gc.freeze()``: what was
    made at start-up is never visited again). What an application may choose for
    its server process (docs/operations.md); the library sets neither."""
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name == "threshold":
            gc.set_threshold(int(value), *gc.get_threshold()[1:])
        elif name == "freeze":
            gc.collect()
            gc.freeze()
        else:
            raise SystemExit(f"unknown collector policy {part!r}")


async def serve_child(store: str, gc_policy: str = "") -> None:
    """Child: serve until stdin closes; print ``{"url", "pid", "package"}`` first;
    ``gc_policy`` for :func:`collector_policy`."""
    collector_policy(gc_policy)
    runs = make_server(make_store(store))
    profile = os.environ.get("RUNS_BENCH_PROFILE")  # a path: cProfile the server into it
    profiler = None
    if profile:
        import cProfile

        # In CPU time: on a shared machine a wall-clock profile charges the time the
        # process spent preempted to whatever it was running (mostly socket.send).
        profiler = cProfile.Profile(time.process_time)
    async with rpcstream.serve(runs, "127.0.0.1", 0) as server:
        # Which rpcstream this is: runs_deployed checks that --server-code took.
        package = os.path.dirname(rpcstream.__file__)
        emit({"url": server.url, "pid": os.getpid(), "package": package})
        if profiler is not None:
            profiler.enable()
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)


# -- the client child ----------------------------------------------------------------------


class Counted:
    """WebSocket messages this process received (all connections)."""

    messages = 0


def count_messages() -> None:
    """Count the messages every peer of this process receives (the driver's one entry)."""
    from rpcstream.peer import driver

    receive: Callable[..., bool] = driver.Driver._receive

    def counting(self: Any, messages: list[bytes]) -> bool:
        Counted.messages += len(messages)
        return receive(self, messages)

    driver.Driver._receive = counting  # type: ignore[method-assign]


class Subscriber:
    """One subscription's checks and figures."""

    def __init__(self) -> None:
        self.last = 0
        self.deliveries = 0
        self.ended = False
        self.wrong: str | None = None
        self.latencies_us: list[int] = []
        self.first: float | None = None
        self.last_at = 0.0

    def take(self, event: dict[str, Any], now: float) -> None:
        """Check one event in order and note its latency."""
        if event["id"] != self.last + 1 and self.wrong is None:
            self.wrong = f"id {event['id']} after {self.last}"
        self.last = event["id"]
        self.deliveries += 1
        data = event["data"]
        if isinstance(data, dict) and "t" in data:
            self.latencies_us.append(int((now - data["t"]) * 1e6))
            if self.first is None:
                self.first = now
            self.last_at = now
        if event["type"] in ("complete", "error", "cancelled"):
            self.ended = True


async def subscribe(
    peer: rpcstream.RpcPeer, run_id: str, batch: bool, sub: Subscriber, ready: Callable[[], None]
) -> None:
    """Read one run to its end; call ``ready`` once its ``started`` event is in."""
    kwargs = {"batch": True} if batch else {}
    monotonic = time.monotonic
    async with peer.stream("runs.subscribe", run_id, after=0, **kwargs) as items:
        async for item in items:
            now = monotonic()
            for event in item if type(item) is list else (item,):
                sub.take(event, now)
                if event["id"] == 1:
                    ready()
    if not sub.ended and sub.wrong is None:
        sub.wrong = f"ended after {sub.last} without a terminal event"


async def client_child(spec: Figures) -> None:
    """Child: subscribe to ``spec["runs"]`` (one per connection, or ``per_connection``
    per connection), print ready, then the figures once every run ended."""
    count_messages()
    per = spec.get("per_connection", 1)
    run_ids: list[str] = spec["runs"]
    connections = (len(run_ids) + per - 1) // per
    subs = [Subscriber() for _ in run_ids]
    waiting = len(run_ids)
    all_ready = anyio.Event()

    def ready() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_ready.set()

    async with contextlib.AsyncExitStack() as stack:
        peers = []
        for _ in range(connections):
            peers.append(await stack.enter_async_context(rpcstream.connect(spec["url"])))
        async with anyio.create_task_group() as tg:
            for i, (run_id, sub) in enumerate(zip(run_ids, subs, strict=True)):
                tg.start_soon(subscribe, peers[i // per], run_id, spec["batch"], sub, ready)
            await all_ready.wait()
            messages = Counted.messages
            cpu = time.process_time()
            start = time.monotonic()
            emit({"ready": True})
        wall = time.monotonic() - start
        cpu = time.process_time() - cpu
        # Printed before the connections close: the parent stops its clock here.
        emit(client_record(subs, Counted.messages - messages, cpu, wall))


async def replay_child(spec: Figures) -> None:
    """Child: read a finished run from the start; print events/s and its own CPU."""
    count_messages()
    sub = Subscriber()
    async with rpcstream.connect(spec["url"]) as peer:
        cpu = time.process_time()
        start = time.perf_counter()
        await subscribe(peer, spec["runs"][0], spec["batch"], sub, lambda: None)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    emit(
        {
            "events": sub.deliveries,
            "seconds": round(seconds, 3),
            "events_per_s": round(sub.deliveries / seconds),
            "messages": Counted.messages,
            "cpu_s": round(cpu, 3),
            "verified": sub.ended and sub.wrong is None and sub.last == spec["expect"],
            "wrong": sub.wrong,
        }
    )


def client_record(subs: list[Any], messages: int, cpu: float, wall: float) -> Figures:
    """What a client child measured over its subscriptions (``Subscription``-like:
    ``deliveries``, ``latencies_us``, ``first``, ``last_at``, ``wrong``, ``ended``)."""
    wrong = [s.wrong for s in subs if s.wrong is not None]
    firsts = [s.first for s in subs if s.first is not None]
    return {
        "deliveries": sum(s.deliveries for s in subs),
        # Those after ``ready``: every subscription had exactly its ``started`` then.
        "measured": sum(s.deliveries for s in subs) - len(subs),
        "ticks": sum(len(s.latencies_us) for s in subs),
        "messages": messages,
        "first_receipt": min(firsts, default=None),
        "last_receipt": max((s.last_at for s in subs), default=None),
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "nice": os.nice(0),
        "verified": not wrong and all(s.ended for s in subs),
        "wrong": wrong[:3],
        "latencies_us": [x for s in subs for x in s.latencies_us],
    }


def emit(record: Figures) -> None:
    """Print one JSON line (the parent reads them)."""
    print(json.dumps(record), flush=True)


def child_main(argv: list[str]) -> int:
    """``--serve STORE``, ``--client SPEC`` / ``--replay SPEC``, or the raw baseline's
    ``--raw-serve`` / ``--raw-client SPEC`` (:mod:`benchmarks.runs_raw`), with ``--loop``."""
    loop = argv[argv.index("--loop") + 1] if "--loop" in argv else "asyncio"
    gc_policy = argv[argv.index("--gc") + 1] if "--gc" in argv else ""
    role, value = argv[0], argv[1] if len(argv) > 1 else ""
    work: Callable[[], Awaitable[None]]
    if role == "--serve":
        work = lambda: serve_child(value, gc_policy)  # noqa: E731
    elif role == "--client":
        work = lambda: client_child(json.loads(value))  # noqa: E731
    elif role == "--replay":
        work = lambda: replay_child(json.loads(value))  # noqa: E731
    elif role == "--raw-serve":
        from . import runs_raw

        work = runs_raw.serve_child
    elif role == "--raw-client":
        from . import runs_raw

        work = lambda: runs_raw.client_child(json.loads(value))  # noqa: E731
    else:
        raise SystemExit(f"unknown role {role!r}")
    anyio.run(work, backend=loop)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
