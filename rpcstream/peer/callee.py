"""The callee side of a peer: the other side's calls, notifications and stream calls.

Each incoming call is admitted or refused at once (rate, concurrency, unknown
method, wrong kind), then run by one handler runner whatever its kind: bind the
parameters (opening stream arguments), invoke the handler under the call's
deadline, turn its outcome into what the kind calls for (a ``Result`` or
``Error``, a log line for a notification, the end of the result stream), and
close the stream arguments it did not read to the end. A plain ``def`` handler
runs where the call arrives, with no task; anything else runs in a task of its
own with a cancel scope in the waiters table, so a ``Cancel`` or
``StreamCancel`` frame, the deadline or the end of the connection cancels
exactly that work.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import traceback
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    RateLimited,
    RemoteError,
)
from ..limits import TokenBucket
from ..messages import Call, Error, Notify, Result, StreamCall, StreamId
from ..observe import hooks
from ..observe.outcomes import outcome_of
from ..protocol import shorten, wire_error
from ..router import Method, Router
from .admission import PING, SETTINGS, parse_settings
from .driver import HANDLER, NOTIFIED, PUMP, Driver
from .streams import IncomingStream, Senders, deadline

if TYPE_CHECKING:
    from .rpcpeer import RpcPeer

__all__ = ["GENERIC_MESSAGE", "PING", "Callee", "current_peer"]


GENERIC_MESSAGE = "internal error (see the server log)"
"""What a caller is told of an unexpected exception, after its type, unless the
side that ran the handler opted in with ``expose_errors``."""

log = logging.getLogger("rpcstream.peer")

_current_peer: contextvars.ContextVar[RpcPeer] = contextvars.ContextVar("rpcstream_peer")


def current_peer() -> RpcPeer:
    """The :class:`RpcPeer` of the connection whose call is being handled.

    Raises :class:`LookupError` outside a handler.
    """
    return _current_peer.get()


IncomingCall = Call | Notify | StreamCall


class Callee:
    """Admits and runs the other side's calls (see the module docstring)."""

    def __init__(
        self,
        driver: Driver,
        senders: Senders,
        peer: RpcPeer,
        router: Router,
        *,
        max_concurrent_handlers: int,
        call_rate: tuple[float, int] | None,
        expose_errors: bool,
        on_settings: Callable[[int], None],
    ) -> None:
        self._driver = driver
        self._senders = senders
        self._peer = peer
        self.router = router
        self.max_concurrent_handlers = max_concurrent_handlers
        self.expose_errors = expose_errors
        self._bucket = TokenBucket(*call_rate) if call_rate is not None else None
        self._on_settings = on_settings  # the other side's limits, for our caller
        self.running = 0  # handlers running in tasks (plain functions hold no slot)
        self.calls_received = 0

    # -- admission ---------------------------------------------------------------------

    def on_call(self, frame: IncomingCall) -> None:
        """A call arrived: refuse it, run it at once, or start its task."""
        self.calls_received += 1
        driver = self._driver
        method = self.router.get(frame.method)
        if method is None:
            if frame.method == PING and type(frame) is Call:
                driver.proto.end_call(frame.id, Result(frame.id, driver.codec.encode_raw(None)))
                return
            if frame.method == SETTINGS and type(frame) is Notify:
                self._settings(frame)
                return
        if self._bucket is not None and not self._bucket.take():
            self._refuse(frame, RateLimited(f"{frame.method}: too many calls on this connection"))
            return
        if self.running >= self.max_concurrent_handlers:
            self._refuse(
                frame,
                Overloaded(
                    f"{self.running} handlers running (max_concurrent_handlers="
                    f"{self.max_concurrent_handlers})"
                ),
            )
            return
        if method is None:
            self._refuse(frame, MethodNotFound(f"no method {shorten(repr(frame.method))}"))
            return
        if type(frame) is StreamCall and not method.may_stream:
            self._refuse(frame, _not_a_stream(frame.method))  # its annotation says so
            return
        if method.inline and type(frame) is not StreamCall:
            self._run_inline(frame, method)  # type: ignore[arg-type]
            return
        slot = _Slot(self)
        if type(frame) is Call:
            driver.waiters.add(HANDLER, frame.id, slot.cancel)
        elif type(frame) is StreamCall:
            driver.waiters.add(PUMP, frame.stream_id, slot.cancel)
        else:  # so that the connection's end cancels it too, as it does the others
            driver.waiters.add(NOTIFIED, id(slot), slot.cancel)
        driver.spawn_eager(self._run, frame, method, slot)

    def _settings(self, frame: Notify) -> None:
        try:
            limit = parse_settings(self._driver.codec.decode(frame.kwargs))
        except Exception:  # malformed: as if never sent
            limit = None
        if limit is not None:
            self._on_settings(limit)

    def _refuse(self, frame: IncomingCall, error: RemoteError) -> None:
        obs = self._driver.observer  # observe
        call = None if obs is None else obs.call_received(self._peer, *_kind_of(frame))
        if type(frame) is Notify:
            log.warning("dropped notification %s: %s", shorten(repr(frame.method)), error)
            if call is not None:  # observe
                call.end(outcome_of(error), error)
        else:
            self._finish(frame, None, error, call, in_reader=True)
        self._close_stream_args(frame, {})

    # -- the one handler runner ---------------------------------------------------------

    def _run_inline(self, frame: Call | Notify, method: Method) -> None:
        """A plain-function handler runs now, where the call arrived: no task to
        start, nothing to wait for or cancel. It runs in a copy of the context,
        so what it sets stays its own, as in a task."""
        opened: dict[int, IncomingStream] = {}
        answer: Result | None = None
        failure: BaseException | None = None
        obs = self._driver.observer  # observe
        call = None if obs is None else obs.call_received(self._peer, *_kind_of(frame))
        try:
            args, kwargs = self._bind(frame, method, opened)
            result = contextvars.copy_context().run(self._call_plain, method, args, kwargs)
            if type(frame) is Call:
                answer = self._result(frame, result)
        except Exception as exc:
            failure = exc
        self._finish(frame, answer, failure, call, in_reader=True)
        self._close_stream_args(frame, opened)

    def _call_plain(self, method: Method, args: list[Any], kwargs: dict[str, Any]) -> Any:
        _current_peer.set(self._peer)  # in the handler's own copy of the context
        result = method.func(*args, **kwargs)
        if _close_awaitable(result):
            # A wrapped async function that does not look like one: say so
            # rather than send a coroutine or leave it never awaited.
            raise InternalError(
                f"{method.name}: a plain function returned an awaitable; register the "
                "async function itself (or mark the wrapper with inspect.markcoroutinefunction)"
            )
        return result

    async def _run(self, frame: IncomingCall, method: Method, slot: _Slot) -> None:
        scope = slot.scope
        opened: dict[int, IncomingStream] = {}
        answer: Result | None = None
        failure: BaseException | None = None
        timeout = None if type(frame) is Notify else frame.timeout  # type: ignore[union-attr]
        token = _current_peer.set(self._peer)
        obs = self._driver.observer  # observe: in this task, so a span it makes is current
        call = None if obs is None else obs.call_received(self._peer, *_kind_of(frame))
        try:
            with scope:
                try:
                    args, kwargs = self._bind(frame, method, opened)
                    if timeout is None:  # the common case: no scope to enter
                        if type(frame) is Call and not method.streaming:  # and no frame
                            result = await method.func(*args, **kwargs)
                        else:
                            result = await self._invoke(frame, method, args, kwargs)
                    else:
                        with anyio.CancelScope(deadline=deadline(timeout)) as dl:
                            result = await self._invoke(frame, method, args, kwargs)
                        if dl.cancelled_caught:
                            raise DeadlineExceeded(
                                f"{frame.method}: deadline of {timeout} s exceeded"
                            )
                    if type(frame) is Call:
                        answer = self._result(frame, result)
                except Exception as exc:
                    failure = exc
                except BaseException as exc:
                    # Not the handler's to answer with (KeyboardInterrupt, ...): it
                    # goes on up, but its caller is answered (and it is logged) first,
                    # not left waiting. A cancellation is not a failure of the handler.
                    if not isinstance(exc, anyio.get_cancelled_exc_class()):
                        failure = exc
                    raise
            if (
                type(frame) is StreamCall
                and scope.cancelled_caught
                and not self._driver.proto.streams.is_cancelled(frame.stream_id)
            ):
                failure = Cancelled(f"{frame.method}: the stream's sender was cancelled")
        finally:
            _current_peer.reset(token)
            slot.free()
            if type(frame) is Call:
                self._driver.waiters.discard(HANDLER, frame.id)
            elif type(frame) is StreamCall:
                self._driver.waiters.discard(PUMP, frame.stream_id)
            else:
                self._driver.waiters.discard(NOTIFIED, id(slot))
            self._finish(frame, answer, failure, call)
            self._close_stream_args(frame, opened)

    async def _invoke(
        self, frame: IncomingCall, method: Method, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        """Run the handler as the frame's kind asks; a stream call pumps its items."""
        if type(frame) is StreamCall:
            if method.streaming:
                items = method.func(*args, **kwargs)
            else:
                items = method.func(*args, **kwargs)
                if not method.inline:
                    items = await items
                if not isinstance(items, AsyncIterable):
                    _close_awaitable(items)
                    raise _not_a_stream(frame.method)
            await self._senders.pump(StreamId(frame.stream_id), items)
            return None
        if method.streaming:
            raise MethodNotFound(f"{frame.method!r} streams its result: call it with stream()")
        return await method.func(*args, **kwargs)

    def _result(self, frame: Call, value: Any) -> Result:
        try:
            return Result(frame.id, self._driver.codec.encode_raw(value))
        except TypeError as exc:
            raise InternalError(f"{frame.method}: result cannot be encoded: {exc}") from exc

    def _finish(
        self,
        frame: IncomingCall,
        answer: Result | None,
        failure: BaseException | None,
        call: hooks.CallObservation | None = None,
        in_reader: bool = False,
    ) -> None:
        """Deliver a handler's outcome as its kind calls for. ``in_reader``: we
        run inside the reader, which sends whatever it queued as it finishes."""
        driver = self._driver
        t = type(frame)
        if t is Notify:
            if failure is not None:
                fields = {"method": frame.method, **hooks.peer_fields(self._peer)}
                log.error(
                    "notification handler %s failed (peer %s, principal %s)",
                    shorten(repr(frame.method)),
                    fields["remote_address"],
                    fields["principal"],
                    exc_info=failure,
                    extra=fields,
                )
            if call is not None:  # observe
                call.end(outcome_of(failure), failure)
            return
        error = None if failure is None else self.remote_error(failure, frame.method)
        if call is not None:  # observe
            call.end(outcome_of(error), failure)
        if t is Call:
            cid: int = frame.id  # type: ignore[union-attr]
            reply: Result | Error | None = answer
            if error is not None:
                reply = Error(cid, *wire_error(driver.codec, error))
            # No answer for a call the caller cancelled, or once closed: the protocol knows.
            if in_reader:
                driver.proto.end_call(cid, reply)
            else:
                driver.send_now(driver.proto.end_call, cid, reply)
        else:
            driver.proto.streams.end_outgoing(frame.stream_id, error)  # type: ignore[union-attr]

    def remote_error(self, exc: BaseException, what: str | None = None) -> RemoteError:
        """What the caller is told of an exception: itself if it is a
        :class:`RemoteError` (raised on purpose, so its message stands), else
        ``internal_error`` naming only the exception's type, unless
        ``expose_errors`` (then its text, and its traceback in ``data``).

        Every other exception is a bug in a handler or a stream's iterator: it is
        logged here, once, at ERROR with its traceback, the method (``what``)
        and the peer.
        """
        if isinstance(exc, RemoteError):
            return exc
        fields = {"method": what, **hooks.peer_fields(self._peer)}
        log.error(
            "%s failed (peer %s, principal %s)",
            "a stream sender" if what is None else f"handler {shorten(repr(what))}",
            fields["remote_address"],
            fields["principal"],
            exc_info=exc,
            extra=fields,
        )
        if not self.expose_errors:
            return InternalError(f"{type(exc).__name__}: {GENERIC_MESSAGE}")
        data = {"traceback": "".join(traceback.format_exception(exc))}
        return InternalError(f"{type(exc).__name__}: {exc}", data)

    # -- parameters and stream arguments ------------------------------------------------

    def _bind(
        self, frame: IncomingCall, method: Method, opened: dict[int, IncomingStream]
    ) -> tuple[list[Any], dict[str, Any]]:
        driver = self._driver

        def open_stream(sid: int, item_type: Any) -> IncomingStream:
            if driver.proto.streams.is_ours(sid):
                raise InvalidParams(f"{frame.method}: stream id {sid} is of the wrong side")
            try:
                stream = IncomingStream(driver, StreamId(sid), item_type)
            except LocalProtocolError as exc:
                raise InvalidParams(f"{frame.method}: {exc}") from None
            opened[sid] = stream
            return stream

        return method.bind(driver.codec, frame.args, frame.kwargs, frame.stream_args, open_stream)

    def _close_stream_args(self, frame: IncomingCall, opened: dict[int, IncomingStream]) -> None:
        """The call is over: close the stream arguments it opened, and refuse the
        ones it never opened (they never will be)."""
        if not frame.stream_args:
            return
        for stream in opened.values():
            stream.close()
        streams = self._driver.proto.streams
        for sid in self._stream_arg_ids(frame):
            if sid not in opened:
                streams.refuse_incoming(sid)

    def _stream_arg_ids(self, frame: IncomingCall) -> list[int]:
        codec = self._driver.codec
        decoded: dict[bool, Any] = {}  # positional? -> args or kwargs, decoded once
        sids = []
        for key in frame.stream_args:
            positional = isinstance(key, int)
            try:
                if positional not in decoded:
                    decoded[positional] = codec.decode(frame.args if positional else frame.kwargs)
                sid = decoded[positional][key]
            except Exception:  # malformed parameters were answered already
                continue
            if isinstance(sid, int):
                sids.append(sid)
        return sids


class _Slot:
    """A running handler's place among ``max_concurrent_handlers``. The caller
    frees it when it cancels (the handler is on its way out, and the caller
    already counts the slot free, see admission.py), else the handler's end."""

    __slots__ = ("callee", "held", "scope")

    def __init__(self, callee: Callee) -> None:
        callee.running += 1
        self.callee = callee
        self.held = True
        self.scope = callee._driver.new_scope()

    def cancel(self) -> None:
        self.scope.cancel()
        self.free()

    def free(self) -> None:
        if self.held:
            self.held = False
            self.callee.running -= 1


def _kind_of(frame: IncomingCall) -> tuple[str, str, dict[str, str] | None]:
    """observe: a call's kind, method and metadata, as observers are told them."""
    t = type(frame)
    kind = hooks.CALL if t is Call else hooks.STREAM if t is StreamCall else hooks.NOTIFY
    return kind, frame.method, frame.meta


def _not_a_stream(method: str) -> MethodNotFound:
    return MethodNotFound(f"{method!r} does not stream: call it with call()")


def _close_awaitable(value: Any) -> bool:
    """Close ``value`` if it is an awaitable nobody will await; whether it was one."""
    if not inspect.isawaitable(value):
        return False
    close = getattr(value, "close", None)
    if close is not None:
        close()
    return True
