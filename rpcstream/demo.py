"""The demo behind ``make demo`` / ``rpcstream demo``: a server and a client
calling each other over a real WebSocket, printing what happens."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from . import Router, connect, current_peer, serve

__all__ = ["run_demo"]


def _server_router() -> Router:
    router = Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def greet(name: str) -> str:
        # Call the client back while its call to us is still pending.
        shout = await current_peer().call("shout", f"hello, {name}")
        return f"server says: {shout}"

    @router.method
    async def tokens(text: str) -> AsyncIterator[str]:
        for word in text.split():
            yield word

    return router


def _client_router() -> Router:
    router = Router()

    @router.method
    async def shout(text: str) -> str:
        return text.upper() + "!"

    return router


async def _main(db: str | None) -> None:
    async with serve(_server_router(), "127.0.0.1", 0) as server:
        print(f"server listening on {server.url}")
        async with connect(server.url, router=_client_router()) as peer:
            print("client -> add(1, 2) =", await peer.call("add", 1, 2))
            print("client -> greet('ada') =", await peer.call("greet", "ada"))
            words = [w async for w in peer.stream("tokens", "calls and streams over one socket")]
            print("client <- stream tokens:", words)
    print("done")


def run_demo(loop: str = "asyncio", db: str | None = None) -> int:
    """Run the demo on ``loop``; returns the exit code."""
    anyio.run(_main, db, backend=loop)
    return 0
