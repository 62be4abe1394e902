"""The WebSocket options a client and a server share, checked and built once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["WebSocketOptions"]


@dataclass(frozen=True)
class WebSocketOptions:
    """How one WebSocket connection behaves, whichever side opened it.

    ``connect()`` and ``serve()`` take these as keyword arguments (documented
    there) and build one of these; the transport turns it into websockets' own.
    """

    max_message_size: int | None = 4 * 1024 * 1024
    """Larger messages close the connection with 1009; ``None``: no limit."""
    ping_interval: float | None = 20.0
    """Seconds between heartbeat pings; ``None``: no heartbeat."""
    ping_timeout: float | None = 20.0
    """Seconds a pong may take before the peer counts as dead."""
    close_timeout: float | None = None
    """Seconds the closing handshake may take; ``None``: the ping timeout (or 10)."""
    open_timeout: float | None = 10.0
    """Seconds the opening handshake may take."""
    compression: str | None = None
    """``"deflate"`` (permessage-deflate) or ``None``."""

    def __post_init__(self) -> None:
        if self.compression not in (None, "deflate"):
            raise ValueError(f"compression must be None or 'deflate', not {self.compression!r}")

    @property
    def effective_close_timeout(self) -> float:
        """The close timeout in force. A peer that missed its pong is dead:
        waiting long for its close frame would only keep pending calls hanging."""
        if self.close_timeout is not None:
            return self.close_timeout
        return self.ping_timeout or 10.0

    def websockets_kwargs(self) -> dict[str, Any]:
        """The same options under websockets' names (``connect``/``serve`` on either loop)."""
        return {
            "compression": self.compression,
            "max_size": self.max_message_size,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
            "close_timeout": self.effective_close_timeout,
            "open_timeout": self.open_timeout,
        }
