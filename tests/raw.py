"""A plain websockets client for tests: no rpcstream peer to correct what it sends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from rpcstream._backend import is_trio


@contextlib.asynccontextmanager
async def raw_connect(url: str, subprotocol: str, **options: Any) -> AsyncIterator[Any]:
    """A websockets connection on the running loop (asyncio or trio), offering
    ``subprotocol``; ``options`` go to websockets' ``connect``."""
    options = {"subprotocols": [subprotocol], "compression": None, **options}
    if is_trio():
        from websockets.trio.client import connect as trio_connect

        async with trio_connect(url, **options) as ws:
            yield ws
    else:
        from websockets.asyncio.client import connect as asyncio_connect

        async with asyncio_connect(url, **options) as ws:
            yield ws
