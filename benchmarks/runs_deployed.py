"""Run streams as deployed: a RunServer alone in its process, its clients in several others.

    python -m benchmarks.runs_deployed                   # asyncio, full sizes
    python -m benchmarks.runs_deployed --quick           # seconds, not minutes
    python -m benchmarks.runs_deployed --server-code DIR # the server runs rpcstream from DIR

(also ``python -m benchmarks.bench_runs --deployed ...``). Prints one JSON line per
measurement. The parent process only starts children (:mod:`benchmarks.runs_procs`)
and drives the server through a control connection:

* ``fanout``: one run ticking ``--fanout-rate`` events/s (10) for ``--seconds`` (10),
  1,000 connections with one subscriber each; and ``fanout_shared``: the same run,
  1,000 subscribers on 10 connections (100 per connection), which shows how many
  WebSocket messages a delivery costs when a connection carries many subscriptions.
  ``fanout`` runs ``--rounds`` rounds interleaved with its baseline, a raw websockets
  server (:mod:`benchmarks.runs_raw`) broadcasting each tick to as many connections
  at the same pace, then prints a line of medians (``summary``);
* ``runs``: 500 and 1,000 runs at once (``--runs``), each ticking at ``--rates``
  (20 and 50) events/s, one subscriber each on its own connection; ``runs_raw``:
  the same in ``--rounds`` rounds interleaved with raw websockets, where every
  connection gets its own ticking run (``await ws.send`` per event), then a
  ``summary`` line of medians;
* ``append``: 100 runs of a flow that sends 500 events as fast as it can
  (``--append-runs``, ``--append-events``), released together: total events/s, in
  ``--rounds`` (3) rounds interleaved with the same appends on the store alone in the
  parent process (``bench_store`` / ``bench_redis.append_concurrent_runs``), medians;
* ``replay``: one client reads a finished run of 1,000,000 events (memory store),
  with and without ``batch=True``.

``--stores redis`` (not in the default ``memory,sqlite``): a private ``redis-server``
on a free loopback port (:mod:`tests.redis_server`, never 6379) and TWO server
processes on it (nodes ``a`` and ``b``, each its own port). Paced runs are started on
``a``; every subscription is made on EACH node (the client processes are split
between them), so ``by_node`` gives the latency on the flow's node and across nodes;
the line's baseline is ``bench_redis.cross_node_latency`` (one ``RedisStore``
appends, a second one follows, one event at a time). ``append`` splits its runs
between the two nodes. asyncio only (``RedisStore`` is).

Every subscription checks its ids (contiguous from 1, ending with the terminal
event): ``verified``. Latency (``p50_us``, ``p99_us``, ``max_us``) is client receipt
minus the ``time.monotonic()`` the flow took just before appending each tick.
``messages_per_delivery`` counts the WebSocket messages the clients received;
``store_commits`` and ``appends_per_commit`` (SQLite and Redis, the store of the node
the runs were started on) how the server grouped the appends: a few per commit, or
hundreds because each commit waits for the last one's deliveries; ``gc_full`` the
full collections of the cyclic garbage collector in the server while it ran (count,
longest and total ms): each stops the event loop for as long as visiting every
tracked object takes, which with hundreds of connections open is tens to hundreds of
milliseconds (docs/benchmarks_runs.md, "Tenth session").
``busy`` is each process's CPU time over the measured wall time: a client near
1.0 would be the bottleneck (the subscribers are spread over ``--client-procs``
processes so that none is). The machine's cores are shared: say so with figures.

``--clients-nice N`` starts the client processes under ``nice -n N``. On a machine
with fewer cores than processes (two here: one server, four clients) the kernel
shares them out fairly, and each client, lighter than the server, is woken ahead
of it: the server waits for a core its clients hold, which it would not on a
machine of its own. With the clients niced the server gets a core first and the
figures show what it does with one; raw websockets' rounds get the same.

``--server-code DIR`` runs the server on another copy of the package (e.g. the
merge base, ``git archive 89a3cfc rpcstream | tar -x -C DIR``), the clients staying
on this checkout, for a before/after comparison in the same run; ``--no-batch``
makes clients subscribe without ``batch=True`` (what such a server understands).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import rpcstream

from . import bench_store
from .bench_runs import Stores, median, printed, store_only, with_baseline
from .peer_measure import proc_cpu_s

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("fanout", "fanout_shared", "runs", "append", "replay")
OPTIONAL_WORKLOADS = ("runs_raw",)  # asked for by name: rounds beside raw websockets
STORES = ("memory", "sqlite")
OPTIONAL_STORES = ("redis",)  # needs redis-server: asked for by name

Figures = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    seconds: float = 10.0
    fanout_connections: int = 1000
    fanout_rate: float = 10.0
    runs: tuple[int, ...] = (500, 1000)
    rates: tuple[float, ...] = (20.0, 50.0)
    replay_events: int = 1_000_000
    client_procs: int = 4
    append_runs: int = 100
    append_events: int = 500  # per run
    rounds: int = 3  # of `append` and `fanout`, each interleaved with its baseline
    latency_samples: int = 500  # of the store-alone cross-node latency (Redis)


FULL = Sizes()
QUICK = Sizes(
    seconds=3.0, fanout_connections=200, runs=(100,), rates=(20.0,), replay_events=100_000,
    append_events=200, rounds=1,
)  # fmt: skip
TINY = Sizes(
    seconds=0.5, fanout_connections=6, runs=(4,), rates=(20.0,), replay_events=2000, client_procs=2,
    append_runs=4, append_events=20, rounds=1, latency_samples=20,
)  # fmt: skip


def emit(record: Figures) -> None:
    """Print one result line, with the 1-minute load average as a noise warning."""
    print(json.dumps({**record, "load1": round(os.getloadavg()[0], 2)}), flush=True)


# -- children ------------------------------------------------------------------------------


class Child:
    """A child process and the JSON lines it prints."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> Figures:
        """The next JSON object it prints (``ChildProcessError`` when it exits first)."""
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            try:
                self._buffer += await stdout.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise ChildProcessError(f"child exited: {self.process.returncode}") from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ChildProcessError(f"child printed {line!r}")
        return value


