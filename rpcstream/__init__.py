"""rpcstream: calls and streams over one WebSocket, on asyncio and trio.

>>> import rpcstream
>>> router = rpcstream.Router()
"""

from .client import connect
from .errors import (
    Cancelled,
    ConnectionClosed,
    DeadlineExceeded,
    ErrorCode,
    EventsTrimmed,
    EventValidationError,
    HandshakeRefused,
    InternalError,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    ProtocolViolation,
    RateLimited,
    ReconnectFailed,
    Refused,
    RemoteError,
    RpcStreamError,
    RunExpired,
    RunFinished,
    RunNotFound,
    StoreUnavailable,
)
from .handshake import HandshakeRequest, HttpResponse, Route, StaticFile, current_principal
from .messages import StreamId
from .peer import IncomingStream, RpcPeer, current_peer
from .router import Router
from .runs.client import RunClient
from .runs.events import RunEvent
from .runs.server import ClientEvent, RunChannel, RunContext, RunServer
from .runs.writer import RunWriter
from .server import Server, serve
from .store.base import EventStore, RunInfo, StoredEvent
from .store.memory import MemoryStore
from .store.sqlite import SQLiteStore

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # RedisStore needs the optional ``redis`` package: import it on first use only.
    if name == "RedisStore":
        from .store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'rpcstream' has no attribute {name!r}")


__all__ = [
    "Cancelled",
    "ClientEvent",
    "EventStore",
    "EventValidationError",
    "MemoryStore",
    "RunChannel",
    "RunClient",
    "RunContext",
    "RunEvent",
    "RunInfo",
    "RunServer",
    "SQLiteStore",
    "RedisStore",
    "RunWriter",
    "StoreUnavailable",
    "StoredEvent",
    "ConnectionClosed",
    "DeadlineExceeded",
    "ErrorCode",
    "EventsTrimmed",
    "IncomingStream",
    "InternalError",
    "InvalidParams",
    "LocalProtocolError",
    "MethodNotFound",
    "Overloaded",
    "ProtocolViolation",
    "RateLimited",
    "ReconnectFailed",
    "Refused",
    "HandshakeRequest",
    "HandshakeRefused",
    "StaticFile",
    "HttpResponse",
    "Route",
    "current_principal",
    "RemoteError",
    "RpcPeer",
    "RpcStreamError",
    "RunExpired",
    "RunFinished",
    "RunNotFound",
    "Router",
    "Server",
    "StreamId",
    "connect",
    "current_peer",
    "serve",
]
