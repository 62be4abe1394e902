"""The live record of a followed run: what this process's followers of it share.

An :class:`~rpcstream.store.base.EventStore` keeps one :class:`Live` per run that
has followers here (see the theory of operation in :mod:`rpcstream.store.base`):
the newest published events in a bounded deque, the one wake-up event of the
followers waiting for more, and the :class:`Tap` of each caught-up ``tail``,
which the publish hands new events to itself. Only the store touches them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING

from .._tasks import FlagLike, new_flag
from ..runs.events import TERMINAL_TYPES

if TYPE_CHECKING:
    from .base import StoredEvent

__all__ = ["Live", "Tap", "Wakeup"]


class Tap:
    """A caught-up follower that takes new events from the publish itself
    (see :meth:`EventStore.tail`)."""

    __slots__ = ("ended", "error", "position", "push", "stopped")

    def __init__(self, position: int, push: Callable[[StoredEvent], object]) -> None:
        self.position = position
        self.push = push
        self.stopped = new_flag()
        self.ended = False
        self.error: Exception | None = None


class Wakeup:
    """What waiters take before they look, and a notify sets: one event
    (:func:`~rpcstream._tasks.new_flag`) at a time, made only when someone asks
    for it (a notify nobody waits for makes none). Followers of a store's run and
    subscriptions of a fan-out hub use it."""

    __slots__ = ("_wake",)

    def __init__(self) -> None:
        self._wake: FlagLike | None = None

    @property
    def wake(self) -> FlagLike:
        """The event the next :meth:`notify` sets (take it before looking)."""
        wake = self._wake
        if wake is None:
            wake = self._wake = new_flag()
        return wake

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters get a fresh event."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()


class Live(Wakeup):
    """What the followers of one run share: recent events, one wake-up event, and
    the taps of the caught-up followers that take events from the publish itself."""

    __slots__ = ("events", "expires", "final_id", "followers", "taps")

    def __init__(self, size: int) -> None:
        super().__init__()
        # Always contiguous ids, oldest first; bounded by ``size``.
        self.events: deque[StoredEvent] = deque(maxlen=size)
        self.followers = 0
        self.final_id: int | None = None
        self.expires: float | None = None
        self.taps: dict[Tap, None] = {}

    def push(self, events: Iterable[StoredEvent], expires: float | None) -> None:
        """Add published events (ascending ids), hand them to the taps and wake
        every follower once."""
        cached = self.events
        fresh: list[StoredEvent] | None = [] if self.taps else None  # for the taps only
        for event in events:
            if cached:
                last = cached[-1].id
                if event.id <= last:
                    continue  # already cached; a late duplicate must not reorder the deque
                if event.id != last + 1:
                    # A gap: the deque may only answer for ranges it holds entirely.
                    cached.clear()
            cached.append(event)
            if fresh is not None:
                fresh.append(event)
            if event.type in TERMINAL_TYPES:
                self.final_id = event.id
                self.expires = expires
        if fresh:
            self._hand_over(fresh)
        self.notify()

    def _hand_over(self, fresh: list[StoredEvent]) -> None:
        """Give each tap the events that follow its position; stop the taps that
        cannot take them (a gap: their task reads storage) or have ended."""
        for tap in list(self.taps):
            for event in fresh:
                if event.id <= tap.position:
                    continue
                if event.id != tap.position + 1:
                    self.untap(tap)
                    break
                try:
                    tap.push(event)
                except Exception as exc:  # raised to the follower, never to the appender
                    tap.error = exc
                    self.untap(tap)
                    break
                tap.position = event.id
                if event.type in TERMINAL_TYPES:
                    tap.ended = True
                    self.untap(tap)
                    break

    def untap(self, tap: Tap) -> None:
        """Stop handing events to ``tap`` and wake its follower."""
        self.taps.pop(tap, None)
        tap.stopped.set()

    def after(self, position: int, limit: int, now: float) -> list[StoredEvent] | None:
        """Cached events after ``position``, or ``None`` when the cache cannot tell.

        An empty list is authoritative: nothing after ``position`` was published.
        """
        cached = self.events
        if not cached or (self.expires is not None and now >= self.expires):
            return None
        last = cached[-1].id
        if position >= last:
            return []
        if position + 1 < cached[0].id:
            return None
        # Live followers sit near the tail, so walk in from the right end.
        newer = list(islice(reversed(cached), last - position))
        newer.reverse()
        return newer[:limit]
