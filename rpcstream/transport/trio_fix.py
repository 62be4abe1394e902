"""websockets' trio connections, changed so that reading never waits on writing.

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
"""

from __future__ import annotations

import contextlib
import contextvars

from websockets.trio.client import ClientConnection
from websockets.trio.server import ServerConnection

__all__ = ["ReadNeverWaitsClientConnection", "ReadNeverWaitsServerConnection"]

_reading = contextvars.ContextVar("rpcstream_ws_reading", default=False)


class _ReadNeverWaits:
    """Mixed into websockets' trio connection classes (see the module docstring)."""

    _flush_scheduled = False

    async def recv_events(self) -> None:
        _reading.set(True)  # this task's own context: only the reader is marked
        await super().recv_events()  # type: ignore[misc]

    async def send_data(self) -> None:
        if _reading.get() and self.send_lock.locked():  # type: ignore[attr-defined]
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.nursery.start_soon(self._deferred_flush)  # type: ignore[attr-defined]
            return
        await super().send_data()  # type: ignore[misc]

    async def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        # A failure here is the connection's: the reader or writer reports it.
        with contextlib.suppress(Exception):
            await super().send_data()  # type: ignore[misc]


class ReadNeverWaitsClientConnection(_ReadNeverWaits, ClientConnection):
    """A ``websockets.trio`` client connection whose reader never waits on the writer."""


class ReadNeverWaitsServerConnection(_ReadNeverWaits, ServerConnection):
    """A ``websockets.trio`` server connection whose reader never waits on the writer."""
