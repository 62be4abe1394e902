"""rpcstream against raw websockets: the same work, in the same run, as it is deployed.

Prints one JSON line per (workload, loop, link, implementation)::

    python -m benchmarks.bench_peer                          # asyncio, full sizes, loopback
    python -m benchmarks.bench_peer --rtt-ms 0,20,100 --workloads W1,W2,W3
    python -m benchmarks.bench_peer --loop all               # asyncio, uvloop and trio
    python -m benchmarks.bench_peer --quick                  # a smoke run
    python -m benchmarks.bench_peer --in-process --profile --workloads W2,W3

By default the rpcstream server, the raw websockets server and the client each run in
a process of their own (:mod:`benchmarks.peer_procs`), every rpcstream setting at its
default. ``--rtt-ms`` lists round-trip times: for each one above 0 the client reaches
both servers through an emulated link (:mod:`benchmarks.link`) of that round trip,
``--mbit`` of bandwidth and a queue of two bandwidth-delay products; 0 is plain
loopback. ``--in-process`` runs server and client in one process on one event loop,
as the first sessions did (every figure then counts the work of both sides).

Workloads (full sizes; ``--quick`` scales them down; :mod:`benchmarks.peer_workloads`):

* ``W1``: one stream of 200,000 items ``{"i": n, "tok": "hello world"}``, server to
  client: ``items_per_s``.
* ``W2``: 256 MiB in 64 KiB ``bytes`` chunks, server to client: ``mb_per_s`` (10^6 B/s).
* ``W3``: 20,000 sequential echo calls: ``p50_us``, ``p99_us``, ``calls_per_s``; on a
  link, only as many as take about 10 s (``Sizes.on_link``).
* ``W3f``: the same calls to an echo that is a plain function (it runs where the
  call arrives, with no task): what the cheapest call costs.
* ``W4``: 50,000 echo calls, 100 in flight (100 worker tasks): ``calls_per_s``.
* ``W5``: 1,000 concurrent streams of 200 W1 items on one connection: ``items_per_s``.
  At the defaults the server runs at most 256 handlers at once, so rpcstream's W5
  line may report the streams refused (``failed_streams``) instead of a figure.
* ``slow``: a consumer reading 10 MB/s (it sleeps after each chunk to keep to the
  rate) from a sender that has 1 GiB to send, stopped after 20 s; each side in a fresh
  process, so each side's peak RSS (``VmHWM``, MiB) is its own.

Each workload runs ``--repeat`` rounds (default 3) after a warm-up; a round runs raw
and rpcstream one after the other, each first in turn. A line reports the run with the
median figure, ``runs`` lists them all, ``verified`` says the answers were checked,
``cpu_s`` is the client's CPU time, ``server_cpu_s`` and ``link_cpu_s`` those of the
server and the link processes, and ``busy`` each one's CPU time over the wall time (a
side near 1.0 was the bottleneck). A run that fails gives a line with ``error``.
``ratio_to_raw`` (on ``rpcstream`` lines) is the rpcstream figure divided by the raw
one for the figure named by ``metric``: above 1 is better for throughputs, below 1 for
``p50_us`` and memory.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pstats
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import rpcstream

from .peer_measure import TARGETS, measure, summarise
from .peer_procs import ROOT, client_child, run_deployed, run_slow_pair, serve_child, slow_client
from .peer_workloads import (
    LOOPS,
    RAW_WORKLOADS,
    RPC_WORKLOADS,
    SIZES,
    WORKLOAD_NAMES,
    Figures,
    Sizes,
    emit,
    make_router,
    raw_connect,
    raw_server,
)

__all__ = ["main"]


# -- in one process ----------------------------------------------------------------------


class _Profiler:
    """cProfile the rpcstream measurements of one workload, when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.prof = cProfile.Profile() if enabled else None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.prof is None:
            yield
            return
        self.prof.enable()
        try:
            yield
        finally:
            self.prof.disable()

    def report(self, title: str, top: int = 30) -> None:
        """Print the top functions by own time to stderr."""
        if self.prof is None:
            return
        out = io.StringIO()
        stats = pstats.Stats(self.prof, stream=out).strip_dirs().sort_stats("tottime")
        stats.print_stats(top)
        if os.environ.get("BENCH_CALLERS"):  # who calls these (a regex), when asked
            stats.print_callers(os.environ["BENCH_CALLERS"])
        print(f"== profile: {title} (sorted by tottime)\n{out.getvalue()}", file=sys.stderr)


