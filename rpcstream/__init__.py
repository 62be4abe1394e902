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
    InternalError,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    ProtocolError,
    ProtocolViolation,
    RemoteError,
    RemoteProtocolError,
    RpcStreamError,
    RunExpired,
    RunFinished,
    RunNotFound,
)
from .messages import StreamId
from .peer import IncomingStream, RpcPeer, current_peer
from .router import Router
from .server import Server, serve

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
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
