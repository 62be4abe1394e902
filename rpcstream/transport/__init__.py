"""What carries one message at a time between two peers.

:class:`~rpcstream.transport.base.Transport` is the whole contract; ``websocket``
adapts a websockets connection (asyncio or trio flavour) and ``memory`` connects
two peers in one process for tests.
"""

from .base import Transport
from .memory import MemoryTransport, memory_transport_pair
from .websocket import WebSocketTransport

__all__ = ["MemoryTransport", "Transport", "WebSocketTransport", "memory_transport_pair"]
