"""The event-store contract, and the follow loop every backend shares.

Theory of operation
-------------------
A *run* is an append-only log of events. Each event gets the next id of its
run, contiguous from 1, so a subscriber that remembers the last id it saw can
prove it missed nothing (as Centrifugo's per-channel offsets do). The last
event of a run is its *terminal* event (one of :data:`TERMINAL_TYPES`); it
marks the run finished, and ``expire_after`` seconds later retention removes
the run's events, leaving a small *tombstone* so that late readers learn
:class:`~rpcstream.errors.RunExpired` rather than
:class:`~rpcstream.errors.RunNotFound`.

:class:`EventStore` splits the work in two:

* Backends implement five storage primitives (``_create_or_get_run``, ``_append``,
  ``_read``, ``_info``, ``_sweep``), and shared ones the lease primitives
  (``_renew_leases``, ``_end_lapsed_runs``), and call :meth:`EventStore._publish` with
  every event once it is stored, in id order per run.
* This module owns argument checking, open/close state, and :meth:`EventStore.follow`.

``follow`` serves live followers without touching storage. While a run has at
least one follower, the store keeps a *live* record for it: a bounded deque of
the most recently published events and ONE :class:`anyio.Event`, set and
replaced on every publish. Each follower loops:

1. take the run's current wake-up event (this is its registration);
2. take the events after its position from the live deque, or, when the deque
   cannot answer (empty, or the follower is behind it), from ``read``;
3. yield them, ending right after the terminal event;
4. when there was nothing new, wait on the event taken in step 1.

Because step 1 comes before step 2, an event published after the follower
looked sets the very event it waits on, so nothing is missed. A publish costs
one ``set()`` however many follow the run, and each follower then slices the
deque: no storage query per follower per event. Followers that fall more than
the deque's length behind read from storage, where trimming raises
:class:`~rpcstream.errors.EventsTrimmed` instead of skipping silently.

The live deque only sees events published by this process: a backend shared by
several processes must publish the events other processes append (Redis can
use pub/sub for this). The hooks a backend has for that, and the only ones:
:meth:`EventStore._publish` (hand events to this process's followers),
:meth:`EventStore._newest_published` (what they hold already, or ``None`` when
nobody follows the run here), and overriding ``_follow`` around
``super()._follow`` (to learn when a run gains or loses its followers here; pass
its ``push`` on, and count what it hands over as given out).

:meth:`EventStore.tail` is ``follow`` for one follower that serves many (a run's
fan-out hub): once caught up it *taps* the live record, and each publish hands
it the new events in the publisher's own call, so an event reaches the hub
without waking its task. A tap that cannot take an event (a gap, or its
``push`` raised) is stopped, and its task goes back to the loop above.
The live records themselves (:mod:`rpcstream.store.live`) stay private to the stores.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterable
from types import TracebackType
from typing import Final, NewType, Self

import anyio
import msgspec

from ..errors import EventsTrimmed, RunExpired, RunFinished, RunNotFound
from ..observe.hooks import events_appended, store_error
from ..runs.events import MAX_EVENT_ID, TERMINAL_TYPES, RunStatus
from .live import Live, Tap

__all__ = [
    "RUNNING",
    "TERMINAL_TYPES",
    "EventStore",
    "RunId",
    "RunInfo",
    "StoredEvent",
]

# observe: what a store raises because of the request, not of itself (not store errors).
_CALLERS_FAULT = (RunNotFound, RunExpired, RunFinished, EventsTrimmed, ValueError, TypeError)

RunId = NewType("RunId", str)
"""The id of one run: chosen by whoever creates it, unique in its store."""

RUNNING: Final[str] = RunStatus.RUNNING.value
"""The :attr:`RunInfo.status` of a run that has no terminal event yet."""

# TERMINAL_TYPES (event types that end a run) is defined with the rest of the run
# vocabulary in rpcstream.runs.events, and re-exported here for store backends.


class StoredEvent(msgspec.Struct, frozen=True, array_like=True):
    """One event of a run, as stored.

    ``array_like`` keeps it compact when a backend (or the wire) encodes it.
    """

    id: int
    """Contiguous per run, from 1."""
    type: str
    """What happened; a type in :data:`TERMINAL_TYPES` ends the run."""
    data: bytes
    """The event's data, JSON-encoded by msgspec; stores never decode it."""
    timestamp: float
    """When it was appended, in unix seconds from the store's clock."""


