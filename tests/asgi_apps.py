"""ASGI apps that tests serve from uvicorn and hypercorn subprocesses.

- ``rpc``: :func:`rpcstream.asgi.app` of a ``RunServer`` (memory store) with
  methods, streams both ways, a ``ticks`` flow, and ``authenticate`` (a bearer
  token: the principal is the token; ``bad`` is forbidden). Served on its own,
  the ASGI server's lifespan events start it.
- ``site``: a Starlette app with ``rpc`` mounted at ``/rpc`` (``Mount``) and at
  ``/ws`` (``WebSocketRoute``), plain routes at ``/hello`` and ``/page``, and a lifespan that
  starts ``rpc`` (mounted apps get no lifespan events of their own).
- ``redis_rpc``: ``rpc``'s router on a ``RedisStore`` at ``$REDIS_URL``, to see
  ``/readyz`` fail when Redis is gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute

import rpcstream
import rpcstream.asgi

router = rpcstream.Router()


@router.method
async def echo(value: object) -> object:
    """Return what it was given."""
    return value


@router.method
async def whoami() -> object:
    """The principal ``authenticate`` returned for this connection."""
    return rpcstream.current_principal()


@router.method
async def count(n: int) -> AsyncIterator[int]:
    """Stream 0..n-1 to the caller."""
    for i in range(n):
        yield i


@router.method
async def total(xs: AsyncIterator[int]) -> int:
    """Sum a stream the caller sends."""
    return sum([x async for x in xs])


@router.method
async def doubled(xs: AsyncIterator[int]) -> AsyncIterator[int]:
    """Streams both ways at once: each item back, doubled."""
    async for x in xs:
        yield 2 * x


def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
    """The bearer token is the principal; ``bad`` is forbidden; none is refused (401)."""
    token = request.bearer_token
    if token == "bad":
        raise rpcstream.Refused("forbidden", 403)
    return token


def make_runs(store: rpcstream.EventStore | None = None) -> rpcstream.RunServer:
    """A RunServer with ``router``'s methods and a ``ticks`` flow."""
    runs = rpcstream.RunServer(store, router=router)

    @runs.flow("ticks")
    async def ticks(
        ctx: rpcstream.RunContext, n: int, delay: float = 0.0, hold_at: tuple[int, ...] = ()
    ) -> dict[str, int]:
        for i in range(n):
            event_id = await ctx.client.send("tick", i)
            if event_id in hold_at:  # held where a test cuts, until it says go for it
                while (await ctx.client.receive()).data != event_id:
                    pass  # a go for an earlier hold, sent twice
            if delay:
                await anyio.sleep(delay)
        return {"ticks": n}

    return runs


rpc = rpcstream.asgi.app(make_runs(), authenticate=authenticate)


async def hello(request: Request) -> PlainTextResponse:
    """A plain Starlette route beside rpcstream."""
    return PlainTextResponse("hello from starlette")


async def page(request: Request) -> HTMLResponse:
    """A blank page for the browser tests, which import ``/rpc/rpcstream.js``."""
    return HTMLResponse("<!doctype html><title>rpcstream under ASGI</title>")


_mounted = rpcstream.asgi.app(make_runs(), authenticate=authenticate)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    async with _mounted.lifespan():
        yield


site = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/page", page),
        WebSocketRoute("/ws", _mounted),
        Mount("/rpc", app=_mounted),
    ],
    lifespan=_lifespan,
)


def _redis_app() -> rpcstream.asgi.AsgiApp:
    from rpcstream.store.redis import RedisStore

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    store = RedisStore(url, prefix="asgi-test:", command_timeout=2.0)
    return rpcstream.asgi.app(make_runs(store))


redis_rpc = _redis_app() if os.environ.get("REDIS_URL") else None
