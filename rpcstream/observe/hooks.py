"""What rpcstream reports, and to whom: the observer interface and its registry.

This module imports nothing of rpcstream, so that every layer may report here,
the stores included.

Theory of operation
-------------------
The peer, the server and the run server call the functions and methods here at
the points that matter to an operator: a connection opened or closed, a
handshake refused, a call started and finished (both sides), a stream sender
stalled on credit, a run changed status, events appended and delivered, a
store operation failed.

Two kinds of report, priced differently:

* **Per connection** (opened, closed, refused handshakes): the module functions
  :func:`connection_opened`, :func:`connection_closed` and
  :func:`handshake_refused` always write their log line (``rpcstream.server``,
  at INFO) and then tell the observers, if any. They run once per connection,
  so their cost does not matter.
* **Per call, stream item or event**: each peer takes :func:`current` once, when
  it is built, and keeps it. ``None`` (nobody observes, the default) costs the
  call path one attribute check and no allocation; an :class:`Observer` gets
  each report as a method call.

Observers are installed process-wide with :func:`install` (the Prometheus and
OpenTelemetry integrations do it for you) and take effect for peers built
afterwards. Every method of :class:`Observer` does nothing: subclass it and
override what you need. An observer must never raise and never block: it runs
inline, on the event loop, in the middle of the connection's work.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

__all__ = [
    "CALL",
    "NOTIFY",
    "STREAM",
    "CallObservation",
    "Observer",
    "connection_closed",
    "connection_opened",
    "current",
    "handshake_refused",
    "install",
    "events_appended",
    "events_delivered",
    "observing",
    "peer_fields",
    "reporting_refusals",
    "run_status",
    "store_error",
    "uninstall",
]

log = logging.getLogger("rpcstream.server")

_R = TypeVar("_R")

CALL: Final = "call"
"""The kind of a call that expects one answer."""
NOTIFY: Final = "notify"
"""The kind of a call that expects no answer."""
STREAM: Final = "stream"
"""The kind of a call whose result is a stream."""


class CallObservation:
    """One call as an observer follows it, from start to :meth:`end`.

    ``meta`` is what the calling side attaches to the call frame (trace context
    headers), ``None`` for nothing. The peer may call :meth:`end` more than once
    (a stream that finished, then is closed): the first call is the outcome, so
    implementations do nothing once ``ended`` is set.
    """

    __slots__ = ("ended", "meta")

    def __init__(self, meta: dict[str, str] | None = None) -> None:
        self.meta = meta
        self.ended = False

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        """The call finished with ``outcome``: ``ok``, ``cancelled``,
        ``connection_closed`` (calls this side made), or the name of the error
        code (see :mod:`rpcstream.observe.outcomes`)."""
        self.ended = True


class Observer:
    """Receives rpcstream's reports; every method is a no-op (see the module docstring).

    ``peer`` arguments are :class:`~rpcstream.RpcPeer` objects: ``peer.principal``,
    ``peer.transport.remote_address``, ``peer.stats``, ``peer.router``.
    """

    # -- connections -------------------------------------------------------------------

    def connection_opened(self, peer: Any) -> None:
        """A server accepted a connection (after the handshake)."""

    def connection_closed(self, peer: Any, code: int, reason: str, duration: float) -> None:
        """A server's connection ended, ``duration`` seconds after it opened."""

    def handshake_refused(self, status: int, reason: str, remote_address: Any) -> None:
        """A server answered an upgrade request with HTTP ``status`` instead."""

    # -- calls -------------------------------------------------------------------------

    def call_received(
        self, peer: Any, kind: str, method: str, meta: dict[str, str] | None
    ) -> CallObservation | None:
        """The other side's call arrived (``kind``: :data:`CALL`, :data:`NOTIFY`,
        :data:`STREAM`), with the ``meta`` its frame carried. The handler runs
        in the context this method leaves current, so a tracer may make its span
        current here; it is ended in the same context. ``None``: not followed."""
        return None

    def call_sent(self, peer: Any, kind: str, method: str) -> CallObservation | None:
        """This side is about to send a call; the observation's ``meta`` travels
        in the frame. ``None``: not followed."""
        return None

    # -- streams -----------------------------------------------------------------------

    def stream_stalled(self, peer: Any, stream_id: int) -> None:
        """A stream sender has an item to send and no credit: it waits for the receiver."""

    # -- runs --------------------------------------------------------------------------

    def run_status(self, flow: str, status: str) -> None:
        """A run of ``flow`` started (``running``) or ended (its terminal type)."""

    def events_appended(self, count: int) -> None:
        """``count`` run events were stored (by flows, the framework or outside writers)."""

    def events_delivered(self, count: int) -> None:
        """``count`` run events were handed to a subscriber's stream."""

    def store_error(self, operation: str, error: BaseException) -> None:
        """A store operation (``append``, ``read``, ``sweep``) failed for a reason
        of the store's own (unreachable, a database error), not the caller's
        (an unknown or finished run, a bad argument)."""


