"""CPU instructions per call, counted by valgrind: figures that do not drift with the machine.

Wall-clock latency on a shared virtual machine is bimodal (the same raw W3 run
reads 50 µs or 80 µs from one minute to the next), so a ratio of two p50s can
move by half. Callgrind counts the instructions the process executes, which
repeat to within a fraction of a percent for the same code and inputs. Each
figure is a difference of two runs that do the same start-up and warm-up, one
with ``--calls`` more measured operations, divided by ``--calls``::

    python -m benchmarks.bench_instructions                   # asyncio and trio
    python -m benchmarks.bench_instructions --loop asyncio --calls 500

Workloads (one JSON line per implementation; ``ratio_to_baseline`` on all but the
first of each workload):

* ``W3``: a sequential echo call over loopback, client and server in one process
  (as in ``bench_peer``): ``raw`` websockets answering inline, rpcstream with an
  ``async def`` echo (a handler task per call) and ``W3f``, a plain ``def`` echo
  (it runs where the call arrives).
* ``spawn``: starting one task that does nothing and running it to its end:
  ``native`` (``loop.create_task`` on asyncio, a trio nursery on trio) beside
  ``anyio`` (``TaskGroup.start_soon``), which rpcstream uses for handlers.
  This is the price of one handler task, which the W3 target's budget must hold.

Needs ``valgrind`` on the PATH (Debian's package); it runs each child about
fifty times slower than usual. ``--workloads W3,W3f`` runs only those.

``--steps`` counts, instead of instructions and without valgrind, how many times
the event loop ran something per operation: task steps on trio (a trio
instrument), callbacks on asyncio (``Handle._run``: task steps and protocol
callbacks alike). Each is a trip through the scheduler; the difference between
two implementations' counts is the task switches one of them adds::

    python -m benchmarks.bench_instructions --steps --workloads W3,W3f
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import sniffio

import rpcstream

from .peer_workloads import DEC, ENC, OP_ECHO, make_router, raw_connect, raw_server

__all__ = ["main"]

LOOPS = ("asyncio", "trio")
WARMUP = 200  # operations before counting starts, in both runs of a pair
CASES = (  # (workload, implementation): the first of each workload is the baseline
    ("W3", "raw"),
    ("W3", "rpcstream"),
    ("W3f", "rpcstream"),
    ("spawn", "native"),
    ("spawn", "anyio"),
)
PAYLOAD = {"i": 0, "tok": "hello world"}

_ROOT = str(Path(__file__).resolve().parent.parent)  # the repository


# -- the children: each does WARMUP + n operations ----------------------------------------


async def w3_raw(n: int) -> None:
    async with raw_server() as url, raw_connect(url) as ws:
        for cid in range(WARMUP + n):
            await ws.send(ENC.encode((OP_ECHO, cid, PAYLOAD)))
            if DEC.decode(await ws.recv(decode=False)) != [cid, PAYLOAD]:
                raise RuntimeError("raw echo: wrong answer")


async def w3_rpcstream(n: int, method: str = "echo") -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        for _ in range(WARMUP + n):
            if await peer.call(method, PAYLOAD) != PAYLOAD:
                raise RuntimeError(f"{method}: wrong answer")


async def w3f_rpcstream(n: int) -> None:
    await w3_rpcstream(n, "echo_plain")


async def _nothing() -> None:
    pass


async def spawn_anyio(n: int) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(WARMUP + n):
            tg.start_soon(_nothing)
            await anyio.lowlevel.checkpoint()  # let it run and end, one at a time


async def spawn_native(n: int) -> None:
    if sniffio.current_async_library() == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            for _ in range(WARMUP + n):
                nursery.start_soon(_nothing)
                await trio.lowlevel.checkpoint()
    else:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()  # hold a reference until each ends
        for _ in range(WARMUP + n):
            task = loop.create_task(_nothing())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)


CHILDREN: dict[tuple[str, str], Callable[[int], Awaitable[None]]] = {
    ("W3", "raw"): w3_raw,
    ("W3", "rpcstream"): w3_rpcstream,
    ("W3f", "rpcstream"): w3f_rpcstream,
    ("spawn", "native"): spawn_native,
    ("spawn", "anyio"): spawn_anyio,
}


# -- the parent: two counted runs per case ------------------------------------------------

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count(workload: str, impl: str, loop: str, n: int) -> int:
    """Instructions of one child run under callgrind, ``n`` operations after the warm-up."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-P",  # PYTHONPATH, not the working directory, says which rpcstream/ runs
        "-m",
        "benchmarks.bench_instructions",
        "--child",
        f"{workload}:{impl}:{loop}:{n}",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # same dict layouts in both runs
    # benchmarks/ after whatever PYTHONPATH names first (-P: not found by the cwd)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _ROOT]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{workload} {impl} on {loop} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def steps(workload: str, impl: str, loop: str, n: int) -> int:
    """Event-loop steps (see the module docstring) of one in-process run of a case."""
    counted = 0
    if loop == "trio":
        import trio

        class Steps(trio.abc.Instrument):
            def before_task_step(self, task: Any) -> None:
                nonlocal counted
                counted += 1

        anyio.run(
            CHILDREN[workload, impl], n, backend=loop, backend_options={"instruments": [Steps()]}
        )
        return counted
    run = asyncio.events.Handle._run

    def counting(handle: asyncio.Handle) -> None:
        nonlocal counted
        counted += 1
        run(handle)

    asyncio.events.Handle._run = counting  # type: ignore[method-assign]
    try:
        anyio.run(CHILDREN[workload, impl], n, backend=loop)
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
    return counted


def measure(
    loop: str,
    calls: int,
    workloads: list[str] | None = None,
    counter: Callable[[str, str, str, int], int] | None = None,
) -> list[dict[str, Any]]:
    """Per-operation instructions (or, with ``counter=steps``, event-loop steps)
    of every case on ``loop`` (of ``workloads``: all by default), with ratios to
    the baseline."""
    counter = counter or count
    metric = "steps_per_op" if counter is steps else "instructions_per_op"
    records: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    for workload, impl in CASES:
        group = "W3" if workload == "W3f" else workload
        if workloads is not None and workload not in workloads and group not in workloads:
            continue
        per_op = (counter(workload, impl, loop, calls) - counter(workload, impl, loop, 0)) / calls
        record: dict[str, Any] = {
            "workload": workload,
            "loop": loop,
            "metric": metric,
            "impl": impl,
            "ops": calls,
            metric: round(per_op, 2) if counter is steps else round(per_op),
        }
        if group not in baseline:
            baseline[group] = per_op
        else:
            record["ratio_to_baseline"] = round(per_op / baseline[group], 2)
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_instructions",
        description="Instructions per call under valgrind (one JSON line per case).",
    )
    parser.add_argument("--loop", choices=[*LOOPS, "all"], default="all")
    parser.add_argument("--calls", type=int, default=1000, help="counted operations per case")
    parser.add_argument("--workloads", help="comma-separated (W3 brings its raw baseline)")
    parser.add_argument("--steps", action="store_true", help="event-loop steps, no valgrind")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Count instructions per operation for each case; print one JSON line each."""
    args = parse_args(argv)
    if args.child:
        workload, impl, loop, n = args.child.split(":")
        anyio.run(CHILDREN[workload, impl], int(n), backend=loop)
        return 0
    if not args.steps and shutil.which("valgrind") is None:
        print("bench_instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    workloads = args.workloads.split(",") if args.workloads else None
    for loop in LOOPS if args.loop == "all" else [args.loop]:
        measure(loop, args.calls, workloads, steps if args.steps else count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
