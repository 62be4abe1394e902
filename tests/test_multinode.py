"""Several server nodes on one Redis: losing a node loses no event and hangs no run.

Two ``rpcstream serve`` subprocesses on different ports share one private
redis-server. A flow runs on node A; a client subscribes through node B; node B
is killed mid-run; the client's RunClient, given both URLs, reconnects to A and
resumes: the events it receives are exactly 1..N. And when node A, the one
running the flow, is killed, node B ends the run as ``Interrupted`` once A's
lease lapses, and the client following through B sees that end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from redis_server import RedisServer, free_port, redis_server

import rpcstream

__all__ = ["redis_server"]  # the fixture, for pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore needs asyncio (the nodes are subprocesses anyway)


async def start_node(
    store_url: str, port: int, lease_ttl: float | None = None
) -> anyio.abc.Process:
    if lease_ttl is None:
        command = [
            sys.executable, "-m", "rpcstream", "serve", "tests.apps:runs",
            "--store", store_url, "--port", str(port),
        ]  # fmt: skip
    else:  # the same app, with short leases
        command = [
            sys.executable, "-c", "import sys, tests.apps as a; "
            "a.serve_leased(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))",
            store_url, str(port), str(lease_ttl),
        ]  # fmt: skip
    process = await anyio.open_process(
        command,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert process.stdout is not None
    line = b""
    with anyio.fail_after(20):
        async for chunk in process.stdout:  # until "serving ... on ws://..."
            line += chunk
            if b"\n" in line:
                break
    assert b"serving tests.apps:runs on ws://" in line, line
    return process


LEASE_TTL = 0.5
Nodes = list[tuple[str, anyio.abc.Process]]


@contextlib.asynccontextmanager
async def start_nodes(store_url: str, lease_ttl: float | None) -> AsyncIterator[Nodes]:
    started = []
    try:
        for _ in range(2):
            port = free_port()
            node = await start_node(store_url, port, lease_ttl)
            started.append((f"ws://127.0.0.1:{port}", node))
        yield started
    finally:
        for _, process in started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Nodes]:
    async with start_nodes(redis_server.url, None) as started:
        yield started


@pytest.fixture
async def leased_nodes(redis_server: RedisServer) -> AsyncIterator[Nodes]:
    """Two nodes whose leases last LEASE_TTL seconds (the default is 30)."""
    async with start_nodes(redis_server.url, LEASE_TTL) as started:
        yield started


@pytest.mark.anyio
async def test_a_client_resumes_on_another_node_when_its_node_dies(nodes: Nodes) -> None:
    (url_a, _), (url_b, process_b) = nodes
    n = 300
    async with rpcstream.connect(url_a) as peer:  # the flow runs on node A
        run = await peer.call("runs.start", "ticks", {"n": n, "delay": 0.005})
    ids: list[int] = []
    async with rpcstream.RunClient([url_b, url_a], backoff_base=0.05, give_up_after=30) as client:
        async for event in client.subscribe(run["run_id"]):
            if not ids:
                assert client.url == url_b  # watching through node B
            ids.append(event["id"])
            if event["id"] == 50:
                process_b.send_signal(signal.SIGKILL)  # node B dies mid-run
        assert client.url == url_a  # and the client carried on through node A
        assert client.connections == 2
        last = event
    assert ids == list(range(1, n + 3))  # started, n ticks, complete: no gap, no duplicate
    assert last["type"] == "complete"


@pytest.mark.anyio
async def test_a_run_whose_node_dies_ends_interrupted_instead_of_hanging(
    leased_nodes: Nodes,
) -> None:
    (url_a, process_a), (url_b, _) = leased_nodes
    async with rpcstream.connect(url_a) as peer:  # the flow runs on node A
        run = await peer.call("runs.start", "ticks", {"n": 100_000, "delay": 0.005})
    events = []
    with anyio.fail_after(30):
        async with rpcstream.connect(url_b) as peer:  # followed through node B
            async for event in peer.stream("runs.subscribe", run["run_id"]):
                events.append(event)
                if event["id"] == 20:
                    process_a.send_signal(signal.SIGKILL)  # node A dies mid-run
    ids = [event["id"] for event in events]
    assert ids == list(range(1, len(ids) + 1))  # no gap, no duplicate
    assert events[-1]["type"] == "error"
    assert events[-1]["data"]["type"] == "Interrupted"
