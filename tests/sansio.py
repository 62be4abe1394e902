"""Two Sans-I/O protocols joined by hand, for tests that need no event loop."""

from __future__ import annotations

from typing import Any

import msgspec

from rpcstream.messages import MSGPACK, Codec
from rpcstream.protocol import Protocol, Side


def pair(codec: Codec = MSGPACK, **kw: Any) -> tuple[Protocol, Protocol]:
    """A connecting and an accepting protocol with the same options."""
    return Protocol(codec, Side.CONNECTING, **kw), Protocol(codec, Side.ACCEPTING, **kw)


def deliver(src: Protocol, dst: Protocol) -> list[Any]:
    """Move every queued message from src to dst; return dst's events."""
    events: list[Any] = []
    while (message := src.data_to_send()) is not None:
        events.extend(dst.receive_message(message))
    return events


def frames(proto: Protocol) -> list[Any]:
    """Every frame ``proto`` has queued, decoded (and taken from its outbox)."""
    out: list[Any] = []
    while (message := proto.data_to_send()) is not None:
        out.extend(proto.codec.decode_batch(message))
    return out


def identity(raw: msgspec.Raw) -> Any:
    """A stream's item decoder: the payload as plain msgpack values."""
    return MSGPACK.decode(raw)
