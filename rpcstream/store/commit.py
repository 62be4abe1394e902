"""Group commit: concurrent appends share one write (a transaction, a pipeline).

Theory of operation
-------------------
``submit`` puts a request on a pending list, bounded in requests (and, if
asked, in the bytes they hold), and waits. Whoever finds
no committer at work becomes the committer: it calls the store's ``write``
with a ``take`` function; ``write`` does whatever waiting it needs (a lock),
calls ``take()`` to get every pending request (up to ``max_group``) and writes
them all at once, giving each an outcome. Requests queued meanwhile form the
next group, whose first waiter to wake commits it. One committer per group
means no background task: the store works without being entered, and nothing
outlives the callers.

Pipelining. ``put_nowait`` queues a request and returns at once, for a caller
that does not wait for its outcome (SQLite's pipelined appends: their ids are
known before the write). Someone must still commit it: when no committer is at
work, ``put_nowait`` starts a *drainer*, a task of its own (an asyncio task, or
a trio system task: no task group to enter) that commits groups until the
pending list is empty, then ends. Waiting callers treat the drainer as any
other committer. ``flush`` waits until everything queued so far is written.

Several writes at once. With ``max_writes`` above 1, up to that many
committers write groups at the same time (Redis: one script call per
connection), so that the store works on one group while the callers of another
run. Groups all of one size would stay in step (every caller of the finished
group queues again at once, and they form one group), so a committer that finds
no group being written takes about half of what is queued, and a second
committer takes the rest at once. Two writes may reach the store in either
order: requests of one :attr:`Request.key` are never in two groups being
written at once (a take stops before the first request whose key is busy), so
they are written in the order they were queued. A waiter whose request another
write holds is not woken when a group ends, only when its own does (asyncio).

Cancellation. A request still on the pending list is withdrawn when its
caller is cancelled: it was never written. A taken request is never put back
(no *requeue*): ``write`` must see a taken group through to an outcome,
shielded from cancellation (bounded by the store's own timeouts), so an append
whose caller was cancelled at that point may still be stored, exactly as when
the cancellation arrives a moment after the write. Requeueing a group whose
committer was cancelled before it wrote would let the committer leave a few
milliseconds sooner, but at the price of requests that are "taken but maybe
not", an extra state each store had to get right, and of requeued requests
racing newer ones for ids. Taking the group only at the last moment, right
before the shielded write, makes that window nothing worth saving.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Hashable
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["GroupCommit", "Request", "checkpoint"]

log = logging.getLogger("rpcstream.store")


class Request:
    """One unit of work waiting for its group; stores subclass it with their fields."""

    __slots__ = ("done", "error", "key", "size", "taken")

    def __init__(self, size: int = 0, key: Hashable = None) -> None:
        self.size = size
        """The bytes it holds, counted against the pending list's ``max_pending_bytes``."""
        self.key = key
        """With ``max_writes`` > 1: requests of one key (not ``None``) are never in
        two groups being written at once, so they are written in the order queued."""
        self.taken = False
        """In a group being written: it can no longer be withdrawn."""
        self.done = False
        """It has its outcome: ``error``, or the store's result fields."""
        self.error: BaseException | None = None
        """Why it failed; :meth:`GroupCommit.submit` raises it."""

    def fail(self, error: BaseException) -> None:
        """Give the request its outcome: ``submit`` raises ``error``."""
        self.error = error
        self.done = True


R = TypeVar("R", bound=Request)

Take = Callable[[], list[R]]
"""What ``write`` calls to take the group: every pending request, up to ``max_group``."""