async def run_in_process(
    loop: str, workloads: list[str], sizes: Sizes, repeat: int, profile: bool
) -> None:
    """Run ``workloads`` (not ``slow``) with both implementations on the running loop."""
    warm = sizes.warmup()
    base = {"loop": loop, "mode": "in-process", "rtt_ms": 0, "mbit": None}
    async with rpcstream.serve(make_router(), "127.0.0.1", 0) as server, raw_server() as raw_url:
        for name in workloads:
            profiler = _Profiler(profile)
            runs: dict[str, list[Figures]] = {"raw": [], "rpcstream": []}
            async with raw_connect(raw_url) as ws, rpcstream.connect(server.url) as peer:
                work: dict[str, Callable[[Sizes], Awaitable[Figures]]] = {
                    "raw": functools.partial(RAW_WORKLOADS[name], ws),
                    "rpcstream": functools.partial(RPC_WORKLOADS[name], peer),
                }
                for impl in runs:
                    await measure(work[impl](warm))
                for r in range(repeat):
                    for impl in ("raw", "rpcstream") if r % 2 == 0 else ("rpcstream", "raw"):
                        profiled = profiler.measure() if impl == "rpcstream" else None
                        with profiled or contextlib.nullcontext():
                            runs[impl].append(await measure(work[impl](sizes)))
            profiler.report(f"{name} rpcstream on {loop}, {repeat} run(s)")
            for line in summarise(name, base, runs["raw"], runs["rpcstream"]):
                emit(line)


# -- Markdown tables from the JSON lines ------------------------------------------------

_ROWS = [  # workload, figure, unit shown
    ("W1", "items_per_s", "items/s"),
    ("W2", "mb_per_s", "MB/s"),
    ("W3", "p50_us", "p50 µs"),
    ("W3", "p99_us", "p99 µs"),
    ("W3", "calls_per_s", "calls/s"),
    ("W3f", "p50_us", "p50 µs"),
    ("W4", "calls_per_s", "calls/s"),
    ("W5", "items_per_s", "items/s"),
]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cell(record: Figures, figure: str) -> str:
    return f"failed: {record['error']}" if "error" in record else _fmt(record[figure])


def _busy(record: Figures) -> str:
    busy = record.get("busy", {})
    return " / ".join(f"{busy[k]:.2f}" for k in ("client", "server", "link") if k in busy)


def _title(loop: str, mode: str, rtt_ms: float, mbit: float | None) -> str:
    if mode == "in-process":
        return f"**{loop}, server and client in one process**"
    where = "loopback" if not rtt_ms else f"a {rtt_ms:g} ms, {mbit:g} Mbit/s link"
    return f"**{loop}, separate processes, {where}**"


