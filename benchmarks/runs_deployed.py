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
  WebSocket messages a delivery costs when a connection carries many subscriptions;
* ``runs``: 500 and 1,000 runs at once (``--runs``), each ticking at ``--rates``
  (20 and 50) events/s, one subscriber each on its own connection;
* ``replay``: one client reads a finished run of 1,000,000 events (memory store),
  with and without ``batch=True``.

Every subscription checks its ids (contiguous from 1, ending with the terminal
event): ``verified``. Latency (``p50_us``, ``p99_us``, ``max_us``) is client receipt
minus the ``time.monotonic()`` the flow took just before appending each tick.
``messages_per_delivery`` counts the WebSocket messages the clients received.
``busy`` is each process's CPU time over the measured wall time: a client near
1.0 would be the bottleneck (the subscribers are spread over ``--client-procs``
processes so that none is). The machine's cores are shared: say so with figures.

``--server-code DIR`` runs the server on another copy of the package (e.g. the
merge base, ``git archive 89a3cfc rpcstream | tar -x -C DIR``), the clients staying
on this checkout, for a before/after comparison in the same run; ``--no-batch``
makes clients subscribe without ``batch=True`` (what such a server understands).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import rpcstream

from .peer_measure import proc_cpu_s

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("fanout", "fanout_shared", "runs", "replay")
STORES = ("memory", "sqlite")

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


FULL = Sizes()
QUICK = Sizes(
    seconds=3.0, fanout_connections=200, runs=(100,), rates=(20.0,), replay_events=100_000
)
TINY = Sizes(
    seconds=0.5, fanout_connections=6, runs=(4,), rates=(20.0,), replay_events=2000, client_procs=2
)


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
async def spawn(args: list[str], loop: str, code: Path | None = None) -> AsyncIterator[Child]:
    """Start ``python -m benchmarks.runs_procs ARGS``; close its stdin and wait on the way out."""
    env = dict(os.environ)
    paths = [str(code)] if code is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "benchmarks.runs_procs", *args, "--loop", loop]
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


async def paced(
    server: Child,
    control: rpcstream.RpcPeer,
    head: Figures,
    args: argparse.Namespace,
    runs: int,
    subscriptions: int,
    rate: float,
    per_connection: int = 1,
) -> Figures:
    """``runs`` paced runs at ``rate`` events/s, ``subscriptions`` spread over them."""
    s: Sizes = args.sizes
    await control.call("bench.arm")
    n = max(1, int(rate * s.seconds))
    run_ids = [
        (await control.call("runs.start", "paced", {"n": n, "rate": rate}))["run_id"]
        for _ in range(runs)
    ]
    subs = [run_ids[i % runs] for i in range(subscriptions)]
    # Whole connections to each process, dealt round-robin.
    groups = [subs[i : i + per_connection] for i in range(0, len(subs), per_connection)]
    procs = max(1, min(s.client_procs, len(groups)))
    shares = [[rid for group in groups[p::procs] for rid in group] for p in range(procs)]
    pid = server.process.pid
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for share in shares:
            spec = {"url": head["url"], "runs": share, "batch": args.batch}
            spec["per_connection"] = per_connection
            clients.append(
                await stack.enter_async_context(
                    spawn(["--client", json.dumps(spec)], args.loop, None)
                )
            )
        for client in clients:
            ready = await client.line()
            assert ready.get("ready"), ready
        cpu = proc_cpu_s(pid)
        go = time.monotonic()
        await control.call("bench.go")
        results = [await client.line() for client in clients]
        wall = time.monotonic() - go
        server_cpu = (proc_cpu_s(pid) or 0.0) - (cpu or 0.0)
    record = {
        **{k: v for k, v in head.items() if k != "url"},
        "runs": runs,
        "subscribers": subscriptions,
        "connections": -(-subscriptions // per_connection),
        "rate": rate,
        "events_per_run": n + 2,
        **figures(results, wall, server_cpu),
    }
    emit(record)
    return record


def figures(results: list[Figures], wall: float, server_cpu: float) -> Figures:
    """What the client children measured, summed, with the server's CPU time."""
    latencies = [x for r in results for x in r.pop("latencies_us")]
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
        "busy": {
            "server": round(server_cpu / wall, 2),
            **{f"client{i}": round(r["cpu_s"] / r["wall_s"], 2) for i, r in enumerate(results)},
        },
        "client_procs": len(results),
        "verified": all(r["verified"] for r in results),
        "wrong": [w for r in results for w in r["wrong"]][:3],
    }


