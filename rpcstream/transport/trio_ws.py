"""websockets on trio: connections that hand each message over as it arrives,
write what they can at once, and whose reader never waits on their writer.

Messages as they arrive
-----------------------
``websockets.trio`` reads in a background task (``recv_events``) that puts each
data frame in a memory channel for ``recv()``. Behind ``recv()`` sat the peer's
own reader task: one task switch per message before the peer looked at it. As
on asyncio (``asyncio_ws``), the connections here call a receiver registered
with :meth:`~_Delivering.deliver` instead, from the reading task itself, with
every message that one read of the socket completed (counted from the events the
protocol returned for that read, so the receiver can tell a burst from a lone
message), and report the end of the connection to a second callback. Until a
receiver is registered, messages wait in a small queue; past 16 of them the
socket stops being read. Fragmented messages are joined and text is checked
for UTF-8 here, as on asyncio.

Writes at once
--------------
Every write to the socket goes through websockets' ``send_data()``, which holds
``send_lock`` across ``stream.send_all()``; that awaits even when the kernel
takes every byte at once. :meth:`~_Delivering.send_now` writes one message
without awaiting when nothing else is writing or waiting to (the lock is free,
which on trio also means no task waits for it, and the protocol holds no bytes
yet): websockets frames it, the bytes go to the kernel in one non-blocking
``write``, and what the kernel does not take goes back in front of the
protocol's outgoing bytes for a background flush, which every later write waits
behind (the lock is fair). A write that never awaits cannot be cancelled
halfway, so no message is ever cut. Plain TCP only (TLS streams write through
``send_data()``), and not on Windows, where ``os.write`` does not take sockets.

The reader never waits on the writer
------------------------------------
After every read, ``recv_events`` calls ``send_data()`` to flush the automatic
replies the protocol may have produced (pong, close). When our writer is blocked
in ``send_all()`` because the peer's TCP window is full, the reader would then
stop reading too; and when the peer is in the same state (bulk data both ways),
neither side would read again: a deadlock. asyncio is immune because its
``transport.write()`` never blocks. Here, a ``send_data()`` called from the
reading task returns at once when there is nothing to send, and does not wait
for the lock: if the lock is taken it leaves the flush to one background task,
which takes the lock in turn. Bytes still leave in protocol order: every flush
sends whatever ``protocol.data_to_send()`` holds at that moment, under the lock.

What the reader left to that task must still leave before the socket closes: a
close frame (1002, 1009 after a protocol violation) queued while the writer was
busy would otherwise be lost when the other side's EOF ends the reader, which
closes the stream at once. So closing the stream first waits (within the close
timeout) for the lock and flushes; and once the protocol is closed, a flush that
finds the stream gone drops what is left instead of raising into websockets'
reader ("unexpected internal error").

:func:`connect` and :func:`serve` are websockets' own, making these connections.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from websockets.frames import CloseCode, Frame
from websockets.protocol import State
from websockets.trio.client import ClientConnection
from websockets.trio.client import connect as ws_connect
from websockets.trio.server import ServerConnection
from websockets.trio.server import serve as ws_serve

from .connection import MESSAGE_OPCODES, Assembly, never_requested, tracked

__all__ = [
    "UNREACHABLE",
    "ReadNeverWaitsClientConnection",
    "ReadNeverWaitsServerConnection",
    "connect",
    "serve",
]

log = logging.getLogger("rpcstream.transport")

# trio reports a failed TLS handshake (an untrusted certificate) as a broken stream.
UNREACHABLE: tuple[type[BaseException], ...] = (OSError, TimeoutError, trio.BrokenResourceError)
"""What ``connect`` raises when the server cannot be reached."""

_EARLY_MAX = 16  # messages held before a receiver is registered; then reading pauses
_WRITE_NOW = sys.platform != "win32"  # os.write takes a socket's descriptor

_reading = contextvars.ContextVar("rpcstream_ws_reading", default=False)


class _Delivering:
    """Mixed into websockets' trio connection classes (see the module docstring)."""

    _flush_scheduled = False
    _flushes = 0  # deferred flushes scheduled and not yet finished
    _failed = False  # invalid text: nothing more is processed
    _lost = False
    _early_paused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # starts recv_events, which runs only later
        ws: Any = self
        self._assembly = Assembly()
        self._on_messages: Callable[[list[bytes]], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._received: list[bytes] = []  # completed by the current read
        self._early: deque[bytes] = deque()
        self._plain = _WRITE_NOW and type(ws.stream) is trio.SocketStream
        # recv_events hands process_event() the events of one read, one by one:
        # counting them down tells where a read ends, to deliver its messages.
        # (A list, not an attribute of ours: the protocol must not hold the connection.)
        self._events_left = left = [0]
        events_received = ws.protocol.events_received

        def counted() -> list[Any]:
            events: list[Any] = events_received()
            left[0] = len(events)
            return events

        ws.protocol.events_received = counted

    # -- receiving ---------------------------------------------------------------------

    def deliver(
        self, on_messages: Callable[[list[bytes]], None], on_lost: Callable[[], None]
    ) -> None:
        """From now on, call ``on_messages`` with the whole messages each read of
        the socket completes, in order, and ``on_lost`` once the connection is
        gone. Messages that came before are delivered first, at once."""
        self._on_messages = on_messages
        if self._early:
            early = list(self._early)
            self._early.clear()
            on_messages(early)
        if self._early_paused:
            self._early_paused = False
            self.resume_reading()  # type: ignore[attr-defined]
        if self._lost:
            on_lost()
        else:
            self._on_lost = on_lost

    async def recv_events(self) -> None:
        _reading.set(True)  # this task's own context: only the reader is marked
        await super().recv_events()  # type: ignore[misc]

    def process_event(self, event: Any) -> None:
        left = self._events_left
        left[0] -= 1
        self._process(event)
        if left[0] <= 0 and self._received and self._on_messages is not None:
            received, self._received = self._received, []
            self._on_messages(received)

    def _process(self, event: Any) -> None:
        if type(event) is not Frame:  # the handshake's Request or Response
            super().process_event(event)  # type: ignore[misc]
            return
        if self._failed:
            return  # what the same read held after invalid text (RFC 6455, 7.1.7)
        if event.opcode not in MESSAGE_OPCODES:  # ping, pong, close: websockets' business
            super().process_event(event)  # type: ignore[misc]
            return
        try:
            message = self._assembly.take(event)
        except UnicodeDecodeError as exc:
            self._fail_invalid_data(exc)
            return
        if message is None:
            return
        if self._on_messages is not None:
            self._received.append(message)
        else:
            self._early.append(message)
            if len(self._early) >= _EARLY_MAX and not self._early_paused:
                self._early_paused = True
                self.pause_reading()  # type: ignore[attr-defined]

    def _fail_invalid_data(self, exc: UnicodeDecodeError) -> None:
        """Close with 1007 (RFC 6455, 8.1), as websockets' ``recv()`` would, and
        drop the TCP connection if the other side has not closed it in time."""
        ws: Any = self
        self._failed = True
        ws.set_connection_exc(exc)
        ws.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        self._schedule_flush()  # the reader is between reads: it would not flush
        if ws.close_deadline is None and ws.close_timeout is not None:
            ws.close_deadline = trio.current_time() + ws.close_timeout
        if ws.close_deadline is not None:
            ws.nursery.start_soon(self._close_when_overdue)

    async def _close_when_overdue(self) -> None:
        ws: Any = self
        with trio.move_on_at(ws.close_deadline):
            await ws.stream_closed.wait()
            return
        await ws.close_stream()

    # -- sending -----------------------------------------------------------------------

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` can write a message: plain TCP, open, and
        nothing else writing, waiting to write, or queued."""
        ws: Any = self
        return (
            self._plain
            and ws.protocol.state is State.OPEN
            and not ws.send_lock.locked()  # trio's lock is fair: free means no waiter
            and not self._flush_scheduled
            and not ws.protocol.writes
            and ws.send_in_progress is None
        )

    def send_now(self, message: bytes, *, text: bool) -> None:
        """Write one message without awaiting (only when :meth:`can_send_now`):
        what the kernel does not take now leaves first in a background flush."""
        ws: Any = self
        protocol = ws.protocol
        if text:
            protocol.send_text(message)
        else:
            protocol.send_binary(message)
        data = protocol.data_to_send()
        out = data[0] if len(data) == 1 else b"".join(data)
        try:
            sent = os.write(ws.stream.socket.fileno(), out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # as websockets' send_context(): the connection is broken
            ws.set_connection_exc(exc)
            ws.nursery.start_soon(ws.close_stream)
            return
        if sent < len(out):
            protocol.writes.insert(0, out[sent:])  # before anything queued later
            self._schedule_flush()

    @property
    def buffered_amount(self) -> int:
        """Bytes framed but not yet handed to the kernel (what a partial write left)."""
        ws: Any = self
        return sum(len(data) for data in ws.protocol.writes)

    async def send_data(self) -> None:
        ws: Any = self
        if not _reading.get():
            await super().send_data()  # type: ignore[misc]
            return
        if not ws.protocol.writes:
            return  # nothing to flush after this read: no lock, no checkpoint
        if ws.send_lock.locked():
            self._schedule_flush()
            return
        try:
            await super().send_data()  # type: ignore[misc]
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            if ws.protocol.state is not State.CLOSED:
                raise  # the reader reports it, as websockets does
            # Closed already (by us, or the other side is gone): nothing can leave.
            log.debug("dropped bytes queued for a closed connection", exc_info=True)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flushes += 1
            self.nursery.start_soon(self._deferred_flush)  # type: ignore[attr-defined]

    async def _deferred_flush(self) -> None:
        try:
            # What is queued from now on needs another flush. (can_send_now()
            # stays false: from here on this task holds the lock or waits for it.)
            self._flush_scheduled = False
            # A failure here is the connection's: the reader or writer reports it.
            with contextlib.suppress(Exception):
                await super().send_data()  # type: ignore[misc]
        finally:
            self._flushes -= 1

    # -- closing -----------------------------------------------------------------------

    async def close_stream(self) -> None:
        ws: Any = self
        try:
            if self._flushes:
                # The lock is fair: this flush runs after the deferred ones, and
                # sends whatever they left.
                timeout = ws.close_timeout if ws.close_timeout is not None else float("inf")
                with trio.move_on_after(timeout), contextlib.suppress(Exception):
                    await super().send_data()  # type: ignore[misc]
            await super().close_stream()  # type: ignore[misc]
        finally:
            self._lost = True
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost()


class ReadNeverWaitsClientConnection(_Delivering, ClientConnection):
    """A ``websockets.trio`` client connection that hands over each message as it
    arrives, writes at once when it can, and whose reader never waits on the writer."""


class ReadNeverWaitsServerConnection(_Delivering, ServerConnection):
    """A ``websockets.trio`` server connection that hands over each message as it
    arrives, writes at once when it can, and whose reader never waits on the writer."""


def connect(url: str, **kwargs: Any) -> Any:
    """websockets' ``connect`` (an async context manager), making these connections."""
    return ws_connect(url, create_connection=ReadNeverWaitsClientConnection, **kwargs)


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[Any], Awaitable[None]], host: str, port: int, **kwargs: Any
) -> AsyncIterator[int]:
    """websockets' ``serve`` with these connections; yields the bound port.
    On the way out, sockets that never sent their request are dropped at once."""
    opening, create_connection = tracked(ReadNeverWaitsServerConnection)
    stopped = trio.Event()

    async def run(task_status: Any) -> None:
        try:
            await ws_serve(
                handler, port, host=host, create_connection=create_connection,
                task_status=task_status, **kwargs,
            )  # fmt: skip
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        # Named for what it runs (websockets' server), not for this closure.
        ws_server = await nursery.start(run, name=f"{ws_serve.__module__}.serve")
        try:
            yield int(ws_server.listeners[0].socket.getsockname()[1])
        finally:
            with trio.CancelScope(shield=True):
                for connection in never_requested(opening):
                    await trio.aclose_forcefully(connection.stream)  # no TLS goodbye
                # Waiting for serve_forever to end, not for aclose(): a handler
                # that raised a BaseException ended it without setting what
                # aclose() waits for (websockets 17.4), which hung here for ever.
                async with trio.open_nursery() as closing:
                    closing.start_soon(ws_server.aclose)
                    await stopped.wait()
                    closing.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
