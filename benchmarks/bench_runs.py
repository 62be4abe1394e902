"""RunServer over a real WebSocket, beside the same work done on the event store alone.

Prints one JSON line per measurement::

    python -m benchmarks.bench_runs                         # asyncio, full sizes
    python -m benchmarks.bench_runs --loop all              # asyncio and trio
    python -m benchmarks.bench_runs --loop all --quick      # a smoke run
    python -m benchmarks.bench_runs --benches replay --profile   # cProfile the wire side

Measurements, for the memory and SQLite stores on each event loop (full sizes;
``--quick`` scales them down):

* ``flow_append_one_run``: one flow sends 20,000 events with ``ctx.client.send``
  (no subscriber): ``events_per_s``, timed inside the flow from its first send to
  its last.
* ``flow_append_100_runs``: 100 runs of that flow send 500 events each, all at
  once (they wait at a barrier and are released together): total ``events_per_s``.
* ``replay``: one client reads a finished run of 1,000,000 events from the start
  with ``peer.stream("runs.subscribe", run_id, after=0)``: ``events_per_s`` received,
  from the call to the last event. Done with both codecs (``msgpack``, the default,
  and ``json``). The run is built on the store directly (64 concurrent appenders,
  :func:`benchmarks.bench_store.build_replay_run`); a SQLite file is built once and
  reused by later event loops.
* ``fanout_latency``: 1,000 subscribers to one run, 100 per connection on 10
  connections; once all have the run's ``started`` event, the flow sends 200 events,
  sleeping 1 ms after each, each carrying ``time.perf_counter()`` taken just before
  its append. Each subscriber notes ``perf_counter()`` on receipt: ``p50_us``,
  ``p99_us`` and ``max_us`` of receipt minus append over all deliveries, and
  ``deliveries_per_s`` (all deliveries over the time from the first append to the
  last receipt). ``mean_append_interval_ms`` is the pace the flow really kept: far
  above 1 ms means the process was saturated and latency includes queueing. The
  same with ONE subscriber (``subscribers: 1``) gives the unloaded path's latency.

Each measurement is repeated (``--repeat``, default 3) and the run with the median
main figure is printed, with every run's figure in ``runs``. ``cpu_s`` is the
process's CPU time (all threads) over the timed part, and ``cpu_us_per_event`` (or
``_per_delivery``) that over the count: it moves less than wall time when other
processes share the machine.

Baselines. No raw-websockets program does what a run does, so each line carries the
same work done on the store alone, without RunServer, peer or socket, under
``baseline_*`` keys, and ``ratio_to_baseline`` (the line's figure over the
baseline's; above 1 is better for throughputs, below 1 for latencies):

* appends: ``store.append`` in a loop, from :mod:`benchmarks.bench_store`
  (``append_one_run``, ``append_concurrent_runs``), same counts, a pre-encoded
  payload of the same shape;
* replay: ``store.follow`` alone (:func:`benchmarks.bench_store.replay`);
* fan-out: 1,000 ``store.follow`` tasks and one task appending, paced the same way.

``--deployed`` measures as deployed instead: :mod:`benchmarks.runs_deployed`.

Everything runs in ONE process and on ONE event loop: client and server share the
CPU (the SQLite store also uses a worker thread), and send and receive times come
from the same clock. The machine's second core only helps SQLite's thread.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

import rpcstream
from benchmarks import bench_store
from rpcstream.store.base import EventStore

__all__ = ["main"]

LOOPS = ("asyncio", "trio")
STORES = ("memory", "sqlite")
BENCHES = ("append", "replay", "fanout")
CODECS = ("msgpack", "json")
REPLAY_RETENTION = 30 * 86400.0  # seconds: the replay run outlives any benchmark run

Figures = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    one_run_events: int = 20_000
    runs: int = 100
    events_per_run: int = 500
    replay_events: int = 1_000_000
    writers: int = 64
    fanout: tuple[tuple[int, int], ...] = ((1, 1), (1_000, 10))  # (subscribers, connections)
    fanout_events: int = 200
    interval: float = 0.001


FULL = Sizes()
QUICK = Sizes(
    one_run_events=2_000,
    events_per_run=50,
    replay_events=100_000,
    fanout=((1, 1), (200, 2)),
    fanout_events=50,
)


# -- figures -------------------------------------------------------------------------------


def emit(record: Figures) -> None:
    """Print one result line (with the 1-minute load average, as a noise warning)."""
    record = {**record, "load1": round(os.getloadavg()[0], 2)}
    print(json.dumps(record), flush=True)


class Span:
    """Wall-clock and process CPU time (all threads) of a timed part."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.wall = 0.0
        self.cpu = 0.0

    def stop(self, wall_end: float | None = None) -> Span:
        """End the span, at ``wall_end`` (a ``perf_counter()`` value) if given."""
        self.cpu = time.process_time() - self.cpu0
        self.wall = (time.perf_counter() if wall_end is None else wall_end) - self.wall0
        return self


