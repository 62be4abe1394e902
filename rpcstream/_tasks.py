"""Task primitives every layer shares: a task group whose lone exception comes out
as itself, and :class:`Flag`, an event for less than ``anyio.Event``.

Our background tasks never raise (they turn failures into closed connections
and error frames), so an exception leaving one of our task groups comes from
the body of the user's ``async with``. Users write ``except RemoteError``
around that block; they should not have to unwrap an ``ExceptionGroup`` of one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

__all__ = ["Flag", "FlagLike", "new_flag", "task_group"]


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    """``anyio.create_task_group()``, re-raising a group of one exception as that exception."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


class FlagLike(Protocol):
    """What :func:`new_flag` returns: ``anyio.Event``'s interface."""

    def set(self) -> None:
        """Wake every waiter; later waits return at once (after a checkpoint)."""

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""

    def wait(self) -> Awaitable[Any]:
        """Wait until :meth:`set` is called."""


class Flag:
    """``anyio.Event`` on asyncio, for fewer objects and less time.

    An ``anyio.Event`` is made through a lookup of the running library and wraps an
    ``asyncio.Event``, with a deque of waiters, whose ``wait`` is a coroutine inside
    a coroutine: three objects for the cyclic garbage collector while idle, seven
    while a task waits. A server holds several per connection, most of them waited
    on for the connection's whole life, and every full collection visits them all
    (docs/benchmarks_runs.md, "Tenth session": the garbage collector). A Flag is
    one object while idle, and a waiter adds one future, awaited directly.

    Cancelling a waiter cancels only its own future. Waiters that were cancelled
    stay in the list, done, until it has doubled since it was last pruned: the list
    stays within twice the live waiters. Waiting on a set Flag is still a
    checkpoint, as on an ``anyio.Event``: a loop around it cannot starve the others.
    """

    __slots__ = ("_prune_at", "_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None
        self._prune_at = 8

    def set(self) -> None:
        """Wake every waiter; later waits return after a checkpoint."""
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():  # done: cancelled
                waiter.set_result(None)

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._set

    def wait(self) -> Awaitable[Any]:
        """Wait until :meth:`set` is called (cancellable, as any await)."""
        if self._set:
            return anyio.lowlevel.checkpoint()
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        elif len(waiters) >= self._prune_at:
            waiters[:] = [w for w in waiters if not w.done()]
            self._prune_at = max(8, 2 * len(waiters))
        waiters.append(waiter)
        return waiter


_trio_event: Any = None  # trio.Event, once a flag was asked for on trio


def new_flag() -> FlagLike:
    """An event for the running loop: a :class:`Flag` on asyncio, ``trio.Event`` on
    trio (what ``anyio.Event`` wraps there, without the wrapper)."""
    global _trio_event
    if asyncio._get_running_loop() is not None:
        return Flag()
    if _trio_event is None:
        import trio  # only here: trio is an optional dependency

        _trio_event = trio.Event
    event: FlagLike = _trio_event()
    return event
