"""A TCP proxy on 127.0.0.1 that can cut or freeze its connections, for fault tests,
and `go`, which lets a run held at a cut go on."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import anyio.lowlevel

import rpcstream


class Proxy:
    """Forwards to ``target_port``; ``cut()`` closes every connection, ``freeze()``
    stops forwarding without closing (a half-dead peer: nothing answers)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.frozen = anyio.Event()
        self.connections = 0
        self._scopes: list[anyio.CancelScope] = []

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    def freeze(self) -> None:
        self.frozen.set()

    async def _pipe(self, src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            async for chunk in src:
                if self.frozen.is_set():
                    await anyio.sleep_forever()
                await dst.send(chunk)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        with anyio.CancelScope() as scope:
            self._scopes.append(scope)
            server = await anyio.connect_tcp("127.0.0.1", self.target_port)
            async with client, server, anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, server)
                tg.start_soon(self._pipe, server, client)


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._handle)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()


async def go(client: rpcstream.RunClient, run_id: str, event_id: int) -> None:
    """Let a run held at ``event_id`` go on, over whichever connection is up: a
    call on the connection just cut fails, and is sent again (the run ignores a
    second go for the same hold)."""
    while True:
        try:
            await client.send(run_id, "go", event_id)
            return
        except rpcstream.ConnectionClosed:
            await anyio.lowlevel.checkpoint()