def rate(count: int, span: Span, unit: str = "event", units: str = "events") -> Figures:
    """Count, time, rate and CPU cost per unit of a span's work."""
    return {
        units: count,
        "seconds": round(span.wall, 3),
        f"{units}_per_s": round(count / span.wall),
        "cpu_s": round(span.cpu, 3),
        f"cpu_us_per_{unit}": round(span.cpu / count * 1e6, 2),
    }


def percentiles(samples: list[float]) -> Figures:
    """p50, p99 and max of ``samples`` (seconds) in microseconds."""
    samples.sort()
    n = len(samples)

    def at(q: float) -> float:
        return round(samples[min(n - 1, max(0, math.ceil(n * q) - 1))] * 1e6, 1)

    return {"p50_us": at(0.50), "p99_us": at(0.99), "max_us": round(samples[-1] * 1e6, 1)}


async def median_of(repeat: int, metric: str, once: Callable[[], Awaitable[Figures]]) -> Figures:
    """Run ``once`` ``repeat`` times; the run with the median ``metric``, and all of them."""
    results: list[Figures] = []
    for _ in range(repeat):
        gc.collect()
        results.append(await once())
    return median(results, metric)


def median(results: list[Figures], metric: str) -> Figures:
    """The result with the median ``metric`` (the lower of two), and every result's figure."""
    ranked = sorted(results, key=lambda figures: figures[metric])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = [figures[metric] for figures in results]
    return chosen


def with_baseline(figures: Figures, baseline: Figures, metric: str, label: str) -> Figures:
    """``figures`` plus the baseline's figures as ``baseline_*`` and their ratio."""
    record = dict(figures)
    record["baseline"] = label
    for key, value in baseline.items():
        record[f"baseline_{key}"] = value
    if baseline.get(metric):
        record["ratio_to_baseline"] = round(figures[metric] / baseline[metric], 3)
    return record


# -- stores and profiling ------------------------------------------------------------------


class Stores:
    """Makes the stores of one kind; SQLite files live in ``directory``."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory

    def fresh(self, name: str) -> EventStore:
        """An empty store (a SQLite file ``name`` is deleted first)."""
        if self.kind == "memory":
            return rpcstream.MemoryStore()
        path = self.directory / f"{name}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return rpcstream.SQLiteStore(path)

    def replay(self, run_id: str) -> EventStore:
        """The store that holds the replay run: a kept SQLite file, or a new MemoryStore.

        Its runs never expire during a benchmark. A SQLite file whose ``run_id`` is
        missing, or has expired, is deleted, so that the run is built again.
        """
        if self.kind == "memory":
            return rpcstream.MemoryStore(expire_after=REPLAY_RETENTION)
        path = self.directory / "replay.sqlite"
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as conn:
                try:
                    row = conn.execute(
                        "SELECT status, expires FROM runs WHERE run_id = ?", (run_id,)
                    ).fetchone()
                except sqlite3.Error:
                    row = None
            if row is None or row[0] == "expired" or row[1] < time.time() + 3600:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        return rpcstream.SQLiteStore(path, expire_after=REPLAY_RETENTION)


@contextlib.contextmanager
def profiled(enabled: bool, title: str) -> Iterator[None]:
    """cProfile the block (this thread only) and print the top functions to stderr."""
    if not enabled:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(f"=== profile: {title} (by tottime) ===\n{out.getvalue()}", file=sys.stderr)


async def printed(func: Callable[..., Awaitable[None]], *args: Any) -> Figures:
    """Run a measurement that prints JSON lines (``bench_store``, ``bench_redis``); its last."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        await func(*args)
    record: Figures = json.loads(out.getvalue().splitlines()[-1])
    return record


