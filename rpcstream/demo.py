"""The demo behind ``make demo`` / ``rpcstream demo``, and the built-in app of
``rpcstream serve``.

A RunServer on the embedded SQLite store with a fake token-streaming flow; a
client calls the server (which calls it back), starts a run, prints its tokens
as they arrive, has its connection cut midway, and resumes without losing or
repeating an event.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .errors import ConnectionClosed
from .handshake import StaticFile
from .peer import current_peer
from .router import Router
from .runs.client import RunClient
from .runs.server import RunContext, RunServer
from .server import Server, serve
from .store.base import EventStore
from .store.sqlite import SQLiteStore

__all__ = ["Complete", "Token", "make_app", "run_demo"]

_DEMO_PAGE = Path(__file__).parent / "static" / "demo.html"

_TEXT = (
    "Quantum computers store information in qubits, which can hold a blend of zero and one "
    "at the same time. Entangled qubits share one state, so measuring one tells you about "
    "the other. Algorithms exploit interference to make wrong answers cancel out and right "
    "answers add up, which is why some problems get dramatically faster."
)


class Token(msgspec.Struct):
    """One generated token."""

    token: str
    index: int


class Complete(msgspec.Struct):
    """The end of a generation."""

    total_tokens: int
    duration: float


def _fake_model(prompt: str, n: int) -> Iterator[str]:
    words = _TEXT.split()
    offset = sum(map(ord, prompt)) % len(words)
    for i in range(n):
        yield words[(offset + i) % len(words)]


def make_app(store: EventStore | None = None) -> RunServer:
    """The demo app: a ``ml-inference`` flow and two plain methods."""
    router = Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def greet(name: str) -> str:
        # Calls the client back while the client's call is still pending.
        shout = await current_peer().call("shout", f"hello, {name}")
        return f"server heard: {shout}"

    @router.method
    async def drop_connection() -> None:
        # Demo only: the server closes the caller's connection, as a restart or a
        # network drop would; the demo page then shows its RunClient resuming.
        await current_peer().aclose(1012, "demo drop")

    runs = RunServer(store=store, router=router)
    # The demo page at http://host:port/ (serve() answers plain GETs from http_routes).
    runs.http_routes = {"/": StaticFile.from_path(_DEMO_PAGE, "text/html; charset=utf-8")}

    @runs.flow("ml-inference", events={"token": Token, "complete": Complete})
    async def ml_inference(
        ctx: RunContext, prompt: str, model: str = "small", tokens: int = 40, delay: float = 0.02
    ) -> None:
        started = time.perf_counter()
        await ctx.client.send("status", {"status": "generating", "model": model})
        count = 0
        for i, word in enumerate(_fake_model(prompt, tokens)):
            await anyio.sleep(delay)  # the "model" thinking
            await ctx.client.send("token", Token(word, i))
            count += 1
        await ctx.client.send(
            "complete", Complete(total_tokens=count, duration=time.perf_counter() - started)
        )

    return runs


runs = make_app()
"""The built-in app of ``rpcstream serve`` (memory store unless ``--store`` says otherwise)."""


def _client_router() -> Router:
    router = Router()

    @router.method
    async def shout(text: str) -> str:
        return text.upper() + "!"

    return router


async def _cut_connections(server: Server) -> None:
    for peer in list(server.peers):
        await peer.aclose(1012, "demo: cutting the connection")


async def _main(db: Path, cut_after: int) -> list[int]:
    say = print
    async with serve(make_app(SQLiteStore(db)), "127.0.0.1", 0) as server:
        say(f"server: listening on {server.url}, runs stored in {db}")
        async with RunClient(server.url, router=_client_router(), backoff_base=0.05) as client:
            say("client: add(1, 2) =", await client.call("add", 1, 2))
            say("client: greet('ada') =", await client.call("greet", "ada"))
            prompt = "Explain quantum computing"
            run_id = await client.start("ml-inference", {"prompt": prompt})
            say(f"client: started run {run_id} of 'ml-inference' ({prompt!r})")
            ids: list[int] = []
            connections = client.connections
            line = ""
            async for event in client.subscribe(run_id):
                if client.connections != connections:
                    connections = client.connections
                    say(f"\n  [reconnected; resumed after event {ids[-1]}]")
                ids.append(event["id"])
                kind: str = event["type"]
                data: Any = event["data"]
                if kind == "token":
                    line += data["token"] + " "
                    sys.stdout.write(data["token"] + " ")
                    sys.stdout.flush()
                else:
                    say(f"\n  [{event['id']}] {kind}: {data}")
                if event["id"] == cut_after:
                    say(f"\n  [server cuts the connection after event {cut_after}]")
                    await _cut_connections(server)
    return ids


def run_demo(loop: str = "asyncio", db: str | None = None, cut_after: int = 17) -> int:
    """Run the demo on ``loop``; returns the exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(db) if db else Path(tmp) / "runs.db"
        try:
            ids = anyio.run(_main, path, cut_after, backend=loop)
        except ConnectionClosed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
    if ids == list(range(1, len(ids) + 1)):
        print(f"client: received events 1..{len(ids)} through the cut: no gap, no duplicate")
        return 0
    print(f"client: events out of order or missing: {ids}", file=sys.stderr)
    return 1
