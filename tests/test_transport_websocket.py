"""Opening a WebSocket: a failure says why in words, the same on asyncio and trio."""

from __future__ import annotations

import socket

import anyio
import pytest

import rpcstream
from rpcstream.transport.websocket import describe_failure

pytestmark = pytest.mark.anyio


async def test_wss_against_a_plain_server_says_the_tls_handshake_failed() -> None:
    async with rpcstream.serve(rpcstream.Router()) as server:
        url = server.url.replace("ws://", "wss://")
        with anyio.fail_after(10), pytest.raises(rpcstream.ConnectionClosed) as info:
            async with rpcstream.connect(url):
                pass
    assert "TLS handshake (a plain ws:// server?)" in info.value.reason
    assert "sub-exception" not in info.value.reason


async def test_a_dead_port_says_connection_refused_without_exception_groups() -> None:
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with anyio.fail_after(10), pytest.raises(rpcstream.ConnectionClosed) as info:
        async with rpcstream.connect(f"ws://127.0.0.1:{port}"):
            pass
    assert info.value.code == 1006
    assert info.value.reason == f"cannot connect to ws://127.0.0.1:{port}: Connection refused"


def test_the_words_come_from_the_leaves_of_a_group_or_a_chain() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    group = ExceptionGroup("all attempts to connect failed", [refused, refused])
    assert describe_failure(OSError("all attempts failed"), secure=False) == "all attempts failed"
    wrapped = OSError("")
    wrapped.__cause__ = group
    assert describe_failure(wrapped, secure=False) == "Connection refused"
    assert describe_failure(ConnectionResetError(), secure=True).startswith("the server closed")
