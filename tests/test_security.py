"""Authentication, run ownership, limits and abuse, on asyncio and trio."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import trustme
import websockets.exceptions

import rpcstream
from rpcstream.limits import TokenBucket
from rpcstream.runs.client import RunClient

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"alice-token": "alice", "bob-token": "bob", "admin-token": "admin"}


def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
    token = request.bearer_token
    if token == "banned":
        raise rpcstream.Refused("this token is banned", 403)
    return TOKENS.get(token or "")


def make_runs(**kw: Any) -> rpcstream.RunServer:
    router = rpcstream.Router()

    @router.method
    async def whoami() -> Any:
        return rpcstream.current_principal()

    runs = rpcstream.RunServer(router=router, **kw)

    @runs.flow("wait")
    async def wait(ctx: rpcstream.RunContext) -> None:
        await ctx.client.send("owner", rpcstream.current_principal())
        await ctx.client.receive()  # until a client says so

    @runs.flow("chatty")
    async def chatty(ctx: rpcstream.RunContext, n: int) -> None:
        for i in range(n):
            try:
                await ctx.client.send("n", i)
            except rpcstream.RateLimited as exc:
                # The flow sees the limit; it reports it through the one channel
                # the limit does not count: its return value.
                raise RuntimeError(f"limited at {i}: {exc.message}") from exc

    return runs


@pytest.fixture
async def server() -> AsyncIterator[rpcstream.Server]:
    async with rpcstream.serve(make_runs(), authenticate=authenticate) as srv:
        yield srv


async def test_authenticate_sees_bearer_tokens_or_the_access_token_parameter(
    server: rpcstream.Server,
) -> None:
    async with rpcstream.connect(server.url, token="alice-token") as peer:
        assert await peer.call("whoami") == "alice"
    async with rpcstream.connect(server.url + "/?access_token=bob-token") as peer:
        assert await peer.call("whoami") == "bob"


async def test_refusals_happen_before_the_upgrade_with_401_or_403(
    server: rpcstream.Server,
) -> None:
    for token, status in [(None, 401), ("wrong", 401), ("banned", 403)]:
        with pytest.raises(rpcstream.HandshakeRefused) as info:
            async with rpcstream.connect(server.url, token=token):
                pass
        assert info.value.status == status
    assert server.connections_accepted == 0


async def test_a_run_client_gives_up_at_once_when_refused(server: rpcstream.Server) -> None:
    async with RunClient(server.url, token="wrong", backoff_base=0.01) as client:
        with pytest.raises(rpcstream.ReconnectFailed, match="HTTP 401") as info:
            await client.start("wait")
    assert isinstance(info.value.__cause__, rpcstream.HandshakeRefused)


async def test_only_the_owner_sees_a_run_and_others_get_the_unknown_run_error(
    server: rpcstream.Server,
) -> None:
    async with (
        RunClient(server.url, token="alice-token") as alice,
        RunClient(server.url, token="bob-token") as bob,
    ):
        run_id = await alice.start("wait")
        events = alice.subscribe(run_id)
        assert (await anext(events))["type"] == "started"
        assert (await anext(events))["data"] == "alice"  # the principal reached the flow
        unknown = await _error_of(bob.status("no-such-run"))
        for attempt in [
            bob.status(run_id),
            bob.cancel(run_id),
            bob.send(run_id, "go"),
            _first(bob.subscribe(run_id)),
        ]:
            error = await _error_of(attempt)
            assert type(error) is rpcstream.RunNotFound
            assert error.message == unknown.message.replace("no-such-run", run_id)
        await alice.send(run_id, "go")
        assert [e["type"] async for e in events] == ["complete"]


async def test_an_access_hook_can_let_others_in() -> None:
    def admins_too(principal: Any, info: rpcstream.RunInfo, action: str) -> bool:
        return principal in ("admin", info.owner)

    async with (
        rpcstream.serve(make_runs(can_access=admins_too), authenticate=authenticate) as server,
        RunClient(server.url, token="alice-token") as alice,
        RunClient(server.url, token="admin-token") as admin,
        RunClient(server.url, token="bob-token") as bob,
    ):
        run_id = await alice.start("wait")
        assert (await admin.status(run_id))["status"] == "running"
        with pytest.raises(rpcstream.RunNotFound):
            await bob.status(run_id)
        await admin.cancel(run_id)


async def test_runs_in_flight_per_principal_are_limited() -> None:
    async with (
        rpcstream.serve(make_runs(max_runs_per_principal=2), authenticate=authenticate) as server,
        RunClient(server.url, token="alice-token") as alice,
        RunClient(server.url, token="bob-token") as bob,
    ):
        first = await alice.start("wait")
        await alice.start("wait")
        with pytest.raises(rpcstream.Overloaded, match="too many runs in flight"):
            await alice.start("wait")
        await bob.start("wait")  # others are not affected
        await alice.send(first, "go")
        async for _ in alice.subscribe(first):
            pass
        await alice.start("wait")  # room again once one ended


async def test_connections_per_principal_are_limited_with_429() -> None:
    async with (
        rpcstream.serve(
            make_runs(), authenticate=authenticate, max_connections_per_principal=2
        ) as server,
        rpcstream.connect(server.url, token="alice-token"),
        rpcstream.connect(server.url, token="alice-token"),
    ):
        with pytest.raises(rpcstream.HandshakeRefused) as info:
            async with rpcstream.connect(server.url, token="alice-token"):
                pass
        assert info.value.status == 429
        async with rpcstream.connect(server.url, token="bob-token") as bob:
            assert await bob.call("whoami") == "bob"


async def test_calls_beyond_the_connections_rate_are_answered_rate_limited() -> None:
    async with (
        rpcstream.serve(make_runs(), call_rate=(0.001, 5)) as server,
        rpcstream.connect(server.url) as peer,
    ):
        for _ in range(5):
            await peer.call("whoami")
        with pytest.raises(rpcstream.RateLimited, match="too many calls"):
            await peer.call("whoami")
        async with rpcstream.connect(server.url) as other:  # per connection
            assert await other.call("whoami") is None


async def test_events_beyond_a_runs_send_rate_are_refused_to_the_flow() -> None:
    async with (
        rpcstream.serve(make_runs(send_rate=(0.001, 3))) as server,
        RunClient(server.url) as client,
    ):
        run_id = await client.start("chatty", {"n": 10})
        events = [e async for e in client.subscribe(run_id)]
    assert [e["type"] for e in events] == ["started", "n", "n", "n", "error"]
    assert events[-1]["data"]["message"].startswith("limited at 3: run ")


async def test_messages_over_the_size_limit_close_the_connection_with_1009() -> None:
    async with (
        rpcstream.serve(make_runs(), max_message_size=64 * 1024) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(rpcstream.ConnectionClosed) as info:
            await peer.call("whoami", "x" * 100_000)
        assert info.value.code == 1009


async def test_streams_beyond_max_streams_are_refused_as_overloaded() -> None:
    router = rpcstream.Router()

    @router.method
    async def forever() -> AsyncIterator[int]:
        yield 1
        await anyio.sleep_forever()

    async with (
        rpcstream.serve(router, max_streams=3) as server,
        rpcstream.connect(server.url) as peer,
    ):
        streams = [peer.stream("forever") for _ in range(3)]
        for s in streams:
            assert await anext(s) == 1
        with pytest.raises(rpcstream.Overloaded, match="too many open streams"):
            await anext(peer.stream("forever"))


async def test_a_client_that_never_completes_the_handshake_is_dropped() -> None:
    async with rpcstream.serve(make_runs(), open_timeout=0.3) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as tcp:
            await tcp.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ...and never finishes
            with anyio.fail_after(5):
                received = b""
                try:
                    async for chunk in tcp:
                        received += chunk
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        # Dropped (with or without a 4xx/5xx answer), never upgraded.
        assert b"101 Switching Protocols" not in received
        assert server.connections_accepted == 0


async def test_a_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst


def test_a_client_that_calls_and_never_reads_is_cut_off_with_bounded_server_memory() -> None:
    """The server (a subprocess, so its RSS is its own) answers a flood of calls
    from a client that never reads; the answers pile up to max_queued_bytes and
    the server aborts the connection. Its peak RSS stays bounded."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "rpcstream", "serve", "tests.apps:router", "--port", "0"]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split(" on ")[1].strip()
            sent = anyio.run(_flood_without_reading, url)
            peak_kib = _peak_rss_kib(process.pid)
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=10)
    assert "too many answers queued: the peer does not read" in stderr
    assert sent > 16  # MiB: more than the server keeps queued
    assert peak_kib < 200 * 1024, f"server peak RSS {peak_kib // 1024} MiB"