class _Fanout(Observer):
    """Several observers as one (built by :func:`current` when more than one is installed)."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def connection_opened(self, peer: Any) -> None:
        for o in self.observers:
            o.connection_opened(peer)

    def connection_closed(self, peer: Any, code: int, reason: str, duration: float) -> None:
        for o in self.observers:
            o.connection_closed(peer, code, reason, duration)

    def handshake_refused(self, status: int, reason: str, remote_address: Any) -> None:
        for o in self.observers:
            o.handshake_refused(status, reason, remote_address)

    def call_received(
        self, peer: Any, kind: str, method: str, meta: dict[str, str] | None
    ) -> CallObservation | None:
        found = [o.call_received(peer, kind, method, meta) for o in self.observers]
        return _join(found)

    def call_sent(self, peer: Any, kind: str, method: str) -> CallObservation | None:
        return _join([o.call_sent(peer, kind, method) for o in self.observers])

    def stream_stalled(self, peer: Any, stream_id: int) -> None:
        for o in self.observers:
            o.stream_stalled(peer, stream_id)

    def run_status(self, flow: str, status: str) -> None:
        for o in self.observers:
            o.run_status(flow, status)

    def events_appended(self, count: int) -> None:
        for o in self.observers:
            o.events_appended(count)

    def events_delivered(self, count: int) -> None:
        for o in self.observers:
            o.events_delivered(count)

    def store_error(self, operation: str, error: BaseException) -> None:
        for o in self.observers:
            o.store_error(operation, error)


class _Joined(CallObservation):
    __slots__ = ("parts",)

    def __init__(self, parts: list[CallObservation]) -> None:
        meta: dict[str, str] = {}
        for p in parts:
            meta.update(p.meta or {})
        super().__init__(meta or None)
        self.parts = parts

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        # Ended in reverse: a tracer that made its span current is undone last-in, first-out.
        for p in reversed(self.parts):
            p.end(outcome, error)


def _join(found: list[CallObservation | None]) -> CallObservation | None:
    parts = [f for f in found if f is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else _Joined(parts)


_O = TypeVar("_O", bound=Observer)
_installed: list[Observer] = []
_current: Observer | None = None


def install(observer: _O) -> _O:
    """Report to ``observer`` from now on (peers built from now on); returns it."""
    global _current
    if observer not in _installed:
        _installed.append(observer)
    _current = _installed[0] if len(_installed) == 1 else _Fanout(list(_installed))
    return observer


def uninstall(observer: Observer) -> None:
    """Stop reporting to ``observer`` (peers built from now on)."""
    global _current
    if observer in _installed:
        _installed.remove(observer)
    if not _installed:
        _current = None
    else:
        _current = _installed[0] if len(_installed) == 1 else _Fanout(list(_installed))


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    """``with observing(o):`` install ``o`` for the block (tests, scripts)."""
    install(observer)
    try:
        yield observer
    finally:
        uninstall(observer)


def current() -> Observer | None:
    """The observer to report to, ``None`` when nothing observes."""
    return _current


def peer_fields(peer: Any) -> dict[str, Any]:
    """The context fields that name a peer in log lines: remote address and principal."""
    return {
        "remote_address": _address(peer.transport.remote_address),
        "principal": _principal_id(peer.principal),
    }


def _principal_id(principal: Any) -> str | None:
    # As rpcstream.handshake.principal_id, which this module cannot import: it sits
    # below every layer that reports (stores included) and imports none of them.
    if principal is None or isinstance(principal, str):
        return principal
    return str(getattr(principal, "id", principal))


def _address(address: Any) -> str | None:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if address is None else str(address)


# -- per-connection reports: a log line, then the observers ------------------------------


def connection_opened(peer: Any) -> tuple[float, dict[str, Any]]:
    """Log and report an accepted connection; returns what :func:`connection_closed`
    needs: when, and the fields naming the peer (once closed, a transport may no
    longer know its remote address)."""
    fields = peer_fields(peer)
    log.info(
        "connection opened from %s (principal %s)",
        fields["remote_address"],
        fields["principal"],
        extra=fields,
    )
    if _current is not None:
        _current.connection_opened(peer)
    return time.monotonic(), fields


def connection_closed(peer: Any, opened: tuple[float, dict[str, Any]]) -> None:
    """Log and report the end of a connection that :func:`connection_opened` saw."""
    duration = time.monotonic() - opened[0]
    error = peer._driver.proto.close_error
    code = getattr(error, "code", 1006)
    reason = getattr(error, "reason", "") or ""
    fields = opened[1]
    log.info(
        "connection closed from %s (principal %s): code %s %s after %.3f s",
        fields["remote_address"],
        fields["principal"],
        code,
        repr(reason),
        duration,
        extra={**fields, "code": code, "reason": reason, "duration": round(duration, 6)},
    )
    if _current is not None:
        _current.connection_closed(peer, code, reason, duration)


def handshake_refused(status: int, reason: str, remote_address: Any) -> None:
    """Log and report an upgrade request answered with an HTTP error."""
    address = _address(remote_address)
    log.warning(
        "handshake refused from %s: %d %s",
        address,
        status,
        reason,
        extra={"status": status, "reason": reason, "remote_address": address},
    )
    if _current is not None:
        _current.handshake_refused(status, reason, remote_address)


def reporting_refusals(
    on_request: Callable[[Any], Awaitable[_R]],
) -> Callable[[Any], Awaitable[_R]]:
    """Wrap a server's request hook (``HttpRequest -> HttpResponse | Upgrade``) so
    that each upgrade it refuses (answers with an ``HttpResponse``) is reported once."""

    async def hook(request: Any) -> _R:
        answer = await on_request(request)
        status = getattr(answer, "status", None)  # an HttpResponse; an Upgrade has none
        if status is not None and request.is_upgrade:
            handshake_refused(status, _reason(answer), request.remote_address)
        return answer

    return hook


def _reason(response: Any) -> str:
    text = bytes(response.body).decode("utf-8", "replace").strip()
    return text[:200] if text else str(response.reason)


# -- runs and stores: the observers only (these may run per event) -----------------------


def run_status(flow: str, status: str) -> None:
    """Report that a run of ``flow`` started (``running``) or ended (its terminal type)."""
    if _current is not None:
        _current.run_status(flow, status)


def events_appended(count: int) -> None:
    """Report ``count`` run events stored."""
    if _current is not None:
        _current.events_appended(count)


def events_delivered(count: int) -> None:
    """Report ``count`` run events handed to a subscriber's stream."""
    if _current is not None:
        _current.events_delivered(count)


def store_error(operation: str, error: BaseException) -> None:
    """Report a store operation that failed for the store's own reasons (the
    caller decides: see :meth:`Observer.store_error`)."""
    if _current is not None:
        _current.store_error(operation, error)
