"""RpcPeer: one symmetric object per connection, driving :mod:`rpcstream.protocol` with anyio.

Theory of operation
-------------------
Three kinds of task run in the peer's task group:

* the **reader** hands each received message to the Sans-I/O protocol and acts
  on the events that come back: it starts handler tasks, completes pending
  calls and wakes the stream consumers and senders that wait. Where the
  transport can hand messages over as they arrive (websockets on asyncio), that
  work runs in the transport's callback, with no task switch per message, and
  the reader task only waits for the connection's end;
* the **writer** sends what the protocol has queued. While it awaits the socket,
  frames keep queueing, and the next message takes them all: that coalescing is
  what makes many small stream items cheap;
* **handlers** and **pumps**: one task per incoming call to an ``async def``
  handler (a plain ``def`` runs in the reader, at once, with no task), and one
  per outgoing stream, each in its own cancel scope so a ``Cancel``/``StreamCancel`` frame,
  a deadline or the end of the connection can cancel exactly that work.

Calls and answers skip the writer when they can (``_flush``): if the writer is
not mid-send and the transport can take a message without waiting, whoever
queued the frame writes it at once, which saves a task switch per call. Such a
write never awaits, so a cancelled caller can never leave half a message on the
wire; a caller's cancellation only queues a ``Cancel`` frame. When one read of
the socket wakes several callers or handlers, their frames wait for the writer
instead and leave together.

The task group's own cancel scope encloses the body of ``async with peer:``, so
it is only ever cancelled on exit: a lost connection fails pending work with
:class:`ConnectionClosed` instead of silently cancelling the user's code.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import sniffio
from anyio.abc import TaskGroup

from ._tasks import task_group
from .errors import (
    Cancelled,
    ConnectionClosed,
    DeadlineExceeded,
    InternalError,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    RateLimited,
    RemoteError,
)
from .limits import TokenBucket
from .messages import (
    MSGPACK,
    Call,
    Cancel,
    Codec,
    Error,
    Fault,
    Notify,
    Result,
    StreamCall,
    StreamCancel,
    StreamId,
)
from .protocol import (
    Empty,
    Finished,
    Protocol,
    Side,
    StreamCancelled,
    StreamReadable,
    StreamWritable,
    shorten,
    wire_error,
)
from .router import Method, Router
from .transport.base import Transport

__all__ = ["PING", "IncomingStream", "RpcPeer", "current_peer"]

PING = "rpcstream.ping"
"""A reserved method every peer answers with ``None`` at once: a liveness check for
clients (browsers) that cannot send WebSocket pings."""

log = logging.getLogger("rpcstream.peer")

_NOT_READING = "too many answers queued: the peer does not read"
_LARGE_ITEM = 16 * 1024  # stream items this large skip the writer when they can

_current_peer: contextvars.ContextVar[RpcPeer] = contextvars.ContextVar("rpcstream_peer")


def current_peer() -> RpcPeer:
    """The :class:`RpcPeer` of the connection whose call is being handled.

    Raises :class:`LookupError` outside a handler.
    """
    return _current_peer.get()


class _PendingCall:
    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.answer: Result | Error | None = None


class RpcPeer:
    """One end of an rpcstream connection: call, notify and stream, both ways.

    Use it as an async context manager; :func:`rpcstream.connect` and
    :func:`rpcstream.serve` build it for you over a WebSocket, and
    :func:`rpcstream.testing.memory_peer_pair` over memory.

    Args:
        transport: carries the messages.
        router: the methods the other side may call on this one.
        codec: the wire format (negotiated by subprotocol for WebSockets).
        side: ``Side.CONNECTING`` or ``Side.ACCEPTING`` (fixes stream id parity).
        max_concurrent_handlers: running handlers beyond which a call is
            answered ``overloaded`` at once instead of queued (plain-function
            handlers finish at once and hold no slot).
        window_items, window_bytes: the credit each incoming stream grants at first.
        max_window_bytes: a stream's byte window doubles, up to this, while the
            window is what holds it back (its sender uses all its credit and its
            consumer waits); ``window_bytes`` turns growth off.
        max_window_growth: the total growth all incoming streams of the
            connection may hold at once: the receive buffers stay within
            ``max_streams * window_bytes + max_window_growth``.
        max_buffered_amount: stream senders wait while more than this many bytes
            are queued for the socket, until it drains below a quarter of it.
        max_streams: open streams (both directions) per connection.
        expose_tracebacks: send handler tracebacks to the caller in ``data``.
        close_timeout: how long closing may wait to flush and say goodbye.
        call_rate: ``(per_second, burst)``: incoming calls, notifications and
            stream calls beyond this token bucket are answered ``rate_limited``.
        max_queued_bytes: answers queued for a peer that does not read them
            (it keeps calling but never reads) beyond this abort the connection
            (local code 1008): stream data is bounded by credit, answers by this.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        router: Router | None = None,
        codec: Codec = MSGPACK,
        side: Side = Side.CONNECTING,
        max_concurrent_handlers: int = 256,
        window_items: int = 256,
        window_bytes: int = 256 * 1024,
        max_window_bytes: int = 4 * 1024 * 1024,
        max_window_growth: int = 16 * 1024 * 1024,
        max_buffered_amount: int = 1024 * 1024,
        max_streams: int = 4096,
        expose_tracebacks: bool = False,
        close_timeout: float = 5.0,
        call_rate: tuple[float, int] | None = None,
        max_queued_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.transport = transport
        self.router = router if router is not None else Router()
        self.codec = codec
        self._proto = Protocol(
            codec,
            side,
            window_items=window_items,
            window_bytes=window_bytes,
            max_window_bytes=max_window_bytes,
            max_window_growth=max_window_growth,
            max_streams=max_streams,
            on_data=self._wake,
        )
        self.max_concurrent_handlers = max_concurrent_handlers
        self.max_buffered_amount = max_buffered_amount
        self.low_buffered_amount = max_buffered_amount // 4
        self.expose_tracebacks = expose_tracebacks
        self.max_queued_bytes = max_queued_bytes
        self._call_bucket = TokenBucket(*call_rate) if call_rate is not None else None
        self.close_timeout = close_timeout
        self._text = not codec.binary
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._calls: dict[int, _PendingCall] = {}
        self._handlers: dict[int, anyio.CancelScope] = {}  # incoming call id -> scope
        self._pumps: dict[int, anyio.CancelScope] = {}  # outgoing stream id -> scope
        self._readable: dict[int, anyio.Event] = {}  # incoming stream id -> waiter
        self._writable: dict[int, anyio.Event] = {}  # outgoing stream id -> waiter
        self._wakeup = anyio.Event()  # the writer waits on this
        self._quiet = False  # queueing a frame does not wake the writer (see _flush)
        self._coalesce = False  # frames wait for the writer, to leave together
        self._read_ended = anyio.Event()  # the transport delivers: the end came
        self._read_stop: str | BaseException | None = None  # why delivered reading stopped
        self._write_error: Exception | None = None  # a direct write failed: the writer ends
        self._drained: anyio.Event | None = None
        self._flushed: anyio.Event | None = None
        self._closed = anyio.Event()
        self._closing: anyio.Event | None = None
        self._transport_lost = False  # the transport failed or closed under us
        self._close_exc: ConnectionClosed | None = None
        self._inflight = 0
        self._running = 0
        self._tasks = 0
        self.calls_received = 0
        self.principal: Any = None
        """Who the other side is, as ``authenticate`` said (server side)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        self._tg = await stack.enter_async_context(task_group())
        self._stack = stack
        self._spawn(self._read_loop)
        self._spawn(self._write_loop)
        return self

    def _spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Start a task the peer owns, counted in ``stats["tasks"]``."""
        assert self._tg is not None
        self._tasks += 1
        self._tg.start_soon(self._counted, func, args)

    async def _counted(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            await func(*args)
        finally:
            self._tasks -= 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None and self._stack is not None
        try:
            await self.aclose()
        finally:
            self._tg.cancel_scope.cancel()
            suppress = await self._stack.__aexit__(exc_type, exc, tb)
        return suppress

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by either side) or broken."""
        return self._close_exc is not None

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side, or breaks."""
        await self._closed.wait()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection: fail pending calls, cancel handlers and streams,
        flush what is queued and run the closing handshake, within ``close_timeout``."""
        if self._closing is not None:
            # Someone is closing already (with their code): wait for them rather
            # than racing a second close handshake against their flush.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2 * self.close_timeout):
                await self._closing.wait()
            return
        self._closing = closing = anyio.Event()
        try:
            await self._close(code, reason)
        finally:
            closing.set()

    async def _close(self, code: int, reason: str) -> None:
        if self._close_exc is None:
            self._shutdown(ConnectionClosed(code, reason or "closed locally"))
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            # Let the writer flush what was queued (cancels, answers) before
            # closing; pointless once the transport itself is gone.
            while (self._proto.has_data() or self._inflight) and not self._transport_lost:
                self._flushed = anyio.Event()
                self._wakeup.set()
                await self._flushed.wait()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            try:
                await self.transport.aclose(code, reason)
            except Exception:  # the socket may already be gone: nothing left to do
                log.debug("error while closing the transport", exc_info=True)

    def _check_method(self, method: str) -> None:
        """A method name must be text the codecs can encode: refuse it here,
        where the caller can see why, not in the writer (which would have to
        end the connection)."""
        if not method.isascii():
            method.encode()  # UnicodeEncodeError (a ValueError) for a lone surrogate

    def _check_open(self) -> None:
        if self._close_exc is not None:
            raise ConnectionClosed(self._close_exc.code, self._close_exc.reason)
        if self._tg is None:
            raise LocalProtocolError("use the peer as an async context manager first")

    def _shutdown(self, exc: ConnectionClosed) -> None:
        """Fail everything that depends on the connection, at once. Idempotent."""
        if self._close_exc is not None:
            return
        self._close_exc = exc
        for pending in self._calls.values():
            pending.event.set()
        self._proto.fail_all_incoming(exc)
        for ev in self._readable.values():
            ev.set()
        self._proto.cancel_all_outgoing()
        for scope in list(self._pumps.values()):
            scope.cancel()
        for scope in list(self._handlers.values()):
            scope.cancel()
        for ev in self._writable.values():
            ev.set()
        if self._drained is not None:
            self._drained.set()
        self._wakeup.set()
        self._closed.set()

    # -- stats -------------------------------------------------------------------------

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for the socket and not yet written to it (as in browsers)."""
        return self._proto.queued_bytes + self._inflight + self.transport.buffered_amount

    @property
    def stats(self) -> dict[str, int]:
        """Counts of live work on this connection (all zero once it is closed and idle)."""
        return {
            "pending_calls": len(self._calls),
            "running_handlers": self._running,
            "streams": self._proto.stream_count,
            "pumps": len(self._pumps),
            "tasks": self._tasks,
        }

    # -- the two loops -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        # Delivered messages run in the transport's callbacks, outside any task:
        # give them this task's context, so handlers see what the connection's
        # task set (current_principal, the user's own context variables), and
        # name the event loop there, which anyio cannot detect without a task.
        context = contextvars.copy_context()
        context.run(sniffio.current_async_library_cvar.set, sniffio.current_async_library())

        def on_messages(messages: list[bytes]) -> None:
            context.run(self._on_messages, messages)

        try:
            if self.transport.deliver(on_messages, self._read_ended.set):
                # Messages arrive through _on_messages, with no task switch each;
                # this task only waits for the end and turns it into actions.
                await self._read_ended.wait()
                stop = self._read_stop
                if isinstance(stop, BaseException):
                    raise stop
                if stop is not None:
                    await self._abandon(1008, stop)
                    return
                await self.transport.receive()  # raises the connection's end
            else:
                while True:
                    if not self._receive([await self.transport.receive()]):
                        await self._abandon(1008, _NOT_READING)
                        return
        except ConnectionClosed as exc:
            self._transport_lost = True
            self._shutdown(exc)
            if self._flushed is not None:
                self._flushed.set()
        except Exception as exc:  # a bug or an unexpected transport error: never hang
            log.error("rpcstream reader failed", exc_info=exc)
            self._shutdown(ConnectionClosed(1011, f"internal error: {exc}"))
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                await self.transport.aclose(1011, "internal error")

    def _on_messages(self, messages: list[bytes]) -> None:
        """Messages handed over by the transport as they arrived (see _read_loop)."""
        if self._read_stop is not None or self._close_exc is not None:
            return  # ending: nothing can wait for what follows (as after a loop's end)
        try:
            if not self._receive(messages):
                self._read_stop = _NOT_READING
                self._read_ended.set()
        except BaseException as exc:  # never into the transport's callback: the reader raises it
            self._read_stop = exc
            self._read_ended.set()

    def _receive(self, messages: list[bytes]) -> bool:
        """Act on messages that arrived together; whatever they make us send
        leaves as one message. ``False`` when the other side broke the limit on
        queued answers."""
        proto, dispatch = self._proto, self._dispatch
        count = 0
        outer = self._quiet
        self._quiet = True
        try:
            for message in messages:
                events = proto.receive_message(message)
                count += len(events)
                for event in events:
                    dispatch(event)
        finally:
            self._quiet = outer
        if proto.queued_bytes > self.max_queued_bytes:
            return False
        if count > 1:
            # A burst: the callers and handlers it woke answer in the next
            # iteration; their frames wait for the writer and leave together.
            self._coalesce = True
            self._wakeup.set()
        self._flush()
        return True

    async def _abandon(self, code: int, reason: str) -> None:
        """Drop the connection at once, and what is queued: the peer broke a
        limit by not reading, so it would not read a close frame either."""
        log.warning("aborting a connection (%d): %s", code, reason)
        self._proto.discard_queued()
        self._transport_lost = True
        self._shutdown(ConnectionClosed(code, reason))
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            await self.transport.abort()

    async def _write_loop(self) -> None:
        proto, transport, text = self._proto, self.transport, self._text
        try:
            while True:
                if self._write_error is not None:
                    raise self._write_error  # a direct write failed (see _flush)
                self._coalesce = False
                message = proto.data_to_send()
                if message is None:
                    # Idle: what is still buffered is the transport's to drain, and
                    # no send of ours will come to wake the senders waiting for it.
                    drained = self._drained
                    if drained is not None:
                        self._drained = None
                        drained.set()
                    if self._flushed is not None:
                        self._flushed.set()
                    # Even once closed, stay until the task group ends us, so that
                    # aclose()'s final flush still has a writer.
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                self._inflight = len(message)
                try:
                    await transport.send(message, text=text)
                finally:
                    self._inflight = 0
                self._sent()
        except ConnectionClosed as exc:
            self._transport_lost = True
            self._shutdown(exc)
            if self._flushed is not None:
                self._flushed.set()
        except Exception as exc:
            log.exception("rpcstream writer failed")
            self._shutdown(ConnectionClosed(1011, f"internal error: {exc}"))
            if self._flushed is not None:
                self._flushed.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                await self.transport.aclose(1011, "internal error")

    def _sent(self) -> None:
        """A message left: wake the stream senders waiting for the buffer to drain."""
        drained = self._drained
        if drained is not None and self.buffered_amount <= self.low_buffered_amount:
            self._drained = None
            drained.set()

    def _dispatch(self, event: Any) -> None:
        t = type(event)
        if t is StreamReadable:
            self._wake_reader(event.stream_id)
        elif t is Result or t is Error:
            pending = self._calls.get(event.id)
            if pending is not None:
                pending.answer = event
                pending.event.set()
        elif t is StreamWritable:
            ev = self._writable.get(event.stream_id)
            if ev is not None:
                ev.set()
        elif t is Call:
            self._start_handler(event, event.id, self._run_call)
        elif t is StreamCall:
            self._start_handler(event, None, self._run_stream_call)
        elif t is Notify:
            self._start_handler(event, None, self._run_notify)
        elif t is Cancel:
            scope = self._handlers.get(event.id)
            if scope is not None:
                scope.cancel()
        elif t is StreamCancelled:
            scope = self._pumps.get(event.stream_id)
            if scope is not None:
                scope.cancel()
            ev = self._writable.get(event.stream_id)
            if ev is not None:
                ev.set()
        elif t is Fault:
            log.warning(
                "peer reported a protocol fault: [%s] %s", event.code, shorten(event.message)
            )

    def _wake_reader(self, sid: int) -> None:
        ev = self._readable.get(sid)
        if ev is not None:
            ev.set()

    def _wake(self) -> None:
        if not self._quiet:  # else whoever set _quiet calls _flush() next
            self._wakeup.set()

    def _send_now(self, frame: Any) -> None:
        """Queue ``frame`` and send it at once if the socket can take it: calls
        and answers, where a trip through the writer task would add latency.
        Inside another quiet section (a handler run eagerly from ``_receive``),
        that section sends it."""
        outer = self._quiet
        self._quiet = True
        try:
            self._proto.send(frame)
        finally:
            self._quiet = outer
        if not outer:
            self._flush()

    def _send_item_now(self, sid: StreamId, payload: msgspec.Raw) -> None:
        """As :meth:`_send_now`, for a stream item."""
        outer = self._quiet
        self._quiet = True
        try:
            self._proto.send_item(sid, payload)
        finally:
            self._quiet = outer
        if not outer:
            self._flush()

    def _flush(self) -> None:
        """Write the next queued message now if the transport can without waiting
        and the writer is not mid-send (the order of messages is kept); leave the
        rest to the writer. Never awaits, so no cancellation can cut a message."""
        proto, transport = self._proto, self.transport
        if not proto.has_data():
            return
        if not self._inflight and not self._coalesce and transport.can_send_now():
            try:
                message = proto.data_to_send()
                assert message is not None
                transport.send_now(message, text=self._text)
            except Exception as exc:  # an unencodable frame: as in the writer, end with 1011
                self._write_error = exc
                self._wakeup.set()
                return
            self._sent()
            if not proto.has_data():
                return
        self._wakeup.set()

    # -- outgoing calls ----------------------------------------------------------------

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        result_type: Any = Any,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the other side and return its result.

        ``timeout`` (seconds) bounds the wait and travels with the call as a
        deadline the callee enforces; when it passes, :class:`DeadlineExceeded`.
        ``result_type`` converts the result (default: plain msgspec types).
        Async iterables among the arguments travel as streams. Cancelling the
        caller sends a ``Cancel`` frame, which cancels the handler.
        """
        self._check_open()
        self._check_method(method)
        proto = self._proto
        cid = proto.next_call_id()
        args_raw, kwargs_raw, stream_args, sids = self._encode_params(args, kwargs)
        pending = self._calls[cid] = _PendingCall()
        self._send_now(Call(cid, method, args_raw, kwargs_raw, timeout, stream_args))
        try:
            if timeout is None:
                await pending.event.wait()
            else:
                with anyio.move_on_after(timeout):
                    await pending.event.wait()
                if not pending.event.is_set():
                    raise DeadlineExceeded(f"{method}: no answer within {timeout} s")
        except BaseException:
            if pending.answer is None and self._close_exc is None:
                proto.send(Cancel(cid))
            self._stop_unopened(sids)
            raise
        finally:
            del self._calls[cid]
        answer = pending.answer
        if answer is None:
            assert self._close_exc is not None
            self._stop_unopened(sids)
            raise ConnectionClosed(self._close_exc.code, self._close_exc.reason)
        if type(answer) is Result:
            try:
                return self.codec.decode(answer.value, result_type)
            except msgspec.ValidationError as exc:
                raise InternalError(
                    f"{method}: result did not match {result_type!r}: {exc}"
                ) from None
        assert isinstance(answer, Error)
        self._stop_unopened(sids)
        raise RemoteError.from_wire(answer.code, answer.message, answer.data)

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Call ``method`` on the other side without waiting for (or getting) an answer."""
        self._check_open()
        self._check_method(method)
        args_raw, kwargs_raw, stream_args, _ = self._encode_params(args, kwargs)
        self._proto.send(Notify(method, args_raw, kwargs_raw, stream_args))
        await anyio.lowlevel.checkpoint()

    def stream(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        item_type: Any = Any,
        window_items: int | None = None,
        window_bytes: int | None = None,
        **kwargs: Any,
    ) -> IncomingStream:
        """Call a streaming ``method``; iterate the result for its items.

        ``async for item in peer.stream("count", 10): ...``. Leaving the loop
        early (``break``, an exception, cancellation) stops the sender; use
        ``async with peer.stream(...) as items:`` to stop it at a known point.
        """
        self._check_open()
        self._check_method(method)
        proto = self._proto
        sid = proto.next_stream_id()
        # Open our end first: if that fails, no handler is left waiting for credit.
        stream = IncomingStream(self, sid, item_type, window_items, window_bytes, timeout)
        try:
            args_raw, kwargs_raw, stream_args, _ = self._encode_params(args, kwargs)
        except BaseException:
            stream.close()
            raise
        proto.send(StreamCall(sid, method, args_raw, kwargs_raw, timeout, stream_args))
        return stream

    def _encode_params(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[msgspec.Raw, msgspec.Raw, list[int | str], list[StreamId]]:
        codec = self.codec
        stream_args: list[int | str] = []
        sids: list[StreamId] = []
        try:
            if any(isinstance(a, AsyncIterable) for a in args) or any(
                isinstance(v, AsyncIterable) for v in kwargs.values()
            ):
                new_args = list(args)
                for i, a in enumerate(args):
                    if isinstance(a, AsyncIterable):
                        new_args[i] = sid = self._start_pump(a)
                        stream_args.append(i)
                        sids.append(sid)
                new_kwargs = dict(kwargs)
                for k, v in kwargs.items():
                    if isinstance(v, AsyncIterable):
                        new_kwargs[k] = sid = self._start_pump(v)
                        stream_args.append(k)
                        sids.append(sid)
                args, kwargs = tuple(new_args), new_kwargs
            args_raw = codec.encode_raw(args) if args else codec.empty_array
            kwargs_raw = codec.encode_raw(kwargs) if kwargs else codec.empty_map
        except BaseException as exc:
            for sid in sids:  # the call will not be made: stop its streams
                self.abort_stream(sid)
            if isinstance(exc, TypeError):
                raise TypeError(f"parameters cannot be encoded: {exc}") from exc
            raise
        return args_raw, kwargs_raw, stream_args, sids

    def _stop_unopened(self, sids: list[StreamId]) -> None:
        # A call that ended will never open the streams it did not open yet.
        for sid in sids:
            if not self._proto.is_cancelled(sid) and not self._proto.can_send(sid):
                scope = self._pumps.get(sid)
                if scope is not None:
                    scope.cancel()

    # -- raw streams -------------------------------------------------------------------

    async def send_stream(
        self, items: AsyncIterable[Any], stream_id: int | None = None
    ) -> StreamId:
        """Send ``items`` as a stream, in the background; return its id.

        With no ``stream_id`` one is allocated (tell the receiver by a call);
        pass the id a receiver allocated with :meth:`receive_stream` otherwise.
        Nothing is sent until the receiver opens the stream by granting credit.
        """
        self._check_open()
        sid = self._start_pump(items, stream_id)
        await anyio.lowlevel.checkpoint()
        return sid

    def receive_stream(
        self,
        stream_id: int | None = None,
        *,
        item_type: Any = Any,
        window_items: int | None = None,
        window_bytes: int | None = None,
    ) -> tuple[StreamId, IncomingStream]:
        """Open a stream to receive: the id a sender allocated, or a new one to
        hand to the sender. Returns the id and an async iterator of its items."""
        self._check_open()
        sid = StreamId(self._proto.next_stream_id() if stream_id is None else stream_id)
        stream = IncomingStream(self, sid, item_type, window_items, window_bytes, None)
        return sid, stream

    def abort_stream(self, stream_id: int) -> None:
        """Sender side: stop an outgoing stream; its receiver gets ``Cancelled``."""
        scope = self._pumps.get(stream_id)
        if scope is not None:
            scope.cancel()

    def close_receiving_stream(self, stream_id: int) -> None:
        """Receiver side: stop reading a stream; its sender is told to stop."""
        self._proto.close_incoming(stream_id)
        ev = self._readable.pop(stream_id, None)
        if ev is not None:
            ev.set()

    def _start_pump(self, items: AsyncIterable[Any], stream_id: int | None = None) -> StreamId:
        assert self._tg is not None
        sid = StreamId(self._proto.next_stream_id() if stream_id is None else stream_id)
        self._proto.open_outgoing(sid)
        scope = self._pumps[sid] = anyio.CancelScope()
        self._spawn(self._run_pump, sid, scope, items)
        return sid

    async def _run_pump(self, sid: StreamId, scope: anyio.CancelScope, items: Any) -> None:
        error: RemoteError | None = None
        try:
            with scope:
                try:
                    await self._pump_items(sid, items)
                except RemoteError as exc:
                    error = exc
                except Exception as exc:
                    error = self._internal_error(exc)
            if scope.cancelled_caught:
                error = Cancelled(f"stream {sid}: the sender stopped")
        finally:
            self._pumps.pop(sid, None)
            self._proto.end_outgoing(sid, error)

    async def _pump_items(self, sid: StreamId, items: AsyncIterable[Any]) -> None:
        """Send every item of ``items`` on ``sid`` under credit and buffer limits,
        closing the iterator whatever happens (its ``finally`` runs)."""
        proto = self._proto
        encode = self.codec.encode_raw
        iterator = aiter(items)
        try:
            async for item in iterator:
                payload = encode(item)
                while not proto.can_send(sid):
                    if proto.is_cancelled(sid) or self._close_exc is not None:
                        return
                    ev = self._writable[sid] = anyio.Event()
                    try:
                        await ev.wait()
                    finally:
                        self._writable.pop(sid, None)
                if self.buffered_amount > self.max_buffered_amount:
                    await self._wait_drained()
                if len(payload) < _LARGE_ITEM:
                    proto.send_item(sid, payload)  # the writer takes it with its neighbours
                else:  # batching saves nothing here: write it now if nothing waits
                    self._send_item_now(sid, payload)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                    await aclose()

    async def _wait_drained(self) -> None:
        while self.buffered_amount > self.low_buffered_amount and self._close_exc is None:
            if not self._proto.has_data() and not self._inflight:
                return  # only the transport holds bytes: its own send() waits for them
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    # -- incoming calls ----------------------------------------------------------------

    def _start_handler(self, frame: Any, call_id: int | None, runner: Callable[..., Any]) -> None:
        assert self._tg is not None
        self.calls_received += 1
        method = self.router.get(frame.method)
        if method is None and frame.method == PING and type(frame) is Call:
            self._proto.send(Result(frame.id, self.codec.encode_raw(None)))
            return
        if self._call_bucket is not None and not self._call_bucket.take():
            self._refuse(frame, RateLimited(f"{frame.method}: too many calls on this connection"))
            return
        if self._running >= self.max_concurrent_handlers:
            self._refuse(
                frame,
                Overloaded(
                    f"{self._running} handlers running (max_concurrent_handlers="
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
            self._run_inline(frame, method)
            return
        self._running += 1
        scope = anyio.CancelScope()
        if call_id is not None:
            self._handlers[call_id] = scope
        elif type(frame) is StreamCall:
            self._pumps[frame.stream_id] = scope
        self._spawn(runner, frame, method, scope)

    def _run_inline(self, frame: Call | Notify, method: Method) -> None:
        """A plain-function handler runs now, where the call arrived: no task to
        start, nothing to wait for or cancel. It runs in a copy of the context,
        so what it sets stays its own, as in a task."""
        opened: dict[int, IncomingStream] = {}
        answer: Result | Error | None = None
        try:
            args, kwargs = self._bind(frame, method, opened)
            result = contextvars.copy_context().run(self._call_plain, method, args, kwargs)
            if type(frame) is Call:
                try:
                    answer = Result(frame.id, self.codec.encode_raw(result))
                except TypeError as exc:
                    raise InternalError(f"{frame.method}: result cannot be encoded: {exc}") from exc
        except RemoteError as exc:
            if type(frame) is Call:
                answer = self._error_frame(frame.id, exc)
        except Exception as exc:
            if type(frame) is Call:
                answer = self._error_frame(frame.id, self._internal_error(exc))
            else:
                log.exception("notification handler %r failed", frame.method)
        if answer is not None:
            self._proto.send(answer)  # the reader sends it with whatever else it queued
        self._cancel_stream_args(frame, opened)

    def _call_plain(self, method: Method, args: list[Any], kwargs: dict[str, Any]) -> Any:
        _current_peer.set(self)  # in the handler's own copy of the context
        result = method.func(*args, **kwargs)
        if _close_awaitable(result):
            # A wrapped async function that does not look like one: say so
            # rather than send a coroutine or leave it never awaited.
            raise InternalError(
                f"{method.name}: a plain function returned an awaitable; register the "
                "async function itself (or mark the wrapper with inspect.markcoroutinefunction)"
            )
        return result

    def _refuse(self, frame: Any, error: RemoteError) -> None:
        proto = self._proto
        if type(frame) is Call:
            proto.send(Error(frame.id, error.code, error.message))
        elif type(frame) is StreamCall:
            proto.end_outgoing(frame.stream_id, error)
        else:
            log.warning("dropped notification %s: %s", shorten(repr(frame.method)), error)
        self._cancel_stream_args(frame, {})

    def _bind(
        self, frame: Any, method: Method, opened: dict[int, IncomingStream]
    ) -> tuple[list[Any], dict[str, Any]]:
        def open_stream(sid: int, item_type: Any) -> IncomingStream:
            if self._proto.is_ours(sid):
                raise InvalidParams(f"{frame.method}: stream id {sid} is of the wrong side")
            try:
                stream = IncomingStream(self, StreamId(sid), item_type, None, None, None)
            except LocalProtocolError as exc:
                raise InvalidParams(f"{frame.method}: {exc}") from None
            opened[sid] = stream
            return stream

        return method.bind(self.codec, frame.args, frame.kwargs, frame.stream_args, open_stream)

    def _cancel_stream_args(self, frame: Any, opened: dict[int, IncomingStream]) -> None:
        """The call is over: close the stream arguments it opened, and tell the
        caller to stop the ones it never opened (they never will be)."""
        if not frame.stream_args:
            return
        for stream in opened.values():
            stream.close()
        decoded: dict[bool, Any] = {}  # positional? -> args or kwargs, decoded once
        for key in frame.stream_args:
            positional = isinstance(key, int)
            try:
                if positional not in decoded:
                    decoded[positional] = self.codec.decode(
                        frame.args if positional else frame.kwargs
                    )
                sid = decoded[positional][key]
            except (msgspec.DecodeError, IndexError, KeyError, TypeError):
                continue
            if isinstance(sid, int) and sid not in opened:
                self._proto.send(StreamCancel(sid))

    async def _run_call(self, frame: Call, method: Method, scope: anyio.CancelScope) -> None:
        opened: dict[int, IncomingStream] = {}
        answer: Result | Error | None = None
        token = _current_peer.set(self)
        try:
            with scope:
                try:
                    args, kwargs = self._bind(frame, method, opened)
                    if method.streaming:
                        raise MethodNotFound(
                            f"{frame.method!r} streams its result: call it with stream()"
                        )
                    if frame.timeout is None:  # the common case: no scope to enter
                        result = await method.func(*args, **kwargs)
                    else:
                        with anyio.CancelScope(deadline=_deadline(frame.timeout)) as dl:
                            result = await method.func(*args, **kwargs)
                    if frame.timeout is not None and dl.cancelled_caught:
                        raise DeadlineExceeded(
                            f"{frame.method}: deadline of {frame.timeout} s exceeded"
                        )
                    try:
                        answer = Result(frame.id, self.codec.encode_raw(result))
                    except TypeError as exc:
                        raise InternalError(
                            f"{frame.method}: result cannot be encoded: {exc}"
                        ) from exc
                except RemoteError as exc:
                    answer = self._error_frame(frame.id, exc)
                except Exception as exc:
                    answer = self._error_frame(frame.id, self._internal_error(exc))
        finally:
            _current_peer.reset(token)
            self._handlers.pop(frame.id, None)
            self._running -= 1
            # A cancelled handler (Cancel frame or closing) sends no answer.
            if answer is not None and not scope.cancel_called and self._close_exc is None:
                self._send_now(answer)
            self._cancel_stream_args(frame, opened)

    async def _run_notify(self, frame: Notify, method: Method, scope: anyio.CancelScope) -> None:
        opened: dict[int, IncomingStream] = {}
        token = _current_peer.set(self)
        try:
            with scope:
                try:
                    args, kwargs = self._bind(frame, method, opened)
                    await method.func(*args, **kwargs)
                except Exception:
                    log.exception("notification handler %r failed", frame.method)
        finally:
            _current_peer.reset(token)
            self._running -= 1
            self._cancel_stream_args(frame, opened)

    async def _run_stream_call(
        self, frame: StreamCall, method: Method, scope: anyio.CancelScope
    ) -> None:
        sid = StreamId(frame.stream_id)
        opened: dict[int, IncomingStream] = {}
        error: RemoteError | None = None
        token = _current_peer.set(self)
        try:
            with scope:
                try:
                    args, kwargs = self._bind(frame, method, opened)
                    with anyio.CancelScope(deadline=_deadline(frame.timeout)) as dl:
                        if method.streaming:
                            items = method.func(*args, **kwargs)
                        else:
                            if method.inline:
                                items = method.func(*args, **kwargs)
                            else:
                                items = await method.func(*args, **kwargs)
                            if not isinstance(items, AsyncIterable):
                                _close_awaitable(items)
                                raise _not_a_stream(frame.method)
                        await self._pump_items(sid, items)
                    if dl.cancelled_caught:
                        error = DeadlineExceeded(
                            f"{frame.method}: deadline of {frame.timeout} s exceeded"
                        )
                except RemoteError as exc:
                    error = exc
                except Exception as exc:
                    error = self._internal_error(exc)
            if scope.cancelled_caught and not self._proto.is_cancelled(sid):
                error = Cancelled(f"{frame.method}: the stream's sender was cancelled")
        finally:
            _current_peer.reset(token)
            self._pumps.pop(sid, None)
            self._running -= 1
            self._proto.end_outgoing(sid, error)
            self._cancel_stream_args(frame, opened)

    def _internal_error(self, exc: BaseException) -> RemoteError:
        data = None
        if self.expose_tracebacks:
            data = {"traceback": "".join(traceback.format_exception(exc))}
        log.debug("handler raised", exc_info=exc)
        return InternalError(f"{type(exc).__name__}: {exc}", data)

    def _error_frame(self, call_id: int, exc: RemoteError) -> Error:
        return Error(call_id, *wire_error(self.codec, exc))


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


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    return anyio.current_time() + max(0.0, timeout)


class IncomingStream(AsyncIterator[Any]):
    """The items of a stream this peer receives, as an async iterator.

    Dropping it, leaving ``async with``, :meth:`close`, or cancelling the task
    while it waits for an item tells the sender to stop. When the sender failed,
    iteration raises its :class:`RemoteError` after the items sent before the
    failure; when the connection closed, :class:`ConnectionClosed`.
    """

    def __init__(
        self,
        peer: RpcPeer,
        stream_id: StreamId,
        item_type: Any,
        window_items: int | None,
        window_bytes: int | None,
        timeout: float | None,
    ) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self._open = True
        self._deadline = _deadline(timeout)
        decoder = peer.codec.decoder(item_type)
        peer._proto.open_incoming(
            stream_id, decoder.decode, window_items=window_items, window_bytes=window_bytes
        )

    def __repr__(self) -> str:
        return f"<IncomingStream {self.stream_id}{'' if self._open else ' closed'}>"

    @property
    def window_bytes(self) -> int:
        """The byte window this stream grants now: it grows, up to the peer's
        ``max_window_bytes``, while the window is what holds the stream back."""
        return self.peer._proto.window_bytes_of(self.stream_id)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if not self._open:
            raise StopAsyncIteration
        peer, sid = self.peer, self.stream_id
        proto = peer._proto
        while True:
            try:
                return proto.pop_item(sid)
            except Empty:
                pass
            except Finished:
                self.close()
                raise StopAsyncIteration from None
            except KeyError:  # closed with peer.close_receiving_stream(stream_id)
                self._open = False
                raise StopAsyncIteration from None
            except BaseException:
                self.close()
                raise
            ev = peer._readable[sid] = anyio.Event()
            timed_out = False
            try:
                if self._deadline == math.inf:  # the common case: no scope to enter
                    await ev.wait()
                else:
                    with anyio.CancelScope(deadline=self._deadline) as dl:
                        await ev.wait()
                    timed_out = dl.cancelled_caught
            except BaseException:
                # Cancelled while waiting for an item: this consumer stops here,
                # so its sender must stop now, not when the iterator is collected.
                self.close()
                raise
            finally:
                peer._readable.pop(sid, None)
            if timed_out:
                self.close()
                raise DeadlineExceeded(f"stream {sid}: deadline exceeded")
            if not self._open:
                raise StopAsyncIteration

    def close(self) -> None:
        """Stop receiving; the sender is told to stop. Needs no ``await``."""
        if self._open:
            self._open = False
            peer = self.peer
            peer.close_receiving_stream(self.stream_id)

    async def aclose(self) -> None:
        """Stop receiving (see :meth:`close`)."""
        self.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Breaking out of ``async for`` drops the iterator: stop the sender now
        # rather than when the connection closes.
        if getattr(self, "_open", False):
            with contextlib.suppress(Exception):  # the loop may be gone at interpreter exit
                self.close()
