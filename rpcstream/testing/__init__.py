"""Helpers for testing code built on rpcstream.

* :func:`memory_peer_pair`: two connected :class:`~rpcstream.RpcPeer` objects in
  one process, no sockets: fast tests of handlers and clients.
* :mod:`rpcstream.testing.store_suite`: the conformance suite every
  :class:`~rpcstream.store.base.EventStore` backend passes (needs pytest).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..messages import MSGPACK, Codec
from ..peer import RpcPeer
from ..protocol import Side
from ..router import Router
from ..transport.memory import memory_transport_pair

__all__ = ["memory_peer_pair"]


@contextlib.asynccontextmanager
async def memory_peer_pair(
    a_router: Router | None = None,
    b_router: Router | None = None,
    *,
    codec: Codec = MSGPACK,
    max_messages: int = 64,
    **peer_options: Any,
) -> AsyncIterator[tuple[RpcPeer, RpcPeer]]:
    """Yield two connected peers: ``a`` (connecting side) serves ``a_router``,
    ``b`` (accepting side) serves ``b_router``. Both close when the block ends."""
    ta, tb = memory_transport_pair(max_messages)
    async with (
        RpcPeer(ta, router=a_router, codec=codec, side=Side.CONNECTING, **peer_options) as a,
        RpcPeer(tb, router=b_router, codec=codec, side=Side.ACCEPTING, **peer_options) as b,
    ):
        yield a, b
