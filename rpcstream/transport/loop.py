"""Which event loop runs us, and what it can do that anyio does not expose: websockets
has one module per loop, and only the transport needs to know which (as anyio's
``_backends``)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import sniffio

__all__ = ["EagerTasks", "is_trio"]

log = logging.getLogger("rpcstream.peer")


def is_trio() -> bool:
    """Whether the current task runs on trio (otherwise asyncio)."""
    return sniffio.current_async_library() == "trio"


class EagerTasks:
    """Tasks whose first step runs at once, where they are started, in a task of
    their own: asyncio's eager start (Python 3.12+). A handler that answers
    without waiting then answers within the call that received it, with no trip
    through the event loop, and still has its own task identity (its own
    ``current_task()``, cancel scopes and locks), unlike a plain function call.

    anyio's task groups start tasks lazily whatever the task factory, so these
    tasks live beside the peer's task group: their owner cancels them through
    their own cancel scopes and waits for them with :meth:`wait`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def here(cls) -> EagerTasks | None:
        """Eager tasks for the running loop, or ``None`` where there are none
        (trio, or Python before 3.12)."""
        if sys.version_info < (3, 12) or sniffio.current_async_library() != "asyncio":
            return None
        return cls(asyncio.get_running_loop())

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro``'s first step now, the rest as a task of the loop."""
        task = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg]
        if task.done():
            _report(task)
            return
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        _report(task)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Wait until every task started here has finished."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))


def _report(task: asyncio.Task[None]) -> None:
    # The coroutines started here catch their own failures; one that still
    # escapes is a bug, and must not vanish as "exception never retrieved".
    if not task.cancelled() and task.exception() is not None:
        log.error("rpcstream task failed", exc_info=task.exception())
