"""One exception tree, rooted in :class:`RpcStreamError`.

::

    RpcStreamError
    ├── RemoteError(code, message, data)       the only error that crosses the wire
    │   ├── MethodNotFound                     ErrorCode.METHOD_NOT_FOUND
    │   ├── InvalidParams                      ErrorCode.INVALID_PARAMS
    │   ├── InternalError                      ErrorCode.INTERNAL_ERROR
    │   ├── Cancelled                          ErrorCode.CANCELLED
    │   ├── DeadlineExceeded (TimeoutError)    ErrorCode.DEADLINE_EXCEEDED
    │   ├── Overloaded                         ErrorCode.OVERLOADED
    │   ├── ProtocolViolation                  ErrorCode.PROTOCOL_ERROR
    │   ├── RunNotFound (LookupError)          ErrorCode.RUN_NOT_FOUND
    │   ├── RunExpired (LookupError)           ErrorCode.RUN_EXPIRED
    │   ├── EventsTrimmed                      ErrorCode.EVENTS_TRIMMED
    │   ├── RunFinished                        ErrorCode.RUN_FINISHED
    │   ├── RateLimited                        ErrorCode.RATE_LIMITED
    │   └── StoreUnavailable                   ErrorCode.UNAVAILABLE
    ├── ConnectionClosed                       the connection is gone; pending work failed
    │   ├── HandshakeRefused                   the server answered HTTP (401, 403, 429...)
    │   └── ReconnectFailed                    a RunClient gave up reconnecting
    ├── LocalProtocolError                     we were asked to do something the protocol forbids
    ├── Refused                                raised by ``authenticate``: refuse with HTTP 401/403
    └── EventValidationError (ValueError)      a flow sent data that does not fit its event type

As in h11, the name says whose fault a broken protocol was: ``ProtocolViolation``
(code ``PROTOCOL_ERROR``) is the peer's, and reaches us in a ``Fault``, a
``StreamError`` or as the error of a stream it broke; ``LocalProtocolError`` is
our own caller's, and never crosses the wire. Third-party exceptions
(websockets, msgspec, sqlite3, redis) are mapped to these at the boundary, with
the original chained as ``__cause__``.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

__all__ = [
    "Cancelled",
    "ConnectionClosed",
    "DeadlineExceeded",
    "ErrorCode",
    "EventValidationError",
    "EventsTrimmed",
    "HandshakeRefused",
    "InternalError",
    "InvalidParams",
    "LocalProtocolError",
    "MethodNotFound",
    "Overloaded",
    "ProtocolViolation",
    "RateLimited",
    "Refused",
    "ReconnectFailed",
    "RemoteError",
    "RpcStreamError",
    "RunExpired",
    "RunFinished",
    "RunNotFound",
    "StoreUnavailable",
]


class ErrorCode(enum.IntEnum):
    """Standard error codes carried by ``Error``, ``StreamError`` and ``Fault`` frames.

    Codes below 1000 are reserved for rpcstream; applications may use 1000 and above.
    """

    PROTOCOL_ERROR = 1
    METHOD_NOT_FOUND = 2
    INVALID_PARAMS = 3
    INTERNAL_ERROR = 4
    CANCELLED = 5
    DEADLINE_EXCEEDED = 6
    OVERLOADED = 7
    RUN_NOT_FOUND = 8
    RUN_EXPIRED = 9
    EVENTS_TRIMMED = 10
    RUN_FINISHED = 11
    UNAUTHORIZED = 12
    RATE_LIMITED = 13
    UNAVAILABLE = 14


class RpcStreamError(Exception):
    """Base class of every exception rpcstream raises."""


class RemoteError(RpcStreamError):
    """An error that crossed (or will cross) the wire: ``code``, ``message``, ``data``.

    Raise it from a handler to choose what the caller sees; any other exception
    reaches the caller as :class:`InternalError`. What arrives from the wire is
    rebuilt by :meth:`from_wire` as the subclass matching its code, so callers can
    ``except rpcstream.Overloaded`` whichever side raised it. Subclasses take
    ``(message, data)``; ``RemoteError`` itself takes ``(code, message, data)``.
    """

    code_default: ClassVar[int] = ErrorCode.INTERNAL_ERROR
    # Filled by __init_subclass__: code -> the subclass that owns it.
    _by_code: ClassVar[dict[int, type[_Coded]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code_default" in cls.__dict__ and not cls.__name__.startswith("_"):
            RemoteError._by_code.setdefault(int(cls.code_default), cls)  # type: ignore[arg-type]

    def __init__(self, code: int, message: str = "", data: Any = None) -> None:
        self.code: int = int(code)
        self.message = message
        self.data = data
        super().__init__(self.code, message, data)

    @classmethod
    def from_wire(cls, code: int, message: str, data: Any = None) -> RemoteError:
        """Rebuild an error received in a frame as the subclass its code names."""
        sub = RemoteError._by_code.get(code)
        if sub is None:
            return RemoteError(code, message, data)
        return sub(message, data)

    def __str__(self) -> str:
        try:
            name = ErrorCode(self.code).name.lower()
        except ValueError:
            name = f"code {self.code}"
        return f"[{name}] {self.message}" if self.message else f"[{name}]"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError.from_wire, (self.code, self.message, self.data))


class _Coded(RemoteError):
    """A :class:`RemoteError` whose code is fixed by its class."""

    def __init__(self, message: str = "", data: Any = None) -> None:
        super().__init__(self.code_default, message, data)


class MethodNotFound(_Coded, LookupError):
    """No handler is registered under the called name."""

    code_default = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(_Coded, TypeError):
    """The parameters did not bind to the handler's signature or failed validation."""

    code_default = ErrorCode.INVALID_PARAMS


