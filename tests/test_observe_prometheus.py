"""Prometheus metrics end to end: serve with ``metrics_route()``, make calls, streams
and a run over a real WebSocket, GET /metrics over HTTP and read the counters."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import rpcstream
from rpcstream.observe import hooks
from rpcstream.observe.prometheus import PrometheusObserver, enable, metrics_route

pytestmark = pytest.mark.anyio


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A registry of its own per test, and its observer uninstalled afterwards."""
    registry = CollectorRegistry()
    observer = enable(registry)
    try:
        yield registry
    finally:
        hooks.uninstall(observer)


def make_app() -> rpcstream.RunServer:
    router = rpcstream.Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def fail() -> None:
        raise KeyError("secret")

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    runs = rpcstream.RunServer(router=router)

    @runs.flow("ticks")
    async def ticks(ctx: rpcstream.RunContext, n: int) -> None:
        for i in range(n):
            await ctx.client.send("tick", i)

    return runs


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics: every sample by name and labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_connections_calls_streams_runs_and_events(
    registry: CollectorRegistry,
) -> None:
    async with rpcstream.serve(make_app(), routes={"/metrics": metrics_route(registry)}) as server:
        async with rpcstream.connect(server.url) as peer:
            for i in range(3):
                assert await peer.call("add", i, 1) == i + 1
            with pytest.raises(rpcstream.MethodNotFound):
                await peer.call("no such method, named by the client")
            with pytest.raises(rpcstream.InternalError):
                await peer.call("fail")
            # One item of credit at a time: the server's sender waits for each grant.
            assert [i async for i in peer.stream("count", 20, window_items=1)] == list(range(20))
            run = await peer.call("runs.start", "ticks", {"n": 3})
            events = [e async for e in peer.stream("runs.subscribe", run["run_id"])]
            assert [e["type"] for e in events] == ["started", "tick", "tick", "tick", "complete"]
            during = await anyio.to_thread.run_sync(scrape, server.port)
        await server.wait_idle()
        after = await anyio.to_thread.run_sync(scrape, server.port)

    assert value(during, "rpcstream_connections_open") == 1
    assert value(after, "rpcstream_connections_open") == 0
    assert value(after, "rpcstream_connections_accepted_total") == 1
    calls = "rpcstream_calls_total"
    assert value(after, calls, method="add", kind="call", outcome="ok") == 3
    assert value(after, calls, method="fail", kind="call", outcome="internal_error") == 1
    # A name the client chose is never a label: it counts as "unknown".
    assert value(after, calls, method="unknown", kind="call", outcome="method_not_found") == 1
    assert value(after, calls, method="count", kind="stream", outcome="ok") == 1
    assert value(after, calls, method="runs.subscribe", kind="stream", outcome="ok") == 1
    assert value(after, "rpcstream_call_duration_seconds_count", method="add", kind="call") == 3
    assert value(after, "rpcstream_stream_stalls_total") >= 1
    assert value(after, "rpcstream_streams_open") == 0
    assert value(after, "rpcstream_runs_total", flow="ticks", status="running") == 1
    assert value(after, "rpcstream_runs_total", flow="ticks", status="complete") == 1
    assert value(after, "rpcstream_runs_running", flow="ticks") == 0
    assert value(after, "rpcstream_run_events_appended_total") == 5
    assert value(after, "rpcstream_run_events_delivered_total") == 5
    assert value(after, "rpcstream_store_errors_total", operation="append") == 0


async def test_open_streams_and_refused_handshakes_are_counted(
    registry: CollectorRegistry,
) -> None:
    def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
        return "ada" if request.bearer_token == "good" else None

    routes = {"/metrics": metrics_route(registry)}
    async with rpcstream.serve(make_app(), authenticate=authenticate, routes=routes) as server:
        with pytest.raises(rpcstream.HandshakeRefused):
            async with rpcstream.connect(server.url, token="bad"):
                pass
        async with (
            rpcstream.connect(server.url, token="good") as peer,
            peer.stream("count", 1000, window_items=1) as items,
        ):
            assert await items.__anext__() == 0
            samples = await anyio.to_thread.run_sync(scrape, server.port)
    # Both ends of the stream live in this process: the server's and the client's.
    assert value(samples, "rpcstream_streams_open") == 1
    assert value(samples, "rpcstream_handshakes_refused_total", status="401") == 1


async def test_a_failing_store_is_counted_by_operation(registry: CollectorRegistry) -> None:
    observer = enable(registry)
    assert isinstance(observer, PrometheusObserver)
    store = rpcstream.MemoryStore()
    async with store:
        await store.create_run("r", "flow")
        with pytest.raises(rpcstream.RunNotFound):  # the caller's mistake: not counted
            await store.append("nope", "tick", b"1")

        async def broken(*args: Any) -> Any:
            raise OSError("disk full")

        store._append = broken  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await store.append("r", "tick", b"1")
    assert registry.get_sample_value("rpcstream_store_errors_total", {"operation": "append"}) == 1
