"""Admission that waits: our calls in flight stay within the limit the other side
advertised, and callers beyond it wait for a slot instead of being refused.

As HTTP/2's ``SETTINGS_MAX_CONCURRENT_STREAMS``: each side sends its limits in a
reserved notification, ``rpcstream.settings``, as its first frame. A caller
takes a slot before its ``Call`` or ``StreamCall`` leaves and gives it back when
the answer came (or the result stream ended) or when it gave up: the callee
frees the slot when the ``Cancel``/``StreamCancel`` arrives, before its handler
has wound down, so both sides count alike. Until the other side's limits
arrive, its limit is taken to be the default (256), which is what a peer that
never advertises (an older one) enforces. ``OVERLOADED`` remains the answer to
a peer that ignores the advertised limit.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Final

import anyio

from ..errors import ConnectionClosed, DeadlineExceeded, Overloaded

__all__ = ["DEFAULT_MAX_CONCURRENT_HANDLERS", "PING", "SETTINGS", "Admission", "parse_settings"]

SETTINGS: Final = "rpcstream.settings"
"""The reserved notification each side sends first: ``kwargs`` are its limits."""

PING: Final = "rpcstream.ping"
"""A reserved method every peer answers with ``None``, for heartbeats from
clients (browsers) that cannot send WebSocket pings. It is answered where it
arrives, without a handler, so it takes no slot."""

DEFAULT_MAX_CONCURRENT_HANDLERS: Final = 256


class Admission:
    """Slots for our calls on the other side, and the callers waiting for one."""

    __slots__ = ("_closed", "_waiting", "limit", "max_waiting", "used")

    def __init__(self, max_waiting: int, limit: int = DEFAULT_MAX_CONCURRENT_HANDLERS) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.used = 0
        self._waiting: deque[anyio.Event] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot."""
        return len(self._waiting)

    def set_limit(self, limit: int) -> None:
        """The other side advertised its limit."""
        self.limit = limit
        self._hand_over()

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits ahead of us."""
        if self.used < self.limit and not self._waiting:
            self.used += 1
            return True
        return False

    async def acquire(self, deadline: float = math.inf) -> None:
        """Take a slot, waiting in line for one until ``deadline`` (anyio time).

        Raises :class:`DeadlineExceeded` when the deadline passes first,
        :class:`ConnectionClosed` when the connection closes, and
        :class:`Overloaded` at once when ``max_waiting`` callers wait already.
        """
        if self.try_acquire():
            return
        if self._closed:
            raise ConnectionClosed(None, "the connection closed")
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(
                f"{len(self._waiting)} calls wait for the other side's "
                f"{self.limit} handler slots (max_waiting_calls)"
            )
        ready = anyio.Event()
        self._waiting.append(ready)
        try:
            if deadline == math.inf:
                await ready.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await ready.wait()
        except BaseException:
            self._give_up(ready)
            raise
        if not ready.is_set():  # the deadline passed first
            self._give_up(ready)
            raise DeadlineExceeded("no handler slot on the other side before the deadline")
        if self._closed:
            raise ConnectionClosed(None, "the connection closed")

    def _give_up(self, ready: anyio.Event) -> None:
        if ready.is_set():
            if not self._closed:
                self.release()  # a slot was handed to us: hand it on
        else:
            self._waiting.remove(ready)

    def release(self) -> None:
        """Give a slot back."""
        self.used -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiting and self.used < self.limit:
            self.used += 1
            self._waiting.popleft().set()

    def close(self) -> None:
        """The connection closed: wake every waiter (each raises ConnectionClosed)."""
        self._closed = True
        while self._waiting:
            self._waiting.popleft().set()


def parse_settings(kwargs: Any) -> int | None:
    """The ``max_concurrent_handlers`` a ``rpcstream.settings`` notification
    advertises, if it is a positive integer (other keys are for later versions)."""
    if not isinstance(kwargs, dict):
        return None
    limit = kwargs.get("max_concurrent_handlers")
    if type(limit) is int and limit >= 1:
        return limit
    return None
