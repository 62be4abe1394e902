"""Serve an rpcstream app as an ASGI 3 application: under uvicorn, hypercorn or
gunicorn's uvicorn workers, alone or mounted in Starlette and FastAPI.

::

    import rpcstream.asgi

    rpc = rpcstream.asgi.app(runs, authenticate=check_token)
    # uvicorn module:rpc            or, mounted under /rpc:
    # Starlette(routes=[Mount("/rpc", app=rpc)], lifespan=lambda _: rpc.lifespan())

:func:`app` returns an :class:`AsgiApp`, which serves the same protocol as
:func:`rpcstream.serve` through the same :class:`~rpcstream.server.Service`:

- ``websocket`` scopes (any path): the ``Origin`` check, ``authenticate``
  (reading the scope's headers, query string and client address),
  ``max_connections_per_principal``, then the connection is accepted with the
  first subprotocol the client offers among the codecs' and served by an
  :class:`~rpcstream.RpcPeer`; handlers see :func:`~rpcstream.current_principal`.
  Refusals (401/403/429/503) answer with their HTTP status where the server
  has the ASGI ``websocket.http.response`` extension (uvicorn and hypercorn
  do); elsewhere the connection is closed before ``accept`` with 1008, which
  the server answers with HTTP 403.
- ``http`` scopes: ``GET``/``HEAD`` of the routes, ``/healthz``, ``/readyz``
  and the browser module (``/rpcstream.js`` and ``/rpcstream/*.js``), at paths
  below the mount point.
- ``lifespan``: enters the app (a ``RunServer`` starts its store, its sweeper,
  and ends its runs on shutdown). Starlette and FastAPI do not pass lifespan
  events to mounted apps: enter :meth:`AsgiApp.lifespan` from the parent's own
  lifespan instead. Until the app is started, upgrades and ``/readyz`` answer 503.

What the ASGI server does instead of rpcstream: the WebSocket handshake,
heartbeat pings (uvicorn ``--ws-ping-interval``/``--ws-ping-timeout``, 20 s by
default; hypercorn ``websocket_ping_interval``, off by default), the message
size limit (uvicorn ``--ws-max-size``, hypercorn ``websocket_max_message_size``,
16 MiB by default: the server buffers a whole message before the app sees it;
the app then also closes with 1009 above ``max_message_size``), UTF-8 checks of
text messages (1007), compression (uvicorn offers permessage-deflate unless
``--ws-per-message-deflate false``), TLS and the open and close timeouts. The
``rpcstream.ping`` method answers as on any connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from .handshake import Authenticate, Route
from .messages import Codec
from .router import Router
from .server import App, Server, Service, _router_of
from .transport.asgi import Receive, Scope, Send, serve_asgi_http, serve_asgi_websocket

__all__ = ["AsgiApp", "app"]

_NOT_STARTED = (
    "not started: the ASGI server sent no lifespan events (a mounted app gets none); "
    "enter AsgiApp.lifespan() in the parent app's lifespan"
)


class AsgiApp:
    """An ASGI 3 application serving one rpcstream app (see the module docstring).

    ``server`` counts its connections as :func:`rpcstream.serve`'s
    :class:`~rpcstream.server.Server` does (``stats``, ``wait_idle()``, ``peers``);
    it has no address of its own.
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.server: Server = service.server
        self._needs_start = isinstance(service.app, contextlib.AbstractAsyncContextManager)
        self._started = False
        if self._needs_start:
            service.not_ready = _NOT_STARTED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        kind = scope.get("type")
        service = self.service
        if kind == "websocket":
            await serve_asgi_websocket(
                scope,
                receive,
                send,
                on_request=service.on_request,
                handler=service.handler,
                subprotocols=service.subprotocols,
                max_message_size=service.max_message_size,
            )
        elif kind == "http":
            await serve_asgi_http(scope, receive, send, service.on_request)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"rpcstream's ASGI app serves no {kind!r} scope")

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[AsgiApp]:
        """Start the app for the block (a ``RunServer``: its store and runs),
        and end it on the way out; nothing to do for a plain :class:`Router`.

        The ASGI server's lifespan events do this when the app is served on its
        own; a parent app (Starlette, FastAPI) enters it from its own lifespan.
        """
        started = self.service.app
        if not isinstance(started, contextlib.AbstractAsyncContextManager):
            yield self
            return
        if self._started:
            raise RuntimeError("this rpcstream ASGI app is started already")
        self._started = True
        try:
            async with started:
                self.service.not_ready = None
                try:
                    yield self
                finally:
                    self.service.not_ready = "shutting down"
        finally:
            self._started = False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol: start on ``startup``, stop on ``shutdown``."""
        async with contextlib.AsyncExitStack() as stack:
            while True:
                event = await receive()
                kind = event.get("type")
                if kind == "lifespan.startup":
                    try:
                        await stack.enter_async_context(self.lifespan())
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    try:
                        await stack.aclose()
                    except Exception as exc:
                        await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.shutdown.complete"})
                    return


def app(
    app: Router | App,
    *,
    codecs: Sequence[Codec] | None = None,
    max_message_size: int | None = 4 * 1024 * 1024,
    authenticate: Authenticate | None = None,
    max_connections_per_principal: int | None = None,
    routes: Mapping[str, Route] | None = None,
    serve_client: bool = True,
    origins: Sequence[str | None] | None = None,
    **peer_options: Any,
) -> AsgiApp:
    """An ASGI 3 application serving ``app`` (a :class:`Router` or a ``RunServer``).

    The options are :func:`rpcstream.serve`'s, with the same meaning; those that
    belong to the socket (ping, timeouts, compression, TLS) are the ASGI
    server's own settings instead (see the module docstring). ``peer_options``
    go to each :class:`~rpcstream.RpcPeer` (``max_buffered_amount``,
    ``max_concurrent_handlers``, windows, ``call_rate``...).
    """
    service = Service(
        app,
        Server(_router_of(app), ""),
        codecs=codecs,
        max_message_size=max_message_size,
        authenticate=authenticate,
        max_connections_per_principal=max_connections_per_principal,
        routes=routes,
        serve_client=serve_client,
        origins=origins,
        peer_options=peer_options,
    )
    return AsgiApp(service)