async def raw_fanout(raw: Child, raw_url: str, head: Figures, args: argparse.Namespace) -> Figures:
    """The baseline of ``fanout``: raw websockets broadcasting each tick to as many
    connections, at the same pace, the clients spread over as many processes."""
    s: Sizes = args.sizes
    n = max(1, int(s.fanout_rate * s.seconds))
    count = s.fanout_connections
    procs = max(1, min(s.client_procs, count))
    pid = raw.process.pid
    stdin = raw.process.stdin
    assert stdin is not None
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for p in range(procs):
            spec = {"url": raw_url, "connections": len(range(p, count, procs))}
            clients.append(
                await stack.enter_async_context(
                    spawn(["--raw-client", json.dumps(spec)], args.loop, None)
                )
            )
        for client in clients:
            ready = await client.line()
            assert ready.get("ready"), ready
        cpu = proc_cpu_s(pid)
        go = time.monotonic()
        await stdin.send(json.dumps({"n": n, "rate": s.fanout_rate}).encode() + b"\n")
        results = [await client.line() for client in clients]
        wall = time.monotonic() - go
        server_cpu = (proc_cpu_s(pid) or 0.0) - (cpu or 0.0)
    record = {
        **{k: v for k, v in head.items() if k != "url"},
        "code": "raw websockets",
        "runs": 1,
        "subscribers": count,
        "connections": count,
        "rate": s.fanout_rate,
        "events_per_run": n + 2,
        **figures(results, wall, server_cpu),
    }
    emit(record)
    return record


async def fanout_rounds(
    server: Child, control: rpcstream.RpcPeer, head: Figures, args: argparse.Namespace
) -> None:
    """``fanout`` beside its raw-websockets baseline: ``--repeat`` rounds, the two
    alternating which goes first, then one line of medians."""
    s: Sizes = args.sizes
    mine: list[Figures] = []
    base: list[Figures] = []
    async with spawn(["--raw-serve"], args.loop) as raw:
        raw_url = (await raw.line())["url"]
        for r in range(args.repeat):
            for which in ("raw", "this") if r % 2 == 0 else ("this", "raw"):
                if which == "raw":
                    base.append(await raw_fanout(raw, raw_url, {**head, "round": r}, args))
                else:
                    count, rate = s.fanout_connections, s.fanout_rate
                    at = {**head, "round": r}
                    record = await paced(server, control, at, args, 1, count, rate)
                    mine.append(record)
    summary: Figures = {k: v for k, v in head.items() if k != "url"}
    summary["summary"] = f"medians of {args.repeat} rounds"
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
    server: Child, control: rpcstream.RpcPeer, head: Figures, args: argparse.Namespace
) -> None:
    """One client reads a finished run from the start, with and without batches."""
    events = args.sizes.replay_events
    start = time.perf_counter()
    run_id = await control.call("bench.replay_run", events)
    built = time.perf_counter() - start
    pid = server.process.pid
    for batch in (True, False) if args.batch else (False,):
        spec = {"url": head["url"], "runs": [run_id], "batch": batch, "expect": events}
        cpu = proc_cpu_s(pid)
        async with spawn(["--replay", json.dumps(spec)], args.loop) as client:
            result = await client.line()
        server_cpu = (proc_cpu_s(pid) or 0.0) - (cpu or 0.0)
        emit(
            {
                **{k: v for k, v in head.items() if k != "url"},
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


async def run_store(store: str, args: argparse.Namespace, directory: Path) -> None:
    """Every selected workload against one server process on ``store``."""
    spec = "memory" if store == "memory" else f"sqlite:{directory / 'runs.db'}"
    with contextlib.suppress(FileNotFoundError):
        (directory / "runs.db").unlink()
    s: Sizes = args.sizes
    async with spawn(["--serve", spec], args.loop, args.server_code) as server:
        info = await server.line()
        head = {
            "bench": "runs_deployed",
            "loop": args.loop,
            "store": store,
            "code": "server-code" if args.server_code else "this",
            "batch": args.batch,
            "url": info["url"],
        }
        async with rpcstream.connect(info["url"]) as control:
            for workload in args.workloads:
                try:
                    if workload == "fanout":
                        await fanout_rounds(server, control, {**head, "workload": workload}, args)
                    elif workload == "fanout_shared":
                        per = max(1, s.fanout_connections // 10)
                        await paced(server, control, {**head, "workload": workload}, args, 1,
                                    s.fanout_connections, s.fanout_rate, per)  # fmt: skip
                    elif workload == "runs":
                        for runs in s.runs:
                            for rate in s.rates:
                                await paced(server, control, {**head, "workload": workload},
                                            args, runs, runs, rate)  # fmt: skip
                    elif workload == "replay" and store == "memory":
                        await replay(server, control, {**head, "workload": workload}, args)
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
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seconds", type=float, default=None, help="ticking time per run")
    parser.add_argument("--runs", default=None, help="comma-separated run counts")
    parser.add_argument("--rates", default=None, help="comma-separated events/s per run")
    parser.add_argument("--client-procs", type=int, default=None)
    parser.add_argument("--server-code", type=Path, default=None)
    parser.add_argument("--no-batch", dest="batch", action="store_false")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="fanout: rounds, each beside its raw baseline (3; 1 with --quick/--tiny)",
    )
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.repeat is None:
        args.repeat = 1 if args.tiny or args.quick else 3
    changes: Figures = {}
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.runs is not None:
        changes["runs"] = tuple(int(x) for x in args.runs.split(","))
    if args.rates is not None:
        changes["rates"] = tuple(float(x) for x in args.rates.split(","))
    if args.client_procs is not None:
        changes["client_procs"] = args.client_procs
    args.sizes = Sizes(**{**vars(sizes), **changes})
    args.stores = [x for x in args.stores.split(",") if x]
    args.workloads = [x for x in args.workloads.split(",") if x]
    for values, allowed in ((args.stores, STORES), (args.workloads, WORKLOADS)):
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