async def store_only(func: Callable[..., Awaitable[None]], *args: Any) -> Figures:
    """Run a :mod:`benchmarks.bench_store` measurement; the figures it printed, plus CPU."""
    cpu = time.process_time()
    record = await printed(func, *args)
    cpu = time.process_time() - cpu
    figures = {"events": record["events"], "seconds": record["seconds"]}
    figures["events_per_s"] = record["events_per_s"]
    figures["cpu_s"] = round(cpu, 3)
    figures["cpu_us_per_event"] = round(cpu / record["events"] * 1e6, 2)
    for key in ("commits", "appends_per_commit"):
        if key in record:
            figures[key] = record[key]
    return figures


# -- the flows -----------------------------------------------------------------------------


@dataclass
class Barrier:
    """Flows wait here until the harness releases them all at once."""

    expected: int
    arrived: int = 0
    all_arrived: anyio.Event = field(default_factory=anyio.Event)
    go: anyio.Event = field(default_factory=anyio.Event)
    finished: int = 0
    all_finished: anyio.Event = field(default_factory=anyio.Event)
    send_times: list[float] = field(default_factory=list)  # append times (paced flow)
    end: float = 0.0  # when the last flow finished sending

    async def wait(self) -> None:
        """Arrive, then wait for :attr:`go`."""
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_arrived.set()
        await self.go.wait()

    def done(self) -> None:
        """One flow finished sending."""
        self.end = time.perf_counter()
        self.finished += 1
        if self.finished == self.expected:
            self.all_finished.set()


async def send_tokens(ctx: rpcstream.RunContext, n: int) -> None:
    """What the ``emit`` flow does: ``n`` sends, as fast as the run takes them."""
    send = ctx.client.send
    for i in range(n):
        # The shape of bench_store.PAYLOAD, encoded by the flow as an app's would be.
        await send("token", {"token": "hello", "index": i, "p": 0.5})


def make_runs(store: EventStore, barrier: Barrier) -> rpcstream.RunServer:
    """A RunServer with the benchmark's flows, which synchronise on ``barrier``."""
    runs = rpcstream.RunServer(store=store)

    @runs.flow("emit")
    async def emit_flow(ctx: rpcstream.RunContext, n: int) -> None:
        await barrier.wait()
        await send_tokens(ctx, n)
        barrier.done()

    @runs.flow("paced")
    async def paced_flow(ctx: rpcstream.RunContext, n: int, interval: float) -> None:
        await barrier.wait()
        send, times = ctx.client.send, barrier.send_times
        for i in range(n):
            t = time.perf_counter()
            times.append(t)
            await send("tick", {"i": i, "t": t})
            await anyio.sleep(interval)
        barrier.done()

    return runs


