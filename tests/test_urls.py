"""rpcstream.urls: the URLs people type, made into ws:// and wss:// URLs (or a clear error)."""

from __future__ import annotations

import re

import pytest

import rpcstream
from rpcstream.urls import websocket_url
from tests.apps import router


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765"),
        ("wss://example.com/rpc?x=1", "wss://example.com/rpc?x=1"),
        ("http://127.0.0.1:8765", "ws://127.0.0.1:8765"),
        ("HTTPS://example.com:8443/rpc", "wss://example.com:8443/rpc"),
        ("127.0.0.1:8765", "ws://127.0.0.1:8765"),
        ("localhost:8765/rpc", "ws://localhost:8765/rpc"),
        ("[::1]:8765", "ws://[::1]:8765"),
        ("  ws://h:1  ", "ws://h:1"),
        ("ws://user:pw@h:1", "ws://user:pw@h:1"),
    ],
)
def test_http_https_and_bare_host_port_become_ws_and_wss(given: str, used: str) -> None:
    assert websocket_url(given) == used


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "empty server URL"),
        ("ftp://h:1", "scheme 'ftp' is not ws, wss, http or https"),
        ("ws://127.0.0.1:99999", "Port out of range"),
        ("localhost:http", "invalid server URL 'localhost:http'"),
        ("ws://[::1", "Invalid IPv6 URL"),
        ("ws://", "no host name"),
        ("ws://h:1/#top", "fragment"),
        ("ws://user@h:1", "needs a password"),
        ("ws://h:0", "port 0"),
    ],
)
def test_a_url_no_server_can_have_is_a_value_error_saying_why(given: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        websocket_url(given)


def test_a_url_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not bytes"):
        websocket_url(b"ws://h:1")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_connect_accepts_an_http_url_and_a_bare_host_port() -> None:
    async with rpcstream.serve(router, "127.0.0.1", 0) as server:
        port = server.port
        for url in (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
            async with rpcstream.connect(url) as peer:
                assert await peer.call("echo", url) == url


@pytest.mark.anyio
async def test_connect_refuses_a_url_it_cannot_use_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        async with rpcstream.connect("ftp://127.0.0.1:1"):
            pass
