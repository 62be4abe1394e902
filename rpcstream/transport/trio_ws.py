"""websockets on trio: connections whose reader never waits on their writer.

``websockets.trio`` reads in a background task (``recv_events``) that, after
every chunk, calls ``send_data()`` to flush the automatic replies the protocol
may have produced (pong, close). ``send_data()`` holds ``send_lock`` across
``stream.send_all()``. When our writer is blocked in ``send_all()`` because the
peer's TCP window is full, the reader therefore stops reading too; and when the
peer is in the same state (bulk data both ways), neither side reads again: a
deadlock. asyncio is immune because its ``transport.write()`` never blocks.

Here, a ``send_data()`` called from the reading task does not wait for the lock:
if the lock is taken it leaves the flush to one background task, which takes the
lock in turn. Bytes still leave in protocol order: every flush sends whatever
``protocol.data_to_send()`` holds at that moment, under the same lock.

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
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.trio.client import ClientConnection
from websockets.trio.client import connect as ws_connect
from websockets.trio.server import ServerConnection
from websockets.trio.server import serve as ws_serve

from .connection import TextCheck, never_requested, tracked

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

_reading = contextvars.ContextVar("rpcstream_ws_reading", default=False)


class _ReadNeverWaits:
    """Mixed into websockets' trio connection classes (see the module docstring)."""

    _flush_scheduled = False
    _flushes = 0  # deferred flushes scheduled and not yet finished
    _failed = False  # invalid text: nothing more is processed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text_check = TextCheck()

    async def recv_events(self) -> None:
        _reading.set(True)  # this task's own context: only the reader is marked
        await super().recv_events()  # type: ignore[misc]

    async def send_data(self) -> None:
        ws: Any = self
        if not _reading.get():
            await super().send_data()  # type: ignore[misc]
            return
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

    def process_event(self, event: Any) -> None:
        if type(event) is Frame:
            if self._failed:
                return  # what the same read held after invalid text (RFC 6455, 7.1.7)
            if event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT:
                try:
                    self._text_check.check(event)
                except UnicodeDecodeError as exc:
                    self._fail_invalid_data(exc)
                    return
        super().process_event(event)  # type: ignore[misc]

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

    async def _deferred_flush(self) -> None:
        try:
            self._flush_scheduled = False  # what is queued from now on needs another
            # A failure here is the connection's: the reader or writer reports it.
            with contextlib.suppress(Exception):
                await super().send_data()  # type: ignore[misc]
        finally:
            self._flushes -= 1

    async def close_stream(self) -> None:
        ws: Any = self
        if self._flushes:
            # The lock is fair: this flush runs after the deferred ones, and
            # sends whatever they left.
            timeout = ws.close_timeout if ws.close_timeout is not None else float("inf")
            with trio.move_on_after(timeout), contextlib.suppress(Exception):
                await super().send_data()  # type: ignore[misc]
        await super().close_stream()  # type: ignore[misc]


class ReadNeverWaitsClientConnection(_ReadNeverWaits, ClientConnection):
    """A ``websockets.trio`` client connection whose reader never waits on the writer."""


class ReadNeverWaitsServerConnection(_ReadNeverWaits, ServerConnection):
    """A ``websockets.trio`` server connection whose reader never waits on the writer."""


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

    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            functools.partial(
                ws_serve,
                handler,
                port,
                host=host,
                create_connection=create_connection,
                **kwargs,
            )
        )
        try:
            yield int(ws_server.listeners[0].socket.getsockname()[1])
        finally:
            with trio.CancelScope(shield=True):
                for connection in never_requested(opening):
                    await trio.aclose_forcefully(connection.stream)  # no TLS goodbye
                await ws_server.aclose()
            nursery.cancel_scope.cancel()
