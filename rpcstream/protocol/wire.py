"""What the protocol puts in its own frames: error fields every codec can encode, and
peer-supplied text cut to a bounded length."""

from __future__ import annotations

from typing import Any, Final

from ..errors import ErrorCode, Overloaded, RemoteError
from ..messages import Codec

__all__ = ["MAX_CREDIT", "encodable", "overloaded_streams", "shorten", "wire_error"]

MAX_CREDIT: Final = 2**31
"""Outstanding credit beyond this is a protocol violation (an overflow guard)."""


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: peer-supplied text in our own
    messages and logs must not let a peer make them arbitrarily large."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def wire_error(codec: Codec, error: RemoteError) -> tuple[int, str, Any]:
    """``error``'s code, message and data in a form every codec can encode: an
    error from a handler must never make a whole batch unencodable (and so end
    the connection). A lone surrogate (``os.fsdecode`` of a bad file name) is
    escaped; a code outside 64 bits becomes ``internal_error``."""
    code = error.code if -(2**63) <= error.code < 2**64 else int(ErrorCode.INTERNAL_ERROR)
    message = error.message
    if not message.isascii():
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return code, message, encodable(codec, error.data)


def encodable(codec: Codec, data: Any) -> Any:
    """``data`` if the codec can encode it, else ``None``: error details must never
    make a whole batch unencodable."""
    if data is None:
        return None
    try:
        codec.encode(data)
    except (TypeError, ValueError, OverflowError):
        return None
    return data


def overloaded_streams(limit: int) -> RemoteError:
    """The error for a stream beyond the connection's ``max_streams``."""
    return Overloaded(f"too many open streams on this connection (max_streams={limit})")
