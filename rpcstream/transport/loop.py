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

_EAGER = sys.version_info >= (3, 12)


def is_trio() -> bool:
    """Whether the current task runs on trio (otherwise asyncio)."""
    return sniffio.current_async_library() == "trio"


class EagerTasks:
    """Handler tasks on asyncio, started outside anyio's task groups because a
    handler task is the largest cost of a call (``benchmarks/bench_instructions``:
    about 140k instructions through ``TaskGroup.start_soon``, 50k for a plain
    asyncio task).

    On Python 3.12+ a task's first step runs at once, where it is started:
    asyncio's eager start. A handler that answers without waiting then answers
    within the call that received it, with no trip through the event loop, and
    still has its own task identity (its own ``current_task()``, cancel scopes
    and locks), unlike a plain function call. On 3.11 the task starts on the
    loop's next turn, as anyio's would.

    Their owner cancels these tasks through their own cancel scopes (a task group
    does not hold them) and waits for them with :meth:`wait`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def here(cls) -> EagerTasks | None:
        """Handler tasks for the running loop, or ``None`` on trio (whose nursery
        tasks are cheap, and which has no eager start)."""
        if sniffio.current_async_library() != "asyncio":
            return None
        return cls(asyncio.get_running_loop())

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of the loop, its first step now where Python can."""
        if _EAGER:
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg]
        else:
            task = self._loop.create_task(coro)
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