@contextlib.asynccontextmanager
async def spawn(
    args: list[str], loop: str, code: Path | None = None, nice: int = 0
) -> AsyncIterator[Child]:
    """Start ``python -m benchmarks.runs_procs ARGS`` (under ``nice -n NICE`` when
    given), with rpcstream from ``code`` when given; close its stdin and wait on the
    way out."""
    env = dict(os.environ)
    paths = [str(code)] if code is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")])
    # -P: ``-m`` would put the working directory (ROOT) first on sys.path, ahead of
    # PYTHONPATH, and ROOT's rpcstream would shadow ``code``'s.
    argv = [sys.executable, "-P", "-m", "benchmarks.runs_procs", *args, "--loop", loop]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    process = await anyio.open_process(argv, env=env, cwd=ROOT, stderr=None)
    try:
        yield Child(process)
    finally:
        with anyio.CancelScope(shield=True):
            if process.stdin is not None:
                with contextlib.suppress(Exception):
                    await process.stdin.aclose()
            with anyio.move_on_after(10) as waited:
                await process.wait()
            if waited.cancelled_caught:
                process.kill()
                await process.wait()
            await process.aclose()


# -- measurements --------------------------------------------------------------------------


def percentiles(samples: list[int]) -> Figures:
    """p50, p99 and max of latency samples in microseconds."""
    if not samples:
        return {}
    samples = sorted(samples)
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "max_us": samples[-1],
    }


@dataclass(frozen=True)
class Node:
    """A server child: its name in the figures, its process and its URL."""

    name: str
    child: Child
    url: str


def servers_busy(nodes: list[Node], cpu: list[float], wall: float) -> Figures:
    """Each server's CPU time over the wall time: ``server``, or ``server_a``, ``server_b``."""
    names = ["server"] if len(nodes) == 1 else [f"server_{node.name}" for node in nodes]
    return {name: round(c / wall, 2) for name, c in zip(names, cpu, strict=True)}


