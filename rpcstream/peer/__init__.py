"""RpcPeer: one symmetric object per connection, driving :mod:`rpcstream.protocol` with anyio.

The package is split by job: :mod:`.driver` (the connection: reader, writer,
waiters, lifecycle), :mod:`.caller`, :mod:`.callee` (one handler runner),
:mod:`.admission` (slots on the other side), :mod:`.streams` (both directions)
and :mod:`.rpcpeer`, the facade users hold. Imports go one way:
``rpcpeer -> caller, callee -> streams -> driver``; admission imports none of them.
"""

from .callee import PING, current_peer
from .driver import Lifecycle
from .rpcpeer import RpcPeer
from .streams import IncomingStream

__all__ = ["PING", "IncomingStream", "Lifecycle", "RpcPeer", "current_peer"]