async def _flood_without_reading(url: str) -> int:
    """Send 1 MiB echo calls, never reading an answer, until the server hangs up."""
    from websockets.asyncio.client import connect

    args = msgspec.Raw(msgspec.msgpack.encode(["x" * (1024 * 1024)]))
    no_kwargs = msgspec.Raw(msgspec.msgpack.encode({}))
    sent = 0
    # websockets stops reading the socket once 16 messages wait unread: from
    # then on the server's answers stay in the server.
    # max_size=None: the client itself must not hang up on a 1 MiB answer (1009).
    async with connect(
        url, subprotocols=["rpcstream.v1.msgpack"], compression=None, max_size=None
    ) as ws:
        with anyio.fail_after(40):
            try:
                for i in range(1, 400):
                    await ws.send(msgspec.msgpack.encode([[1, i, "echo", args, no_kwargs]]))
                    sent += 1
            except websockets.exceptions.ConnectionClosed as exc:
                assert exc.rcvd is None, f"closed by a close frame, not aborted: {exc}"
                return sent
    raise AssertionError(f"the server never hung up ({sent} MiB sent)")


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def _error_of(awaitable: Any) -> rpcstream.RemoteError:
    try:
        await awaitable
    except rpcstream.RemoteError as exc:
        return exc
    raise AssertionError("expected a RemoteError")


