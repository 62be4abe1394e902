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
    HandshakeRefused,
    InternalError,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    ProtocolError,
    ProtocolViolation,
    RateLimited,
    ReconnectFailed,
    RemoteError,
    RemoteProtocolError,
    RpcStreamError,
    RunExpired,
    RunFinished,
    RunNotFound,
)
from .handshake import HandshakeRequest, Refused, StaticFile, current_principal
from .messages import StreamId
from .peer import IncomingStream, RpcPeer, current_peer
from .router import Router
from .runclient import RunClient
from .runs import ClientEvent, EventValidationError, RunChannel, RunContext, RunEvent, RunServer
from .server import Server, serve
from .store.base import EventStore, RunInfo, StoredEvent
from .store.memory import MemoryStore
from .store.sqlite import SQLiteStore

__version__ = "0.1.0"

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
    "ProtocolError",
    "ProtocolViolation",
    "RateLimited",
    "ReconnectFailed",
    "Refused",
    "HandshakeRequest",
    "HandshakeRefused",
    "StaticFile",
    "current_principal",
    "RemoteError",
    "RemoteProtocolError",
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
