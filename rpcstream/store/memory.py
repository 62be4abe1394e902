"""An :class:`~rpcstream.store.base.EventStore` kept in this process's memory.

Theory of operation
-------------------
Each run is a small record holding its events in a Python list. Trimming
(``max_events``) advances a start offset instead of deleting from the front of
the list, and the dead prefix is dropped once it is at least half the list, so
both appends and ``read`` slices stay O(1) amortised per event.

Finished runs go on a heap ordered by ``expires``; :meth:`MemoryStore.sweep`
pops the ones that are due. A run found past its expiry on access is removed
there and then. Either way its id moves to a bounded tombstone map (oldest
dropped first), which is how ``RunExpired`` is told apart from ``RunNotFound``.

Every operation starts with an anyio checkpoint, as any async call should, so a
task appending in a loop still lets followers (and cancellation) in; ``append``,
the hot path, is a cancellation point on every call but gives the loop up only
when the store has not for :attr:`MemoryStore.yield_interval` (a millisecond):
a schedule point costs a trip through the event loop, most of what an append
costs (fanout_instructions, one run per connection: 8% of the server's
instructions per delivery on asyncio, 22% on trio), and a flow's events reach
live subscribers from the append itself (``EventStore.tail``), not from their
tasks. After the checkpoint the operation runs without awaiting, so it is
atomic with respect to other tasks: ids are contiguous without any lock.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio.lowlevel

from .base import RUNNING, EventStore, RunInfo, StoredEvent

__all__ = ["MemoryStore"]


class _Run:
    __slots__ = (
        "created",
        "events",
        "expires",
        "finished",
        "flow",
        "last_id",
        "owner",
        "start",
        "status",
    )

    def __init__(self, flow: str, owner: str | None, created: float) -> None:
        self.flow = flow
        self.owner = owner
        self.created = created
        self.finished: float | None = None
        self.expires: float | None = None
        self.last_id = 0
        # Stored events are events[start:]; ids run from first_id to last_id.
        self.events: list[StoredEvent] = []
        self.start = 0
        self.status = RUNNING

    @property
    def first_id(self) -> int:
        return self.last_id - (len(self.events) - self.start) + 1


class MemoryStore(EventStore):
    """Runs and events in plain dicts and lists: fast, and gone with the process.

    ``max_tombstones`` bounds how many expired run ids are remembered (to raise
    ``RunExpired`` rather than ``RunNotFound``); the oldest are forgotten first.
    Without ``max_events``, a run's events are bounded only by retention.
    """

    def __init__(
        self,
        *,
        max_events: int | None = None,
        expire_after: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_tombstones: int = 100_000,
    ) -> None:
        super().__init__(max_events=max_events, expire_after=expire_after, clock=clock)
        if max_tombstones < 0:
            raise ValueError(f"max_tombstones must not be negative, not {max_tombstones}")
        self.max_tombstones = max_tombstones
        self._runs: dict[str, _Run] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        # (expires, run_id) of finished runs; entries for runs already gone are skipped.
        self._expiry: list[tuple[float, str]] = []
        self._gave_up_loop = time.monotonic()  # when an append last did (see _append)

    yield_interval: float = 0.001
    """Seconds a task may go on appending before an append gives the event loop up
    (see the module docstring); 0: at every append."""

    async def _create_or_get_run(
        self, run_id: str, flow: str, owner: str | None, lease: bool
    ) -> tuple[RunInfo, bool]:
        # One process, no leases: a flow dies with the process, and the store with it.
        await anyio.lowlevel.checkpoint()
        now = self.clock()
        if run_id in self._runs or run_id in self._tombstones:
            return self._run_info(run_id, self._get(run_id, now)), False
        run = self._runs[run_id] = _Run(flow, owner, now)
        return self._run_info(run_id, run), True

    async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> StoredEvent:
        mono = time.monotonic()
        if mono - self._gave_up_loop >= self.yield_interval:
            self._gave_up_loop = mono
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()
        now = self.clock()
        run = self._get(run_id, now)
        if run.status != RUNNING:
            raise self._finished(run_id)
        run.last_id += 1
        event = StoredEvent(run.last_id, type, data, now)
        events = run.events
        events.append(event)
        if self.max_events is not None and len(events) - run.start > self.max_events:
            run.start += 1
            # Compact only when the dead prefix is large, so each event is moved O(1) times.
            if run.start >= 64 and run.start * 2 >= len(events):
                del events[: run.start]
                run.start = 0
        if terminal:
            run.status = type
            run.finished = now
            run.expires = now + self.expire_after
            heapq.heappush(self._expiry, (run.expires, run_id))
        self._publish(run_id, (event,), run.expires)
        return event

    async def _read(self, run_id: str, after: int, limit: int) -> list[StoredEvent]:
        await anyio.lowlevel.checkpoint()
        run = self._get(run_id, self.clock())
        first_id = run.first_id
        self._check_trimmed(run_id, after, first_id, run.last_id)
        if after >= run.last_id:
            return []
        index = run.start + max(after + 1 - first_id, 0)
        return run.events[index : index + limit]

    async def _info(self, run_id: str) -> RunInfo:
        await anyio.lowlevel.checkpoint()
        return self._run_info(run_id, self._get(run_id, self.clock()))

    async def _running_runs(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return [rid for rid, run in self._runs.items() if run.finished is None]

    async def _sweep(self) -> int:
        await anyio.lowlevel.checkpoint()
        now = self.clock()
        expiry = self._expiry
        removed = 0
        while expiry and expiry[0][0] <= now:
            _, run_id = heapq.heappop(expiry)
            run = self._runs.get(run_id)
            # The run may be gone already (expired on access) or be a newer run with
            # the same id; only remove what is really due.
            if run is not None and run.expires is not None and now >= run.expires:
                self._expire(run_id)
                removed += 1
        return removed

    def _get(self, run_id: str, now: float) -> _Run:
        """The run, or the error that says why there is none; expires lazily."""
        run = self._runs.get(run_id)
        if run is None:
            if run_id in self._tombstones:
                raise self._expired(run_id)
            raise self._not_found(run_id)
        if run.expires is not None and now >= run.expires:
            self._expire(run_id)
            raise self._expired(run_id)
        return run

    def _expire(self, run_id: str) -> None:
        del self._runs[run_id]
        if self.max_tombstones == 0:
            return
        tombstones = self._tombstones
        tombstones[run_id] = None
        while len(tombstones) > self.max_tombstones:
            tombstones.popitem(last=False)

    @staticmethod
    def _run_info(run_id: str, run: _Run) -> RunInfo:
        return RunInfo(
            run_id=run_id,
            flow=run.flow,
            owner=run.owner,
            status=run.status,
            created=run.created,
            finished=run.finished,
            last_id=run.last_id,
            first_id=run.first_id,
            expires=run.expires,
        )
