"""rpcstream.asgi under real ASGI servers: uvicorn, hypercorn on asyncio, and
hypercorn on trio, each a subprocess on a free loopback port serving
``tests/asgi_apps.py``; the clients run on asyncio and on trio.

The Starlette app (``site``) mounts the rpcstream app with ``Mount("/rpc")``
and ``WebSocketRoute("/ws")`` and starts it from its own lifespan; the bare
app (``rpc``) is started by the server's lifespan events.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_server import RedisServer, free_port, require_redis_server

import rpcstream
import rpcstream.asgi
from tests.browser import CHROMIUM, cdp_session, launch
from tests.tcp_proxy import go, tcp_proxy

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
SERVERS = ["uvicorn", "hypercorn", "hypercorn-trio"]


def command(server: str, target: str, port: int) -> list[str]:
    """The command line that serves ``target`` (module:attribute) on ``port``."""
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    worker = "trio" if server == "hypercorn-trio" else "asyncio"
    return [
        sys.executable, "-m", "hypercorn", target, "--bind", f"127.0.0.1:{port}",
        "--worker-class", worker, "--log-level", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(server: str, target: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run ``server`` on ``target`` until the block ends; yield its port once it
    accepts connections (polled, with a deadline, while the process lives)."""
    port = free_port()
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            command(server, target, port), cwd=ROOT, env=environ, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    log = output.read().decode(errors="replace")
                    pytest.fail(f"{server} did not start serving {target}:\n{log}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)  # the next poll
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            output.seek(0)
            log = output.read().decode(errors="replace")
            assert "Traceback" not in log, log


@pytest.fixture(scope="module", params=SERVERS)
def site(request: pytest.FixtureRequest) -> Iterator[int]:
    """The port of the Starlette app (rpcstream at /rpc/ and /ws) under each server."""
    with serving(request.param, "tests.asgi_apps:site") as port:
        yield port


@pytest.fixture(scope="module", params=SERVERS)
def bare(request: pytest.FixtureRequest) -> Iterator[int]:
    """The port of the rpcstream app served alone, started by the server's lifespan."""
    with serving(request.param, "tests.asgi_apps:rpc") as port:
        yield port


async def http_get(url: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, errors included."""

    def get() -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read(), response.headers["content-type"]
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read(), error.headers["content-type"]

    return await anyio.to_thread.run_sync(get)


async def test_calls_run_as_the_principal_through_a_starlette_mount(site: int) -> None:
    async with rpcstream.connect(f"ws://127.0.0.1:{site}/rpc/", token="alice") as peer:
        assert await peer.call("echo", {"a": [1, "é"], "b": None}) == {"a": [1, "é"], "b": None}
        assert await peer.call("whoami") == "alice"
        assert await peer.call("rpcstream.ping") is None


async def test_a_websocket_route_serves_the_same_app(site: int) -> None:
    url = f"ws://127.0.0.1:{site}/ws"
    async with rpcstream.connect(url, token="bob", codec="json") as peer:
        assert await peer.call("whoami") == "bob"


async def test_streams_flow_both_ways(site: int) -> None:
    async with rpcstream.connect(f"ws://127.0.0.1:{site}/rpc/", token="alice") as peer:
        assert [i async for i in peer.stream("count", 5000)] == list(range(5000))

        async def numbers(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        assert await peer.call("total", numbers(5000)) == 5000 * 4999 // 2
        assert [x async for x in peer.stream("doubled", numbers(1000))] == [
            2 * i for i in range(1000)
        ]


async def test_refusals_answer_401_and_403_before_the_upgrade(site: int) -> None:
    url = f"ws://127.0.0.1:{site}/rpc/"
    for token, status in [(None, 401), ("bad", 403)]:
        with pytest.raises(rpcstream.HandshakeRefused) as info:
            async with rpcstream.connect(url, token=token):
                pass
        assert info.value.status == status


async def test_a_run_resumes_exactly_through_network_cuts(site: int) -> None:
    n = 1000
    async with tcp_proxy(site) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/rpc/"
        async with rpcstream.RunClient(url, token="alice", backoff_base=0.01) as client:
            # Held at each cut until told to go on, so the run is still going when
            # it is cut: batched delivery could otherwise hand all of it over first.
            cuts = [250, 500, 750, 1000]
            run_id = await client.start("ticks", {"n": n, "hold_at": cuts})
            ids = []
            async for event in client.subscribe(run_id):
                ids.append(event["id"])
                if event["id"] in cuts:
                    proxy.cut()  # both TCP connections close under the peers' feet
                    await go(client, run_id, event["id"])
    assert ids == list(range(1, n + 3))  # started, n ticks, complete: no gap, no duplicate
    assert proxy.connections >= len(cuts) + 1


async def test_http_routes_health_and_the_browser_module_below_the_mount(site: int) -> None:
    base = f"http://127.0.0.1:{site}"
    assert await http_get(f"{base}/rpc/healthz") == (200, b"ok\n", "text/plain; charset=utf-8")
    assert (await http_get(f"{base}/rpc/readyz"))[:2] == (200, b"ready\n")
    status, body, kind = await http_get(f"{base}/rpc/rpcstream.js")
    assert status == 200 and kind.startswith("text/javascript") and b"export" in body
    status, body, kind = await http_get(f"{base}/rpc/rpcstream/peer.js")
    assert status == 200 and kind.startswith("text/javascript")
    assert (await http_get(f"{base}/hello"))[:2] == (200, b"hello from starlette")
    assert (await http_get(f"{base}/rpc/nope"))[0] == 404


async def test_the_servers_lifespan_starts_an_app_served_alone(bare: int) -> None:
    assert (await http_get(f"http://127.0.0.1:{bare}/readyz"))[:2] == (200, b"ready\n")
    async with rpcstream.RunClient(f"ws://127.0.0.1:{bare}/", token="carol") as client:
        run_id = await client.start("ticks", {"n": 3})
        types = [event["type"] async for event in client.subscribe(run_id)]
    assert types == ["started", "tick", "tick", "tick", "complete"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the client's loop is beside the point
async def test_readyz_fails_while_the_redis_store_is_down(tmp_path: Path) -> None:
    require_redis_server()
    with RedisServer(tmp_path) as redis:
        env = {"REDIS_URL": redis.url}
        with serving("uvicorn", "tests.asgi_apps:redis_rpc", env) as port:
            url = f"http://127.0.0.1:{port}/readyz"
            assert (await http_get(url))[:2] == (200, b"ready\n")
            redis.stop()
            status, body, _ = await http_get(url)
            assert (status, body) == (503, b"store unavailable\n")
            assert (await http_get(f"http://127.0.0.1:{port}/healthz"))[0] == 200  # alive
            redis.start()  # same port: the store's pool reconnects
            assert (await http_get(url))[:2] == (200, b"ready\n")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the browser drives the client side
@pytest.mark.parametrize("server", SERVERS)
async def test_the_browser_module_works_against_each_server(server: str) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} not found: install the Debian package chromium"
        if CI:
            pytest.fail(f"CI=true, so the browser tests must run, but {message}", pytrace=False)
        pytest.skip(message)
    browser = launch()
    try:
        with serving(server, "tests.asgi_apps:site") as port:
            async with cdp_session(browser.ws_url) as cdp:
                page = await cdp.new_page()
                await page.goto(f"http://127.0.0.1:{port}/page")
                out: Any = await page.evaluate(
                    """(async () => {
                      const rs = await import("/rpc/rpcstream.js");
                      const out = {};
                      try { await rs.connect("/rpc/"); } catch (e) {
                        out.refused = [e instanceof rs.ConnectionClosed];  // HTTP 401
                      }
                      const peer = await rs.connect("/rpc/", { token: "dora" });
                      out.whoami = await peer.call("whoami");
                      out.echo = await peer.call("echo", [{ x: [1, "é"] }]);
                      const items = [];
                      for await (const i of peer.stream("count", [300])) items.push(i);
                      out.items = items.length;
                      async function* numbers(n) { for (let i = 0; i < n; i++) yield i; }
                      out.total = await peer.call("total", [numbers(300)]);
                      await peer.close();
                      return out;
                    })()"""
                )
                await page.close()
    finally:
        browser.close()
    assert out == {
        "refused": [True],
        "whoami": "dora",
        "echo": {"x": [1, "é"]},
        "items": 300,
        "total": 300 * 299 // 2,
    }


async def run_lifespan(app: rpcstream.asgi.AsgiApp, *, then: Any = None) -> list[dict[str, Any]]:
    """Drive the ASGI lifespan protocol in process; ``then()`` runs between
    startup and shutdown. Returns what the app sent."""
    sent: list[dict[str, Any]] = []
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        if len(events) == 1 and then is not None:
            await then()
        return events.pop(0)

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


async def test_lifespan_events_start_and_stop_the_run_server_in_process() -> None:
    runs = rpcstream.RunServer()
    app = rpcstream.asgi.app(runs)
    seen: list[str | None] = []

    async def between() -> None:
        seen.append(await app.service.check_ready())

    sent = await run_lifespan(app, then=between)
    assert [e["type"] for e in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen == [None]  # ready while started
    assert await app.service.check_ready() is not None  # not once stopped


async def test_a_store_that_cannot_open_fails_the_startup_with_its_message() -> None:
    class Broken(rpcstream.MemoryStore):
        async def _open(self) -> None:
            raise rpcstream.StoreUnavailable("cannot reach the store")

    app = rpcstream.asgi.app(rpcstream.RunServer(Broken()))
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "cannot reach the store" in sent[0]["message"]


async def test_a_router_needs_no_start_and_the_lifespan_is_a_no_op() -> None:
    app = rpcstream.asgi.app(rpcstream.Router())
    assert await app.service.check_ready() is None
    sent = await run_lifespan(app)
    assert [e["type"] for e in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_an_app_cannot_be_started_twice_at_once() -> None:
    app = rpcstream.asgi.app(rpcstream.RunServer())
    async with app.lifespan():
        with pytest.raises(RuntimeError, match="started already"):
            async with app.lifespan():
                pass
