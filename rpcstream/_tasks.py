"""A task group whose lone exception comes out as itself.

Our background tasks never raise (they turn failures into closed connections
and error frames), so an exception leaving one of our task groups comes from
the body of the user's ``async with``. Users write ``except RemoteError``
around that block; they should not have to unwrap an ``ExceptionGroup`` of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from anyio.abc import TaskGroup

__all__ = ["task_group"]


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