def markdown_tables(records: list[Figures]) -> str:
    """A table per loop and link (rpcstream beside raw), then the slow-consumer table."""
    groups: dict[tuple[str, str, float, float | None], dict[tuple[str, str], Figures]] = {}
    for r in records:
        if r.get("workload", "slow") != "slow":
            key = (r["loop"], r.get("mode", "in-process"), r.get("rtt_ms", 0), r.get("mbit"))
            groups.setdefault(key, {})[r["workload"], r["impl"]] = r
    out: list[str] = []
    for key, by_key in groups.items():
        rows = []
        for workload, figure, unit in _ROWS:
            raw = by_key.get((workload, "raw"))
            rpc = by_key.get((workload, "rpcstream"))
            if raw is None or rpc is None:
                continue
            target = TARGETS[workload]
            ratio, met, busy = "", "", ""
            if "error" not in raw and "error" not in rpc:
                value = rpc[figure] / raw[figure]
                ratio = f"{value:.2f}"
                if figure == target.metric:
                    met = f"{target.ratio}x: {'met' if target.met(value) else '**missed**'}"
            if figure == target.metric:
                busy = _busy(rpc)
            rows.append(
                f"| {workload} | {unit} | {_cell(raw, figure)} | {_cell(rpc, figure)} "
                f"| {ratio} | {met} | {busy} |"
            )
        if rows:
            out += [
                _title(*key),
                "",
                "| workload | figure | raw | rpcstream | ratio | target "
                "| rpcstream CPU busy: client / server / link |",
                "|---|---|--:|--:|--:|---|---|",
                *rows,
                "",
            ]
    slow = [r for r in records if r.get("workload") == "slow"]
    if slow:
        out += [
            "| loop | impl | consumed MiB | sender ahead MiB | sender RSS MiB (start → peak) "
            "| consumer RSS MiB (start → peak) | consumer close s |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in slow:
            out.append(
                f"| {r['loop']} | {r['impl']} | {r['consumed_mib']} | {r['sender_ahead_mib']} "
                f"| {r['server_rss_start_mib']} → {r['server_peak_rss_mib']} "
                f"| {r['client_rss_start_mib']} → {r['client_peak_rss_mib']} "
                f"| {r['client_close_s']} |"
            )
        out.append("")
    return "\n".join(out)


# -- entry point -------------------------------------------------------------------------


def loop_available(loop: str) -> bool:
    """Whether ``loop``'s event loop package is importable."""
    return loop == "asyncio" or importlib.util.find_spec(loop) is not None


def run_on(loop: str, func: Callable[[], Awaitable[None]]) -> None:
    """Run ``func`` on the named event loop."""
    import anyio

    if loop == "trio":
        anyio.run(func, backend="trio")
    else:
        anyio.run(func, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


def meta() -> Figures:
    """What a result depends on: the commit, Python and the libraries' versions."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True, text=True, cwd=ROOT, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for package in ("websockets", "msgspec", "anyio", "trio", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "meta": {
            "commit": commit,
            "python": sys.version.split()[0],
            "versions": versions,
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "argv": sys.argv[1:],
        }
    }


def _rtts(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ms like 0,20,100, not {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"round-trip times must be >= 0 ms, not {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_peer",
        description="Benchmark rpcstream against raw websockets (one JSON line per result).",
    )
    parser.add_argument("--loop", choices=[*LOOPS, "all"], default="asyncio")
    parser.add_argument("--size", choices=list(SIZES), default="full", help="how much work")
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds per workload, the median reported (default: 3, 1 with --quick)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=_rtts,
        default=[0.0],
        help="round-trip times of the emulated link, comma-separated; 0 is loopback (default)",
    )
    parser.add_argument(
        "--mbit", type=float, default=1000.0, help="the emulated link's bandwidth (default 1000)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="server and client in this process, on one event loop (no link)",
    )
    parser.add_argument(
        "--table",
        metavar="JSONL",
        help="print Markdown tables from a file of this script's output, and run nothing",
    )
    parser.add_argument(
        "--profile", action="store_true", help="with --in-process: cProfile rpcstream (stderr)"
    )
    # Internal: the children this script starts.
    parser.add_argument("--serve", choices=["rpcstream", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--slow-client", choices=["rpcstream", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "quick"
    by_key = {w.lower(): w for w in WORKLOAD_NAMES}
    try:
        args.workloads = [by_key[w.strip().lower()] for w in args.workloads.split(",") if w]
    except KeyError as exc:
        parser.error(f"unknown workload {exc.args[0]!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    if args.repeat is None:
        args.repeat = 1 if args.size != "full" else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not (math.isfinite(args.mbit) and args.mbit > 0):
        parser.error("--mbit must be above 0")
    if args.in_process and args.rtt_ms != [0.0]:
        parser.error("--in-process runs over loopback only: no --rtt-ms")
    if args.profile and not args.in_process:
        parser.error("--profile needs --in-process (it profiles this process)")
    if args.loop == "all" and (args.serve or args.client or args.slow_client):
        parser.error("a child runs on one --loop")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks that ``argv`` selects; print one JSON line per result."""
    args = parse_args(argv)
    sizes = SIZES[args.size]
    if args.table:
        lines = Path(args.table).read_text().splitlines()
        print(markdown_tables([json.loads(line) for line in lines if line.startswith("{")]))
        return 0
    measured = [w for w in args.workloads if w != "slow"]
    if args.serve:
        run_on(args.loop, functools.partial(serve_child, args.serve))
        return 0
    if args.client:
        spec = json.loads(args.client)
        run_on(args.loop, functools.partial(client_child, spec, measured, sizes, args.repeat))
        return 0
    if args.slow_client:
        run_on(args.loop, functools.partial(slow_client, args.slow_client, args.url, sizes))
        return 0
    emit(meta())
    for loop in list(LOOPS) if args.loop == "all" else [args.loop]:
        if not loop_available(loop):
            emit({"loop": loop, "skipped": f"{loop} is not importable"})
            continue
        if measured and args.in_process:
            work = functools.partial(
                run_in_process, loop, measured, sizes, args.repeat, args.profile
            )
            run_on(loop, work)
        elif measured:
            run_deployed(loop, measured, args.size, args.repeat, args.rtt_ms, args.mbit)
        if "slow" in args.workloads:
            run_slow_pair(loop, args.size, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
