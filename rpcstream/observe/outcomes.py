"""How a call ended, in the words observers are told: ``ok`` or an error code's name."""

from __future__ import annotations

from ..errors import ConnectionClosed, ErrorCode, RemoteError

__all__ = ["client_outcome", "outcome_of"]


def outcome_of(error: BaseException | None) -> str:
    """A handled call's outcome: ``ok``, or the snake-case name of the error code
    it ended with (``invalid_params``, ``cancelled``...; ``internal_error`` for an
    exception that is not a :class:`RemoteError`; ``error`` for an application's
    own code)."""
    if error is None:
        return "ok"
    if not isinstance(error, RemoteError):
        return "internal_error"
    try:
        return ErrorCode(error.code).name.lower()
    except ValueError:
        return "error"


def client_outcome(exc: BaseException) -> str:
    """How a call this side made ended, when it ended with ``exc``."""
    if isinstance(exc, RemoteError):
        return outcome_of(exc)
    if isinstance(exc, ConnectionClosed):
        return "connection_closed"
    return "cancelled"  # the caller's task was cancelled (or interrupted)
