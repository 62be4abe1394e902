"""Streams as the application sees them: the items it receives as an async iterator
(:class:`IncomingStream`), and the async iterables it sends, each pumped by a
task under credit and buffer limits (:class:`Senders`).

While it pumps a stream, the pump names it to the iterable it runs
(:func:`current_sender`): a producer that learns of items outside that task
(the runs' fan-out hub, for thousands of subscribers) may queue them itself
with :meth:`StreamSender.try_send`, when credit and the buffer allow at once,
instead of waking the pump for each. The pump is then parked in the iterable,
so the order of items stays the order they were queued in.

Both talk to the connection only through the driver's narrow interface: the
protocol's :class:`~rpcstream.protocol.StreamTable`, the waiters table, and
``send_now``/``spawn``/``wait_drained``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, Self

import anyio
from msgspec import Raw

from ..errors import Cancelled, DeadlineExceeded, RemoteError
from ..messages import StreamId
from ..observe.hooks import CallObservation
from ..observe.outcomes import client_outcome
from ..protocol import Empty, Finished, State
from .driver import PUMP, READABLE, WRITABLE, Driver

__all__ = ["IncomingStream", "Senders", "StreamSender", "current_sender", "deadline"]

_LARGE_ITEM = 16 * 1024  # stream items this large skip the writer when they can

_current: contextvars.ContextVar[StreamSender | None] = contextvars.ContextVar(
    "rpcstream_stream_sender", default=None
)


def current_sender() -> StreamSender | None:
    """The outgoing stream whose pump runs the caller (an async generator a
    streaming handler returned, while it is iterated); ``None`` elsewhere."""
    return _current.get()


def deadline(timeout: float | None) -> float:
    """The anyio deadline ``timeout`` seconds from now (``inf`` for ``None``)."""
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

    # observe: the stream call an observer follows, ended with the stream (first end wins).
    _observation: CallObservation | None = None

    def __init__(
        self,
        driver: Driver,
        stream_id: StreamId,
        item_type: Any = Any,
        window_items: int | None = None,
        window_bytes: int | None = None,
        timeout: float | None = None,
        *,
        open_now: bool = True,
    ) -> None:
        self._driver = driver
        self.stream_id = stream_id
        self._open = True
        self.deadline = deadline(timeout)
        """When the stream's timeout runs out (anyio time; ``inf``: never)."""
        self._decode = driver.codec.decoder(item_type).decode
        self._windows = (window_items, window_bytes)
        # A stream call's slot on the other side (see admission.py), given back
        # once when the stream is done; and, beyond the limit, how to start.
        self._release: Callable[[], None] | None = None
        self._pending: (
            tuple[Callable[[float], Awaitable[None]], Callable[[], None], Callable[[], None]] | None
        ) = None
        if open_now:
            self.open()

    def open(self) -> None:
        """Register the stream with the protocol, which grants its first credit."""
        window_items, window_bytes = self._windows
        self._driver.proto.streams.open_incoming(
            self.stream_id, self._decode, window_items=window_items, window_bytes=window_bytes
        )

    def hold_slot(self, release: Callable[[], None]) -> None:
        """The stream holds a handler slot on the other side until it is done."""
        self._release = release

    def start_later(
        self,
        acquire: Callable[[float], Awaitable[None]],
        start: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        """Start at the first read, once ``acquire`` (within the stream's deadline)
        got a slot: ``start`` opens the stream and sends the call."""
        self._pending = (acquire, start, release)

    async def _start(self) -> None:
        assert self._pending is not None
        acquire, start, release = self._pending
        self._pending = None
        try:
            await acquire(self.deadline)
        except BaseException:
            self._open = False  # never started: nothing to close, no slot held
            raise
        self._release = release
        try:
            start()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<IncomingStream {self.stream_id}{'' if self._open else ' closed'}>"

    @property
    def peer(self) -> Any:
        """The :class:`~rpcstream.RpcPeer` this stream belongs to."""
        return self._driver.owner

    @property
    def window_bytes(self) -> int:
        """The byte window this stream grants now: it grows, up to the peer's
        ``max_window_bytes``, while the window is what holds the stream back."""
        return self._driver.proto.streams.window_bytes_of(self.stream_id)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if not self._open:
            raise StopAsyncIteration
        if self._pending is not None:
            await self._start()
        driver, sid = self._driver, self.stream_id
        streams, waiters = driver.proto.streams, driver.waiters
        while True:
            try:
                return streams.pop_item(sid)
            except Empty:
                pass
            except Finished:
                if self._observation is not None:  # observe
                    self._observation.end("ok")
                self.close()
                raise StopAsyncIteration from None
            except KeyError:  # closed with peer.close_receiving_stream(stream_id)
                self._open = False
                self._give_back_slot()
                raise StopAsyncIteration from None
            except BaseException as exc:
                if self._observation is not None:  # observe
                    self._observation.end(client_outcome(exc), exc)
                self.close()
                raise
            ev = driver.new_event()
            waiters.add(READABLE, sid, ev.set)
            timed_out = False
            try:
                if self.deadline == math.inf:  # the common case: no scope to enter
                    await ev.wait()
                else:
                    with anyio.CancelScope(deadline=self.deadline) as dl:
                        await ev.wait()
                    timed_out = dl.cancelled_caught
            except BaseException:
                # Cancelled while waiting for an item: this consumer stops here,
                # so its sender must stop now, not when the iterator is collected.
                self.close()
                raise
            finally:
                waiters.discard(READABLE, sid)
            if timed_out:
                if self._observation is not None:  # observe
                    self._observation.end("deadline_exceeded")
                self.close()
                raise DeadlineExceeded(f"stream {sid}: deadline exceeded")
            if not self._open:
                raise StopAsyncIteration

    def close(self) -> None:
        """Stop receiving; the sender is told to stop. Needs no ``await``."""
        if self._open:
            self._open = False
            if self._pending is None:
                close_receiving(self._driver, self.stream_id)
            self._pending = None
            self._give_back_slot()
            if self._observation is not None:  # observe: stopped early, if not ended yet
                self._observation.end("cancelled")

    def _give_back_slot(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

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


def close_receiving(driver: Driver, stream_id: int) -> None:
    """Stop reading an incoming stream: its sender is told to stop, and a
    consumer waiting for its items wakes to find it closed."""
    driver.proto.streams.close_incoming(stream_id)
    driver.waiters.wake(READABLE, stream_id)


class StreamSender:
    """One outgoing stream, for a producer that queues items without the pump
    (see the module docstring). Only while the pump waits for the producer's
    next item, or the order of items is lost: the producer must know it."""

    __slots__ = ("_driver", "stream_id")

    def __init__(self, driver: Driver, stream_id: StreamId) -> None:
        self._driver = driver
        self.stream_id = stream_id

    def try_send(self, payload: Raw) -> bool:
        """Queue one encoded item if the receiver's credit and the connection's
        buffer take it now (as the pump would without waiting); ``False``, and
        nothing queued, otherwise: then the pump must send it, waiting as it does."""
        driver, sid = self._driver, self.stream_id
        proto = driver.proto
        streams = proto.streams
        if (
            proto.state is not State.OPEN
            or streams.is_cancelled(sid)
            or not streams.can_send(sid)
            or driver.buffered_amount > driver.max_buffered_amount
        ):
            return False
        if len(payload) < _LARGE_ITEM:
            streams.send_item(sid, payload)  # leaves with what else is queued this turn
        else:
            driver.send_now(streams.send_item, sid, payload)
        return True


class Senders:
    """The streams this peer sends: one pump task each, under the receiver's
    credit and the connection's ``max_buffered_amount``."""

    def __init__(self, driver: Driver, report: Callable[[BaseException], RemoteError]) -> None:
        self._driver = driver
        # How an exception from the application's iterator reaches the receiver.
        self._report = report

    def start(self, items: AsyncIterable[Any], stream_id: int | None = None) -> StreamId:
        """Register a stream and start pumping ``items`` into it; return its id."""
        driver = self._driver
        streams = driver.proto.streams
        sid = StreamId(streams.next_stream_id() if stream_id is None else stream_id)
        streams.open_outgoing(sid)
        scope = driver.new_scope()
        driver.waiters.add(PUMP, sid, scope.cancel)
        driver.spawn(self._run, sid, scope, items)
        return sid

    def abort(self, stream_id: int) -> None:
        """Stop an outgoing stream; its receiver gets ``Cancelled``."""
        self._driver.waiters.wake(PUMP, stream_id)

    def stop_unopened(self, sids: list[StreamId]) -> None:
        """A call ended: it will never open those of its stream arguments it has
        not opened yet, so their senders stop."""
        streams = self._driver.proto.streams
        for sid in sids:
            if not streams.is_cancelled(sid) and not streams.can_send(sid):
                self.abort(sid)

    async def _run(self, sid: StreamId, scope: Any, items: Any) -> None:
        driver = self._driver
        error: RemoteError | None = None
        try:
            with scope:
                try:
                    await self.pump(sid, items)
                except RemoteError as exc:
                    error = exc
                except Exception as exc:
                    error = self._report(exc)
            if scope.cancelled_caught:
                error = Cancelled(f"stream {sid}: the sender stopped")
        finally:
            driver.waiters.discard(PUMP, sid)
            driver.proto.streams.end_outgoing(sid, error)

    async def pump(self, sid: StreamId, items: AsyncIterable[Any]) -> None:
        """Send every item of ``items`` on ``sid`` under credit and buffer limits,
        closing the iterator whatever happens (its ``finally`` runs)."""
        driver = self._driver
        proto, waiters = driver.proto, driver.waiters
        streams = proto.streams
        encode = driver.codec.encode_raw
        iterator = aiter(items)
        # The iterator's code runs in this task's context: it sees its stream.
        token = _current.set(StreamSender(driver, sid))
        try:
            async for item in iterator:
                # Already encoded (a run's events, shared by every subscriber):
                # as it is, not copied by the encoder.
                payload = item if type(item) is Raw else encode(item)
                while not streams.can_send(sid):
                    if streams.is_cancelled(sid) or proto.state is State.CLOSED:
                        return
                    if driver.observer is not None:  # observe: held back by the receiver
                        driver.observer.stream_stalled(driver.owner, sid)
                    ev = driver.new_event()
                    waiters.add(WRITABLE, sid, ev.set)
                    try:
                        await ev.wait()
                    finally:
                        waiters.discard(WRITABLE, sid)
                if driver.buffered_amount > driver.max_buffered_amount:
                    await driver.wait_drained()
                    # The receiver may have stopped the stream meanwhile.
                    if streams.is_cancelled(sid) or proto.state is State.CLOSED:
                        return
                if len(payload) < _LARGE_ITEM:
                    streams.send_item(sid, payload)  # the writer takes it with its neighbours
                else:  # batching saves nothing here: write it now if nothing waits
                    driver.send_now(streams.send_item, sid, payload)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(driver.close_timeout):
                    await aclose()
            _current.reset(token)
