"""RunClient: reconnects, URL rotation, exact resume, heartbeats; on asyncio and trio."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import rpcstream
from tests.tcp_proxy import go, tcp_proxy

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def make_runs() -> rpcstream.RunServer:
    runs = rpcstream.RunServer()

    @runs.flow("ticks")
    async def ticks(ctx: rpcstream.RunContext, n: int, hold_at: tuple[int, ...] = ()) -> None:
        for i in range(n):
            event_id = await ctx.client.send("tick", i)
            if event_id in hold_at:
                # Hold the run where the test cuts the connection, until it says
                # go: the cut then always lands on a run still in progress (with
                # batched delivery, a run that went on could be all delivered).
                while (await ctx.client.receive()).data != event_id:
                    pass  # a go for an earlier hold, sent twice

    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server() -> AsyncIterator[rpcstream.Server]:
    async with rpcstream.serve(make_runs()) as srv:
        yield srv


async def test_subscriptions_resume_exactly_through_connections_cut_at_random_points(
    server: rpcstream.Server,
) -> None:
    n = 3000
    rng = random.Random(7)
    cut_at = set(rng.sample(range(1, n), 8))
    async with rpcstream.RunClient(server.url, backoff_base=0.01) as client:
        run_id = await client.start("ticks", {"n": n, "hold_at": sorted(cut_at)})
        ids = []
        async for event in client.subscribe(run_id):
            ids.append(event["id"])
            if event["id"] in cut_at:
                for peer in list(server.peers):  # the server side drops the socket
                    await peer.aclose(1012, "cut")
                await go(client, run_id, event["id"])
        assert client.connections >= len(cut_at) + 1
    assert ids == list(range(1, n + 3))  # started, n ticks, complete: no gap, no duplicate


async def test_cuts_in_the_network_itself_are_survived_too(server: rpcstream.Server) -> None:
    n = 2000
    async with tcp_proxy(server.port) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}"
        async with rpcstream.RunClient(url, backoff_base=0.01) as client:
            cuts = [500, 1000, 1500, 2000]
            run_id = await client.start("ticks", {"n": n, "hold_at": cuts})
            ids = []
            async for event in client.subscribe(run_id):
                ids.append(event["id"])
                if event["id"] in cuts:
                    proxy.cut()  # both TCP connections close under the peers' feet
                    await go(client, run_id, event["id"])
    assert ids == list(range(1, n + 3))
    assert proxy.connections >= len(cuts) + 1


async def test_the_client_rotates_through_its_urls(server: rpcstream.Server) -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    async with rpcstream.RunClient([dead, server.url], backoff_base=0.01) as client:
        assert await client.call("runs.start", "ticks", {"n": 1}, timeout=10)
        assert client.url == server.url


async def test_the_client_gives_up_after_max_attempts_with_one_clear_error() -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    async with rpcstream.RunClient(dead, backoff_base=0.01, max_attempts=3) as client:
        with pytest.raises(rpcstream.ReconnectFailed, match="gave up after 3 failed attempts"):
            await client.start("ticks", {"n": 1})
        with pytest.raises(rpcstream.ReconnectFailed):
            async for _ in client.subscribe("any"):
                pass


async def test_on_retry_hears_of_each_failed_attempt_before_its_delay() -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    heard: list[tuple[int, float, BaseException | None]] = []
    client = rpcstream.RunClient(
        dead, backoff_base=0.01, max_attempts=3, on_retry=lambda *a: heard.append(a)
    )
    async with client:
        with pytest.raises(rpcstream.ReconnectFailed):
            await client.start("ticks", {"n": 1})
    assert [attempt for attempt, _, _ in heard] == [1, 2]  # the third gives up instead
    assert all(0 <= delay <= 0.01 * 2**attempt for attempt, delay, _ in heard)
    assert all(isinstance(error, rpcstream.ConnectionClosed) for _, _, error in heard)


async def test_calls_while_disconnected_wait_bounded_by_their_timeout_or_fail_at_once() -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    async with rpcstream.RunClient(dead, backoff_base=0.01) as client:
        with pytest.raises(rpcstream.ConnectionClosed, match="not connected"):
            await client.call("runs.status", "x", wait=False)
        with pytest.raises(rpcstream.DeadlineExceeded, match=r"no connection within 0\.2 s"):
            await client.call("runs.status", "x", timeout=0.2)
    async with rpcstream.RunClient(dead, wait=False) as client:
        with pytest.raises(rpcstream.ConnectionClosed):
            await client.status("x")


async def test_a_peer_that_stops_answering_is_noticed_by_both_sides() -> None:
    router = rpcstream.Router()
    blocked = anyio.Event()

    @router.method
    async def block() -> None:
        blocked.set()
        await anyio.sleep_forever()

    beats: dict[str, Any] = {"ping_interval": 0.1, "ping_timeout": 0.2}
    async with rpcstream.serve(router, **beats) as server, tcp_proxy(server.port) as proxy:
        async with rpcstream.connect(f"ws://127.0.0.1:{proxy.port}", **beats) as peer:

            async def freeze_once_blocked() -> None:
                await blocked.wait()
                proxy.freeze()  # half-open: nothing is closed, nothing answers

            async with anyio.create_task_group() as tg:
                tg.start_soon(freeze_once_blocked)
                with pytest.raises(rpcstream.ConnectionClosed, match="keepalive ping timeout"):
                    await peer.call("block")
        await server.wait_idle()  # the server dropped its side (and cancelled the handler)
        assert server.stats == {"connections": 0, "tasks": 0}


async def test_a_killed_and_restarted_server_process_loses_no_event(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "runs.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "rpcstream", "serve", "tests.apps:runs",
        "--store", f"sqlite:{db}", "--port", str(port),
    ]  # fmt: skip

    async def start_server() -> anyio.abc.Process:
        process = await anyio.open_process(command, cwd=ROOT, env=env)
        assert process.stdout is not None
        line = b""
        async for chunk in process.stdout:  # wait for its "serving ... on ws://" line
            line += chunk
            if b"\n" in line:
                break
        assert b"serving" in line, line
        return process

    url = f"ws://127.0.0.1:{port}"
    first = await start_server()
    ids: list[int] = []
    second = None
    try:
        async with rpcstream.RunClient(url, backoff_base=0.05, give_up_after=30) as client:
            run_id = await client.start("ticks", {"n": 400, "delay": 0.005})
            async for event in client.subscribe(run_id):
                ids.append(event["id"])
                if event["id"] == 100:
                    first.send_signal(signal.SIGKILL)  # no goodbye, no terminal event
                    await first.wait()
                    second = await start_server()  # same port, same SQLite file
            last = event
    finally:
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.terminate()
                await process.wait()
            if process is not None:
                await process.aclose()
    # Every event the first server stored arrives exactly once, then the restarted
    # server's verdict on the run it found orphaned: no gap, no duplicate.
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) > 100
    assert last["type"] == "error" and last["data"]["type"] == "Interrupted"