class InternalError(_Coded):
    """The handler raised an exception that was not a :class:`RemoteError`."""

    code_default = ErrorCode.INTERNAL_ERROR


class Cancelled(_Coded):
    """The remote side cancelled the work (a stream's sender was cancelled, for instance)."""

    code_default = ErrorCode.CANCELLED


class DeadlineExceeded(_Coded, TimeoutError):
    """The call's deadline passed, on either side; also a :class:`TimeoutError`."""

    code_default = ErrorCode.DEADLINE_EXCEEDED


class Overloaded(_Coded):
    """The callee refused work beyond a configured limit instead of queueing it."""

    code_default = ErrorCode.OVERLOADED


class ProtocolViolation(_Coded):
    """Sent in a ``Fault`` or ``StreamError`` frame when a peer breaks the protocol."""

    code_default = ErrorCode.PROTOCOL_ERROR


class RunNotFound(_Coded, LookupError):
    """No run with this id exists (or the caller may not see it)."""

    code_default = ErrorCode.RUN_NOT_FOUND


class RunExpired(_Coded, LookupError):
    """The run existed, finished, and its events were removed by retention."""

    code_default = ErrorCode.RUN_EXPIRED


class EventsTrimmed(_Coded):
    """Events after the requested id were trimmed away; ``data`` holds ``first_id``.

    Raised instead of silently skipping: the subscriber decides whether to
    resume from ``first_id`` (accepting the gap) or give up.
    """

    code_default = ErrorCode.EVENTS_TRIMMED

    @property
    def first_id(self) -> int:
        """The first event id still stored."""
        if isinstance(self.data, dict):
            return int(self.data.get("first_id", 0))
        return 0


class RunFinished(_Coded):
    """The run already has its terminal event; nothing more can be appended or sent."""

    code_default = ErrorCode.RUN_FINISHED


class RateLimited(_Coded):
    """A token-bucket limit (calls per connection, events per run) refused the work."""

    code_default = ErrorCode.RATE_LIMITED


class StoreUnavailable(_Coded):
    """The event store's backing service (Redis) failed or cannot be reached.

    The underlying exception is the ``__cause__``. An append that raised this may
    or may not have been stored. Clients see it as ``unavailable``.
    """

    code_default = ErrorCode.UNAVAILABLE


class ConnectionClosed(RpcStreamError):
    """The connection closed (either side) or broke; every pending call fails with this."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        text = "connection closed"
        if code is not None:
            text += f" (code {code}{': ' + reason if reason else ''})"
        super().__init__(text)


class HandshakeRefused(ConnectionClosed):
    """The server refused the WebSocket upgrade with an HTTP ``status`` (401, 403, 429...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(1006, reason)
        self.status = status


class ReconnectFailed(ConnectionClosed):
    """A :class:`~rpcstream.RunClient` gave up reconnecting (attempts or time ran out)."""

    def __init__(self, reason: str) -> None:
        super().__init__(1006, reason)


class LocalProtocolError(RpcStreamError):
    """We were asked to do something the protocol forbids (our caller's fault): a
    stream id already in use, an item without credit, a peer not yet entered."""


class Refused(RpcStreamError):
    """Raise it from ``authenticate`` to refuse with an HTTP status (401 by default)."""

    def __init__(self, message: str = "unauthorized", status: int = 401) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EventValidationError(RpcStreamError, ValueError):
    """``ctx.client.send`` got data that does not fit the event's declared type."""