@contextlib.asynccontextmanager
async def served(
    store: EventStore, barrier: Barrier
) -> AsyncIterator[tuple[rpcstream.Server, rpcstream.RpcPeer]]:
    """Serve a RunServer on ``store`` on 127.0.0.1 and connect one client to it."""
    async with (
        rpcstream.serve(make_runs(store, barrier), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        yield server, peer


# -- 1. appends through a flow -------------------------------------------------------------


async def flow_append(store: EventStore, runs: int, each: int, profile: bool) -> Figures:
    """``runs`` runs of the ``emit`` flow send ``each`` events, released together."""
    barrier = Barrier(expected=runs)
    async with served(store, barrier) as (_, peer):
        async with anyio.create_task_group() as tg:
            for _ in range(runs):
                tg.start_soon(functools.partial(peer.call, "runs.start", "emit", {"n": each}))
        await barrier.all_arrived.wait()
        before = bench_store.counters(store)
        with profiled(profile, f"flow append, {runs} run(s)"):
            span = Span()
            barrier.go.set()
            await barrier.all_finished.wait()
            span.stop(barrier.end)
        stats = bench_store.group_stats(store, before)
    return {**rate(runs * each, span), **stats}


async def bench_append(stores: Stores, head: Figures, args: argparse.Namespace) -> None:
    """Measurement 1: appends through a flow, one run and many at once."""
    sizes, name, backend = args.sizes, stores.kind, head["loop"]
    cases = [
        ("flow_append_one_run", 1, sizes.one_run_events, "append_one_run"),
        (
            f"flow_append_{sizes.runs}_runs",
            sizes.runs,
            sizes.events_per_run,
            "append_concurrent_runs",
        ),
    ]
    for bench, runs, each, base_name in cases:

        async def base_once(
            base_name: str = base_name, runs: int = runs, each: int = each
        ) -> Figures:
            async with stores.fresh("append-base") as store:
                if base_name == "append_one_run":
                    return await store_only(bench_store.append_one_run, store, name, backend, each)
                return await store_only(
                    bench_store.append_concurrent_runs, store, name, backend, runs, each
                )

        async def flow_once(runs: int = runs, each: int = each) -> Figures:
            return await flow_append(stores.fresh("append-flow"), runs, each, args.profile)

        base = await median_of(args.repeat, "events_per_s", base_once)
        figures = await median_of(args.repeat, "events_per_s", flow_once)
        emit(
            with_baseline(
                {**head, "bench": bench, "flow_runs": runs, **figures},
                base,
                "events_per_s",
                f"store.append (bench_store.{base_name})",
            )
        )


# -- 2. replay of a long run ---------------------------------------------------------------


async def wire_replay(
    server: rpcstream.Server, run_id: str, events: int, codec: str, profile: bool
) -> Figures:
    """Read the whole run over a new connection; check every id arrived in order."""
    async with rpcstream.connect(server.url, codec=codec) as peer:
        count = 0
        first = 0.0
        with profiled(profile, f"replay over the wire ({codec})"):
            span = Span()
            async for event in peer.stream("runs.subscribe", run_id, after=0):
                count += 1
                if count == 1:
                    first = time.perf_counter() - span.wall0
                if event["id"] != count:
                    raise AssertionError(f"event {event['id']} arrived as number {count}")
            span.stop()
    if count != events:
        raise AssertionError(f"{count} events replayed, expected {events}")
    return {**rate(count, span), "first_event_ms": round(first * 1e3, 2)}


async def bench_replay(stores: Stores, head: Figures, args: argparse.Namespace) -> None:
    """Measurement 2: one subscriber replays a long finished run, then store.follow alone."""
    sizes, name, backend = args.sizes, stores.kind, head["loop"]
    events = sizes.replay_events
    run_id = f"replay-{events}"  # bench_store's name for it
    store = stores.replay(run_id)
    async with rpcstream.serve(make_runs(store, Barrier(0)), "127.0.0.1", 0) as server:
        try:
            await store.info(run_id)
            built = "reused"
        except rpcstream.RunNotFound:
            build = await store_only(
                bench_store.build_replay_run, store, name, backend, events, sizes.writers
            )
            built = f"built in {build['seconds']} s ({build['events_per_s']} events/s)"
        base = await median_of(
            args.repeat,
            "events_per_s",
            functools.partial(store_only, bench_store.replay, store, name, backend, events),
        )
        for codec in CODECS:
            figures = await median_of(
                args.repeat,
                "events_per_s",
                functools.partial(wire_replay, server, run_id, events, codec, args.profile),
            )
            emit(
                with_baseline(
                    {**head, "bench": "replay", "codec": codec, **figures, "run": built},
                    base,
                    "events_per_s",
                    "store.follow (bench_store.replay)",
                )
            )


# -- 3. fan-out latency --------------------------------------------------------------------


@dataclass
class Deliveries:
    """What the subscribers saw: latencies, and when the last event arrived."""

    expected_subscribers: int
    latencies: list[float] = field(default_factory=list)
    ready: int = 0
    all_ready: anyio.Event = field(default_factory=anyio.Event)
    last: float = 0.0

    def started(self) -> None:
        """A subscriber has the run's first event: it follows live from now on."""
        self.ready += 1
        if self.ready == self.expected_subscribers:
            self.all_ready.set()

    def figures(self, send_times: list[float], span: Span, subscribers: int) -> Figures:
        """Latency percentiles, delivery rate, CPU cost and the pace the appender kept."""
        events = len(send_times)
        deliveries = len(self.latencies)
        if deliveries != events * subscribers:
            raise AssertionError(f"{deliveries} deliveries, expected {events * subscribers}")
        return {
            "subscribers": subscribers,
            "events": events,
            **percentiles(self.latencies),
            **rate(deliveries, span, "delivery", "deliveries"),
            "mean_append_interval_ms": (
                round((send_times[-1] - send_times[0]) / (events - 1) * 1e3, 3)
                if events > 1
                else None
            ),
        }


async def wire_subscriber(peer: rpcstream.RpcPeer, run_id: str, seen: Deliveries) -> None:
    """Subscribe over ``peer``; note each ``tick``'s latency."""
    latencies = seen.latencies
    async for event in peer.stream("runs.subscribe", run_id, after=0):
        now = time.perf_counter()
        kind = event["type"]
        if kind == "tick":
            latencies.append(now - event["data"]["t"])
            seen.last = now
        elif kind == "started":
            seen.started()


async def wire_fanout(
    stores: Stores, sizes: Sizes, subscribers: int, connections: int, profile: bool
) -> Figures:
    """The ``paced`` flow, with ``subscribers`` subscribers over ``connections``."""
    n = sizes.fanout_events
    barrier = Barrier(expected=1)
    seen = Deliveries(subscribers)
    async with (
        served(stores.fresh("fanout"), barrier) as (server, first),
        contextlib.AsyncExitStack() as stack,
    ):
        peers = [first] + [
            await stack.enter_async_context(rpcstream.connect(server.url))
            for _ in range(connections - 1)
        ]
        run = await first.call("runs.start", "paced", {"n": n, "interval": sizes.interval})
        async with anyio.create_task_group() as tg:
            for i in range(subscribers):
                tg.start_soon(wire_subscriber, peers[i % len(peers)], run["run_id"], seen)
            await seen.all_ready.wait()
            await barrier.all_arrived.wait()
            gc.collect()
            with profiled(profile, f"fan-out to {subscribers} subscribers over the wire"):
                span = Span()
                barrier.go.set()
                await barrier.all_finished.wait()
            # The task group waits for every subscriber to get the terminal event.
        span.wall0 = barrier.send_times[0]
        span.stop(seen.last)
    return seen.figures(barrier.send_times, span, subscribers)


async def store_fanout(stores: Stores, sizes: Sizes, subscribers: int) -> Figures:
    """The same paced appends and the same number of followers, on the store alone."""
    n = sizes.fanout_events
    seen = Deliveries(subscribers)
    send_times: list[float] = []
    decode = msgspec.json.decode

    async def follower(store: EventStore) -> None:
        latencies = seen.latencies
        async with contextlib.aclosing(store.follow("fanout", 0)) as events:
            async for event in events:
                now = time.perf_counter()
                if event.type == "tick":
                    latencies.append(now - decode(event.data)["t"])
                    seen.last = now
                elif event.type == "started":
                    seen.started()

    async with stores.fresh("fanout-base") as store:
        await store.create_run("fanout", "paced")
        await store.append("fanout", "started", b'{"flow":"paced"}')
        async with anyio.create_task_group() as tg:
            for _ in range(subscribers):
                tg.start_soon(follower, store)
            await seen.all_ready.wait()
            gc.collect()
            span = Span()
            for i in range(n):
                t = time.perf_counter()
                send_times.append(t)
                await store.append("fanout", "tick", msgspec.json.encode({"i": i, "t": t}))
                await anyio.sleep(sizes.interval)
            await store.append("fanout", "complete", b"null", terminal=True)
        span.wall0 = send_times[0]
        span.stop(seen.last)
    return seen.figures(send_times, span, subscribers)


async def bench_fanout(stores: Stores, head: Figures, args: argparse.Namespace) -> None:
    """Measurement 3: append-to-subscriber latency with many subscribers on one run."""
    sizes = args.sizes
    for subscribers, connections in sizes.fanout:
        base = await median_of(
            args.repeat, "p50_us", functools.partial(store_fanout, stores, sizes, subscribers)
        )
        figures = await median_of(
            args.repeat,
            "p50_us",
            functools.partial(wire_fanout, stores, sizes, subscribers, connections, args.profile),
        )
        extra = {"connections": connections, "interval_ms": sizes.interval * 1e3}
        emit(
            with_baseline(
                {**head, "bench": "fanout_latency", **figures, **extra},
                base,
                "p50_us",
                f"store.follow x {subscribers}, same pacing",
            )
        )


# -- entry point ---------------------------------------------------------------------------

MEASUREMENTS = {"append": bench_append, "replay": bench_replay, "fanout": bench_fanout}


def environment(loop: str, args: argparse.Namespace) -> Figures:
    """What the figures were taken on."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("anyio", "trio", "websockets", "msgspec"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "bench": "environment",
        "loop": loop,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        **versions,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "quick": args.quick,
        "repeat": args.repeat,
    }


async def run_loop(loop: str, args: argparse.Namespace, directory: Path) -> None:
    """Every selected measurement, for every selected store, on the running loop."""
    emit(environment(loop, args))
    for kind in args.stores:
        stores = Stores(kind, directory)
        head: Figures = {"loop": loop, "store": kind}
        for bench in args.benches:
            await MEASUREMENTS[bench](stores, head, args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: loops, stores, measurements, sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_runs",
        description="Benchmark RunServer over WebSockets beside its event store alone.",
    )
    parser.add_argument("--loop", choices=[*LOOPS, "all"], default="asyncio")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated")
    parser.add_argument(
        "--benches", default=",".join(BENCHES), help=f"comma-separated, from {','.join(BENCHES)}"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per measurement (default 3, quick 1)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile each wire measurement (to stderr)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="keep SQLite files here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    args.benches = [b.strip() for b in args.benches.split(",") if b.strip()]
    for value, allowed in ((args.stores, STORES), (args.benches, BENCHES)):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.sizes = QUICK if args.quick else FULL
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the measurements ``argv`` selects; print one JSON line per result.

    ``--deployed`` runs :mod:`benchmarks.runs_deployed` instead (the server alone in
    its process, clients in others), with the rest of ``argv``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--deployed" in argv:
        from .runs_deployed import main as deployed

        return deployed([a for a in argv if a != "--deployed"])
    args = parse_args(argv)
    loops = list(LOOPS) if args.loop == "all" else [args.loop]
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-runs-")))
        else:
            directory = args.dir
            directory.mkdir(parents=True, exist_ok=True)
        for loop in loops:
            if loop != "asyncio" and importlib.util.find_spec(loop) is None:
                emit({"loop": loop, "skipped": f"{loop} is not importable"})
                continue
            anyio.run(run_loop, loop, args, directory, backend=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