async def _first(events: Any) -> Any:
    return await anext(events)


async def test_upgrades_from_an_origin_not_listed_are_refused() -> None:
    async with rpcstream.serve(make_runs(), origins=["https://app.example"]) as server:
        with pytest.raises(rpcstream.HandshakeRefused) as info:
            async with rpcstream.connect(server.url, headers={"Origin": "https://evil.example"}):
                pass
        assert info.value.status == 403
        async with rpcstream.connect(server.url, headers={"Origin": "https://app.example"}) as p:
            assert await p.call("rpcstream.ping") is None  # the reserved liveness check


async def test_plain_http_gets_its_routes_or_a_404() -> None:
    import urllib.error
    import urllib.request

    route = rpcstream.StaticFile("text/plain", b"hello")
    seen: list[rpcstream.HandshakeRequest] = []

    async def answer(request: rpcstream.HandshakeRequest) -> rpcstream.HttpResponse:
        seen.append(request)
        await anyio.lowlevel.checkpoint()
        if request.query.get("fail"):
            raise RuntimeError("a route that fails")
        return rpcstream.HttpResponse(202, b"dynamic", "text/plain")

    routes: dict[str, rpcstream.Route] = {"/hello.txt": route, "/dynamic": answer}
    async with rpcstream.serve(make_runs(), routes=routes) as server:
        base = f"http://127.0.0.1:{server.port}"

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(base + path, timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, exc.read()

        assert await anyio.to_thread.run_sync(get, "/hello.txt") == (200, b"hello")
        assert await anyio.to_thread.run_sync(get, "/dynamic?x=1") == (202, b"dynamic")
        assert seen[0].path == "/dynamic" and seen[0].query == {"x": "1"}
        status, body = await anyio.to_thread.run_sync(get, "/dynamic?fail=1")
        assert status == 500 and b"RuntimeError" not in body
        status, body = await anyio.to_thread.run_sync(get, "/favicon.ico")
        assert status == 404 and b"not found" in body
        status, body = await anyio.to_thread.run_sync(get, "/rpcstream.js")
        assert status == 200 and b"export" in body


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context
    that trusts the test CA that issued it (trustme: no files, no openssl)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_calls_and_streams_run_over_tls_and_an_untrusted_certificate_is_refused(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    router = rpcstream.Router()

    @router.method
    async def echo(x: Any) -> Any:
        return x

    @router.method
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield i.to_bytes(4, "big") * 16384  # 64 KiB: written at once when it can be

    async with rpcstream.serve(router, "127.0.0.1", 0, ssl=server_ctx) as server:
        assert server.url.startswith("wss://")
        async with rpcstream.connect(server.url, ssl=client_ctx) as peer:
            assert await peer.call("echo", {"a": 1}) == {"a": 1}
            count = 0
            async for chunk in peer.stream("chunks", 64):
                assert chunk[:4] == count.to_bytes(4, "big")
                count += 1
            assert count == 64
        with pytest.raises(rpcstream.ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
            async with rpcstream.connect(server.url):  # the system CAs do not know ours
                pass
