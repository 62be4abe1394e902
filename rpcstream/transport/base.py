"""The transport contract: whole messages in, whole messages out."""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["Transport"]


class Transport(abc.ABC):
    """Carries whole messages for one :class:`~rpcstream.RpcPeer`.

    One task sends and one task receives; ``aclose`` may be called from any task.
    Failures surface as :class:`~rpcstream.ConnectionClosed`.
    """

    subprotocol: str | None = None
    """The negotiated WebSocket subprotocol (names the codec), if any."""

    @abc.abstractmethod
    async def send(self, message: bytes, *, text: bool) -> None:
        """Send one message; ``text`` marks UTF-8 (JSON) content."""

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """Receive one message, text or binary, as bytes."""

    @abc.abstractmethod
    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (a WebSocket close handshake where there is one)."""

    def deliver(
        self, on_messages: Callable[[list[bytes]], None], on_lost: Callable[[], None]
    ) -> bool:
        """Hand messages to ``on_messages`` as they arrive (those that arrived
        together in one list), and call ``on_lost`` once the connection is gone;
        :meth:`receive` then only raises the connection's end. ``False`` (the
        default) when the transport cannot: then :meth:`receive` returns them."""
        return False

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` can write a message right away."""
        return False

    def send_now(self, message: bytes, *, text: bool) -> None:
        """Write one message without waiting; only when :meth:`can_send_now`."""
        raise NotImplementedError

    def run_soon(self, callback: Callable[[], None]) -> bool:
        """Have the event loop call ``callback`` (which must not raise) in its next
        turn, outside any task, after what is ready now; ``False`` (the default)
        when the transport cannot: only transports that can :meth:`send_now`
        need to, since only a direct write can follow from such a callback."""
        return False

    async def abort(self) -> None:
        """Drop the connection at once, without a closing handshake: for a peer
        that broke a limit and will not read a close frame anyway."""
        await self.aclose(1008, "aborted")

    @property
    def buffered_amount(self) -> int:
        """Bytes accepted by :meth:`send` but not yet handed to the operating system."""
        return 0

    @property
    def close_code(self) -> int | None:
        """The close code, once closed."""
        return None

    @property
    def remote_address(self) -> object:
        """The remote address, where the transport knows one."""
        return None
