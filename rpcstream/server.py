"""serve(): accept WebSocket connections and run an RpcPeer on each.

One code path for both event loops: websockets' ``asyncio`` or ``trio`` server
does the handshake, ping/pong and closing; each accepted connection becomes a
:class:`WebSocketTransport` under an :class:`RpcPeer` that lives as long as it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl as ssl_module
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import anyio
from websockets.protocol import State

from ._backend import is_trio
from ._tasks import task_group
from .handshake import (
    Authenticate,
    Refused,
    StaticFile,
    _principal,
    builtin_routes,
    is_upgrade,
    parse_request,
    principal_id,
    refuse,
    respond,
    run_authenticate,
)
from .messages import CODECS, Codec
from .peer import RpcPeer
from .protocol import Side
from .router import Router
from .transport.websocket import WebSocketTransport, websockets_options

__all__ = ["App", "Server", "serve"]

log = logging.getLogger("rpcstream.server")


@runtime_checkable
class App(Protocol):
    """Anything that serves like a :class:`Router`: it has a ``router``, and may
    want to know when connections come and go (``RunServer`` does)."""

    @property
    def router(self) -> Router:
        """The methods served."""
        ...


class Server:
    """A running server: its address and its live connections."""

    def __init__(self, router: Router, host: str, *, secure: bool = False) -> None:
        self.router = router
        self.host = host
        self.secure = secure
        self.port = 0
        self.peers: set[RpcPeer] = set()
        self.connections_accepted = 0
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def url(self) -> str:
        """``ws://host:port`` to connect to (``wss://`` when serving TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}"

    async def wait_idle(self) -> None:
        """Wait until no connection is open (every handler finished its clean-up)."""
        await self._idle.wait()

    def _add(self, peer: RpcPeer) -> None:
        if not self.peers:
            self._idle = anyio.Event()
        self.peers.add(peer)

    def _remove(self, peer: RpcPeer) -> None:
        self.peers.discard(peer)
        if not self.peers:
            self._idle.set()

    @property
    def stats(self) -> dict[str, int]:
        """Live connections, and the sum of their peers' counts (calls, handlers,
        streams, tasks): all zero once every connection is closed."""
        totals = {"connections": len(self.peers), "tasks": 0}
        for peer in list(self.peers):
            for k, v in peer.stats.items():
                totals[k] = totals.get(k, 0) + v
        return totals


def _router_of(app: Router | App) -> Router:
    if isinstance(app, Router):
        return app
    return app.router


