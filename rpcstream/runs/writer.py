"""RunWriter: append a run's events from a worker that has only an event store.

A worker process (a queue consumer, a cron job) need not run a
:class:`~rpcstream.runs.server.RunServer`: with a store shared with the servers (a
:class:`~rpcstream.store.redis.RedisStore`), it writes a run's events and
every server's subscribers see them live::

    async with RedisStore(url) as store:
        writer = await RunWriter.create(store, run_id, "summarize")  # or RunWriter(store, run_id)
        await writer.send("token", {"text": "Hello"})
        await writer.complete({"summary": "..."})            # or: await writer.fail("it broke")

The events are the ones a RunServer's flows write (:mod:`rpcstream.runs.events`):
``started`` with ``{"flow": ...}`` (from :meth:`RunWriter.create`), the
worker's own events, then one terminal event: ``complete`` with the result, or
``error`` with ``{"message": ..., "type": ...}``. The writer only JSON-encodes
``data`` (with msgspec); it does not check event types against a flow's declaration.
"""

from __future__ import annotations

from typing import Any

from .. import models
from ..store.base import EventStore
from .events import TERMINAL_TYPES, ErrorData, EventType, begin_run

__all__ = ["RunWriter"]


class RunWriter:
    """Appends events to the run ``run_id`` in ``store`` (which the caller opens and closes).

    Each method returns the new event's id. Appending after the terminal event
    raises :class:`~rpcstream.errors.RunFinished`; an unknown run raises
    :class:`~rpcstream.errors.RunNotFound`; data msgspec cannot encode raises
    :class:`TypeError` and appends nothing.
    """

    def __init__(self, store: EventStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    @classmethod
    async def create(
        cls, store: EventStore, run_id: str, flow: str, *, owner: str | None = None
    ) -> RunWriter:
        """Create the run (as ``runs.start`` does: with its ``started`` event) and a writer."""
        await begin_run(store, run_id, flow, owner)
        return cls(store, run_id)

    async def send(self, type: str, data: Any = None) -> int:
        """Append an event of ``type`` with ``data``; a terminal type ends the run."""
        encoded = models.encode_json(data)  # encode_data, and pydantic models
        event = await self.store.append(self.run_id, type, encoded, terminal=type in TERMINAL_TYPES)
        return event.id

    async def complete(self, data: Any = None) -> int:
        """End the run successfully, with ``data`` as its result."""
        return await self.send(EventType.COMPLETE.value, data)

    async def fail(self, message: str, *, error_type: str = "Error") -> int:
        """End the run with an ``error`` event: ``{"message": message, "type": error_type}``."""
        return await self.send(EventType.ERROR.value, ErrorData(message, error_type))

    def __repr__(self) -> str:
        return f"RunWriter({self.store!r}, {self.run_id!r})"
