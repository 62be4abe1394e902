"""RunClient: start runs and follow them through disconnects, resuming exactly.

Theory of operation
-------------------
A RunClient owns one background task, the *keeper*, that holds a connection
open: it connects to the next URL of its list, publishes the peer, waits until
the connection closes, then sleeps a backoff delay (exponential, with full
jitter, capped) and tries the next URL. After ``max_attempts`` failed attempts
in a row, or ``give_up_after`` seconds without a connection, it gives up and
every waiter gets one :class:`ReconnectFailed`.

:meth:`RunClient.subscribe` remembers the id of the last event it handed to the
user. When the connection drops it waits for the keeper's next connection and
subscribes again with ``after=<that id>``: the server replays from the store,
so the user sees every event exactly once, in order.

Calls are not retried (``runs.start`` is not idempotent, unless given a
``run_id``): a call in flight when the connection drops raises
:class:`ConnectionClosed`. A call made while
disconnected waits for the next connection (bounded by its ``timeout``) or,
with ``wait=False``, fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from .._tasks import task_group
from ..client import connect
from ..errors import (
    ConnectionClosed,
    DeadlineExceeded,
    HandshakeRefused,
    InvalidParams,
    ReconnectFailed,
)
from ..peer import RpcPeer
from ..router import Router
from .events import TERMINAL_TYPES

__all__ = ["RunClient"]

log = logging.getLogger("rpcstream.runs.client")


class RunClient:
    """A client of a ``RunServer`` that survives disconnects.

    Args:
        urls: one server URL, or several to rotate through on reconnect.
        token: sent as ``Authorization: Bearer <token>``.
        backoff_base, backoff_cap: the reconnect delay is uniform in
            ``[0, min(cap, base * 2**failures)]`` ("full jitter").
        max_attempts: consecutive failed connection attempts before giving up
            (``None``: never).
        give_up_after: seconds without a connection before giving up
            (``None``: never).
        wait: whether calls made while disconnected wait for the reconnect
            (default) or fail at once with :class:`ConnectionClosed`.
        ping_interval, ping_timeout: heartbeats; a peer that does not answer a
            ping within ``ping_timeout`` is taken for dead and the connection
            closed (then re-opened).
        router: methods the server may call on this client.
        on_retry: called as ``on_retry(attempt, delay, error)`` before each
            reconnect delay: ``attempt`` failed attempts in a row so far,
            ``delay`` seconds until the next, ``error`` the last connection
            failure (``None`` if there was none yet). For progress output,
            such as the command's "retrying in N s" lines.
        connect_options: more options for :func:`rpcstream.connect`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        codec: str = "msgpack",
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        max_attempts: int | None = None,
        give_up_after: float | None = None,
        wait: bool = True,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        router: Router | None = None,
        on_retry: Callable[[int, float, BaseException | None], None] | None = None,
        **connect_options: Any,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RunClient needs at least one URL")
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self.give_up_after = give_up_after
        self.wait = wait
        self.on_retry = on_retry
        self._connect_options: dict[str, Any] = dict(
            connect_options,
            token=token,
            codec=codec,
            router=router,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        self._peer: RpcPeer | None = None
        # Set (and replaced) whenever the connection state changes: waiters take
        # the current one, check the state, then wait.
        self._changed = anyio.Event()
        self._failed: ReconnectFailed | None = None
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        # Peers of servers that refused ``batch=True`` (older ones): weakly held,
        # so a closed connection's entry goes with it.
        self._no_batches: weakref.WeakSet[RpcPeer] = weakref.WeakSet()
        self.connections = 0
        """How many connections were opened so far (1 + reconnects)."""
        self.url: str | None = None
        """The URL of the current connection."""

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._stack = contextlib.AsyncExitStack()
        self._tg = await self._stack.enter_async_context(task_group())
        self._tg.start_soon(self._keep_connected)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None and self._stack is not None
        self._tg.cancel_scope.cancel()
        return await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._peer is not None and not self._peer.closed

    async def _keep_connected(self) -> None:
        failures = 0
        index = 0
        down_since = anyio.current_time()
        last_error: BaseException | None = None
        while True:
            url = self.urls[index % len(self.urls)]
            index += 1
            try:
                async with connect(url, **self._connect_options) as peer:
                    failures = 0
                    self.connections += 1
                    self.url = url
                    self._peer = peer
                    self._notify()
                    log.info("connected to %s", url)
                    await peer.wait_closed()
            except HandshakeRefused as exc:
                last_error = exc
                log.info("connection to %s refused: %s", url, exc)
                if exc.status in (401, 403):  # retrying with the same token cannot help
                    self._give_up(f"{exc}", exc)
                    return
            except (ConnectionClosed, OSError) as exc:
                last_error = exc
                log.info("connection to %s failed: %s", url, exc)
            finally:
                if self._peer is not None:
                    self._peer = None
                    self._notify()
                    down_since = anyio.current_time()
            failures += 1
            waited = anyio.current_time() - down_since
            if (self.max_attempts is not None and failures >= self.max_attempts) or (
                self.give_up_after is not None and waited >= self.give_up_after
            ):
                self._give_up(
                    f"gave up after {failures} failed attempts over {waited:.1f} s "
                    f"({', '.join(self.urls)}): {last_error}",
                    last_error,
                )
                return
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**failures))
            if self.give_up_after is not None:
                delay = min(delay, max(0.0, self.give_up_after - waited))
            if self.on_retry is not None:
                self.on_retry(failures, delay, last_error)
            await anyio.sleep(delay)

    def _give_up(self, reason: str, cause: BaseException | None) -> None:
        self._failed = ReconnectFailed(reason)
        self._failed.__cause__ = cause
        self._notify()  # every waiter raises _failed

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def peer(self, *, wait: bool | None = None) -> RpcPeer:
        """The open connection's peer, waiting for the (re)connection if allowed."""
        while True:
            changed = self._changed
            if self._failed is not None:
                raise self._failed
            peer = self._peer
            if peer is not None and not peer.closed:
                return peer
            if not (self.wait if wait is None else wait):
                raise ConnectionClosed(1006, "not connected (the RunClient is reconnecting)")
            if peer is not None:
                # Closed, but the keeper has not noticed yet: it will, at once.
                await peer.wait_closed()
            await changed.wait()

    # -- calls -------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        timeout: float | None = None,
        wait: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the server (see :meth:`RpcPeer.call`).

        ``timeout`` bounds the wait for a connection and the call together.
        """
        if timeout is None:
            peer = await self.peer(wait=wait)
            return await peer.call(method, *args, **kwargs)
        deadline = anyio.current_time() + timeout
        found: RpcPeer | None = None
        with anyio.move_on_after(timeout):
            found = await self.peer(wait=wait)
        if found is None:
            raise DeadlineExceeded(f"{method}: no connection within {timeout} s")
        remaining = max(0.0, deadline - anyio.current_time())
        return await found.call(method, *args, timeout=remaining, **kwargs)

    async def start(
        self,
        flow: str,
        params: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        **kw: Any,
    ) -> str:
        """Start a run of ``flow``; returns its id.

        With ``run_id`` (1 to 128 of ``A-Z a-z 0-9 _ . : -``), the run gets that
        id, or, if a run of ``flow`` you may see holds it already, that run is
        returned and nothing starts: "resume or start the stream for chat X",
        safe to retry after a dropped connection and under races between
        clients and server nodes. Follow it with :meth:`subscribe` either way.
        """
        if run_id is not None:
            kw["run_id"] = run_id
        run = await self.call("runs.start", flow, params or {}, **kw)
        return str(run["run_id"])

    async def status(self, run_id: str, **kw: Any) -> dict[str, Any]:
        """The run's status (``runs.status``)."""
        result: dict[str, Any] = await self.call("runs.status", run_id, **kw)
        return result

    async def cancel(self, run_id: str, **kw: Any) -> dict[str, Any]:
        """Cancel the run (``runs.cancel``)."""
        result: dict[str, Any] = await self.call("runs.cancel", run_id, **kw)
        return result

    async def send(self, run_id: str, type: str, data: Any = None, **kw: Any) -> None:
        """Send an event to the running flow (``runs.send``)."""
        await self.call("runs.send", run_id, type, data, **kw)

    async def subscribe(self, run_id: str, after: int = 0) -> AsyncGenerator[dict[str, Any], None]:
        """Every event of the run with id > ``after``, then live ones, until its
        terminal event; through disconnects, with no gap and no duplicate.

        ``self.last_event_id(run_id)`` is not needed: resume is automatic. Close
        it early with ``contextlib.aclosing`` (or by breaking out of the loop).
        """
        last = after
        while True:
            peer = await self.peer(wait=True)
            batch = peer not in self._no_batches
            try:
                async with peer.stream(
                    "runs.subscribe", run_id, after=last, **_batch(batch)
                ) as items:
                    async for item in items:
                        # With batch=True an item is a list of events: replay and
                        # catch-up arrive many per message. Those not handed out
                        # yet when the connection drops are read again after
                        # ``last``, so a batch cut short loses nothing.
                        for event in item if type(item) is list else (item,):
                            last = event["id"]
                            yield event
                            if event["type"] in TERMINAL_TYPES:
                                return
                return  # the run had ended before ``after``: nothing more will come
            except InvalidParams as exc:
                if not batch or "batch" not in str(exc):
                    raise
                # A server from before batches: ask it for one event per item.
                self._no_batches.add(peer)
            except ConnectionClosed:
                log.info("subscription to %s lost after event %d; resuming", run_id, last)


def _batch(on: bool) -> dict[str, bool]:
    return {"batch": True} if on else {}