@contextlib.asynccontextmanager
async def serve(
    app: Router | App,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    codecs: Sequence[Codec] | None = None,
    max_message_size: int = 4 * 1024 * 1024,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float | None = None,
    open_timeout: float | None = 10.0,
    compression: str | None = None,
    authenticate: Authenticate | None = None,
    max_connections_per_principal: int | None = None,
    routes: Mapping[str, StaticFile] | None = None,
    serve_client: bool = True,
    origins: Sequence[str | None] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    **peer_options: Any,
) -> AsyncIterator[Server]:
    """Serve ``app`` (a :class:`Router`, or a ``RunServer``) on ``host:port``.

    ``port=0`` picks a free port (``server.port``, ``server.url``). Leaving the
    ``async with`` block closes every connection. Heartbeats: a ping every
    ``ping_interval`` s; a peer whose pong is ``ping_timeout`` s late is dead, and
    its connection closes (within ``close_timeout``, default ``ping_timeout``).
    ``peer_options`` go to each :class:`RpcPeer` (``max_concurrent_handlers``,
    windows, ...).

    ``authenticate(request)`` sees each upgrade request (a
    :class:`HandshakeRequest`) and returns the connection's principal, or
    ``None``/raises :class:`Refused` to answer HTTP 401/403 before the upgrade;
    handlers read the principal with :func:`current_principal`.
    ``max_connections_per_principal`` answers HTTP 429 beyond it. Plain HTTP
    ``GET`` requests are answered from ``routes`` (path -> :class:`StaticFile`),
    the app's ``http_routes`` and, unless ``serve_client=False``, the browser
    module at ``/rpcstream.js``; other plain requests get 404. ``origins`` lists the
    ``Origin`` headers accepted on upgrades (``None`` in it: no header), against
    cross-site WebSocket hijacking when browsers authenticate with cookies;
    by default any origin is accepted.
    Compression stays off unless ``compression="deflate"``: it costs far more
    CPU than it saves on a LAN. ``ssl`` (a server-side ``ssl.SSLContext``)
    serves ``wss://``.
    """
    router = _router_of(app)
    server = Server(router, host, secure=ssl is not None)
    http_routes: dict[str, StaticFile] = builtin_routes() if serve_client else {}
    http_routes.update(getattr(app, "http_routes", None) or {})
    http_routes.update(routes or {})
    per_principal: dict[str | None, int] = {}

    async def process_request(connection: Any, request: Any) -> Any:
        if not is_upgrade(request):
            route = http_routes.get(urllib.parse.urlsplit(request.path).path)
            if route is not None:
                return respond(200, route.body, route.content_type)
            return refuse(404, "not found (this is an rpcstream WebSocket endpoint)")
        if authenticate is None:
            return None
        handshake = parse_request(request, getattr(connection, "remote_address", None))
        try:
            principal = await run_authenticate(authenticate, handshake)
        except Refused as exc:
            return refuse(exc.status, exc.message)
        except Exception:
            log.exception("authenticate() failed")
            return refuse(500, "authentication failed")
        if principal is None:
            return refuse(401, "unauthorized")
        limit = max_connections_per_principal
        if limit is not None and per_principal.get(principal_id(principal), 0) >= limit:
            return refuse(429, f"too many connections for this principal (max {limit})")
        connection.rpcstream_principal = principal
        return None

    offered = list(codecs) if codecs else list(CODECS.values())
    subprotocols = [c.subprotocol for c in offered]
    by_name = {c.subprotocol: c for c in offered}

    async def handler(ws: Any) -> None:
        codec = by_name.get(ws.subprotocol) if ws.subprotocol else None
        if codec is None:
            await ws.close(1002, f"no rpcstream subprotocol; offer one of {subprotocols}")
            return
        server.connections_accepted += 1
        principal = getattr(ws, "rpcstream_principal", None)
        pid = principal_id(principal)
        per_principal[pid] = per_principal.get(pid, 0) + 1
        # Handler tasks and flows started from them inherit this context.
        token = _principal.set(principal)
        peer = RpcPeer(
            WebSocketTransport(ws),
            router=router,
            codec=codec,
            side=Side.ACCEPTING,
            **peer_options,
        )
        peer.principal = principal
        server._add(peer)
        try:
            async with peer:
                await peer.wait_closed()
        finally:
            # The peer's task group has ended: every task it started is done.
            server._remove(peer)
            _principal.reset(token)
            left = per_principal[pid] - 1
            if left:
                per_principal[pid] = left
            else:
                del per_principal[pid]

    def select_subprotocol(connection: Any, offered_by_client: Sequence[str]) -> str | None:
        for name in offered_by_client:
            if name in by_name:
                return name
        return None

    options: dict[str, Any] = {
        "subprotocols": subprotocols,
        "select_subprotocol": select_subprotocol,
        **websockets_options(
            compression=compression,
            max_message_size=max_message_size,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            open_timeout=open_timeout,
        ),
        "process_request": process_request,
        "origins": list(origins) if origins is not None else None,
        "ssl": ssl,
    }
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(app, contextlib.AbstractAsyncContextManager):
            await stack.enter_async_context(app)  # a RunServer starts its store and runs
        async with _listen(handler, host, port, options, server):
            yield server


@contextlib.asynccontextmanager
async def _listen(
    handler: Any, host: str, port: int, options: dict[str, Any], server: Server
) -> AsyncIterator[None]:
    if is_trio():
        import trio
        from websockets.trio.server import serve as trio_serve

        from .transport.trio_fix import ReadNeverWaitsServerConnection

        opening: weakref.WeakSet[Any] = weakref.WeakSet()

        def create_trio(*args: Any, **kwargs: Any) -> ReadNeverWaitsServerConnection:
            connection = ReadNeverWaitsServerConnection(*args, **kwargs)
            opening.add(connection)
            return connection

        options = dict(options, create_connection=create_trio)

        async def trio_handler(ws: Any) -> None:
            ws.close = ws.aclose  # the same name on both loops, for handler()
            await handler(ws)

        async with task_group() as tg:
            ws_server = await tg.start(
                functools.partial(trio_serve, trio_handler, port, host=host, **options)
            )
            server.port = ws_server.listeners[0].socket.getsockname()[1]
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    for connection in _idle(opening):
                        await trio.aclose_forcefully(connection.stream)  # no TLS goodbye
                    await ws_server.aclose()
                tg.cancel_scope.cancel()
    else:
        from websockets.asyncio.server import serve as asyncio_serve

        from .transport.asyncio_push import PushServerConnection

        opening = weakref.WeakSet()

        def create_asyncio(*args: Any, **kwargs: Any) -> PushServerConnection:
            connection = PushServerConnection(*args, **kwargs)
            opening.add(connection)
            return connection

        options = dict(options, create_connection=create_asyncio)
        async with asyncio_serve(handler, host, port, **options) as ws_server:
            server.port = ws_server.sockets[0].getsockname()[1]
            try:
                yield
            finally:
                for connection in _idle(opening):
                    if getattr(connection, "transport", None) is not None:  # TLS: set once it is up
                        connection.transport.abort()
                ws_server.close()
                with anyio.CancelScope(shield=True):
                    await ws_server.wait_closed()


def _idle(connections: weakref.WeakSet[Any]) -> list[Any]:
    """Connections that never sent their opening request: browsers open such
    sockets ahead of need. Closing the server would otherwise wait for each
    one's ``open_timeout``; they have nothing to finish, so they are dropped."""
    return [
        c
        for c in list(connections)
        if c.protocol.state is State.CONNECTING and getattr(c, "request", None) is None
    ]
