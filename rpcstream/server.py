"""serve(): accept WebSocket connections and run an RpcPeer on each.

One code path for both event loops: the transport's server (websockets' on the
running loop) does the handshake, ping/pong and closing, and asks
:func:`serve`'s ``on_request`` about each HTTP request first; each accepted
connection is a transport under an :class:`RpcPeer` that lives as long as it.

:class:`Service` is that hook and that handler; the ASGI app
(:mod:`rpcstream.asgi`) drives the same :class:`Service` from ASGI events, so
both ways to serve refuse, route and count connections alike.
"""

from __future__ import annotations

import contextlib
import logging
import ssl as ssl_module
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import anyio

from .errors import Refused
from .handshake import (
    Authenticate,
    HandshakeRequest,
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
from .store.base import EventStore
from .transport import (
    HttpRequest,
    HttpResponse,
    Transport,
    Upgrade,
    WebSocketOptions,
    serve_websocket,
)

__all__ = ["App", "Server", "Service", "serve"]

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


READINESS_TIMEOUT = 5.0
"""Seconds ``/readyz`` waits for the store's answer before it reports 503."""


class Service:
    """What :func:`serve` and the ASGI app (:func:`rpcstream.asgi.app`) share:
    the answer to each HTTP request before an upgrade (routes, ``/healthz``,
    ``/readyz``, origins, ``authenticate``, per-principal limits) and the
    :class:`RpcPeer` run on each accepted connection, counted in ``server``.

    The transports call :meth:`on_request` and :meth:`handler`; the arguments
    are :func:`serve`'s, documented there.
    """

    def __init__(
        self,
        app: Router | App,
        server: Server,
        *,
        codecs: Sequence[Codec] | None = None,
        max_message_size: int | None = 4 * 1024 * 1024,
        authenticate: Authenticate | None = None,
        max_connections_per_principal: int | None = None,
        routes: Mapping[str, Route] | None = None,
        serve_client: bool = True,
        origins: Sequence[str | None] | None = None,
        peer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.router = _router_of(app)
        self.server = server
        self.max_message_size = max_message_size
        self.authenticate = authenticate
        self.max_connections_per_principal = max_connections_per_principal
        self.origins = None if origins is None else set(origins)
        self.peer_options = dict(peer_options or {})
        self.http_routes: dict[str, Route] = {"/healthz": self._healthz, "/readyz": self._readyz}
        if serve_client:
            self.http_routes.update(builtin_routes())
        self.http_routes.update(getattr(app, "http_routes", None) or {})
        self.http_routes.update(routes or {})
        offered = list(codecs) if codecs else list(CODECS.values())
        self.subprotocols = [c.subprotocol for c in offered]
        self._by_name = {c.subprotocol: c for c in offered}
        self._per_principal: dict[str | None, int] = {}
        self.not_ready: str | None = None
        """Why connections are refused (503) and ``/readyz`` fails, if they are:
        the ASGI app sets it until its lifespan has started the app."""

    async def _healthz(self, request: HandshakeRequest) -> HttpResponse:
        """Alive: the process answers HTTP at all."""
        return respond(200, b"ok\n", "text/plain; charset=utf-8")

    async def _readyz(self, request: HandshakeRequest) -> HttpResponse:
        """Ready: started, and the app's event store (if it has one) answers."""
        problem = await self.check_ready()
        if problem is not None:
            return refuse(503, problem)
        return respond(200, b"ready\n", "text/plain; charset=utf-8")

    async def check_ready(self) -> str | None:
        """``None`` when ready, else why not (:attr:`not_ready`, or that the
        store failed: its error is logged, not told to whoever asks)."""
        if self.not_ready is not None:
            return self.not_ready
        store = getattr(self.app, "store", None)
        if not isinstance(store, EventStore):
            return None  # a plain Router keeps no state: always ready
        try:
            with anyio.fail_after(READINESS_TIMEOUT):
                await store.check()
        except TimeoutError:
            log.warning("readiness check: the store did not answer within %s s", READINESS_TIMEOUT)
            return "store unavailable"
        except Exception as exc:  # StoreUnavailable, a closed store, a backend's own error
            log.warning("readiness check: the store failed: %s", exc)
            return "store unavailable"
        return None

    async def on_request(self, request: HttpRequest) -> HttpResponse | Upgrade:
        """Answer a plain request from the routes; refuse an upgrade (403 origin,
        401/403 ``authenticate``, 429 limit, 503 not started) or let it through
        with the principal. Each refused upgrade is logged and reported once."""
        answer = await self._answer(request)
        if request.is_upgrade and isinstance(answer, HttpResponse):  # observe
            hooks.handshake_refused(answer.status, _reason(answer), request.remote_address)
        return answer

    async def _answer(self, request: HttpRequest) -> HttpResponse | Upgrade:
        if not request.is_upgrade:
            route = self.http_routes.get(request.path)
            if isinstance(route, StaticFile):
                return respond(200, route.body, route.content_type)
            if route is not None:
                try:
                    return await route(parse_request(request))
                except Exception:
                    log.exception("HTTP route %s failed", request.path)
                    return refuse(500, "internal error")
            return refuse(404, "not found (this is an rpcstream WebSocket endpoint)")
        if self.origins is not None:
            origin = request.headers.get_all("Origin")
            if len(origin) > 1:
                return refuse(400, "more than one Origin header")
            if (origin[0] if origin else None) not in self.origins:
                return refuse(403, "origin not allowed")
        if self.not_ready is not None:
            return refuse(503, self.not_ready)
        authenticate = self.authenticate
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
        limit = self.max_connections_per_principal
        if limit is not None and self._per_principal.get(principal_id(principal), 0) >= limit:
            return refuse(429, f"too many connections for this principal (max {limit})")
        return Upgrade(principal)

    async def handler(self, transport: Transport, principal: Any) -> None:
        """Run an :class:`RpcPeer` on an accepted connection until it closes."""
        codec = self._by_name.get(transport.subprotocol) if transport.subprotocol else None
        if codec is None:
            await transport.aclose(
                1002, f"no rpcstream subprotocol; offer one of {self.subprotocols}"
            )
            return
        server, per_principal = self.server, self._per_principal
        server.connections_accepted += 1
        pid = principal_id(principal)
        per_principal[pid] = per_principal.get(pid, 0) + 1
        # Handler tasks and flows started from them inherit this context.
        token = _principal.set(principal)
        peer = RpcPeer(
            transport,
            router=self.router,
            codec=codec,
            side=Side.ACCEPTING,
            **self.peer_options,
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


def _reason(response: HttpResponse) -> str:
    text = response.body.decode("utf-8", "replace").strip()
    return text[:200] if text else response.reason


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
    the app's ``http_routes``, ``/healthz`` (200 while the process serves),
    ``/readyz`` (200 when the app's store answers :meth:`EventStore.check
    <rpcstream.store.EventStore.check>`, else 503; a plain Router is always
    ready) and, unless ``serve_client=False``, the browser module at
    ``/rpcstream.js``; other plain requests get 404 (``routes`` may replace
    any of these). ``origins`` lists the
    ``Origin`` headers accepted on upgrades (``None`` in it: no header), against
    cross-site WebSocket hijacking when browsers authenticate with cookies;
    by default any origin is accepted.
    Compression stays off unless ``compression="deflate"``: it costs far more
    CPU than it saves on a LAN. ``ssl`` (a server-side ``ssl.SSLContext``)
    serves ``wss://``.
    """
    server = Server(_router_of(app), host, secure=ssl is not None)
    service = Service(
        app,
        server,
        codecs=codecs,
        max_message_size=max_message_size,
        authenticate=authenticate,
        max_connections_per_principal=max_connections_per_principal,
        routes=routes,
        serve_client=serve_client,
        origins=origins,
        peer_options=peer_options,
    )
    options = WebSocketOptions(
        max_message_size=max_message_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        open_timeout=open_timeout,
        compression=compression,
    )
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(app, contextlib.AbstractAsyncContextManager):
            await stack.enter_async_context(app)  # a RunServer starts its store and runs
        async with serve_websocket(
            service.handler,
            service.on_request,
            host,
            port,
            subprotocols=service.subprotocols,
            options=options,
            ssl=ssl,
        ) as bound:
            server.port = bound
            yield server