class RunInfo(msgspec.Struct, frozen=True):
    """A snapshot of one run's metadata."""

    run_id: str
    flow: str
    """The name of the flow the run executes."""
    owner: str | None
    """Who may see the run (the store records it; it does not enforce it)."""
    status: str
    """:data:`RUNNING`, or the type of the terminal event."""
    created: float
    finished: float | None
    """When the terminal event was appended; ``None`` while running."""
    last_id: int
    """The id of the newest event; 0 when there is none."""
    first_id: int
    """The first id still stored: 1 until trimming, ``last_id + 1`` when all are trimmed."""
    expires: float | None
    """When retention removes the run (``finished + expire_after``); ``None`` while running."""


class EventStore(abc.ABC):
    """Where runs and their events are kept; see the module docstring.

    Use it as an async context manager (or call :meth:`open` and :meth:`aclose`).
    ``max_events`` caps the events kept per run (the oldest are trimmed);
    ``expire_after`` is how long a finished run stays readable; ``clock`` gives
    the time in unix seconds (tests pass a fake one and advance it).

    Retention is not automatic: call :meth:`sweep` now and then. A run past its
    ``expires`` already raises :class:`~rpcstream.errors.RunExpired` before that.
    """

    live_cache_size: int = 1024
    """How many recent events of a followed run are kept in memory for live followers."""
    follow_batch: int = 1000
    """How many events ``follow`` reads from storage at a time when catching up."""
    lease_ttl: float | None = None
    """Seconds a run's lease lasts unless renewed; ``None``: this store has no leases.

    Only stores shared by several processes need leases (see :meth:`renew_leases`):
    an embedded store belongs to one process, whose runs end with it, and a new
    server on it ends them at start-up (:meth:`running_runs`).
    """

    def __init__(
        self,
        *,
        max_events: int | None = None,
        expire_after: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_events is not None and max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        if expire_after < 0:
            raise ValueError(f"expire_after must not be negative, not {expire_after}")
        self.max_events = max_events
        self.expire_after = float(expire_after)
        self.clock = clock
        self._live: dict[str, Live] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Acquire what the backend needs (connections, files); safe to call twice."""
        self._closed = False
        await self._open()

    async def aclose(self) -> None:
        """Release the backend; waiting followers fail with :class:`anyio.ClosedResourceError`.

        Safe to call twice. Every later call fails the same way until :meth:`open`.
        """
        if self._closed:
            return
        self._closed = True
        for live in self._live.values():
            for tap in list(live.taps):
                live.untap(tap)
            live.notify()
        with anyio.CancelScope(shield=True):
            await self._aclose()

    # -- the contract ---------------------------------------------------------

    async def check(self) -> None:
        """Raise unless the store can serve now: what ``/readyz`` asks.

        Raises :class:`~rpcstream.errors.StoreUnavailable` when the backend
        cannot be reached (Redis), :class:`anyio.ClosedResourceError` once
        closed. The default only checks that the store is open; backends with
        something to reach override :meth:`_check`.
        """
        self._check_open()
        await self._check()

    async def create_run(self, run_id: str, flow: str, owner: str | None = None) -> RunInfo:
        """Create an empty, running run.

        Raises :class:`ValueError` if ``run_id`` exists, or existed and expired
        (while its tombstone is kept), so that a late reader of the old run never
        sees a new run's events under the same ids.
        """
        self._check_open()
        try:
            info, created = await self._create_or_get_run(run_id, flow, owner, False)
        except RunExpired:
            created = False
        if not created:
            raise ValueError(f"run {run_id!r} already exists (or existed and expired)")
        return info

    async def create_or_get_run(
        self, run_id: str, flow: str, owner: str | None = None, *, lease: bool = False
    ) -> tuple[RunInfo, bool]:
        """Create the run, or get the one that holds ``run_id`` already: ``(info, created)``.

        Atomic in every backend: however many tasks (or nodes, on a shared store)
        ask for the same id at once, exactly one gets ``created=True``; the others
        get that run's info (whatever its flow and owner: the caller decides what
        a mismatch means). Raises :class:`~rpcstream.errors.RunExpired` for an id
        whose run expired (while its tombstone is kept).

        ``lease=True`` gives a new run a lease of :attr:`lease_ttl` seconds, which
        the process running its flow must keep renewing (:meth:`renew_leases`);
        stores that need no leases (:attr:`lease_ttl` is ``None``) ignore it.
        """
        self._check_open()
        return await self._create_or_get_run(run_id, flow, owner, lease)

    async def append(
        self, run_id: str, type: str, data: bytes, *, terminal: bool = False
    ) -> StoredEvent:
        """Store one event under the run's next id and return it.

        ``terminal=True`` (required exactly when ``type`` is in :data:`TERMINAL_TYPES`)
        finishes the run: its status becomes ``type`` and it expires ``expire_after``
        seconds from now. Raises :class:`~rpcstream.errors.RunNotFound`,
        :class:`~rpcstream.errors.RunExpired`, or :class:`~rpcstream.errors.RunFinished`
        once the run has its terminal event.
        """
        self._check_open()
        if terminal != (type in TERMINAL_TYPES):
            raise ValueError(
                f"event type {type!r} with terminal={terminal}: terminal events, and only "
                f"they, have one of the types {sorted(TERMINAL_TYPES)}"
            )
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes (JSON-encoded), not {data.__class__.__name__}")
        try:  # observe: failures and appended events
            event = await self._append(run_id, type, data, terminal)
        except Exception as exc:
            if not isinstance(exc, _CALLERS_FAULT):
                store_error("append", exc)
            raise
        events_appended(1)
        return event

    async def read(self, run_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` events with ids above ``after``, ascending.

        Raises :class:`~rpcstream.errors.EventsTrimmed` (``data={"first_id": ...}``)
        when events the reader has not seen were trimmed, rather than skip them;
        :class:`~rpcstream.errors.RunNotFound` or :class:`~rpcstream.errors.RunExpired`
        for a run that never existed or has expired.
        """
        self._check_open()
        _check_after(after)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        try:  # observe
            return await self._read(run_id, after, limit)
        except Exception as exc:
            if not isinstance(exc, _CALLERS_FAULT):
                store_error("read", exc)
            raise

    async def info(self, run_id: str) -> RunInfo:
        """The run's metadata; raises like :meth:`read`."""
        self._check_open()
        return await self._info(run_id)

    def follow(self, run_id: str, after: int = 0) -> AsyncGenerator[StoredEvent, None]:
        """Stored events after ``after``, then live ones as they are appended.

        Ends right after yielding the terminal event, or at once when ``after`` is
        at or past the last id of a finished run. Raises like :meth:`read`,
        when iterated. Close it (``contextlib.aclosing``) if you stop early.
        """
        _check_after(after)
        return self._follow(run_id, after)

    async def tail(self, run_id: str, after: int, push: Callable[[StoredEvent], object]) -> None:
        """Call ``push(event)`` for each event :meth:`follow` would yield, in order,
        and return after the terminal event. Once caught up, the store calls ``push``
        itself from the call that published the event (no task switch per event: a
        run's fan-out hub uses it), so ``push`` must be quick and never block; what
        it raises stops the tail and is raised here, never to the appender."""
        _check_after(after)
        async with contextlib.aclosing(self._follow(run_id, after, push)) as events:
            async for event in events:
                push(event)

    async def sweep(self) -> int:
        """Remove the runs whose ``expires`` has passed; return how many were removed.

        Each leaves a tombstone, so it raises :class:`~rpcstream.errors.RunExpired`
        from now on. Runs already found expired on access may not be counted.
        """
        self._check_open()
        return await self._sweep()

    async def renew_leases(self, run_ids: Collection[str]) -> set[str]:
        """Extend the leases of these runs by :attr:`lease_ttl` from now.

        The process running a run's flow calls it (well) within every
        :attr:`lease_ttl`. Returns the ids among ``run_ids`` that are no longer
        running (another node ended them after their lease lapsed): their flows
        should stop, as nothing they append will be stored. A run given without
        a lease gets one. Does nothing, and returns an empty set, on stores
        without leases.
        """
        self._check_open()
        if self.lease_ttl is None or not run_ids:
            return set()
        return await self._renew_leases(list(run_ids))

    async def end_lapsed_runs(self, data: bytes) -> list[str]:
        """End every running run whose lease lapsed with an ``error`` event of ``data``.

        Any process may call it, as often as it likes, racing others: each run
        gets exactly one terminal event, because checking the lease and
        appending the event are one atomic step. Returns the ids of the runs this
        call ended (so, with several callers, each lapsed run is in exactly one
        answer). An empty list on stores without leases.
        """
        self._check_open()
        if self.lease_ttl is None:
            return []
        return await self._end_lapsed_runs(data)

    async def running_runs(self) -> list[str]:
        """The ids of runs that have no terminal event yet.

        A server whose process owns every run of its store (the embedded
        stores) uses it at start-up to end the runs a crash left behind. A
        store shared by several processes (Redis) does not offer it: another
        node may be running them. Raises :class:`NotImplementedError` there.
        """
        self._check_open()
        return await self._running_runs()

    # -- what backends implement ----------------------------------------------

    async def _running_runs(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} is shared: it cannot tell orphans")

    async def _open(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Backend hook for :meth:`open`; must be idempotent."""

    async def _aclose(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Backend hook for :meth:`aclose`; runs shielded from cancellation."""

    async def _check(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Backend hook for :meth:`check`: one cheap round trip to the backend."""

    async def _renew_leases(self, run_ids: list[str]) -> set[str]:
        raise NotImplementedError(f"{type(self).__name__} sets lease_ttl without leases")

    async def _end_lapsed_runs(self, data: bytes) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} sets lease_ttl without leases")

    @abc.abstractmethod
    async def _create_or_get_run(
        self, run_id: str, flow: str, owner: str | None, lease: bool
    ) -> tuple[RunInfo, bool]:
        """Create the run or get the existing one, atomically; as :meth:`create_or_get_run`."""

    @abc.abstractmethod
    async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> StoredEvent:
        """Store the event (arguments already checked) and :meth:`_publish` it."""

    @abc.abstractmethod
    async def _read(self, run_id: str, after: int, limit: int) -> list[StoredEvent]:
        """Read events; arguments already checked. Use :meth:`_check_trimmed`."""

    @abc.abstractmethod
    async def _info(self, run_id: str) -> RunInfo:
        """Return the run's metadata."""

    @abc.abstractmethod
    async def _sweep(self) -> int:
        """Expire the runs past their ``expires``; return how many."""

    # -- shared helpers for backends ------------------------------------------

    def _publish(
        self, run_id: str, events: Iterable[StoredEvent], expires: float | None = None
    ) -> None:
        """Hand stored events (ascending ids) to the run's live followers, if any.

        Call it after the events are durable and readable, and in id order per
        run. ``expires`` is the run's expiry when ``events`` hold its terminal event.
        """
        live = self._live.get(run_id)
        if live is not None:
            live.push(events, expires)

    def _newest_published(self, run_id: str) -> int | None:
        """The id of the newest event the run's live followers here have been given.

        ``None`` when the run has no follower in this process (nothing to
        publish to); 0 when its followers hold no event from :meth:`_publish`
        yet (they read storage themselves). A backend that learns of events
        from elsewhere (another process) uses it to skip what it already
        published, and to catch up from there after missing notifications.
        """
        live = self._live.get(run_id)
        if live is None:
            return None
        return live.events[-1].id if live.events else 0

    @staticmethod
    def _not_found(run_id: str) -> RunNotFound:
        return RunNotFound(f"unknown run {run_id!r}")

    @staticmethod
    def _expired(run_id: str) -> RunExpired:
        return RunExpired(f"run {run_id!r} has expired")

    @staticmethod
    def _finished(run_id: str) -> RunFinished:
        return RunFinished(f"run {run_id!r} has finished")

    @staticmethod
    def _check_trimmed(run_id: str, after: int, first_id: int, last_id: int) -> None:
        """Raise :class:`EventsTrimmed` when a reader at ``after`` lost unseen events."""
        if after + 1 < first_id and after < last_id:
            raise EventsTrimmed(
                f"run {run_id!r}: events {after + 1}..{first_id - 1} were trimmed",
                {"first_id": first_id},
            )

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    # -- follow -----------------------------------------------------------------

    async def _follow(
        self, run_id: str, after: int, push: Callable[[StoredEvent], object] | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        """The loop of :meth:`follow`; with ``push``, that of :meth:`tail`: events
        published while caught up go to ``push`` from the publish, not yielded."""
        live = self._live.get(run_id)
        if live is None:
            size = self.live_cache_size
            if self.max_events is not None:
                # Never hold events that storage has already trimmed.
                size = min(size, self.max_events)
            live = self._live[run_id] = Live(size)
        live.followers += 1
        position = after
        try:
            while True:
                self._check_open()
                # Register before looking: a publish after this line wakes us.
                wake = live.wake
                batch = live.after(position, self.follow_batch, self.clock())
                if batch is None:
                    batch = await self.read(run_id, position, self.follow_batch)
                    if not batch:
                        info = await self.info(run_id)
                        if info.last_id > position:
                            continue  # appended between our read and info: read again
                        if info.status != RUNNING:
                            return
                elif not batch and live.final_id is not None and position >= live.final_id:
                    return
                for event in batch:
                    yield event
                    position = event.id
                    if event.type in TERMINAL_TYPES:
                        return
                # Set: published (or closed) while this task read storage above.
                if batch or wake.is_set():
                    continue
                if push is None:
                    await wake.wait()
                    continue
                # Caught up, and nothing can be published between that check and
                # tapping (no await): from here the publish hands events over.
                tap = Tap(position, push)
                live.taps[tap] = None
                try:
                    await tap.stopped.wait()
                finally:
                    live.untap(tap)
                    position = tap.position
                if tap.error is not None:
                    raise tap.error
                if tap.ended:
                    return
        finally:
            live.followers -= 1
            if live.followers == 0 and self._live.get(run_id) is live:
                del self._live[run_id]


def _check_after(after: int) -> None:
    if not 0 <= after <= MAX_EVENT_ID:
        # Beyond the id space SQLite cannot bind it, and Redis refuses the stream id.
        raise ValueError(f"after must be an event id from 0 to {MAX_EVENT_ID}, not {after}")
