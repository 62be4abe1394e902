"""connect(): open a WebSocket to an rpcstream server and run an RpcPeer on it."""

from __future__ import annotations

import contextlib
import ssl as ssl_module
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .errors import ConnectionClosed
from .messages import JSON, MSGPACK, Codec
from .peer import RpcPeer
from .protocol import Side
from .router import Router
from .transport import WebSocketOptions, open_websocket
from .urls import websocket_url

__all__ = ["connect"]

_CODECS = {"msgpack": MSGPACK, "json": JSON}


@contextlib.asynccontextmanager
async def connect(
    url: str,
    *,
    router: Router | None = None,
    codec: str | Codec = "msgpack",
    token: str | None = None,
    headers: dict[str, str] | Sequence[tuple[str, str]] | None = None,
    max_message_size: int = 4 * 1024 * 1024,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float | None = None,
    open_timeout: float | None = 10.0,
    compression: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
    **peer_options: Any,
) -> AsyncIterator[RpcPeer]:
    """Connect to ``url`` (``ws://host:port``) and yield the :class:`RpcPeer`.

    ``router`` holds the methods the server may call back. ``codec`` is
    ``"msgpack"`` (binary, the default) or ``"json"`` (text). ``token`` is sent
    as ``Authorization: Bearer <token>``. The connection closes when the block
    ends; if it drops earlier, pending calls raise :class:`ConnectionClosed`.
    Heartbeats as in :func:`rpcstream.serve`: a server that stops answering
    pings is noticed within ``ping_interval + ping_timeout + close_timeout``.
    A ``wss://`` URL uses TLS, verified against the system's CAs unless ``ssl``
    (a client-side ``ssl.SSLContext``) says otherwise. ``http://`` and
    ``https://`` URLs, and a bare ``host:port``, mean ``ws://`` and ``wss://``
    (:func:`rpcstream.urls.websocket_url`); any other URL is a ``ValueError``.
    """
    url = websocket_url(url)
    if isinstance(codec, str):
        if codec not in _CODECS:
            raise ValueError(f"unknown codec {codec!r}: expected 'msgpack' or 'json'")
        codec = _CODECS[codec]
    extra: list[tuple[str, str]] = list(
        headers.items() if isinstance(headers, dict) else headers or []
    )
    if token is not None:
        extra.append(("Authorization", f"Bearer {token}"))
    options = WebSocketOptions(
        max_message_size=max_message_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        open_timeout=open_timeout,
        compression=compression,
    )
    async with open_websocket(
        url, subprotocol=codec.subprotocol, options=options, headers=extra, ssl=ssl
    ) as transport:
        if transport.subprotocol != codec.subprotocol:
            raise ConnectionClosed(1002, f"server did not accept {codec.subprotocol}")
        async with RpcPeer(
            transport, router=router, codec=codec, side=Side.CONNECTING, **peer_options
        ) as peer:
            yield peer
