"""Which event loop runs us: websockets has one module per loop, and only the
transport needs to know which (as anyio's ``_backends``)."""

from __future__ import annotations

import sniffio

__all__ = ["is_trio"]


def is_trio() -> bool:
    """Whether the current task runs on trio (otherwise asyncio)."""
    return sniffio.current_async_library() == "trio"
