"""``bench_peer`` as deployed: every side in its own process, optionally across a link.

The process that runs ``python -m benchmarks.bench_peer`` only starts and stops others:

* two servers, ``--serve rpcstream`` and ``--serve raw``: each prints ``{"url", "pid"}``
  and serves until its stdin closes (so they also stop if their parent dies);
* for each round-trip time above 0, one link process (:mod:`benchmarks.link`, with one
  port per server: raw and rpcstream cross the same kind of link);
* a client, ``--client SPEC``, which runs the workloads against both servers in
  interleaved rounds and prints the JSON lines itself.

Every child is stopped when the run ends, normally or not (:func:`spawn`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import rpcstream

from .peer_measure import measure, peak_rss_mib, rss_mib, summarise
from .peer_workloads import (
    DEC,
    ENC,
    OP_CHUNKS,
    RAW_WORKLOADS,
    RPC_WORKLOADS,
    Figures,
    MiB,
    Sizes,
    emit,
    make_router,
    produced,
    raw_connect,
    raw_server,
)

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("raw", "rpcstream")
CLOSE_BUDGET = 2.0  # seconds the slow consumer's client may spend closing
STOP_TIMEOUT = 10.0  # seconds a child gets to exit once its stdin is closed


class ChildFailed(RuntimeError):
    """A child process exited or misbehaved before it was ready."""


# -- children -----------------------------------------------------------------------------


def child_argv(args: list[str], module: str = "benchmarks.bench_peer") -> list[str]:
    """The command line of a child running ``module`` with ``args``."""
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Child:
    """A running child and the JSON object it printed first (its address)."""

    proc: subprocess.Popen[str]
    info: Figures

    def finish(self) -> Figures | None:
        """Close its stdin (it stops) and return the JSON object it prints last, if any."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        last = None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                last = json.loads(line)
        return last


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def spawn(argv: list[str]) -> Iterator[Child]:
    """Start ``argv``, wait for its first line (a JSON object); stop it on the way out.

    Stopping closes its stdin, which every child here takes as the signal to exit,
    then kills it if it has not exited within :data:`STOP_TIMEOUT`.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise ChildFailed(f"{' '.join(argv[1:])} printed {line!r}, not its address")
        yield Child(proc, info)
    finally:
        _stop(proc)


async def wait_for_stdin_eof() -> None:
    """Return when stdin closes: the parent is done with this process (or gone)."""
    await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


# -- the server and client children --------------------------------------------------------


async def serve_child(impl: str) -> None:
    """Child: serve ``impl`` with every setting at its default until stdin closes.

    Prints ``{"url", "pid"}`` first, and on the way out this process's memory figures
    and the bytes its chunk senders produced.
    """
    start_rss = rss_mib()
    async with contextlib.AsyncExitStack() as stack:
        if impl == "rpcstream":
            server = await stack.enter_async_context(rpcstream.serve(make_router(), "127.0.0.1", 0))
            url = server.url
        else:
            url = await stack.enter_async_context(raw_server())
        emit({"url": url, "pid": os.getpid()})
        await wait_for_stdin_eof()
    emit(
        {
            "rss_start_mib": start_rss,
            "peak_rss_mib": peak_rss_mib(),
            "produced_mib": round(produced.bytes / MiB, 1),
        }
    )


async def client_child(spec: Figures, workloads: list[str], sizes: Sizes, repeat: int) -> None:
    """Child: run ``workloads`` against both servers of ``spec``; print the lines.

    Each workload gets a fresh connection to each server, a warm-up on it, then
    ``repeat`` rounds; a round runs raw and rpcstream one after the other, in turn
    first, so both see the same machine.
    """
    sizes = sizes.on_link(spec["rtt_ms"] / 1000)
    warm = sizes.warmup()
    base = {
        "loop": spec["loop"],
        "mode": "processes",
        "rtt_ms": spec["rtt_ms"],
        "mbit": spec["mbit"],
    }
    link = {"link": spec["pids"]["link"]} if "link" in spec["pids"] else {}
    watch = {impl: {"server": spec["pids"][impl], **link} for impl in IMPLS}
    for name in workloads:
        runs: dict[str, list[Figures]] = {impl: [] for impl in IMPLS}
        async with (
            raw_connect(spec["urls"]["raw"]) as ws,
            rpcstream.connect(spec["urls"]["rpcstream"]) as peer,
        ):
            raw_work, rpc_work = RAW_WORKLOADS[name], RPC_WORKLOADS[name]
            work: dict[str, Callable[[Sizes], Awaitable[Figures]]] = {
                "raw": functools.partial(raw_work, ws),
                "rpcstream": functools.partial(rpc_work, peer),
            }
            for impl in IMPLS:
                await measure(work[impl](warm))
            for r in range(repeat):
                for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                    runs[impl].append(await measure(work[impl](sizes), watch[impl]))
        for line in summarise(name, base, runs["raw"], runs["rpcstream"]):
            emit(line)


def _via(url: str, port: int) -> str:
    """``url`` with its port replaced: the same server, through the link."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=f"127.0.0.1:{port}").geturl()


