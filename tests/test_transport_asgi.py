"""The ASGI transport in process: an ASGI "server" made of memory streams drives
``rpcstream.asgi.app`` as uvicorn would, with an :class:`RpcPeer` on the other end.

Real servers (uvicorn, hypercorn) are in tests/test_asgi.py; here the server's
side is under the test's control: whether it has the ``websocket.http.response``
extension, and how much it buffers before its ``send`` blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import rpcstream
import rpcstream.asgi
from rpcstream.errors import ConnectionClosed
from rpcstream.messages import CODECS
from rpcstream.protocol import Side
from rpcstream.transport import Transport
from rpcstream.transport.asgi import (
    AsgiTransport,
    ScopeHeaders,
    route_target,
    serve_asgi_http,
)

pytestmark = pytest.mark.anyio

MSGPACK = "rpcstream.v1.msgpack"


class FakeServer:
    """The server's side of one ASGI WebSocket: what the app sent, and a
    client :class:`Transport` whose messages the app receives."""

    def __init__(self, buffer: int) -> None:
        self.to_app, self._app_inbox = anyio.create_memory_object_stream[dict[str, Any]](16)
        self._to_client, self.client_inbox = anyio.create_memory_object_stream[bytes](buffer)
        self.decided = anyio.Event()  # accepted, or refused
        self.subprotocol: str | None = None
        self.accepted = False
        self.status: int | None = None  # of an HTTP refusal
        self.body = b""
        self.close_code: int | None = None
        self.close_reason = ""
        self.reading = anyio.Event()  # the client reads its messages while set
        self.reading.set()

    async def receive(self) -> dict[str, Any]:
        return await self._app_inbox.receive()

    def close(self) -> None:
        for stream in (self.to_app, self._app_inbox, self._to_client, self.client_inbox):
            stream.close()

    async def send(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self.subprotocol = event.get("subprotocol")
            self.decided.set()
        elif kind == "websocket.http.response.start":
            self.status = event["status"]
        elif kind == "websocket.http.response.body":
            self.body = event["body"]
            self.decided.set()
        elif kind == "websocket.send":
            data = event.get("bytes")
            if data is None:
                data = event["text"].encode()
            try:
                await self._to_client.send(data)  # bounded: blocks as a full socket would
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise OSError("client gone") from exc
        elif kind == "websocket.close":
            self.close_code = event.get("code", 1000)
            self.close_reason = event.get("reason", "")
            self._to_client.close()
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                self.to_app.send_nowait({"type": "websocket.disconnect", "code": self.close_code})
            self.decided.set()


class ClientTransport(Transport):
    """The client's end, reading what the app sent (while ``server.reading``)."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.subprotocol = server.subprotocol

    async def send(self, message: bytes, *, text: bool) -> None:
        event: dict[str, Any] = {"type": "websocket.receive"}
        event["text" if text else "bytes"] = message.decode() if text else message
        try:
            await self.server.to_app.send(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionClosed(1006, "gone") from exc

    async def receive(self) -> bytes:
        await self.server.reading.wait()
        try:
            return await self.server.client_inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            raise ConnectionClosed(self.server.close_code or 1006, "closed") from exc

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
            self.server.to_app.send_nowait({"type": "websocket.disconnect", "code": code})
        self.server.client_inbox.close()


def scope(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("10.0.0.1", 5555),
        "subprotocols": [MSGPACK],
        "extensions": {"websocket.http.response": {}},
    }
    base.update(extra)
    return base


@contextlib.asynccontextmanager
async def open_app(
    app: rpcstream.asgi.AsgiApp, *, buffer: int = 16, **scope_extra: Any
) -> AsyncIterator[FakeServer]:
    """Run ``app`` on one WebSocket scope until the block ends."""
    server = FakeServer(buffer)
    done = anyio.Event()

    async def run() -> None:
        try:
            await app(scope(**scope_extra), server.receive, server.send)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await server.to_app.send({"type": "websocket.connect"})
        with anyio.fail_after(10):
            await server.decided.wait()
        try:
            yield server
        finally:
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                server.to_app.send_nowait({"type": "websocket.disconnect", "code": 1001})
            with anyio.fail_after(10):
                await done.wait()  # the app returned: its connection's work is done
            server.close()


@contextlib.asynccontextmanager
async def client(server: FakeServer, **options: Any) -> AsyncIterator[rpcstream.RpcPeer]:
    assert server.accepted, (server.status, server.body, server.close_code)
    peer = rpcstream.RpcPeer(
        ClientTransport(server), codec=CODECS[MSGPACK], side=Side.CONNECTING, **options
    )
    async with peer:
        yield peer


router = rpcstream.Router()


@router.method
async def whoami() -> object:
    return [rpcstream.current_principal(), rpcstream.current_peer().transport.remote_address]


@router.method
async def echo(value: object) -> object:
    return value


def token_auth(request: rpcstream.HandshakeRequest) -> str | None:
    if request.bearer_token == "bad":
        raise rpcstream.Refused("forbidden", 403)
    return request.bearer_token


async def test_calls_run_with_the_principal_authenticate_read_from_the_scope() -> None:
    app = rpcstream.asgi.app(router, authenticate=token_auth)
    headers = [(b"authorization", b"Bearer alice")]
    async with open_app(app, headers=headers) as server, client(server) as peer:
        assert server.subprotocol == MSGPACK
        assert await peer.call("echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
        assert await peer.call("whoami") == ["alice", ["10.0.0.1", 5555]]
        assert await peer.call("rpcstream.ping") is None
        assert app.server.stats["connections"] == 1
    assert app.server.connections_accepted == 1


async def test_the_query_string_carries_a_token_as_browsers_must() -> None:
    app = rpcstream.asgi.app(router, authenticate=token_auth)
    async with open_app(app, query_string=b"access_token=bob") as server, client(server) as peer:
        assert (await peer.call("whoami"))[0] == "bob"


@pytest.mark.parametrize(
    ("headers", "status"),
    [([], 401), ([(b"authorization", b"Bearer bad")], 403)],
)
async def test_refusals_answer_their_http_status_with_the_response_extension(
    headers: list[tuple[bytes, bytes]], status: int
) -> None:
    app = rpcstream.asgi.app(router, authenticate=token_auth)
    async with open_app(app, headers=headers) as server:
        assert not server.accepted
        assert server.status == status
        assert server.body in (b"unauthorized\n", b"forbidden\n")


async def test_without_the_extension_a_refusal_closes_before_accept_with_1008() -> None:
    app = rpcstream.asgi.app(router, authenticate=token_auth)
    async with open_app(app, extensions={}) as server:
        assert not server.accepted and server.status is None
        assert (server.close_code, server.close_reason) == (1008, "unauthorized")


async def test_too_many_connections_for_one_principal_answer_429() -> None:
    app = rpcstream.asgi.app(router, authenticate=token_auth, max_connections_per_principal=1)
    headers = [(b"authorization", b"Bearer alice")]
    async with open_app(app, headers=headers) as first, client(first) as peer:
        assert await peer.call("echo", 1) == 1
        async with open_app(app, headers=headers) as second:
            assert second.status == 429


async def test_a_client_offering_no_rpcstream_subprotocol_is_closed_with_1002() -> None:
    app = rpcstream.asgi.app(router)
    async with open_app(app, subprotocols=["chat"]) as server:
        assert server.accepted and server.subprotocol is None
        with anyio.fail_after(10):
            while server.close_code is None:
                await anyio.wait_all_tasks_blocked()
        assert server.close_code == 1002


async def test_origins_not_listed_are_refused_with_403() -> None:
    app = rpcstream.asgi.app(router, origins=["https://app.example"])
    evil = [(b"origin", b"https://evil.example")]
    async with open_app(app, headers=evil) as server:
        assert server.status == 403
    good = [(b"origin", b"https://app.example")]
    async with open_app(app, headers=good) as server, client(server) as peer:
        assert await peer.call("echo", 2) == 2


async def test_a_blocked_server_send_holds_stream_senders_back() -> None:
    item = b"x" * 16 * 1024
    limit = 64 * 1024
    seen: list[int] = []
    produced = 0
    flood = rpcstream.Router()

    @flood.method
    async def items(n: int) -> AsyncIterator[bytes]:
        nonlocal produced
        peer = rpcstream.current_peer()
        for _ in range(n):
            seen.append(peer.buffered_amount)
            produced += 1
            yield item

    app = rpcstream.asgi.app(flood, max_buffered_amount=limit)
    # The server holds 2 messages before its send blocks (a full socket).
    async with open_app(app, buffer=2) as server:
        server.reading = anyio.Event()  # the client reads nothing for now
        async with client(server, window_items=1000, window_bytes=64 * 1024 * 1024) as peer:
            stream = peer.stream("items", 200)
            async with stream:
                # Everything settles with the producer waiting for the socket.
                await anyio.wait_all_tasks_blocked()
                assert 0 < produced < 200
                assert max(seen) <= limit + len(item) + 64  # one item and its framing over
                server.reading.set()
                got = [x async for x in stream]
        assert len(got) == 200 and produced == 200


async def test_a_message_above_max_message_size_closes_with_1009() -> None:
    app = rpcstream.asgi.app(router, max_message_size=1000)
    async with open_app(app) as server, client(server) as peer:
        with pytest.raises(ConnectionClosed):
            await peer.call("echo", "x" * 2000)
        assert server.close_code == 1009


async def test_an_app_needing_start_refuses_with_503_until_its_lifespan_runs() -> None:
    runs = rpcstream.RunServer()
    app = rpcstream.asgi.app(runs)
    async with open_app(app) as server:
        assert server.status == 503 and b"lifespan" in server.body
    async with app.lifespan(), open_app(app) as server, client(server) as peer:
        assert await peer.call("rpcstream.ping") is None
    assert app.service.not_ready is not None


def test_scope_headers_compare_names_case_insensitively() -> None:
    headers = ScopeHeaders([(b"X-A", b"1"), (b"x-a", b"2"), (b"B", b"caf\xe9")])
    assert headers.get_all("x-A") == ["1", "2"]
    assert headers.get("b") == "café"  # Latin-1, as HTTP header bytes are
    assert "X-A" in headers and "c" not in headers
    assert headers.get("c", "none") == "none"
    with pytest.raises(LookupError):
        headers.get("x-a")  # repeated: ambiguous


def test_the_route_path_is_below_the_mount_point() -> None:
    assert route_target({"path": "/rpc/readyz", "root_path": "/rpc"}) == "/readyz"
    assert route_target({"path": "/rpc", "root_path": "/rpc"}) == "/"
    assert route_target({"path": "/rpcx/a", "root_path": "/rpc"}) == "/rpcx/a"
    assert route_target({"path": "/a", "query_string": b"x=1"}) == "/a?x=1"


async def run_http(app: Any, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    http_scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    await app(http_scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


async def test_http_serves_health_the_browser_module_and_refuses_other_methods() -> None:
    app = rpcstream.asgi.app(router)
    status, headers, body = await run_http(app, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = await run_http(app, "GET", "/readyz")
    assert (status, body) == (200, b"ready\n")
    status, headers, body = await run_http(app, "GET", "/rpcstream.js")
    assert status == 200 and headers[b"content-type"].startswith(b"text/javascript")
    status, headers, body = await run_http(app, "HEAD", "/rpcstream.js")
    assert status == 200 and body == b"" and int(headers[b"content-length"]) > 0
    status, headers, body = await run_http(app, "POST", "/healthz")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    status, headers, body = await run_http(app, "GET", "/nope")
    assert status == 404


async def test_the_transport_reports_the_disconnect_code_and_refuses_later_sends() -> None:
    events = [
        {"type": "websocket.receive", "text": "é"},
        {"type": "websocket.disconnect", "code": 1001},
    ]

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(event: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent after the disconnect")

    transport = AsgiTransport(receive, send, subprotocol=MSGPACK)
    assert await transport.receive() == "é".encode()
    with pytest.raises(ConnectionClosed) as info:
        await transport.receive()
    assert info.value.code == 1001 and transport.close_code == 1001
    with pytest.raises(ConnectionClosed):
        await transport.send(b"x", text=False)
    await transport.aclose()  # closed already: nothing to send


async def test_close_reasons_are_cut_to_fit_a_close_frame() -> None:
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    async def receive() -> dict[str, Any]:
        raise AssertionError

    transport = AsgiTransport(receive, send, subprotocol=MSGPACK)
    await transport.aclose(1011, "é" * 100)
    assert len(sent[0]["reason"].encode()) <= 123 and sent[0]["code"] == 1011
    await transport.aclose()  # once only
    assert len(sent) == 1


async def test_a_server_whose_send_fails_makes_sends_raise_connection_closed() -> None:
    async def send(event: dict[str, Any]) -> None:
        raise OSError("client disconnected")

    async def receive() -> dict[str, Any]:
        raise AssertionError

    transport = AsgiTransport(receive, send, subprotocol=MSGPACK)
    with pytest.raises(ConnectionClosed) as info:
        await transport.send(b"x", text=False)
    assert info.value.code == 1006


async def test_plain_http_answers_come_from_the_same_hook() -> None:
    async def on_request(request: Any) -> Any:
        assert not request.is_upgrade and request.path == "/x" and request.query == {"a": "1"}
        return rpcstream.HttpResponse(201, b"made", "text/plain")

    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    async def receive() -> dict[str, Any]:
        raise AssertionError

    http_scope = {"type": "http", "method": "GET", "path": "/x", "query_string": b"a=1"}
    await serve_asgi_http(http_scope, receive, send, on_request)
    assert sent[0]["status"] == 201 and sent[1]["body"] == b"made"
