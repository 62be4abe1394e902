"""What an idle connection costs the server, beside raw websockets: memory per connection.

The server runs in its own process (``bench_peer --serve``, every setting at its
default); client processes open the connections, make one call each (so each
connection is fully set up: a peer, its task group, the settings exchanged) and
hold them open. The figure is the growth of the server's resident memory divided
by the number of connections::

    python -m benchmarks.bench_idle                 # 1,000 connections, rpcstream and raw
    python -m benchmarks.bench_idle --connections 200 --loop trio

One JSON line per implementation, the first (raw websockets) the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio

import rpcstream

from .peer_procs import child_argv, spawn, wait_for_stdin_eof
from .peer_workloads import ENC, OP_ECHO

__all__ = ["main"]

CLIENT_PROCESSES = 2  # the client side must not be what limits how fast connections open


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid`` now, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def hold(impl: str, url: str, count: int) -> None:
    """Client child: open ``count`` connections, answer once each, hold them until
    stdin closes. Prints ``{"opened": n}`` once they are all open."""
    import websockets.asyncio.client as ws_asyncio

    async with anyio.create_task_group() as tg:
        opened = 0
        all_open = anyio.Event()
        done = anyio.Event()

        async def one() -> None:
            nonlocal opened
            if impl == "rpcstream":
                async with rpcstream.connect(url) as peer:
                    assert await peer.call("rpcstream.ping") is None
                    opened += 1
                    if opened == count:
                        all_open.set()
                    await done.wait()
            else:
                async with ws_asyncio.connect(url, compression=None) as ws:
                    await ws.send(ENC.encode((OP_ECHO, 1, None)))  # the raw server's echo
                    await ws.recv()
                    opened += 1
                    if opened == count:
                        all_open.set()
                    await done.wait()

        for _ in range(count):
            tg.start_soon(one)
        await all_open.wait()
        print(json.dumps({"url": url, "opened": opened}), flush=True)
        await wait_for_stdin_eof()
        done.set()


def measure(impl: str, loop: str, connections: int) -> dict[str, Any]:
    """Serve ``impl`` in a child, hold ``connections`` from client children."""
    with spawn(child_argv(["--serve", impl, "--loop", loop])) as server:
        pid, url = int(server.info["pid"]), str(server.info["url"])
        before = rss_kib(pid)
        per_child = [connections // CLIENT_PROCESSES] * CLIENT_PROCESSES
        per_child[0] += connections - sum(per_child)
        with ExitStack() as stack:
            for n in per_child:
                argv = child_argv(["--hold", impl, url, str(n)], "benchmarks.bench_idle")
                stack.enter_context(spawn(argv))
            after = rss_kib(pid)  # every child printed its line: all connections are open
    return {
        "workload": "idle",
        "loop": loop,
        "impl": impl,
        "connections": connections,
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "kib_per_connection": round((after - before) / connections, 1),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--loop", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--hold", nargs=3, metavar=("IMPL", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:
        impl, url, n = args.hold
        anyio.run(hold, impl, url, int(n))
        return 0
    if args.connections < CLIENT_PROCESSES:
        parser.error(f"--connections must be at least {CLIENT_PROCESSES}")
    baseline = None
    for impl in ("raw", "rpcstream"):
        line = measure(impl, args.loop, args.connections)
        if baseline is None:
            baseline = line["kib_per_connection"]
        elif baseline:
            line["ratio_to_baseline"] = round(line["kib_per_connection"] / baseline, 2)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
