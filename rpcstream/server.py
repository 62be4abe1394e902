"""serve(): accept WebSocket connections and run an RpcPeer on each.

One code path for both event loops: the transport's server (websockets' on the
running loop) does the handshake, ping/pong and closing, and asks
:func:`serve`'s ``on_request`` about each HTTP request first; each accepted
connection is a transport under an :class:`RpcPeer` that lives as long as it.
"""

from __future__ import annotations

import contextlib
import logging
import ssl as ssl_module
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import anyio

from .handshake import (
    Authenticate,
    Refused,
    Route,
    StaticFile,
    _principal,
    builtin_routes,
    parse_request,
    principal_id,
    refuse,
    respond,
    run_authenticate,
)
from .messages import CODECS, Codec
from .observe import hooks
from .peer import RpcPeer
from .protocol import Side
from .router import Router
from .transport import (
    HttpRequest,
    HttpResponse,
    Transport,
    Upgrade,
    WebSocketOptions,
    serve_websocket,
)

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
    routes: Mapping[str, Route] | None = None,
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
    ``GET`` requests are answered from ``routes`` (path -> :class:`StaticFile`, or
    an async function of the :class:`HandshakeRequest` that returns an
    :class:`HttpResponse`),
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
    http_routes: dict[str, Route] = {**builtin_routes()} if serve_client else {}
    http_routes.update(getattr(app, "http_routes", None) or {})
    http_routes.update(routes or {})
    per_principal: dict[str | None, int] = {}

    options = WebSocketOptions(
        max_message_size=max_message_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        open_timeout=open_timeout,
        compression=compression,
    )

    async def on_request(request: HttpRequest) -> HttpResponse | Upgrade:
        if not request.is_upgrade:
            route = http_routes.get(request.path)
            if isinstance(route, StaticFile):
                return respond(200, route.body, route.content_type)
            if route is not None:
                try:
                    return await route(parse_request(request))
                except Exception:
                    log.exception("HTTP route %s failed", request.path)
                    return refuse(500, "internal error")
            return refuse(404, "not found (this is an rpcstream WebSocket endpoint)")
        if authenticate is None:
            return Upgrade()
        try:
            principal = await run_authenticate(authenticate, parse_request(request))
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
        return Upgrade(principal)

    offered = list(codecs) if codecs else list(CODECS.values())
    subprotocols = [c.subprotocol for c in offered]
    by_name = {c.subprotocol: c for c in offered}

    async def handler(transport: Transport, principal: Any) -> None:
        codec = by_name.get(transport.subprotocol) if transport.subprotocol else None
        if codec is None:
            await transport.aclose(1002, f"no rpcstream subprotocol; offer one of {subprotocols}")
            return
        server.connections_accepted += 1
        pid = principal_id(principal)
        per_principal[pid] = per_principal.get(pid, 0) + 1
        # Handler tasks and flows started from them inherit this context.
        token = _principal.set(principal)
        peer = RpcPeer(
            transport,
            router=router,
            codec=codec,
            side=Side.ACCEPTING,
            **peer_options,
        )
        peer.principal = principal
        server._add(peer)
        opened = hooks.connection_opened(peer)  # observe
        try:
            async with peer:
                await peer.wait_closed()
        finally:
            # The peer's task group has ended: every task it started is done.
            hooks.connection_closed(peer, opened)  # observe
            server._remove(peer)
            _principal.reset(token)
            left = per_principal[pid] - 1
            if left:
                per_principal[pid] = left
            else:
                del per_principal[pid]

    async with contextlib.AsyncExitStack() as stack:
        if isinstance(app, contextlib.AbstractAsyncContextManager):
            await stack.enter_async_context(app)  # a RunServer starts its store and runs
        async with serve_websocket(
            handler,
            hooks.reporting_refusals(on_request),  # observe: a line per refused upgrade
            host,
            port,
            subprotocols=subprotocols,
            options=options,
            origins=origins,
            ssl=ssl,
        ) as bound:
            server.port = bound
            yield server
