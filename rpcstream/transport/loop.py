"""Which event loop runs us, and what it can do that anyio does not expose: websockets
has one module per loop, and only the transport needs to know which (as anyio's
``_backends``)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

if TYPE_CHECKING:
    import trio

__all__ = [
    "EagerTasks",
    "NextTurn",
    "NurseryTasks",
    "Signal",
    "TrioNextTurn",
    "is_trio",
    "next_turn",
    "open_handler_tasks",
    "trio_next_turn",
]

log = logging.getLogger("rpcstream.peer")

_EAGER = sys.version_info >= (3, 12)
if not _EAGER:
    # What 3.12's eager start does inside asyncio, done from outside (see
    # _FirstStepRan): make a task the current one for one step. Private, but
    # these two are fixed for the life of 3.11, the one version that needs them.
    from asyncio.tasks import _enter_task, _leave_task


def is_trio() -> bool:
    """Whether the current task runs on trio (otherwise asyncio)."""
    return sniffio.current_async_library() == "trio"


async def open_handler_tasks(stack: contextlib.AsyncExitStack) -> EagerTasks | NurseryTasks:
    """Where a peer's handler tasks start on the running loop; entered on
    ``stack`` (inside the peer's task group) where it has a block to leave.

    Whichever it is, its owner cancels each task through the task's own cancel
    scope, and calls :meth:`end` before it cancels its task group."""
    eager = EagerTasks.here()
    if eager is not None:
        return eager
    # Entering a nursery does not wait (no checkpoint), so nothing can cancel
    # the owner between entering its task group and this: the stack is whole.
    return await stack.enter_async_context(NurseryTasks.open())


class Signal:
    """An event with at most one waiter, on asyncio: what a caller waits on for its
    answer and a stream for credit or items. ``anyio.Event()`` looks up the running
    library to be made and wraps an ``asyncio.Event`` with its list of waiters; one
    future does for one waiter. ``set`` may come before, during or after ``wait``."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._set = False

    def set(self) -> None:
        """Wake the waiter, if any; later waits return at once."""
        if not self._set:
            self._set = True
            future = self._future
            if future is not None and not future.done():
                future.set_result(None)

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._set

    async def wait(self) -> None:
        """Wait until :meth:`set` is called (cancellable, as any await)."""
        if not self._set:
            self._future = asyncio.get_running_loop().create_future()
            await self._future


class EagerTasks:
    """Handler tasks on asyncio, started outside anyio's task groups because a
    handler task is the largest cost of a call (``benchmarks/bench_instructions``:
    about 140k instructions through ``TaskGroup.start_soon``, 50k for a plain
    asyncio task).

    A task's first step runs at once, where it is started: asyncio's eager
    start (Python 3.12+; on 3.11, the same done from outside, see
    :func:`_start_eagerly`). A handler that answers without waiting then
    answers within the call that received it, with no trip through the event
    loop, and still has its own task identity (its own ``current_task()``,
    cancel scopes and locks), unlike a plain function call.

    Their owner cancels these tasks through their own cancel scopes (a task group
    does not hold them) and waits for them with :meth:`wait`. A task that
    escapes with an exception is logged here (``rpcstream task failed``): nothing
    else would see it. :class:`NurseryTasks` is the same for trio.
    """

    # What each call makes one of (a caller's answer event, a handler's scope).
    new_event: Callable[[], Any] = Signal
    new_scope: Callable[[], Any] = anyio.CancelScope

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

    def start(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run ``func(*args)`` as a task of the loop, its first step now where Python can."""
        coro = func(*args)
        if _EAGER:
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg]
        else:
            task = _start_eagerly(self._loop, coro)
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

    async def end(self) -> None:
        """Wait, shielded, for the tasks left (their owner cancelled them)."""
        if self._tasks:
            with anyio.CancelScope(shield=True):
                await self.wait()


class NurseryTasks:
    """Handler tasks on trio, started in a trio nursery of their owner's rather
    than through anyio's task group: ``TaskGroup.start_soon`` costs about 193k
    instructions per task on trio (anyio 4.14+ gives each task a handle with a
    cancel scope and an event of its own), trio's own spawn about 80k
    (``benchmarks/bench_instructions``, the ``spawn`` rows).

    Open it with :meth:`open`, inside the owner's task group, so that the task
    group's cancel scope encloses the nursery: cancelling the group cancels these
    tasks too. The nursery's own scope encloses the rest of the owner's ``async
    with`` body, as a task group's does: a task that escapes with an exception
    (a ``BaseException``; handlers turn every ``Exception`` into an answer)
    cancels the others and that body, and comes out of the owner's exit as
    itself, as it did from the task group. As with :class:`EagerTasks`, the
    owner cancels a task through the task's own cancel scope, and ends what is
    left (:meth:`cancel`, then leaving :meth:`open`'s block) before its task
    group: cancelled by its own scope, not the group's, the nursery takes its
    own ``Cancelled`` out of what it raises, so a lone exception stays alone.
    """

    __slots__ = ("_nursery", "new_event", "new_scope")

    def __init__(self, nursery: trio.Nursery) -> None:
        import trio

        self._nursery = nursery
        # What each call makes one of (a caller's answer event, a handler's
        # scope): trio's own. anyio's are wrappers around them, each made
        # through a lookup of the running backend, and every use goes through
        # the wrapper (about 30k instructions a call in all). The interface
        # rpcstream uses is the same: set, is_set and wait; cancel and
        # cancelled_caught, as a context manager.
        self.new_event: Callable[[], Any] = trio.Event
        self.new_scope: Callable[[], Any] = trio.CancelScope

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[NurseryTasks]:
        """A nursery for the duration of the block; leaving waits for its tasks.
        A lone exception comes out as itself, not in a group (as from
        ``rpcstream._tasks.task_group``): the task group around it unwraps only one
        level."""
        import trio  # only here: trio is an optional dependency

        try:
            async with trio.open_nursery() as nursery:
                yield cls(nursery)
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise

    def start(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start ``func(*args)`` in the nursery; it runs in the loop's next batch."""
        # A name, so that trio need not format one from the function per task.
        self._nursery.start_soon(func, *args, name="rpcstream handler")

    def cancel(self) -> None:
        """Cancel every task here (the nursery's own scope, not its owner's)."""
        self._nursery.cancel_scope.cancel()

    async def end(self) -> None:
        """Cancel what is left; leaving :meth:`open`'s block waits for it."""
        self.cancel()

    def __len__(self) -> int:
        return len(self._nursery.child_tasks)


class NextTurn:
    """Callbacks for an asyncio loop's next turn, any number of them for the price
    of one loop handle: what the connections of a fan-out ask for at once (each
    writes what a burst queued, see the driver's ``_wake_writer``) costs one
    ``call_soon`` per turn, not one per connection. Each callback runs in the
    context it was given, in the order given; one that raises is reported to the
    loop's exception handler, as a failing ``call_soon`` callback is, and the rest
    still run. One per loop (:func:`next_turn`).

    A turn's callbacks and contexts are kept in two lists, not as a list of pairs:
    a fan-out queues one per connection, and a pair is an object the cyclic
    garbage collector tracks. Made by the thousand in one turn, they outlive the
    collections of the youngest generation that the same turn sets off, and each
    one promoted brings the next full collection nearer (docs/benchmarks_runs.md,
    "Tenth session": the garbage collector)."""

    __slots__ = ("_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: tuple[list[Callable[[], None]], list[contextvars.Context]] | None = None

    def add(self, callback: Callable[[], None], context: contextvars.Context) -> None:
        """Run ``callback`` in ``context`` in the loop's next turn."""
        pending = self._pending
        if pending is None:
            pending = self._pending = ([], [])
            self._loop.call_soon(self._run, pending, context=_BARE)
        pending[0].append(callback)
        pending[1].append(context)

    def _run(self, pending: tuple[list[Callable[[], None]], list[contextvars.Context]]) -> None:
        # What is added while these run is for the turn after (fresh lists).
        if self._pending is pending:
            self._pending = None
        for callback, context in zip(*pending, strict=True):
            try:
                context.run(callback)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc}
                )


_BARE = contextvars.Context()  # NextTurn._run reads no context variable
_next_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, NextTurn] = (
    weakref.WeakKeyDictionary()
)


def next_turn(loop: asyncio.AbstractEventLoop) -> NextTurn:
    """The loop's :class:`NextTurn` (made on first use, gone with the loop)."""
    turn = _next_turns.get(loop)
    if turn is None:
        turn = _next_turns[loop] = NextTurn(loop)
    return turn


class TrioNextTurn:
    """:class:`NextTurn` on trio, which has no ``call_soon``: one system task per
    trio run runs the callbacks, woken by a ``reschedule`` when the first of a
    turn comes (no task switch per connection, no wake-up socket). Callbacks
    added while it runs a batch wait for its next one, after a checkpoint, as
    on asyncio they wait for the next turn. One per run (:func:`trio_next_turn`)."""

    __slots__ = ("_pending", "_sleeping")

    def __init__(self) -> None:
        self._pending: tuple[list[Callable[[], None]], list[contextvars.Context]] | None = None
        self._sleeping: Any = None  # the task, while it waits for work

    def add(self, callback: Callable[[], None], context: contextvars.Context) -> None:
        """Run ``callback`` in ``context`` in the run's next batch of tasks."""
        pending = self._pending
        if pending is None:
            pending = self._pending = ([], [])
            task, self._sleeping = self._sleeping, None
            if task is not None:
                import trio

                trio.lowlevel.reschedule(task)
        pending[0].append(callback)
        pending[1].append(context)

    async def run(self) -> None:
        """The system task: run each batch, sleep while there is none."""
        import trio

        while True:
            if self._pending is None:
                self._sleeping = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(_abort)
            else:
                await trio.lowlevel.checkpoint()
            pending, self._pending = self._pending, None
            for callback, context in zip(*(pending or ((), ())), strict=True):
                try:
                    context.run(callback)
                except Exception:  # a system task's exception would end the whole run
                    log.exception("rpcstream: a callback of the next turn failed")


def _abort(_: Any) -> Any:
    import trio

    return trio.lowlevel.Abort.SUCCEEDED  # cancelled (the run ends): nothing to undo


def trio_next_turn() -> TrioNextTurn:
    """The running trio run's :class:`TrioNextTurn` (its task started on first use)."""
    import trio

    turn: TrioNextTurn | None = _trio_turn().get(None)
    if turn is None:
        turn = TrioNextTurn()
        _trio_turn().set(turn)
        trio.lowlevel.spawn_system_task(turn.run, name="rpcstream next turn")
    return turn


@functools.cache
def _trio_turn() -> Any:
    import trio

    return trio.lowlevel.RunVar("rpcstream_next_turn")


def _report(task: asyncio.Task[None]) -> None:
    # The coroutines started here catch their own failures; an Exception that
    # still escapes is a bug, and must not vanish as "exception never retrieved".
    # A BaseException goes on up on purpose, logged where it was raised (the callee).
    if not task.cancelled() and isinstance(task.exception(), Exception):
        log.error("rpcstream task failed", exc_info=task.exception())


def _start_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> Any:
    """Python 3.11: a task whose first step runs now, as 3.12's eager start does.

    The task is made first, so that it is the current task while the step runs
    (what anyio's cancel scopes, task groups and locks bind to), in the context
    it will keep. Its own first turn on the loop then hands over what that step
    gave (:class:`_FirstStepRan`), and later turns go to the coroutine itself.
    """
    first = _FirstStepRan(coro)
    context = contextvars.copy_context()
    task = loop.create_task(first, context=context)
    outer = asyncio.current_task(loop)  # None in a protocol callback
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    try:
        first.step(context)
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    return task


class _FirstStepRan(Coroutine[Any, Any, None]):
    """A coroutine whose first step already ran; its task takes that step's outcome."""

    __slots__ = ("_coro", "_outcome")

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = coro
        # ("yielded", value), ("returned", value) or ("raised", exception); None once taken.
        self._outcome: tuple[str, Any] | None = None

    def step(self, context: contextvars.Context) -> None:
        try:
            yielded = context.run(self._coro.send, None)
        except StopIteration as stop:
            self._outcome = ("returned", stop.value)
        except BaseException as exc:  # the task raises it, as if it ran there
            self._outcome = ("raised", exc)
        else:
            self._outcome = ("yielded", yielded)

    def send(self, value: Any) -> Any:
        outcome = self._outcome
        if outcome is None:
            return self._coro.send(value)
        self._outcome = None
        kind, result = outcome
        if kind == "yielded":
            return result  # the future the step waits on: the task waits on it now
        if kind == "returned":
            raise StopIteration(result)
        raise result

    def throw(self, exc: Any, *args: Any) -> Any:
        outcome, self._outcome = self._outcome, None
        if outcome is not None and outcome[0] != "yielded":
            raise exc  # it ended in its first step: nothing is left to throw into
        return self._coro.throw(exc, *args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        return self._coro.__await__()

    # What inspect.getcoroutinestate() reads (anyio asks whether a task started).
    @property
    def cr_running(self) -> bool:
        return self._coro.cr_running  # type: ignore[attr-defined, no-any-return]

    @property
    def cr_frame(self) -> Any:
        return self._coro.cr_frame  # type: ignore[attr-defined]

    @property
    def cr_await(self) -> Any:
        return self._coro.cr_await  # type: ignore[attr-defined]

    @property
    def cr_code(self) -> Any:
        return self._coro.cr_code  # type: ignore[attr-defined]