def run_deployed(
    loop: str, workloads: list[str], size: str, repeat: int, rtts_ms: list[float], mbit: float
) -> None:
    """Run ``workloads`` with server, client (and link) in separate processes.

    One client process per round-trip time; 0 ms means straight over loopback, no link.
    """
    with contextlib.ExitStack() as stack:
        servers = {
            impl: stack.enter_context(spawn(child_argv(["--serve", impl, "--loop", loop])))
            for impl in IMPLS
        }
        for rtt in rtts_ms:
            urls = {impl: servers[impl].info["url"] for impl in IMPLS}
            pids = {impl: servers[impl].info["pid"] for impl in IMPLS}
            with contextlib.ExitStack() as on_link:
                if rtt > 0:
                    argv = ["--rtt-ms", str(rtt), "--mbit", str(mbit), "--exit-on-stdin-eof"]
                    for impl in IMPLS:
                        argv += ["--target", f"127.0.0.1:{urllib.parse.urlsplit(urls[impl]).port}"]
                    link = on_link.enter_context(spawn(child_argv(argv, "benchmarks.link")))
                    urls = {
                        i: _via(urls[i], p) for i, p in zip(IMPLS, link.info["ports"], strict=True)
                    }
                    pids["link"] = link.proc.pid
                spec = {
                    "loop": loop,
                    "rtt_ms": rtt,
                    "mbit": mbit if rtt > 0 else None,
                    "urls": urls,
                    "pids": pids,
                }
                argv = ["--client", json.dumps(spec), "--loop", loop, "--size", size]
                argv += ["--workloads", ",".join(workloads), "--repeat", str(repeat)]
                # The client prints its lines straight to our stdout.
                sys.stdout.flush()
                done = subprocess.run(child_argv(argv), env=child_env(), cwd=ROOT, check=False)
                if done.returncode:
                    emit({"loop": loop, "rtt_ms": rtt, "error": f"client exited {done.returncode}"})


# -- the slow consumer: one fresh process per side -----------------------------------------


async def slow_client(impl: str, url: str, s: Sizes) -> None:
    """Child: read ``slow_bytes`` at ``slow_rate`` for at most ``slow_seconds``."""
    start_rss = rss_mib()
    received = 0
    start = time.perf_counter()

    async def pace(n: int) -> bool:
        """Account for ``n`` bytes read; sleep to keep to the rate; False to stop."""
        nonlocal received
        received += n
        now = time.perf_counter()
        if now - start >= s.slow_seconds:
            return False
        delay = start + received / s.slow_rate - now
        if delay > 0:
            await anyio.sleep(delay)
        return True

    # The close handshake may wait behind data the server still sends (raw
    # websockets stops reading while its queue is full): bound it.
    with anyio.CancelScope() as scope:
        if impl == "rpcstream":
            async with rpcstream.connect(url) as peer:
                async with peer.stream("chunks", s.slow_bytes, s.slow_chunk) as stream:
                    async for chunk in stream:
                        if not await pace(len(chunk)):
                            break
                seconds = time.perf_counter() - start
                scope.deadline = anyio.current_time() + CLOSE_BUDGET
        else:
            async with raw_connect(url) as ws:
                await ws.send(ENC.encode((OP_CHUNKS, 0, s.slow_bytes, s.slow_chunk)))
                while (chunk := DEC.decode(await ws.recv(decode=False))) is not None:
                    if not await pace(len(chunk)):
                        break
                seconds = time.perf_counter() - start
                scope.deadline = anyio.current_time() + CLOSE_BUDGET
    closing = time.perf_counter() - start - seconds
    emit(
        {
            "consumed_mib": round(received / MiB, 1),
            "seconds": round(seconds, 2),
            "consumer_mb_per_s": round(received / seconds / 1e6, 2),
            "rss_start_mib": start_rss,
            "peak_rss_mib": peak_rss_mib(),
            "close_s": round(closing, 2),
        }
    )


def run_slow(loop: str, impl: str, size: str, s: Sizes) -> Figures:
    """Run the slow consumer for ``impl`` with each side in its own fresh process."""
    with spawn(child_argv(["--serve", impl, "--loop", loop])) as server:
        client = subprocess.run(
            child_argv(
                ["--slow-client", impl, "--url", server.info["url"], "--loop", loop, "--size", size]
            ),
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=ROOT,
            timeout=s.slow_seconds + CLOSE_BUDGET + 60,
            check=True,
        )
        client_figures = json.loads(client.stdout.splitlines()[-1])
        server_figures = server.finish()
    if server_figures is None:
        raise ChildFailed(f"the {impl} server printed no figures")
    ahead = server_figures["produced_mib"] - client_figures["consumed_mib"]
    return {
        "sender_has_mib": s.slow_bytes // MiB,
        "target_rate_mb_per_s": s.slow_rate / 1e6,
        "time_cap_s": s.slow_seconds,
        **{k: client_figures[k] for k in ("consumed_mib", "seconds", "consumer_mb_per_s")},
        "sender_produced_mib": server_figures["produced_mib"],
        "sender_ahead_mib": round(ahead, 1),
        "server_rss_start_mib": server_figures["rss_start_mib"],
        "server_peak_rss_mib": server_figures["peak_rss_mib"],
        "client_rss_start_mib": client_figures["rss_start_mib"],
        "client_peak_rss_mib": client_figures["peak_rss_mib"],
        "client_close_s": client_figures["close_s"],
    }


def run_slow_pair(loop: str, size: str, s: Sizes) -> None:
    """The slow-consumer workload, raw then rpcstream, one JSON line each."""
    metric = "server_peak_rss_mib"
    base: dict[str, Any] = {"workload": "slow", "loop": loop, "metric": metric}
    raw = run_slow(loop, "raw", size, s)
    emit({**base, "impl": "raw", **raw})
    rpc = run_slow(loop, "rpcstream", size, s)
    emit({**base, "impl": "rpcstream", **rpc, "ratio_to_raw": round(rpc[metric] / raw[metric], 2)})
