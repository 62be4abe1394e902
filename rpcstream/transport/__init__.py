"""What carries one message at a time between two peers: the only package that
knows websockets, or which event loop runs.

- ``base``: :class:`Transport`, the whole contract the peer relies on.
- ``options``: :class:`WebSocketOptions`, what client and server share.
- ``http``: the request before an upgrade and the server's answers, loop-free.
- ``websocket``: :class:`WebSocketTransport`, and :func:`open_websocket` /
  :func:`serve_websocket`, which pick the event loop's module:
- ``asyncio_ws``: connections that hand each message over as it arrives;
- ``trio_ws``: the same on trio, writing at once when nothing else writes, with a
  reader that never waits on the writer.
- ``asgi``: :class:`AsgiTransport` over the ASGI WebSocket interface, and
  :func:`serve_asgi_websocket` / :func:`serve_asgi_http` for ASGI scopes.
- ``memory``: two peers joined in one process, for tests.
- ``loop``: :func:`is_trio`, and where handler tasks start: :class:`EagerTasks` on
  asyncio (eagerly), :class:`NurseryTasks` on trio (in a nursery of the peer's).
"""

from .asgi import AsgiTransport, serve_asgi_http, serve_asgi_websocket
from .base import Transport
from .http import HttpRequest, HttpResponse, Upgrade
from .loop import EagerTasks, NurseryTasks, is_trio, open_handler_tasks
from .memory import MemoryTransport, memory_transport_pair
from .options import WebSocketOptions
from .websocket import WebSocketTransport, open_websocket, serve_websocket

__all__ = [
    "AsgiTransport",
    "EagerTasks",
    "HttpRequest",
    "HttpResponse",
    "MemoryTransport",
    "NurseryTasks",
    "Transport",
    "Upgrade",
    "WebSocketOptions",
    "WebSocketTransport",
    "is_trio",
    "memory_transport_pair",
    "open_handler_tasks",
    "open_websocket",
    "serve_asgi_http",
    "serve_asgi_websocket",
    "serve_websocket",
]
