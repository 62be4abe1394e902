"""The connection driver: moves messages between the transport and the protocol.

Theory of operation
-------------------
* The **reader** hands each received message to the Sans-I/O protocol and acts
  on the events that come back: it starts handlers (through ``on_call``) and
  wakes whoever waits in the :class:`Waiters` table (a caller for its answer, a
  consumer for items, a sender for credit) or cancels what must stop (a
  handler the caller cancelled, a stream sender whose receiver stopped reading).
  Where the transport can hand messages over as they arrive (websockets on
  asyncio and on trio), that work runs in the transport's callback (on trio, in
  websockets' reading task), with no task switch per message, and the reader
  task only waits for the connection's end.
* The **writer** sends what the protocol has queued. While it awaits the socket,
  frames keep queueing, and the next message takes them all: that coalescing is
  what makes many small stream items cheap.

Calls and answers skip the writer when they can (:meth:`Driver.send_now`): if
the writer is not mid-send and the transport can take a message without
waiting, whoever queued the frame writes it at once, which saves a task switch
per call. Such a write never awaits, so a cancelled caller can never leave half
a message on the wire. When one read of the socket wakes several callers or
handlers, their frames wait for the writer instead and leave together.

The driver's task group's cancel scope encloses the body of ``async with
peer:``, so it is only ever cancelled on exit: a lost connection fails pending
work with :class:`ConnectionClosed` instead of silently cancelling user code.

Handler tasks start for less than the task group's ``start_soon``: on asyncio
beside the group (:class:`~rpcstream.transport.EagerTasks`), on trio in a nursery
inside it (:class:`~rpcstream.transport.NurseryTasks`). Each has a cancel scope
in the waiters table, which the connection's end wakes; when the peer stops they
end before the group's reader and writer.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
from collections.abc import Callable
from typing import Any, Final

import anyio
import sniffio
from anyio.abc import TaskGroup

from .._tasks import FlagLike, new_flag, task_group
from ..errors import ConnectionClosed, LocalProtocolError
from ..messages import Call, Cancel, Codec, Error, Fault, Result
from ..observe import hooks
from ..protocol import (
    Protocol,
    State,
    StreamCancelled,
    StreamReadable,
    StreamWritable,
    shorten,
)
from ..transport import EagerTasks, NurseryTasks, open_handler_tasks
from ..transport.base import Transport

__all__ = [
    "ANSWER",
    "HANDLER",
    "NOTIFIED",
    "PUMP",
    "READABLE",
    "WRITABLE",
    "Driver",
    "Lifecycle",
    "Waiters",
]

log = logging.getLogger("rpcstream.peer")

_NOT_READING = "too many answers queued: the peer does not read"

# A burst's frames (the answers to a message of many calls, the next calls of
# many woken callers) leave in pieces of this many, not all in one message: the
# other side starts on the first piece while this side makes the next, where one
# message would have the two sides take turns (W4 ran at 0.56-0.69x raw websockets
# with each side idle half the time; with pieces of 8 to 32, 0.96-1.57x).
BURST_PIECE: Final = 16

# What a waiter waits for, with the id it is keyed by: the kinds of the Waiters table.
ANSWER: Final = 0  # a caller waits for the answer to its call id (wake: set an event)
HANDLER: Final = 1  # a handler runs for the peer's call id (wake: cancel its scope)
READABLE: Final = 2  # a consumer waits for items of an incoming stream id (set)
WRITABLE: Final = 3  # a sender waits for credit on an outgoing stream id (set)
PUMP: Final = 4  # a sender task runs for an outgoing stream id (cancel its scope)
# A notification's handler runs (cancel its scope), keyed by its slot's id(): a
# notification has no id, and nothing wakes it but the connection's end.
NOTIFIED: Final = 5


class Lifecycle(enum.Enum):
    """Where a peer is in its life: one value instead of a set of flags."""

    NEW = "new"  # built, not entered: nothing runs
    OPEN = "open"  # reading and writing
    CLOSING = "closing"  # work failed; flushing what is queued, then the closing handshake
    CLOSED = "closed"  # the transport is gone: nothing more is read or written


class Waiters:
    """The one table of everything that waits on this connection, keyed by what
    it waits for (its kind) and the protocol's id. A waiter is a function that
    wakes it: an event's ``set`` or a cancel scope's ``cancel``."""

    __slots__ = ("_by_kind",)

    def __init__(self) -> None:
        # One dict per kind rather than (kind, id) keys: no tuple to build and
        # hash on every call and every stream item.
        self._by_kind: tuple[dict[int, Callable[[], None]], ...] = tuple({} for _ in range(6))

    def add(self, kind: int, id_: int, wake: Callable[[], None]) -> None:
        """Register a waiter; it replaces any other for the same key."""
        self._by_kind[kind][id_] = wake

    def discard(self, kind: int, id_: int) -> None:
        """Forget a waiter (it stopped waiting)."""
        self._by_kind[kind].pop(id_, None)

    def wake(self, kind: int, id_: int) -> None:
        """Wake the waiter for this key, if there is one."""
        wake = self._by_kind[kind].get(id_)
        if wake is not None:
            wake()

    def count(self, kind: int) -> int:
        """How many waiters of one kind there are (for stats)."""
        return len(self._by_kind[kind])

    def wake_all(self) -> None:
        """Wake every waiter: the connection closed."""
        for table in self._by_kind:
            for wake in list(table.values()):
                wake()


class Driver:
    """Drives one connection: the transport, the protocol, the reader and writer
    tasks, the waiters, and the peer's lifecycle (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        proto: Protocol,
        *,
        close_timeout: float,
        max_buffered_amount: int,
        max_queued_bytes: int,
    ) -> None:
        self.transport = transport
        self.proto = proto
        self.codec: Codec = proto.codec
        self.waiters = Waiters()
        self.state = Lifecycle.NEW
        self.close_timeout = close_timeout
        self.max_buffered_amount = max_buffered_amount
        self.low_buffered_amount = max_buffered_amount // 4
        self.max_queued_bytes = max_queued_bytes
        self.on_call: Callable[[Any], None] = _no_handlers
        self.on_close: Callable[[], None] = _nothing  # the caller's admission wakes its waiters
        # The RpcPeer this driver works for: what handlers and streams name as their peer.
        self.owner: Any = None
        # observe: who is told of calls and stalls; None (nobody) costs one check.
        self.observer: hooks.Observer | None = hooks.current()
        proto.outbox.on_data = self._wake_writer
        self._text = not proto.codec.binary
        self._tg: TaskGroup | None = None
        # Where handler tasks start (see transport/loop.py and start()).
        self._handlers: EagerTasks | NurseryTasks | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks = 0
        # Writer mechanics: the writer waits on _wakeup; _quiet means queueing a
        # frame need not wake it (whoever set it sends next, see send_now);
        # _coalesce makes frames wait for the writer, to leave together.
        self._wakeup = new_flag()
        self._quiet = self._coalesce = False
        self._soon = False  # a _flush_soon callback is due: queueing need not wake anyone
        self._flush_soon_callback = self._flush_soon  # once, not an object a wake-up
        self._inflight = 0  # bytes of the message the writer is sending
        self._write_error: Exception | None = None  # a direct write failed: the writer ends
        self._drained: FlagLike | None = None  # senders waiting for the buffer to drain
        self._flushed: FlagLike | None = None  # closing waits for the writer to go idle
        # Reader mechanics, where the transport delivers messages itself.
        self._read_ended = new_flag()
        self._read_stop: str | BaseException | None = None
        self._closed = new_flag()  # the protocol closed: wait_closed() returns
        self._close_done: FlagLike | None = None  # aclose() ran to its end

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the reader and writer in a task group, and open where handlers start."""
        stack = contextlib.AsyncExitStack()
        self._tg = tg = await stack.enter_async_context(task_group())
        # Leaving: the handlers end (see stop), then the reader and the writer.
        stack.callback(tg.cancel_scope.cancel)
        self._handlers = handlers = await open_handler_tasks(stack)
        self.new_event: Callable[[], Any] = handlers.new_event
        self.new_scope: Callable[[], Any] = handlers.new_scope
        self._stack = stack
        self.state = Lifecycle.OPEN
        self.spawn(self._read_loop)
        self.spawn(self._write_loop)

    async def stop(self, exc_info: tuple[Any, Any, Any]) -> bool | None:
        """Close, then end every task this driver owns (leaving ``async with``)."""
        assert self._stack is not None and self._handlers is not None
        try:
            await self.aclose()
        finally:
            # Closing cancelled each handler (its scope); they end before the group.
            await self._handlers.end()
            suppress = await self._stack.__aexit__(*exc_info)  # cancels the group
        return suppress

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Start a task the driver owns, counted in ``tasks``."""
        assert self._tg is not None
        self._tasks += 1
        self._tg.start_soon(self._counted, func, args)

    def spawn_eager(self, func: Callable[..., Any], *args: Any) -> None:
        """As :meth:`spawn`, for handlers, for less (see transport/loop.py): its owner
        cancels it through a cancel scope of its own (nothing else does before the
        driver stops). Counted in ``tasks`` by the handlers' count."""
        assert self._handlers is not None
        self._handlers.start(func, *args)

    async def _counted(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            await func(*args)
        finally:
            self._tasks -= 1

    @property
    def tasks(self) -> int:
        """Tasks the driver owns that have not finished."""
        return self._tasks + (len(self._handlers) if self._handlers is not None else 0)

    def check_open(self) -> None:
        """Raise unless new work may start on this connection."""
        if self.proto.state is State.CLOSED:
            error = self.proto.close_error
            assert isinstance(error, ConnectionClosed)
            raise ConnectionClosed(error.code, error.reason)
        if self.state is Lifecycle.NEW:
            raise LocalProtocolError("use the peer as an async context manager first")

    async def wait_closed(self) -> None:
        """Wait until the connection closes, by either side, or breaks."""
        await self._closed.wait()

    def shutdown(self, exc: ConnectionClosed) -> None:
        """Fail everything that depends on the connection, at once. Idempotent."""
        if self.proto.state is State.CLOSED:
            return
        self.proto.close(exc)
        self.waiters.wake_all()
        self.on_close()
        if self._drained is not None:
            self._drained.set()
        self._wakeup.set()
        self._closed.set()

    def _lost(self, exc: ConnectionClosed) -> None:
        """The transport failed or closed under us: nothing more can be sent."""
        self.state = Lifecycle.CLOSED
        self.shutdown(exc)
        if self._flushed is not None:
            self._flushed.set()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: fail pending work, flush what is queued, run the closing handshake,
        each within ``close_timeout``."""
        if self._close_done is not None:
            # Someone is closing already: wait for them, not race a second handshake.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2 * self.close_timeout):
                await self._close_done.wait()
            return
        self._close_done = done = new_flag()
        try:
            if self.state is Lifecycle.OPEN:
                self.state = Lifecycle.CLOSING
            self.shutdown(ConnectionClosed(code, reason or "closed locally"))
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                # Let the writer flush what was queued (cancels, answers) before
                # closing; pointless once the transport itself is gone.
                while (self.proto.has_data() or self._inflight) and self.state is (
                    Lifecycle.CLOSING
                ):
                    self._flushed = new_flag()
                    self._wakeup.set()
                    await self._flushed.wait()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                try:
                    await self.transport.aclose(code, reason)
                except Exception:  # the socket may already be gone: nothing left to do
                    log.debug("error while closing the transport", exc_info=True)
        finally:
            self.state = Lifecycle.CLOSED
            done.set()

    async def _abandon(self, code: int, reason: str) -> None:
        """Drop the connection at once, and what is queued: the peer broke a
        limit by not reading, so it would not read a close frame either."""
        log.warning("aborting a connection (%d): %s", code, reason)
        self.proto.outbox.discard()
        self._lost(ConnectionClosed(code, reason))
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            await self.transport.abort()

    async def _fail(self, exc: Exception, what: str) -> None:
        """A bug or an unexpected transport error in the reader or writer: never hang."""
        log.error("rpcstream %s failed", what, exc_info=exc)
        self.state = Lifecycle.CLOSED  # the transport closes now: nothing more to flush
        self.shutdown(ConnectionClosed(1011, f"internal error: {exc}"))
        if self._flushed is not None:
            self._flushed.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            await self.transport.aclose(1011, "internal error")

    # -- buffered bytes ----------------------------------------------------------------

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for the socket and not yet written to it (as in browsers)."""
        return self.proto.outbox.queued_bytes + self._inflight + self.transport.buffered_amount

    async def wait_drained(self) -> None:
        """Wait while more than ``low_buffered_amount`` bytes wait for the socket."""
        while self.buffered_amount > self.low_buffered_amount and self.proto.state is State.OPEN:
            if not self.proto.has_data() and not self._inflight:
                return  # only the transport holds bytes: its own send() waits for them
            if self._drained is None:
                self._drained = new_flag()
            await self._drained.wait()

    # -- reading -----------------------------------------------------------------------

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
            self._lost(exc)
        except Exception as exc:
            await self._fail(exc, "reader")

    def _on_messages(self, messages: list[bytes]) -> None:
        """Messages handed over by the transport as they arrived (see _read_loop)."""
        if self._read_stop is not None or self.proto.state is State.CLOSED:
            return  # ending: nothing can wait for what follows (as after a loop's end)
        try:
            if not self._receive(messages):
                self._read_stop = _NOT_READING
                self._read_ended.set()
        except BaseException as exc:  # never into the transport's callback: the reader raises it
            self._read_stop = exc
            self._read_ended.set()

    def _receive(self, messages: list[bytes]) -> bool:
        """Act on messages that arrived together; what they make us send leaves in
        pieces of BURST_PIECE frames. ``False`` when the peer broke max_queued_bytes."""
        proto, dispatch, outbox = self.proto, self._dispatch, self.proto.outbox
        count = 0
        outer, self._quiet = self._quiet, True
        try:
            for message in messages:
                events = proto.receive_message(message)
                count += len(events)
                for event in events:
                    dispatch(event)
                    if outbox.frames_queued() >= BURST_PIECE:
                        self._flush()  # a piece leaves: the other side starts on it
        finally:
            self._quiet = outer
        if outbox.queued_bytes > self.max_queued_bytes:
            return False
        if count > 1:
            # A burst: the callers and handlers it woke answer in the next
            # iteration; their frames wait for the writer, or a piece's worth.
            self._coalesce = True
            self._wakeup.set()
        self._flush()
        return True

    def _dispatch(self, event: Any) -> None:
        # The most frequent first: items, answers, calls.
        t = type(event)
        waiters = self.waiters
        if t is StreamReadable:
            waiters.wake(READABLE, event.stream_id)
        elif t is Result or t is Error:
            waiters.wake(ANSWER, event.id)
        elif t is Call:
            self.on_call(event)
        elif t is StreamWritable:
            waiters.wake(WRITABLE, event.stream_id)
        elif t is Cancel:
            waiters.wake(HANDLER, event.id)
        elif t is StreamCancelled:
            waiters.wake(PUMP, event.stream_id)
        elif t is Fault:
            log.warning(
                "peer reported a protocol fault: [%s] %s", event.code, shorten(event.message)
            )
        else:  # Notify, StreamCall
            self.on_call(event)

    # -- writing -----------------------------------------------------------------------

    def _wake_writer(self) -> None:
        """A frame was queued outside a quiet section (a stream item, mostly)."""
        if self._quiet or self._soon:  # whoever set it calls _flush() next
            return
        # Not at once: more frames may follow in this turn (a sender with items
        # ready), to leave together. A callback in the loop's next turn, where the
        # transport offers one, writes them for less than waking the writer costs.
        if self.transport.run_soon(self._flush_soon_callback):
            self._soon = True
        else:
            self._wakeup.set()

    def _flush_soon(self) -> None:
        self._soon = False
        self._flush()

    def send_now(self, queue: Callable[..., Any], /, *args: Any) -> Any:
        """Call ``queue(*args)`` (a protocol method that queues frames) and send
        what it queued at once if the socket can take it: calls, answers and
        large items, where a trip through the writer task would add latency.
        Inside another quiet section (the reader acting on a message), that
        section sends it. Returns what ``queue`` returned."""
        outer = self._quiet
        self._quiet = True
        try:
            result = queue(*args)
        finally:
            self._quiet = outer
        if not outer:
            self._flush()
        return result

    def _flush(self) -> None:
        """Write the next queued message now if the transport can without waiting
        and the writer is not mid-send (the order of messages is kept); leave the
        rest to the writer. Never awaits, so no cancellation can cut a message."""
        outbox, transport = self.proto.outbox, self.transport
        if not outbox.has_data():
            return
        piece = not self._coalesce or outbox.frames_queued() >= BURST_PIECE
        if not self._inflight and piece and transport.can_send_now():
            try:
                message = outbox.data_to_send()
                assert message is not None
                transport.send_now(message, text=self._text)
            except Exception as exc:  # an unencodable frame: as in the writer, end with 1011
                self._write_error = exc
                self._wakeup.set()
                return
            self._sent()
            if not outbox.has_data():
                return
        self._wakeup.set()

    async def _write_loop(self) -> None:
        outbox, transport, text = self.proto.outbox, self.transport, self._text
        on_asyncio = isinstance(self._handlers, EagerTasks)  # see the send below
        try:
            while True:
                if self._write_error is not None:
                    raise self._write_error  # a direct write failed (see _flush)
                message = outbox.data_to_send()
                if message is None:
                    # Idle (_coalesce stays: a burst's answers may come after this
                    # wake-up, as trio runs a batch of woken tasks in either order).
                    # What is still buffered is the transport's to drain, and no
                    # send of ours will come to wake the senders waiting for it.
                    drained = self._drained
                    if drained is not None:
                        self._drained = None
                        drained.set()
                    if self._flushed is not None:
                        self._flushed.set()
                    # Even once closed, stay until the task group ends us, so that
                    # aclose()'s final flush still has a writer.
                    self._wakeup = new_flag()
                    await self._wakeup.wait()
                    continue
                self._coalesce = False  # something leaves: a later burst may coalesce
                # asyncio: as _flush, nothing awaited. trio: a burst's answers that
                # come while the writer's send awaits wait for it, not go alone.
                if on_asyncio and transport.can_send_now():
                    transport.send_now(message, text=text)
                else:
                    self._inflight = len(message)
                    try:
                        await transport.send(message, text=text)
                    finally:
                        self._inflight = 0
                self._sent()
        except ConnectionClosed as exc:
            self._lost(exc)
        except Exception as exc:
            await self._fail(exc, "writer")

    def _sent(self) -> None:
        """A message left: wake the stream senders waiting for the buffer to drain."""
        drained = self._drained
        if drained is not None and self.buffered_amount <= self.low_buffered_amount:
            self._drained = None
            drained.set()


def _nothing() -> None:
    pass


def _no_handlers(frame: Any) -> None:
    raise AssertionError("the peer sets on_call before it starts")
