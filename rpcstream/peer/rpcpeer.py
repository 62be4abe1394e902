"""RpcPeer: the public face of one connection, over the parts that do the work.

* :class:`~rpcstream.peer.driver.Driver`: the transport, the Sans-I/O protocol,
  the reader and writer, the waiters table and the peer's lifecycle;
* :class:`~rpcstream.peer.caller.Caller`: calls, notifications, stream calls;
* :class:`~rpcstream.peer.callee.Callee`: admits and runs the other side's calls;
* :class:`~rpcstream.peer.streams.Senders` and
  :class:`~rpcstream.peer.streams.IncomingStream`: the streams both ways.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Coroutine
from types import TracebackType
from typing import Any, Self

import anyio

from ..messages import MSGPACK, Codec, Notify, StreamId
from ..protocol import Protocol, Side, State
from ..router import Router
from ..transport.base import Transport
from .admission import SETTINGS
from .callee import Callee
from .caller import Caller
from .driver import PUMP, Driver, Lifecycle
from .streams import IncomingStream, Senders, close_receiving

__all__ = ["RpcPeer"]


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
        max_window_bytes, max_window_items: a stream's windows double, up to
            these, while the window is what holds it back (its consumer keeps
            up and waits for more); equal to the first window, no growth.
        max_receive_buffer: the bytes all incoming streams of the connection may
            have granted and buffered at once (a hard cap: windows draw from it,
            see :mod:`rpcstream.protocol.streams`).
        max_buffered_amount: stream senders wait while more than this many bytes
            are queued for the socket, until it drains below a quarter of it.
        max_streams: open streams (both directions) per connection.
        expose_errors: tell callers the text of unexpected handler exceptions,
            and their traceback in ``data``. Off by default: a caller gets
            ``internal_error`` with only the exception's type
            (``"ZeroDivisionError: internal error (see the server log)"``), and
            the exception is logged (``rpcstream.peer``, ERROR, with traceback).
            A :class:`RemoteError` raised on purpose always keeps its message.
        close_timeout: how long closing may wait to flush and say goodbye.
        call_rate: ``(per_second, burst)``: incoming calls, notifications and
            stream calls beyond this token bucket are answered ``rate_limited``.
        max_queued_bytes: answers queued for a peer that does not read them
            (it keeps calling but never reads) beyond this abort the connection
            (local code 1008): stream data is bounded by credit, answers by this.
        max_waiting_calls: our calls and stream calls beyond the other side's
            advertised ``max_concurrent_handlers`` wait for a slot; beyond this
            many waiting, a call raises :class:`Overloaded` at once.
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
        max_window_bytes: int = 16 * 1024 * 1024,
        max_window_items: int = 16384,
        max_receive_buffer: int = 32 * 1024 * 1024,
        max_buffered_amount: int = 1024 * 1024,
        max_streams: int = 4096,
        expose_errors: bool = False,
        close_timeout: float = 5.0,
        call_rate: tuple[float, int] | None = None,
        max_queued_bytes: int = 16 * 1024 * 1024,
        max_waiting_calls: int = 100_000,
    ) -> None:
        self.transport = transport
        self.router = router if router is not None else Router()
        self.codec = codec
        proto = Protocol(
            codec,
            side,
            window_items=window_items,
            window_bytes=window_bytes,
            max_window_bytes=max_window_bytes,
            max_window_items=max_window_items,
            max_receive_buffer=max_receive_buffer,
            max_streams=max_streams,
        )
        self._driver = driver = Driver(
            transport,
            proto,
            close_timeout=close_timeout,
            max_buffered_amount=max_buffered_amount,
            max_queued_bytes=max_queued_bytes,
        )
        driver.owner = self
        self._senders = Senders(driver, self._report)
        self._caller = Caller(driver, self._senders, max_waiting_calls)
        driver.on_close = self._caller.admission.close
        self._callee = Callee(
            driver,
            self._senders,
            self,
            self.router,
            max_concurrent_handlers=max_concurrent_handlers,
            call_rate=call_rate,
            expose_errors=expose_errors,
            on_settings=self._caller.admission.set_limit,
        )
        driver.on_call = self._callee.on_call
        self.principal: Any = None
        """Who the other side is, as ``authenticate`` said (server side)."""

    def _report(self, exc: BaseException) -> Any:
        return self._callee.remote_error(exc)

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # Our limits go first, so the other side's callers wait rather than
        # being refused (see admission.py).
        limits = {"max_concurrent_handlers": self._callee.max_concurrent_handlers}
        self._driver.proto.send(
            Notify(SETTINGS, self.codec.empty_array, self.codec.encode_raw(limits), [])
        )
        await self._driver.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._driver.stop((exc_type, exc, tb))

    @property
    def state(self) -> Lifecycle:
        """Where the peer is in its life: new, open, closing or closed."""
        return self._driver.state

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by either side) or broken."""
        return self._driver.proto.state is State.CLOSED

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side, or breaks."""
        await self._driver.wait_closed()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection: fail pending calls, cancel handlers and streams,
        flush what is queued and run the closing handshake, within ``close_timeout``."""
        await self._driver.aclose(code, reason)

    # -- settings and stats --------------------------------------------------------------

    @property
    def max_concurrent_handlers(self) -> int:
        """Running handlers beyond which calls are refused ``overloaded``."""
        return self._callee.max_concurrent_handlers

    @property
    def expose_errors(self) -> bool:
        """Whether the text and traceback of handler exceptions go to the caller."""
        return self._callee.expose_errors

    @property
    def max_buffered_amount(self) -> int:
        """Stream senders wait while more than this many bytes wait for the socket."""
        return self._driver.max_buffered_amount

    @property
    def close_timeout(self) -> float:
        """How long closing may wait to flush and say goodbye."""
        return self._driver.close_timeout

    @property
    def remote_max_concurrent_handlers(self) -> int:
        """The other side's ``max_concurrent_handlers``: what it advertised, or
        the default until it does. Our calls beyond it wait for a slot."""
        return self._caller.admission.limit

    @property
    def calls_received(self) -> int:
        """Calls, notifications and stream calls received so far."""
        return self._callee.calls_received

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for the socket and not yet written to it (as in browsers)."""
        return self._driver.buffered_amount

    @property
    def stats(self) -> dict[str, int]:
        """Counts of live work on this connection (all zero once it is closed and idle)."""
        driver = self._driver
        return {
            "pending_calls": driver.proto.calls_waiting,
            "waiting_calls": self._caller.admission.waiting,
            "running_handlers": self._callee.running,
            "streams": driver.proto.streams.count,
            "pumps": driver.waiters.count(PUMP),
            "tasks": driver.tasks,
        }

    # -- calls -------------------------------------------------------------------------

    def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        result_type: Any = Any,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, Any]:
        """Call ``method`` on the other side; await the result.

        ``timeout`` (seconds) bounds the wait and travels with the call as a
        deadline the callee enforces; when it passes, :class:`DeadlineExceeded`.
        ``result_type`` converts the result (default: plain msgspec types).
        Async iterables among the arguments travel as streams. Cancelling the
        caller sends a ``Cancel`` frame, which cancels the handler.
        """
        # Not ``async def``: handing over the caller's coroutine saves a frame
        # (and its resumptions) on the path every call takes.
        return self._caller.call(method, args, kwargs, timeout, result_type)

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Call ``method`` on the other side without waiting for (or getting) an answer."""
        await self._caller.notify(method, args, kwargs)

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
        return self._caller.stream(
            method, args, kwargs, timeout, item_type, window_items, window_bytes
        )

    # -- raw streams -------------------------------------------------------------------

    async def send_stream(
        self, items: AsyncIterable[Any], stream_id: int | None = None
    ) -> StreamId:
        """Send ``items`` as a stream, in the background; return its id.

        With no ``stream_id`` one is allocated (tell the receiver by a call);
        pass the id a receiver allocated with :meth:`receive_stream` otherwise.
        Nothing is sent until the receiver opens the stream by granting credit.
        """
        self._driver.check_open()
        sid = self._senders.start(items, stream_id)
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
        driver = self._driver
        driver.check_open()
        streams = driver.proto.streams
        sid = StreamId(streams.next_stream_id() if stream_id is None else stream_id)
        stream = IncomingStream(driver, sid, item_type, window_items, window_bytes, None)
        return sid, stream

    def abort_stream(self, stream_id: int) -> None:
        """Sender side: stop an outgoing stream; its receiver gets ``Cancelled``."""
        self._senders.abort(stream_id)

    def close_receiving_stream(self, stream_id: int) -> None:
        """Receiver side: stop reading a stream; its sender is told to stop."""
        close_receiving(self._driver, stream_id)