class GroupCommit(Generic[R]):
    """Batches requests so that one ``write`` serves many concurrent callers.

    Args:
        write: ``async write(take)``: wait for what it needs, call ``take()``,
            then write that group shielded from cancellation and mark every
            request of it done (setting its result, or calling ``fail``).
        max_pending: requests queued at most; more callers wait for room.
        max_group: requests taken per write at most (default ``max_pending``).
        max_pending_bytes: the :attr:`Request.size` of the queued requests at most
            (default: no limit); a request larger than that on its own is let in
            when nothing else is queued.
        max_writes: groups written at once at most (see "Several writes at once"
            in the module docstring); :meth:`put_nowait`'s drainer writes one.
    """

    def __init__(
        self,
        write: Callable[[Take[R]], Awaitable[None]],
        *,
        max_pending: int,
        max_group: int | None = None,
        max_pending_bytes: int | None = None,
        max_writes: int = 1,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        if max_group is not None and max_group < 1:
            raise ValueError(f"max_group must be at least 1, not {max_group}")
        if max_pending_bytes is not None and max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be at least 1, not {max_pending_bytes}")
        if max_writes < 1:
            raise ValueError(f"max_writes must be at least 1, not {max_writes}")
        self.max_pending = max_pending
        self.max_group = max_group or max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_writes = max_writes
        self._write = write
        self._pending: list[R] = []
        self._pending_bytes = 0
        self._committers = 0  # at work: at their checkpoint, or writing a group
        self._writing = 0  # groups taken and not yet done
        self._busy: set[Hashable] = set()  # the keys of those groups (max_writes > 1)
        self._group_done = _signal()
        self.groups = 0
        """Groups taken so far (statistics for tests and benchmarks)."""
        self.requests = 0
        """Requests in those groups."""

    @property
    def pending(self) -> int:
        """Requests queued now, not yet taken."""
        return len(self._pending)

    async def submit(self, request: R) -> None:
        """Queue ``request`` and return once its group gave it an outcome.

        Raises the request's ``error`` if it has one. Cancelled while queued,
        the request is withdrawn; cancelled once taken, it may still be written.
        """
        while not self.has_room(request.size):
            await self._wait()  # backpressure: wait for a group to leave
        self._pending.append(request)
        self._pending_bytes += request.size
        try:
            while not request.done:
                if self._committers >= self.max_writes or not self._can_take():
                    signal = self._group_done  # self._wait(request), one call less
                    if type(signal) is _Signal:
                        await signal.wait(request)
                    else:
                        await signal.wait()
                    continue
                self._committers += 1
                try:
                    await self._commit()
                finally:
                    self._committers -= 1
                    # Wake the waiters: theirs may be done, or one must commit next.
                    self._wake()
        except BaseException:
            if not request.taken:
                self._pending.remove(request)  # never written: safe to withdraw
                self._pending_bytes -= request.size
            raise
        if request.error is not None:
            raise request.error

    def has_room(self, size: int = 0) -> bool:
        """Whether one more request of ``size`` bytes fits now (:meth:`wait_for_room`
        would return at once)."""
        if len(self._pending) >= self.max_pending:
            return False
        limit = self.max_pending_bytes
        return limit is None or not self._pending or self._pending_bytes + size <= limit

    async def wait_for_room(self, size: int = 0) -> None:
        """Return once the pending list has room for one more request of ``size`` bytes."""
        while not self.has_room(size):
            await self._wait()

    def put_nowait(self, request: R) -> None:
        """Queue ``request`` and return at once; a drainer task will write it.

        Call it right after :meth:`wait_for_room` or :meth:`has_room` (with no await
        in between): the pending list stays bounded. The request cannot be
        withdrawn; its outcome is set on it for whoever looks (nobody is told).
        """
        if not self.has_room(request.size):
            raise anyio.WouldBlock("no room: await wait_for_room() first")
        self._pending.append(request)
        self._pending_bytes += request.size
        if not self._committers:
            self._committers += 1
            _spawn(self._drain)

    async def flush(self) -> None:
        """Wait until every request queued so far has its outcome."""
        while self._pending or self._committers:
            await self._wait()

    def _can_take(self) -> bool:
        """Whether a committer would find a request to take now."""
        pending = self._pending
        return bool(pending) and (not self._busy or pending[0].key not in self._busy)

    def _wait(self, request: R | None = None) -> Awaitable[None]:
        """Wait for the next group end; a waiter whose ``request`` another write
        holds sleeps on until that write ends (asyncio)."""
        signal = self._group_done
        if type(signal) is _Signal:
            return signal.wait(request)
        return signal.wait()

    def _wake(self) -> None:
        """A group ended (or a committer left): wake whoever may now go on."""
        signal = self._group_done
        self._group_done = _signal()
        if isinstance(signal, _Signal):
            signal.set(self._group_done)
        else:
            signal.set()

    async def _drain(self) -> None:
        try:
            while self._pending:
                if not self._can_take():  # its key is in a group being written
                    await self._wait()
                    continue
                try:
                    await self._commit()
                finally:
                    self._wake()
        except Exception:  # a write that broke its promise to never raise: say so
            log.exception("a group commit failed")
        finally:
            self._committers -= 1
            self._wake()

    async def _commit(self) -> None:
        # One more turn of the event loop lets the tasks just woken by the previous
        # group queue their next request (trio runs them in random order, so some
        # may not have run yet): the group is taken as late, and so as large, as
        # it can be. A committer cancelled here leaves having taken nothing.
        await checkpoint()
        group: list[R] = []
        keys: set[Hashable] = set()
        took = False

        def take() -> list[R]:
            nonlocal took
            took = True
            pending = self._pending
            count = min(self.max_group, len(pending))
            if self.max_writes > 1:
                count = self._count(count, keys)
            taken = pending[:count]
            del pending[:count]
            for request in taken:
                request.taken = True
                self._pending_bytes -= request.size
            group.extend(taken)
            self._writing += 1
            self.groups += 1
            self.requests += count
            if self._committers < self.max_writes and self._can_take():
                self._wake()  # what is left may go now, beside this group: a committer
            return taken

        try:
            await self._write(take)
        finally:
            if took:
                self._writing -= 1
                self._busy -= keys
            # A write must give every taken request an outcome; should one not (a
            # bug), its caller gets an error rather than waiting forever.
            for request in group:
                if not request.done:
                    request.fail(RuntimeError("the group write ended without an outcome"))

    def _count(self, limit: int, keys: set[Hashable]) -> int:
        """How many of the first ``limit`` pending requests to take when several
        groups may be written at once, and mark their keys busy (into ``keys``).

        It stops before a request whose key a group being written holds. With no
        group being written, it takes about half, so that the rest can go at once
        as a second group and the two overlap (the store works on one while the
        other's callers run): groups all of one size would otherwise stay in step.
        """
        busy = self._busy
        half = limit if self._writing else (limit + 1) // 2
        count = 0
        for request in self._pending[:limit]:
            key = request.key
            if key is not None and key in busy:
                break
            if count >= half and (key is None or key not in keys):
                break  # a split that keeps each key in one group
            if key is not None:
                keys.add(key)
            count += 1
        busy |= keys
        return count


def checkpoint() -> Awaitable[None]:
    """``anyio.lowlevel.checkpoint()``, without its look-up of the running library per call.

    A store's appends checkpoint on their hot path, where anyio's dispatch (sniffio,
    then the backend) costs about as much as the task switch itself. On asyncio it
    is what anyio does there, ``sleep(0)``: one bare yield (the task is rescheduled,
    and a pending cancellation is delivered as it resumes); on trio, trio's, which
    anyio calls there.
    """
    if asyncio._get_running_loop() is not None:
        return _yield()
    global _trio_checkpoint
    if _trio_checkpoint is None:
        import trio  # not asyncio, so trio (an optional dependency): anyio runs no other

        _trio_checkpoint = trio.lowlevel.checkpoint  # what anyio's trio backend calls
    return _trio_checkpoint()


_trio_checkpoint: Callable[[], Awaitable[None]] | None = None


@types.coroutine
def _yield() -> Generator[None, None, None]:
    yield  # asyncio: a bare yield gives up the loop for one iteration (as sleep(0))


class _Signal:
    """What ``anyio.Event`` does for a group's waiters, at less cost on asyncio.

    Every request waits on its group's end, so waiting is on the hot path of an
    append: one bare future per waiter, awaited directly, and nothing to undo on
    wake-up (a cancelled waiter's future stays in the list, done). Cancelling a
    waiter cancels only its own future. A waiter whose request another write
    holds is handed to the next signal rather than woken for nothing.
    """

    __slots__ = ("_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: list[tuple[Request | None, asyncio.Future[None]]] = []

    def set(self, successor: _Signal | anyio.Event) -> None:
        """Wake the waiters, but hand those whose request is still being written
        to ``successor``."""
        self._is_set = True
        kept = []
        for request, waiter in self._waiters:
            if waiter.done():
                continue  # cancelled
            if request is None or request.done or not request.taken:
                waiter.set_result(None)
            else:
                kept.append((request, waiter))
        self._waiters = []
        if kept:
            assert type(successor) is _Signal  # one loop: the same kind
            successor._waiters.extend(kept)

    def wait(self, request: Request | None = None) -> Awaitable[None]:
        # The future itself, not a coroutine around it: one frame less to resume.
        if self._is_set:
            return checkpoint()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((request, waiter))
        return waiter


def _signal() -> _Signal | anyio.Event:
    """A new group-end signal: a :class:`_Signal` on asyncio, an ``anyio.Event`` on trio."""
    if asyncio._get_running_loop() is None:  # trio (or no loop yet: in __init__)
        return anyio.Event()
    return _Signal()


# The drainers running now: asyncio keeps only weak references to its tasks.
_drainers: set[Any] = set()


def _spawn(func: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Start ``func()`` as a task that belongs to no task group (anyio has no such call)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop: anyio runs on trio
        import trio

        trio.lowlevel.spawn_system_task(func)
        return
    task = loop.create_task(func())
    _drainers.add(task)
    task.add_done_callback(_drainers.discard)
