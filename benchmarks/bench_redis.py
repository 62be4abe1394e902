"""RedisStore: append throughput, and cross-node append-to-subscriber latency.

Prints one JSON line per measurement::

    python benchmarks/bench_redis.py                   # starts a private redis-server
    python benchmarks/bench_redis.py --url redis://127.0.0.1:7000/0   # or use yours
    python benchmarks/bench_redis.py --events 2000 --events-per-run 20 --samples 200  # smoke

It never uses the Redis on port 6379 unless given ``--url``: without one it
starts ``redis-server`` on a free loopback port (no persistence) and stops it.
Every measurement uses a fresh key prefix. Measurements (asyncio; Redis needs it):

* ``append_one_run``: one task appends ``--events`` events to one run, one at a time.
* ``append_concurrent_runs``: ``--runs`` tasks each append ``--events-per-run`` events
  to their own run, all at once (events per second in total), with the CPU time per
  append of this process (``client_cpu_us``) and of the redis-server it started
  (``redis_cpu_us``, from ``/proc``; ``null`` with ``--url``): figures that hold on a
  shared machine, where the rate does not.
* ``append_one_run_nodes``: ``--nodes`` RedisStore objects ("nodes"), ``--writers`` tasks
  each, append to ONE run at once (ids stay contiguous; the figure is the total).
* ``cross_node_latency``: node A appends one event at a time; ``--followers`` followers on
  node B follow the run; the time from calling ``append`` on A to the event reaching the
  last of B's followers, over ``--samples`` events: p50, p99, max in milliseconds.

Each event carries the same small JSON payload (about 40 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack, aclosing
from pathlib import Path
from typing import Any

import anyio
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import RedisServer  # noqa: E402

from rpcstream.store.base import StoredEvent  # noqa: E402
from rpcstream.store.redis import RedisStore  # noqa: E402

PAYLOAD = msgspec.json.encode({"token": "hello", "index": 123456, "p": 0.5})


def emit(bench: str, **fields: Any) -> None:
    print(
        json.dumps({"bench": bench, "store": "redis", "backend": "asyncio", **fields}), flush=True
    )


def throughput(events: int, seconds: float) -> dict[str, Any]:
    return {
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds) if seconds else None,
    }


def cpu_seconds(pid: int | None) -> float | None:
    """The user + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store(url: str, prefix: str, args: argparse.Namespace) -> RedisStore:
    return RedisStore(url, prefix=prefix, max_connections=args.max_connections)


def new_prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}:"


async def append_one_run(url: str, args: argparse.Namespace) -> None:
    async with store(url, new_prefix(), args) as node:
        await node.create_run("one", "bench")
        start = time.perf_counter()
        for _ in range(args.events):
            await node.append("one", "token", PAYLOAD)
        emit("append_one_run", **throughput(args.events, time.perf_counter() - start))


async def append_concurrent_runs(url: str, args: argparse.Namespace) -> None:
    async with store(url, new_prefix(), args) as node:
        for index in range(args.runs):
            await node.create_run(f"run-{index}", "bench")

        async def write(run_id: str) -> None:
            for _ in range(args.events_per_run):
                await node.append(run_id, "token", PAYLOAD)

        events = args.runs * args.events_per_run
        redis_pid = getattr(args, "redis_pid", None)  # runs_deployed passes its own args
        redis_before, client_before = cpu_seconds(redis_pid), time.process_time()
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for index in range(args.runs):
                tg.start_soon(write, f"run-{index}")
        seconds = time.perf_counter() - start
        client = time.process_time() - client_before
        redis_after = cpu_seconds(redis_pid)
        redis = None if redis_before is None or redis_after is None else redis_after - redis_before
        emit(
            "append_concurrent_runs",
            runs=args.runs,
            max_connections=args.max_connections,
            calls=node._appends.groups,
            client_cpu_us=round(client / events * 1e6, 2),
            redis_cpu_us=None if redis is None else round(redis / events * 1e6, 2),
            **throughput(events, seconds),
        )


async def append_one_run_nodes(url: str, args: argparse.Namespace) -> None:
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(store(url, prefix, args)) for _ in range(args.nodes)
        ]
        await nodes[0].create_run("shared", "bench")
        remaining = args.events

        async def write(node: RedisStore) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await node.append("shared", "token", PAYLOAD)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for node in nodes:
                for _ in range(args.writers):
                    tg.start_soon(write, node)
        seconds = time.perf_counter() - start
        events = await nodes[-1].read("shared", 0, limit=args.events + 1)
        assert [e.id for e in events] == list(range(1, args.events + 1)), "ids not contiguous"
        emit(
            "append_one_run_nodes",
            nodes=args.nodes,
            writers_per_node=args.writers,
            **throughput(args.events, seconds),
        )


async def cross_node_latency(url: str, args: argparse.Namespace, followers: int) -> None:
    prefix = new_prefix()
    async with store(url, prefix, args) as a, store(url, prefix, args) as b:
        await a.create_run("live", "bench")
        samples = args.samples
        arrived = [0] * (samples + 3)  # how many of B's followers have event i (+ the end)
        done = [anyio.Event() for _ in range(samples + 3)]
        ready = anyio.Event()
        started = 0

        async def follow() -> None:
            nonlocal started
            async with aclosing(b.follow("live")) as events:
                first = True
                async for event in events:
                    if first:
                        first = False
                        started += 1
                        if started == followers:
                            ready.set()
                    arrived[event.id] += 1
                    if arrived[event.id] == followers:
                        done[event.id].set()

        latencies: list[float] = []
        async with anyio.create_task_group() as tg:
            for _ in range(followers):
                tg.start_soon(follow)
            await a.append("live", "token", PAYLOAD)  # id 1: every follower is live
            await ready.wait()
            await done[1].wait()
            for event_id in range(2, samples + 2):
                start = time.perf_counter()
                event: StoredEvent = await a.append("live", "token", PAYLOAD)
                assert event.id == event_id
                await done[event_id].wait()
                latencies.append(time.perf_counter() - start)
            await a.append("live", "complete", b"null", terminal=True)
        latencies.sort()

        def ms(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

        emit(
            "cross_node_latency",
            followers=followers,
            samples=samples,
            p50_ms=ms(0.50),
            p99_ms=ms(0.99),
            max_ms=round(latencies[-1] * 1000, 3),
        )


async def run_all(url: str, args: argparse.Namespace) -> None:
    await append_one_run(url, args)
    await append_concurrent_runs(url, args)
    await append_one_run_nodes(url, args)
    for followers in (int(n) for n in args.followers.split(",")):
        await cross_node_latency(url, args, followers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a Redis to use (default: start one)")
    parser.add_argument("--events", type=int, default=20_000, help="appends to one run")
    parser.add_argument("--runs", type=int, default=100, help="concurrent runs")
    parser.add_argument("--events-per-run", type=int, default=200, help="appends per run")
    parser.add_argument("--nodes", type=int, default=4, help="stores appending to one run")
    parser.add_argument("--writers", type=int, default=8, help="tasks per node, one run")
    parser.add_argument("--samples", type=int, default=2000, help="latency samples")
    parser.add_argument("--followers", default="1,100", help="followers on node B, per run")
    parser.add_argument("--max-connections", type=int, default=16, help="pool size per node")
    args = parser.parse_args()
    args.redis_pid = None
    if args.url is not None:
        anyio.run(run_all, args.url, args, backend="asyncio")
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-redis-") as directory,
        RedisServer(directory) as server,
    ):
        assert server.process is not None
        args.redis_pid = server.process.pid
        anyio.run(run_all, server.url, args, backend="asyncio")


if __name__ == "__main__":
    main()
