"""Event-store throughput: appends, concurrent appends, and replay by one follower.

Prints one JSON line per measurement::

    python benchmarks/bench_store.py                      # the full run (a minute or two)
    python benchmarks/bench_store.py --events 2000 --runs 10 --events-per-run 100 \\
        --replay-events 5000                              # a smoke run, a few seconds

Measurements, for each store and event loop:

* ``append_one_run``: one task appends ``--events`` events to one run, one at a time
  (until all are committed: SQLite's appends are pipelined, and return before it).
* ``append_concurrent_runs``: ``--runs`` tasks each append ``--events-per-run`` events
  to their own run, all at once (the figure is total events per second).
* ``append_paced_runs``: ``--paced-runs`` tasks each append to their own run at
  ``--paced-rate`` events/s for ``--paced-seconds`` (as flows that emit tokens or
  progress do: many runs, a little at a time), starting at random moments of the
  first period. Its figure is the CPU per append, not the rate (fixed by the pace);
  ``--commit-delay`` sets SQLite's (default: the store's own), for an A/B.
* ``build_replay_run``: ``--writers`` tasks append ``--replay-events`` events to ONE run
  concurrently (how the replay run is built; for SQLite it is built once and reused).
* ``replay``: one follower reads the finished ``--replay-events`` run from the start.

The append measurements also give the CPU time per append of the event loop's
thread (``loop_cpu_us``, ``time.thread_time``) and of the whole process
(``cpu_us``: the loop plus SQLite's commit thread): figures that hold on a shared
machine, where the rate does not.

Each event carries the same small JSON payload (about 40 bytes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpcstream.store.base import EventStore
from rpcstream.store.memory import MemoryStore
from rpcstream.store.sqlite import SQLiteStore

PAYLOAD = msgspec.json.encode({"token": "hello", "index": 123456, "p": 0.5})


def emit(bench: str, store: str, backend: str, events: int, seconds: float, **extra: Any) -> None:
    record = {
        "bench": bench,
        "store": store,
        "backend": backend,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds) if seconds else None,
        **extra,
    }
    print(json.dumps(record), flush=True)


def group_stats(store: EventStore, before: tuple[int, int]) -> dict[str, Any]:
    """Average appends per SQLite transaction since ``before`` (empty for other stores)."""
    if not isinstance(store, SQLiteStore):
        return {}
    commits = store._appends.groups - before[0]
    appends = store._appends.requests - before[1]
    return {"commits": commits, "appends_per_commit": round(appends / commits, 1)}


async def settle(store: EventStore) -> None:
    """Wait until every append made so far is committed (SQLite's are pipelined).

    Inside the timing: a pipelined append returns before its commit, and the
    figure must count the time to make them all durable and visible.
    """
    if isinstance(store, SQLiteStore):
        await store._appends.flush()


class CPU:
    """CPU time per event since it was made: the loop's thread, and the process."""

    def __init__(self) -> None:
        self.loop, self.process = time.thread_time(), time.process_time()

    def per(self, events: int) -> dict[str, float]:
        loop, process = time.thread_time() - self.loop, time.process_time() - self.process
        return {
            "loop_cpu_us": round(loop / events * 1e6, 2),
            "cpu_us": round(process / events * 1e6, 2),
        }


def counters(store: EventStore) -> tuple[int, int]:
    if isinstance(store, SQLiteStore):
        return store._appends.groups, store._appends.requests
    return 0, 0


async def append_one_run(store: EventStore, name: str, backend: str, events: int) -> None:
    await store.create_run("one", "bench")
    before = counters(store)
    cpu = CPU()
    start = time.perf_counter()
    for _ in range(events):
        await store.append("one", "token", PAYLOAD)
    await settle(store)
    seconds = time.perf_counter() - start
    emit(
        "append_one_run",
        name,
        backend,
        events,
        seconds,
        **cpu.per(events),
        **group_stats(store, before),
    )


async def append_concurrent_runs(
    store: EventStore, name: str, backend: str, runs: int, each: int
) -> None:
    for index in range(runs):
        await store.create_run(f"concurrent-{index}", "bench")

    async def write(run_id: str) -> None:
        for _ in range(each):
            await store.append(run_id, "token", PAYLOAD)

    before = counters(store)
    cpu = CPU()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(runs):
            tg.start_soon(write, f"concurrent-{index}")
    await settle(store)
    seconds = time.perf_counter() - start
    emit(
        "append_concurrent_runs",
        name,
        backend,
        runs * each,
        seconds,
        runs=runs,
        **cpu.per(runs * each),
        **group_stats(store, before),
    )


async def append_paced_runs(
    store: EventStore, name: str, backend: str, runs: int, rate: float, seconds: float
) -> None:
    ids = [f"paced-{index}" for index in range(runs)]
    for run_id in ids:
        await store.create_run(run_id, "bench")
    each = max(1, round(rate * seconds))
    period = 1 / rate
    rng = random.Random(1)

    async def write(run_id: str, offset: float) -> None:
        due = anyio.current_time() + offset
        for _ in range(each):
            await anyio.sleep(max(0.0, due - anyio.current_time()))
            await store.append(run_id, "token", PAYLOAD)
            due += period

    before = counters(store)
    cpu = CPU()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for run_id in ids:
            tg.start_soon(write, run_id, rng.random() * period)
    await settle(store)
    took = time.perf_counter() - start
    emit(
        "append_paced_runs",
        name,
        backend,
        runs * each,
        took,
        runs=runs,
        rate=rate,
        **cpu.per(runs * each),
        **group_stats(store, before),
    )


async def build_replay_run(
    store: EventStore, name: str, backend: str, events: int, writers: int
) -> None:
    await store.create_run(f"replay-{events}", "bench")
    remaining = events - 1  # the last one is the terminal event

    async def write() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await store.append(f"replay-{events}", "token", PAYLOAD)

    before = counters(store)
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(writers):
            tg.start_soon(write)
    await store.append(f"replay-{events}", "complete", b"null", terminal=True)
    seconds = time.perf_counter() - start
    emit(
        "build_replay_run",
        name,
        backend,
        events,
        seconds,
        writers=writers,
        **group_stats(store, before),
    )


async def replay(store: EventStore, name: str, backend: str, events: int) -> None:
    count = 0
    start = time.perf_counter()
    async with aclosing(store.follow(f"replay-{events}")) as stream:
        async for _ in stream:
            count += 1
    seconds = time.perf_counter() - start
    assert count == events, (count, events)
    emit("replay", name, backend, events, seconds)


async def bench_store(
    name: str, make: Callable[[str], EventStore], backend: str, args: argparse.Namespace
) -> None:
    async with make("append") as store:
        await append_one_run(store, name, backend, args.events)
        await append_concurrent_runs(store, name, backend, args.runs, args.events_per_run)
    if args.paced_runs:
        async with make("paced") as store:
            await append_paced_runs(
                store, name, backend, args.paced_runs, args.paced_rate, args.paced_seconds
            )
    async with make("replay") as store:
        # A SQLite replay run left by an earlier event loop is reused: building it is slow.
        try:
            await store.info(f"replay-{args.replay_events}")
        except LookupError:
            await build_replay_run(store, name, backend, args.replay_events, args.writers)
        await replay(store, name, backend, args.replay_events)


def main(argv: list[str] | None = None) -> int:
    """Run the store benchmarks; ``--quick`` for a smoke run. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--stores", default="memory,sqlite", help="comma-separated")
    parser.add_argument("--backends", default="asyncio,trio", help="comma-separated")
    parser.add_argument("--events", type=int, default=20_000, help="appends to one run")
    parser.add_argument("--runs", type=int, default=100, help="concurrent runs")
    parser.add_argument("--events-per-run", type=int, default=500, help="appends per run")
    parser.add_argument("--replay-events", type=int, default=1_000_000, help="replay run size")
    parser.add_argument("--writers", type=int, default=64, help="tasks building the replay run")
    parser.add_argument("--paced-runs", type=int, default=500, help="paced runs (0: none)")
    parser.add_argument("--paced-rate", type=float, default=20.0, help="events/s per paced run")
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="pacing time")
    parser.add_argument("--commit-delay", type=float, default=None, help="SQLite's, in s")
    parser.add_argument("--dir", type=Path, default=None, help="where SQLite files go")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.runs, args.events_per_run = 2000, 10, 100
        args.replay_events, args.writers = 5000, 8
        args.paced_runs, args.paced_seconds = 20, 0.5

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-store-"))
    directory.mkdir(parents=True, exist_ok=True)
    for backend in args.backends.split(","):
        for name in args.stores.split(","):
            if name == "memory":

                def make(purpose: str) -> EventStore:
                    return MemoryStore()

            elif name == "sqlite":

                def make(purpose: str) -> EventStore:
                    path = directory / f"{purpose}.sqlite"
                    if purpose != "replay":
                        for suffix in ("", "-wal", "-shm"):
                            Path(f"{path}{suffix}").unlink(missing_ok=True)
                    if args.commit_delay is None:
                        return SQLiteStore(path)
                    return SQLiteStore(path, commit_delay=args.commit_delay)

            else:
                parser.error(f"unknown store {name!r}")
            anyio.run(bench_store, name, make, backend, args, backend=backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
