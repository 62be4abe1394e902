"""RunServer: run ids mapped to persisted event streams, with replay, live follow and resume.

Theory of operation
-------------------
A *flow* is a registered async function; each execution of it is a *run*, with
an id. ``runs.start`` creates the run in the :class:`EventStore`, appends its
``started`` event, starts the flow in the RunServer's task group and returns the
id at once. The flow talks to its clients through ``ctx.client``: ``send``
validates an event against the flow's declared types and appends it to the
store; ``receive``/``on`` get the events clients send with ``runs.send``.

The store, not the flow, is what subscribers read: ``runs.subscribe(run_id,
after=N)`` is a stream of ``store.follow(run_id, N)``: every stored event with
id > N, then live ones, ending after the terminal event. Ids are contiguous, so
a client that remembers the last id it saw resumes exactly: no gap, no
duplicate. A slow subscriber is held by its stream's credit: it holds back only
its own ``follow`` loop, never the flow's appends nor other subscribers.

Exactly one terminal event ends a run: ``complete`` (the flow returned, its
return value as data, or the flow sent ``complete`` itself), ``error`` (the
flow raised) or ``cancelled`` (``runs.cancel``, or the server shutting down).

Starting runs (with caller-chosen ids), executing flows, recording their end
through store outages and keeping leases on shared stores live in
:mod:`rpcstream.runs.flows` (:class:`~rpcstream.runs.flows.FlowHost`, which
``RunServer`` extends); this module serves the ``runs.*`` methods.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

from .. import models
from .._tasks import task_group
from ..errors import InvalidParams, Overloaded, RunFinished, RunNotFound
from ..handshake import StaticFile, current_principal, principal_id
from ..observe import hooks
from ..peer import current_peer
from ..peer.streams import current_sender
from ..router import Router
from ..store.base import EventStore, RunInfo
from ..store.memory import MemoryStore
from .events import MAX_EVENT_ID, RunStatus
from .fanout import Fanout, iso_time
from .flows import (
    ClientEvent,
    EventValidationError,
    Flow,
    FlowHost,
    RunChannel,
    RunContext,
)

__all__ = [
    "ClientEvent",
    "EventValidationError",
    "RunChannel",
    "RunContext",
    "RunServer",
    "owner_only",
]

log = logging.getLogger("rpcstream.runs")

F = TypeVar("F", bound=Callable[..., Awaitable[None]])


class RunServer(FlowHost):
    """Flows by name, their runs in an event store, and the ``runs.*`` methods.

    Serve it like a router: ``async with rpcstream.serve(runs, host, port)``.

    Args:
        store: where events are kept (default: a :class:`MemoryStore`).
        router: the app's own methods, served beside ``runs.*``.
        sweep_interval: how often expired runs are removed from the store.
        inbox_size: client events buffered per run before ``runs.send`` answers
            ``overloaded``.
        cancel_timeout: how long a cancelled flow may take to write its
            ``cancelled`` event on shutdown.
        end_orphaned_runs: at start-up, end with an ``error`` event the runs an
            embedded store still holds as running (their process died).
        can_access: ``can_access(principal, run_info, action) -> bool`` decides
            who may ``subscribe``, ``status``, ``cancel`` or ``send`` to a run;
            by default only its owner (the principal that started it), or anyone
            for a run started without one. Refusals look exactly like an
            unknown run, so run ids cannot be probed.
        max_runs_per_principal: runs in flight per principal; ``runs.start``
            beyond it is answered ``overloaded``.
        send_rate: ``(per_second, burst)`` token bucket per run on
            ``ctx.client.send`` (:class:`RateLimited` beyond it).

    How long an end the store refused is retried (``end_retry_for``,
    ``end_retry_delay``, ``end_retry_delay_max``) are attributes, documented on
    :class:`~rpcstream.runs.flows.FlowHost`; leases are the store's
    (``RedisStore(lease_ttl=...)``).
    """

    def __init__(
        self,
        store: EventStore | None = None,
        *,
        router: Router | None = None,
        sweep_interval: float = 30.0,
        inbox_size: int = 64,
        cancel_timeout: float = 5.0,
        end_orphaned_runs: bool = True,
        can_access: Callable[[Any, RunInfo, str], bool] | None = None,
        max_runs_per_principal: int | None = None,
        send_rate: tuple[float, int] | None = None,
    ) -> None:
        self.end_orphaned_runs = end_orphaned_runs
        self.http_routes: dict[str, StaticFile] = {}
        """Plain HTTP GET routes ``serve()`` answers beside the WebSocket (path -> file)."""
        self.can_access = can_access or owner_only
        self.max_runs_per_principal = max_runs_per_principal
        self.send_rate = send_rate
        self.store = store if store is not None else MemoryStore()
        self.sweep_interval = sweep_interval
        self.inbox_size = inbox_size
        self.cancel_timeout = cancel_timeout
        self._init_flows()
        self._fanout = Fanout(self.store)
        self._tg: TaskGroup | None = None
        self._exit: contextlib.AsyncExitStack | None = None
        self._router = Router()
        if router is not None:
            self._router.include(router)
        self._router.add(self._start, "runs.start")
        self._router.add(self._subscribe, "runs.subscribe")
        self._router.add(self._status, "runs.status")
        self._router.add(self._cancel, "runs.cancel")
        self._router.add(self._send, "runs.send")

    @property
    def router(self) -> Router:
        """The methods served: the app's own and ``runs.*``."""
        return self._router

    @property
    def running(self) -> int:
        """Runs executing in this process now."""
        return len(self._runs)

    def flow(self, name: str, *, events: dict[str, type] | None = None) -> Callable[[F], F]:
        """Register ``async def flow(ctx, **params)`` under ``name``.

        ``events`` maps event types to the types their data must fit: what
        msgspec converts (Structs, dataclasses, TypedDicts...) or pydantic models.
        """
        for type_, declared in (events or {}).items():
            try:
                models.check_type(declared)
            except TypeError as exc:
                raise TypeError(f"flow {name!r}: event {type_!r}: {exc}") from None

        def decorator(func: F) -> F:
            if name in self._flows:
                raise ValueError(f"flow {name!r} is already registered")
            self._flows[name] = Flow(name, func, dict(events or {}))
            return func

        return decorator

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self.store)
            await self._end_orphans()
            self._tg = await stack.enter_async_context(task_group())
            # The store may have been replaced since __init__ (the CLI does).
            self._fanout = Fanout(self.store)
            self._fanout.tg = self._tg
            stack.callback(self._tg.cancel_scope.cancel)
            stack.callback(self._cancel_all)
            if self.sweep_interval and math.isfinite(self.sweep_interval):
                self._tg.start_soon(self._sweep_loop)
            if self.store.lease_ttl is not None:
                self._tg.start_soon(self._lease_loop, self.store.lease_ttl)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._exit = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._exit is not None
        stack, self._exit = self._exit, None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval)
            try:
                removed = await self.store.sweep()
            except Exception as exc:
                log.exception("sweeping expired runs failed")
                hooks.store_error("sweep", exc)  # observe
            else:
                if removed:
                    log.debug("removed %d expired runs", removed)

    # -- the runs.* methods --------------------------------------------------------------

    async def _check_access(self, run_id: str, action: str) -> RunInfo:
        info = await self.store.info(run_id)
        if not self.can_access(current_principal(), info, action):
            raise RunNotFound(f"unknown run {run_id!r}")  # the store's words, exactly
        return info

    async def _start(
        self, flow: str, params: dict[str, Any] | None = None, *, run_id: str | None = None
    ) -> dict[str, Any]:
        principal = current_principal()
        run_id, created = await self.start_run(
            flow,
            params,
            owner=principal_id(principal),
            run_id=run_id,
            may_see=lambda info: self.can_access(principal, info, "start"),
        )
        return {"run_id": run_id, "stream_id": run_id, "created": created}

    async def _subscribe(
        self, run_id: str, after: int = 0, batch: bool = False
    ) -> AsyncIterator[Any]:
        # An async generator (not a function returning one), so that the router
        # knows it streams: ``call("runs.subscribe")`` is refused as a stream.
        if not 0 <= after <= MAX_EVENT_ID:
            # The caller's mistake, not ours: the store would raise ValueError.
            raise InvalidParams(
                f"runs.subscribe(): 'after' must be an event id, 0 to {MAX_EVENT_ID}, not {after}"
            )
        info = await self._check_access(run_id, "subscribe")
        # The hub may queue live events straight into this stream (see fanout.py).
        sender = current_sender()
        send = None if sender is None else sender.try_send
        items = self._fanout.subscribe(info, after, current_peer().codec, batch, send)
        async with contextlib.aclosing(items) as stream:
            async for item in stream:
                yield item

    async def _status(self, run_id: str) -> dict[str, Any]:
        info = await self._check_access(run_id, "status")
        return _status(info, self._fanout.subscribers(run_id))

    async def _cancel(self, run_id: str) -> dict[str, Any]:
        info = await self._check_access(run_id, "cancel")
        if await self._cancel_flow(run_id):
            return {"run_id": run_id, "status": RunStatus.CANCELLING.value}
        # Finished, running on another node, or just ended by us: as the store says.
        info = await self.store.info(run_id)
        return _status(info, self._fanout.subscribers(run_id))

    async def _send(self, run_id: str, type: str, data: Any = None) -> None:
        info = await self._check_access(run_id, "send")
        run = self._runs.get(run_id)
        if run is None:
            raise RunFinished(f"run {run_id} is not running (status {info.status})")
        handler = run.handlers.get(type)
        if handler is not None:
            await handler(data)
            return
        try:
            run.inbox_send.send_nowait(ClientEvent(type, data))
        except anyio.WouldBlock:
            raise Overloaded(
                f"run {run_id}: {self.inbox_size} client events wait already"
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise RunFinished(f"run {run_id} is not running") from None


def owner_only(principal: Any, info: RunInfo, action: str) -> bool:
    """The default access rule: a run's owner only (anyone for an unowned run)."""
    return info.owner is None or principal_id(principal) == info.owner


def _status(info: RunInfo, subscribers: int) -> dict[str, Any]:
    return {
        "run_id": info.run_id,
        "flow": info.flow,
        "status": info.status,
        "last_id": info.last_id,
        "first_id": info.first_id,
        "created": iso_time(info.created),
        "finished": None if info.finished is None else iso_time(info.finished),
        "subscribers": subscribers,
    }