async def paced(
    nodes: list[Node],
    control: rpcstream.RpcPeer,
    head: Figures,
    args: argparse.Namespace,
    runs: int,
    subscriptions: int,
    rate: float,
    per_connection: int = 1,
) -> Figures:
    """``runs`` paced runs at ``rate`` events/s, started through ``control`` (on the first
    node), ``subscriptions`` spread over them on EACH node; returns the printed figures."""
    s: Sizes = args.sizes
    await control.call("bench.arm")
    before = (await control.call("bench.census"))["tracked"]
    n = max(1, int(rate * s.seconds))
    run_ids = [
        (await control.call("runs.start", "paced", {"n": n, "rate": rate}))["run_id"]
        for _ in range(runs)
    ]
    subs = [run_ids[i % runs] for i in range(subscriptions)]
    # Whole connections to each process, dealt round-robin; each node its share of them.
    groups = [subs[i : i + per_connection] for i in range(0, len(subs), per_connection)]
    procs = max(1, min(s.client_procs // len(nodes), len(groups)))
    shares = [[rid for group in groups[p::procs] for rid in group] for p in range(procs)]
    async with contextlib.AsyncExitStack() as stack:
        clients: list[tuple[Node, Child]] = []
        for node in nodes:
            for share in shares:
                spec = {"url": node.url, "runs": share, "batch": args.batch}
                spec["per_connection"] = per_connection
                argv = ["--client", json.dumps(spec)]
                child = spawn(argv, args.loop, nice=args.clients_nice)
                clients.append((node, await stack.enter_async_context(child)))
        for _, client in clients:
            ready = await client.line()
            assert ready.get("ready"), ready
        census = await control.call("bench.census", args.census)
        cpu = [proc_cpu_s(node.child.process.pid) or 0.0 for node in nodes]
        commits = await control.call("bench.commits")
        await control.call("bench.gc_pauses")  # from here on
        go = time.monotonic()
        await control.call("bench.go")
        results = [(node, await client.line()) for node, client in clients]
        wall = time.monotonic() - go
        full_gcs = await control.call("bench.gc_pauses")
        if commits is not None:  # the control node's store: where the runs append
            now = await control.call("bench.commits")
            commits = [now[0] - commits[0], now[1] - commits[1]]
        cpu = [
            (proc_cpu_s(node.child.process.pid) or 0.0) - before
            for node, before in zip(nodes, cpu, strict=True)
        ]
    latencies = {node.name: [x for n, r in results if n is node for x in r.pop("latencies_us")]
                 for node in nodes}  # fmt: skip
    flat = [r for _, r in results]
    figures = {
        **head,
        "runs": runs,
        "subscribers": subscriptions * len(nodes),
        "connections": -(-subscriptions // per_connection) * len(nodes),
        "rate": rate,
        "events_per_run": n + 2,
        **client_figures(flat, wall, sum(cpu), [x for v in latencies.values() for x in v]),
    }
    figures["busy"] = {**servers_busy(nodes, cpu, wall), **figures["busy"]}
    figures["gc_full"] = {"count": full_gcs[0], "max_ms": full_gcs[1], "total_ms": full_gcs[2]}
    # What each connection to the control node (and its share of the runs) adds to
    # what a full collection visits, counted once every subscription had its first event.
    on_control = -(-subscriptions // per_connection)
    figures["tracked_per_connection"] = round((census["tracked"] - before) / on_control, 1)
    figures["server_gc"] = {"threshold": census["threshold"], "frozen": census["frozen"]}
    for key in ("types", "coroutines", "tasks"):
        if key in census:  # --census N: the N most common, per connection
            figures[f"census_{key}"] = [[name, round(count / on_control, 2)]
                                        for name, count in census[key]]  # fmt: skip
    if commits is not None and commits[0]:
        figures["store_commits"] = commits[0]
        figures["appends_per_commit"] = round(commits[1] / commits[0], 1)
    if len(nodes) > 1:  # where the subscribers were: the flow's node, or another
        figures["by_node"] = {name: percentiles(samples) for name, samples in latencies.items()}
    return figures


def client_figures(
    results: list[Figures], wall: float, server_cpu: float, latencies: list[int]
) -> Figures:
    """What the client children measured, summed, with the servers' CPU time."""
    deliveries = sum(r["deliveries"] for r in results)
    messages = sum(r["messages"] for r in results)
    measured = sum(r["measured"] for r in results)
    return {
        "seconds": round(wall, 2),
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / wall) if wall else None,
        **percentiles(latencies),
        "messages_per_delivery": round(messages / measured, 3) if measured else None,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_us_per_delivery": round(server_cpu * 1e6 / measured, 1) if measured else None,
        "busy": {f"client{i}": round(r["cpu_s"] / r["wall_s"], 2) for i, r in enumerate(results)},
        "client_procs": len(results),
        "clients_nice": max(r["nice"] for r in results) if results else None,
        "verified": all(r["verified"] for r in results),
        "wrong": [w for r in results for w in r["wrong"]][:3],
    }


async def raw_fanout(
    raw: Child,
    raw_url: str,
    head: Figures,
    args: argparse.Namespace,
    count: int | None = None,
    rate: float | None = None,
    each: bool = False,
) -> Figures:
    """The baseline of ``fanout``: raw websockets broadcasting each tick to as many
    connections, at the same pace, the clients spread over as many processes.
    ``each``: the baseline of ``runs`` instead, every connection its own ticking run."""
    s: Sizes = args.sizes
    rate = s.fanout_rate if rate is None else rate
    count = s.fanout_connections if count is None else count
    n = max(1, int(rate * s.seconds))
    procs = max(1, min(s.client_procs, count))
    pid = raw.process.pid
    stdin = raw.process.stdin
    assert stdin is not None
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for p in range(procs):
            spec = {"url": raw_url, "connections": len(range(p, count, procs))}
            argv = ["--raw-client", json.dumps(spec)]
            child = spawn(argv, args.loop, nice=args.clients_nice)
            clients.append(await stack.enter_async_context(child))
        for client in clients:
            ready = await client.line()
            assert ready.get("ready"), ready
        cpu = proc_cpu_s(pid)
        go = time.monotonic()
        await stdin.send(json.dumps({"n": n, "rate": rate, "each": each}).encode() + b"\n")
        results = [await client.line() for client in clients]
        wall = time.monotonic() - go
        server_cpu = (proc_cpu_s(pid) or 0.0) - (cpu or 0.0)
    latencies = [x for r in results for x in r.pop("latencies_us")]
    record = {
        **head,
        "code": "raw websockets",
        "runs": count if each else 1,
        "subscribers": count,
        "connections": count,
        "rate": rate,
        "events_per_run": n + 2,
        **client_figures(results, wall, server_cpu, latencies),
    }
    record["busy"] = {"server": round(server_cpu / wall, 2), **record["busy"]}
    return record


async def fanout_rounds(
    nodes: list[Node],
    control: rpcstream.RpcPeer,
    head: Figures,
    args: argparse.Namespace,
    out: Callable[[Figures], None],
    runs: int | None = None,
    rate: float | None = None,
) -> None:
    """``fanout`` beside its raw-websockets baseline: ``--rounds`` rounds, the two
    alternating which goes first, each line printed, then one line of medians.
    With ``runs``: the ``runs`` workload (that many runs at ``rate``, one subscriber
    each on its own connection) beside raw websockets ticking each connection alone."""
    s: Sizes = args.sizes
    mine: list[Figures] = []
    base: list[Figures] = []
    each = runs is not None
    conns = s.fanout_connections if runs is None else runs
    rate = s.fanout_rate if rate is None else rate
    async with spawn(["--raw-serve"], args.loop) as raw:
        raw_url = (await raw.line())["url"]
        for r in range(s.rounds):
            for which in ("raw", "this") if r % 2 == 0 else ("this", "raw"):
                at = {**head, "round": r}
                if which == "raw":
                    base.append(await raw_fanout(raw, raw_url, at, args, conns, rate, each))
                    emit(base[-1])
                else:
                    count = runs if runs is not None else 1
                    mine.append(await paced(nodes, control, at, args, count, conns, rate))
                    out(mine[-1])
    summary: Figures = {**head, "summary": f"medians of {s.rounds} rounds"}
    if runs is not None:
        summary.update(runs=runs, rate=rate)
    for key in ("p50_us", "p99_us", "server_cpu_us_per_delivery"):
        ours = statistics.median(x[key] for x in mine)
        theirs = statistics.median(x[key] for x in base)
        summary[key] = ours
        summary[f"baseline_{key}"] = theirs
        summary[f"{key}_rounds"] = [x[key] for x in mine]
        summary[f"baseline_{key}_rounds"] = [x[key] for x in base]
        summary[f"ratio_to_baseline_{key}"] = round(ours / theirs, 2) if theirs else None
    summary["verified"] = all(x["verified"] for x in mine + base)
    emit(summary)


async def replay(
    node: Node, control: rpcstream.RpcPeer, head: Figures, args: argparse.Namespace
) -> None:
    """One client reads a finished run from the start, with and without batches."""
    events = args.sizes.replay_events
    start = time.perf_counter()
    run_id = await control.call("bench.replay_run", events)
    built = time.perf_counter() - start
    pid = node.child.process.pid
    for batch in (True, False) if args.batch else (False,):
        spec = {"url": node.url, "runs": [run_id], "batch": batch, "expect": events}
        cpu = proc_cpu_s(pid)
        replay = spawn(["--replay", json.dumps(spec)], args.loop, nice=args.clients_nice)
        async with replay as client:
            result = await client.line()
        server_cpu = (proc_cpu_s(pid) or 0.0) - (cpu or 0.0)
        emit(
            {
                **head,
                "batch": batch,
                **result,
                "messages_per_event": round(result["messages"] / result["events"], 4),
                "server_cpu_s": round(server_cpu, 2),
                "server_cpu_us_per_event": round(server_cpu * 1e6 / result["events"], 2),
                "busy": {
                    "server": round(server_cpu / result["seconds"], 2),
                    "client": round(result["cpu_s"] / result["seconds"], 2),
                },
                "build_s": round(built, 1),
            }
        )


async def flow_appends(
    nodes: list[Node], controls: list[rpcstream.RpcPeer], args: argparse.Namespace
) -> Figures:
    """``append_runs`` runs of the ``emit`` flow, spread over the nodes, released together:
    total events/s from ``bench.go`` until the last flow's last send is stored (committed,
    for SQLite's pipelined appends: as the store-alone baseline counts them)."""
    s: Sizes = args.sizes
    shares = [s.append_runs // len(nodes) + (i < s.append_runs % len(nodes))
              for i in range(len(nodes))]  # fmt: skip
    for control, share in zip(controls, shares, strict=True):
        await control.call("bench.arm", share)
        for _ in range(share):
            await control.call("runs.start", "emit", {"n": s.append_events})
    # A node given no run has nothing to wait for (fewer runs than nodes).
    controls = [c for c, share in zip(controls, shares, strict=True) if share]
    for control in controls:
        await control.call("bench.arrived")
    cpu = [proc_cpu_s(node.child.process.pid) or 0.0 for node in nodes]
    start = time.monotonic()
    for method in ("bench.go", "bench.finished"):
        async with anyio.create_task_group() as tg:
            for control in controls:
                tg.start_soon(control.call, method)
    wall = time.monotonic() - start
    cpu = [(proc_cpu_s(n.child.process.pid) or 0.0) - c for n, c in zip(nodes, cpu, strict=True)]
    events = s.append_runs * s.append_events
    return {
        "flow_runs": s.append_runs,  # ("runs" holds each round's events_per_s)
        "events": events,
        "seconds": round(wall, 3),
        "events_per_s": round(events / wall),
        "server_cpu_us_per_event": round(sum(cpu) * 1e6 / events, 2),
        "busy": servers_busy(nodes, cpu, wall),
    }


async def appends(
    nodes: list[Node],
    controls: list[rpcstream.RpcPeer],
    head: Figures,
    args: argparse.Namespace,
    baseline: Callable[[], Awaitable[Figures]],
) -> None:
    """Appends through flows on every node, beside the store alone, in interleaved rounds."""
    base: list[Figures] = []
    flows: list[Figures] = []
    for _ in range(args.sizes.rounds):
        base.append(await baseline())
        flows.append(await flow_appends(nodes, controls, args))
    figures = {**head, **median(flows, "events_per_s")}
    label = "store.append alone, same runs and counts (append_concurrent_runs)"
    emit(with_baseline(figures, median(base, "events_per_s"), "events_per_s", label))


@contextlib.contextmanager
def store_spec(store: str, directory: Path) -> Iterator[tuple[str, int]]:
    """The ``--serve`` argument for ``store`` and how many server processes share it."""
    if store == "redis":
        from . import bench_redis  # its private redis-server, on a free port

        with bench_redis.RedisServer(directory / "redis") as redis:
            yield redis.url, 2
        return
    if store == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{directory / 'runs.db'}{suffix}").unlink(missing_ok=True)
        yield f"sqlite:{directory / 'runs.db'}", 1
        return
    yield "memory", 1


def store_baselines(
    store: str, spec: str, directory: Path, args: argparse.Namespace
) -> tuple[Callable[[], Awaitable[Figures]], Callable[[], Awaitable[Figures]] | None]:
    """The store alone, in this process: concurrent appends, and (Redis) cross-node latency."""
    s: Sizes = args.sizes
    if store == "redis":
        from rpcstream.store.redis import RedisStore

        from . import bench_redis

        pool = inspect.signature(RedisStore).parameters["max_connections"].default
        ns = argparse.Namespace(runs=s.append_runs, events_per_run=s.append_events,
                                max_connections=pool, samples=s.latency_samples)  # fmt: skip

        async def latency() -> Figures:
            record = await printed(bench_redis.cross_node_latency, spec, ns, 1)
            return {f"{q}_us": round(record[f"{q}_ms"] * 1000) for q in ("p50", "p99", "max")}

        return functools.partial(printed, bench_redis.append_concurrent_runs, spec, ns), latency
    stores = Stores(store, directory)

    async def base() -> Figures:
        async with stores.fresh("append-base") as alone:
            return await store_only(bench_store.append_concurrent_runs, alone, store, args.loop,
                                    s.append_runs, s.append_events)  # fmt: skip

    return base, None


async def run_store(store: str, args: argparse.Namespace, directory: Path) -> None:
    """Every selected workload against the server processes on ``store`` (Redis: two)."""
    s: Sizes = args.sizes
    if store == "redis" and args.loop != "asyncio":
        emit({"store": store, "loop": args.loop, "skipped": "RedisStore runs on asyncio only"})
        return
    with store_spec(store, directory) as (spec, count):
        async with contextlib.AsyncExitStack() as stack:
            nodes = []
            for name in "ab"[:count]:
                child = await stack.enter_async_context(
                    spawn(["--serve", spec, "--gc", args.server_gc], args.loop, args.server_code)
                )
                started = await child.line()
                package = Path(started["package"])
                if (
                    args.server_code is not None
                    and args.server_code.resolve() not in package.parents
                ):
                    raise SystemExit(f"the server runs {package}, not --server-code's")
                nodes.append(Node(name, child, started["url"]))
            controls = [await stack.enter_async_context(rpcstream.connect(n.url)) for n in nodes]
            head = {
                "bench": "runs_deployed",
                "loop": args.loop,
                "store": store,
                "nodes": count,
                "code": "server-code" if args.server_code else "this",
                "server_package": str(package),
                "batch": args.batch,
            }
            base_appends, base_latency = store_baselines(store, spec, directory, args)
            latency = await base_latency() if base_latency is not None else None
            for workload in args.workloads:
                work = {**head, "workload": workload}

                def out(figures: Figures) -> None:
                    if latency is None:
                        return emit(figures)
                    label = "store.follow on node b of an append on node a, one at a time"
                    emit(with_baseline(figures, latency, "p99_us", label))

                try:
                    if workload == "fanout":
                        await fanout_rounds(nodes, controls[0], work, args, out)
                    elif workload == "fanout_shared":
                        per = max(1, s.fanout_connections // 10)
                        out(await paced(nodes, controls[0], work, args, 1, s.fanout_connections,
                                        s.fanout_rate, per))  # fmt: skip
                    elif workload == "runs":
                        for runs in s.runs:
                            for rate in s.rates:
                                out(await paced(nodes, controls[0], work, args, runs, runs, rate))
                    elif workload == "runs_raw":  # the same beside raw websockets, in rounds
                        for runs in s.runs:
                            for rate in s.rates:
                                await fanout_rounds(nodes, controls[0], work, args, out, runs, rate)
                    elif workload == "append":
                        await appends(nodes, controls, work, args, base_appends)
                    elif workload == "replay" and store == "memory":
                        await replay(nodes[0], controls[0], work, args)
                except (ChildProcessError, rpcstream.RpcStreamError, OSError) as exc:
                    emit({"workload": workload, "store": store, "error": f"{exc!r}"})


def environment(args: argparse.Namespace) -> Figures:
    """What the figures were taken on."""
    return {
        "bench": "environment",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "loop": args.loop,
        "sizes": vars(args.sizes),
        "server_code": str(args.server_code) if args.server_code else None,
        "clients_nice": args.clients_nice,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runs_deployed",
        description="Run streams with the server alone in its process and clients in others.",
    )
    parser.add_argument("--loop", choices=["asyncio", "trio"], default="asyncio")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, seconds each")
    size.add_argument("--tiny", action="store_true", help="a smoke run (tests)")
    parser.add_argument(
        "--stores", default=",".join(STORES), help="memory,sqlite (default); redis: two servers"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seconds", type=float, default=None, help="ticking time per run")
    parser.add_argument("--runs", default=None, help="comma-separated run counts")
    parser.add_argument("--rates", default=None, help="comma-separated events/s per run")
    parser.add_argument("--client-procs", type=int, default=None)
    parser.add_argument("--append-runs", type=int, default=None, help="runs of `append`")
    parser.add_argument("--append-events", type=int, default=None, help="events per run")
    parser.add_argument(
        "--rounds", type=int, default=None, help="of `append` and `fanout`, beside their baselines"
    )
    parser.add_argument("--server-code", type=Path, default=None)
    parser.add_argument(
        "--clients-nice",
        type=int,
        default=0,
        help="run the client processes under `nice -n N`: the server gets a core first",
    )
    parser.add_argument("--no-batch", dest="batch", action="store_false")
    parser.add_argument(
        "--census",
        type=int,
        default=0,
        metavar="N",
        help="`runs` lines list the server's N most common tracked types, coroutines "
        "and task stacks (asyncio), per connection",
    )
    parser.add_argument(
        "--server-gc",
        default="",
        metavar="POLICY",
        help="the server's collector policy: threshold=N, freeze, or both, comma-separated "
        "(an application's choice, docs/operations.md; default: the interpreter's)",
    )
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    changes: Figures = {}
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.runs is not None:
        changes["runs"] = tuple(int(x) for x in args.runs.split(","))
    if args.rates is not None:
        changes["rates"] = tuple(float(x) for x in args.rates.split(","))
    for key in ("client_procs", "append_runs", "append_events", "rounds"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    args.sizes = Sizes(**{**vars(sizes), **changes})
    args.stores = [x for x in args.stores.split(",") if x]
    args.workloads = [x for x in args.workloads.split(",") if x]
    choices = ((args.stores, STORES + OPTIONAL_STORES),
               (args.workloads, WORKLOADS + OPTIONAL_WORKLOADS))  # fmt: skip
    for values, allowed in choices:
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return args


async def amain(args: argparse.Namespace) -> None:
    """Every selected store in turn."""
    emit(environment(args))
    with tempfile.TemporaryDirectory(prefix="bench-runs-deployed-") as directory:
        for store in args.stores:
            await run_store(store, args, Path(directory))


def main(argv: list[str] | None = None) -> int:
    """Run what ``argv`` selects; one JSON line per result."""
    args = parse_args(argv)
    anyio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
