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
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import models
from .._tasks import task_group
from ..errors import (
    EventValidationError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    RateLimited,
    RunExpired,
    RunFinished,
    RunNotFound,
)
from ..handshake import StaticFile, current_principal, principal_id
from ..limits import TokenBucket
from ..observe import hooks
from ..peer import current_peer
from ..router import Router
from ..store.base import EventStore, RunInfo
from ..store.memory import MemoryStore
from .events import (
    MAX_EVENT_ID,
    TERMINAL_TYPES,
    ErrorData,
    EventType,
    RunStatus,
    begin_run,
    encode_data,
)
from .fanout import Fanout, iso_time

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

# Types only the framework writes: a flow ends itself only by returning (or sending
# ``complete``), so ``error`` and ``cancelled`` always mean what they say.
_RESERVED = frozenset({EventType.STARTED.value} | TERMINAL_TYPES - {EventType.COMPLETE.value})


class ClientEvent(msgspec.Struct, frozen=True):
    """An event a client sent to a running flow with ``runs.send``."""

    type: str
    data: Any


class RunChannel:
    """``ctx.client``: the flow's side of the conversation with its clients."""

    def __init__(self, server: RunServer, run: _Run) -> None:
        self._server = server
        self._run = run

    async def send(self, type: str, data: Any = None) -> int:
        """Append an event for every subscriber; returns its id.

        ``data`` is checked against the type declared for ``type`` in the flow's
        ``events`` (a dict is converted, a Struct instance checked); undeclared
        types take any data msgspec can encode. Raises
        :class:`EventValidationError` on bad data.
        """
        run = self._run
        if run.send_bucket is not None and not run.send_bucket.take():
            raise RateLimited(f"run {run.run_id}: events sent faster than the run's send_rate")
        if type in _RESERVED:
            raise ValueError(f"event type {type!r} is reserved for the framework")
        declared = run.flow.events.get(type)
        try:
            if declared is not None:
                data = models.convert(data, declared)  # Structs and pydantic models
            encoded = models.encode_json(data)  # encode_data, and pydantic models
        except (msgspec.ValidationError, TypeError) as exc:
            raise EventValidationError(f"event {type!r} of flow {run.flow.name!r}: {exc}") from exc
        terminal = type == EventType.COMPLETE
        if run.finished:
            raise RunFinished(f"run {run.run_id} already ended")
        event = await self._server.store.append(run.run_id, type, encoded, terminal=terminal)
        if terminal:
            run.finished = True
        return event.id

    def has_subscribers(self) -> bool:
        """Whether any client (on this server) watches the run now."""
        return self._server._fanout.subscribers(self._run.run_id) > 0

    async def receive(self) -> ClientEvent:
        """The next event a client sent with ``runs.send`` (waits for one)."""
        return await self._run.inbox_receive.receive()

    def on(
        self, type: str
    ) -> Callable[[Callable[[Any], Awaitable[None]]], Callable[[Any], Awaitable[None]]]:
        """Register ``async def handler(data)`` for client events of ``type``.

        It runs when the event arrives (in the ``runs.send`` call, which waits
        for it); events with a handler do not reach :meth:`receive`.
        """

        def decorator(func: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
            self._run.handlers[type] = func
            return func

        return decorator


class RunContext:
    """What a flow receives first: its run's id and ``client`` channel."""

    def __init__(self, server: RunServer, run: _Run) -> None:
        self.run_id = run.run_id
        self.flow = run.flow.name
        self.client = RunChannel(server, run)


class _Flow:
    def __init__(self, name: str, func: Callable[..., Awaitable[Any]], events: dict[str, Any]):
        self.name = name
        self.func = func
        self.events = events
        params = list(inspect.signature(func).parameters.values())[1:]  # skip ctx
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        fields: list[Any] = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"flow {name!r}: *args and **kwargs are not supported")
            hint = hints.get(p.name, Any)
            if p.default is p.empty:
                fields.append((p.name, hint))
            else:
                fields.append((p.name, hint, p.default))
        # One Struct per flow validates all parameters in one pass, with msgspec's
        # messages naming the field.
        self.params = msgspec.defstruct(
            f"{name}.params", fields, forbid_unknown_fields=True, kw_only=True
        )
        self.param_names = [p.name for p in params]


class _Run:
    def __init__(
        self,
        run_id: str,
        flow: _Flow,
        inbox_size: int,
        owner: str | None,
        send_rate: tuple[float, int] | None,
    ) -> None:
        self.run_id = run_id
        self.flow = flow
        self.owner = owner
        self.send_bucket = TokenBucket(*send_rate) if send_rate is not None else None
        self.scope = anyio.CancelScope()
        self.finished = False
        self.handlers: dict[str, Callable[[Any], Awaitable[None]]] = {}
        send: MemoryObjectSendStream[ClientEvent]
        receive: MemoryObjectReceiveStream[ClientEvent]
        send, receive = anyio.create_memory_object_stream[ClientEvent](inbox_size)
        self.inbox_send = send
        self.inbox_receive = receive


class RunServer:
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
        self._flows: dict[str, _Flow] = {}
        self._runs: dict[str, _Run] = {}
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
            self._flows[name] = _Flow(name, func, dict(events or {}))
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

    async def _end_orphans(self) -> None:
        # A run still "running" in an embedded store when we start was left by a
        # process that died: no flow will ever end it, so its subscribers would
        # wait forever. End it with an error they can see.
        if not self.end_orphaned_runs:
            return
        try:
            orphans = await self.store.running_runs()
        except NotImplementedError:  # a shared store: another node may own them
            return
        data = encode_data(
            ErrorData("the server stopped while the run was in flight", "Interrupted")
        )
        for run_id in orphans:
            with contextlib.suppress(RunFinished, RunNotFound, RunExpired):
                await self.store.append(run_id, EventType.ERROR.value, data, terminal=True)
                log.warning("run %s was interrupted by a restart: ended with an error", run_id)

    def _cancel_all(self) -> None:
        # Flows still running when the server stops end with ``cancelled``: each
        # writes it under a shielded, time-bounded scope, and the task group's
        # exit (right after this) waits for them.
        for run in list(self._runs.values()):
            run.scope.cancel()

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

    # -- starting and running flows -----------------------------------------------------

    async def start(
        self, flow: str, params: dict[str, Any] | None = None, *, owner: str | None = None
    ) -> str:
        """Start a run of ``flow`` (as ``runs.start`` does) and return its id at once."""
        if self._tg is None:
            raise RuntimeError("the RunServer is not running: use it with serve() or async with")
        name = flow
        found = self._flows.get(name)
        if found is None:
            raise MethodNotFound(f"no flow {name!r}")
        limit = self.max_runs_per_principal
        if limit is not None and sum(r.owner == owner for r in self._runs.values()) >= limit:
            raise Overloaded(f"too many runs in flight for this principal (max {limit})")
        try:
            values = models.convert(params or {}, found.params)
        except msgspec.ValidationError as exc:
            raise InvalidParams(f"flow {name!r}: {exc}") from None
        kwargs = {n: getattr(values, n) for n in found.param_names}
        run_id = uuid.uuid4().hex
        await begin_run(self.store, run_id, name, owner)
        run = self._runs[run_id] = _Run(run_id, found, self.inbox_size, owner, self.send_rate)
        self._tg.start_soon(self._execute, run, kwargs)
        hooks.run_status(name, RunStatus.RUNNING.value)  # observe
        return run_id

    async def _execute(self, run: _Run, kwargs: dict[str, Any]) -> None:
        ctx = RunContext(self, run)
        terminal: str = EventType.COMPLETE.value
        data: Any = None
        try:
            with run.scope:
                try:
                    data = await run.flow.func(ctx, **kwargs)
                except Exception as exc:
                    log.info("flow %s run %s failed", run.flow.name, run.run_id, exc_info=True)
                    terminal, data = EventType.ERROR.value, ErrorData.from_exception(exc)
            if run.scope.cancelled_caught:
                terminal, data = EventType.CANCELLED.value, None
            if not run.finished:
                try:
                    encoded = models.encode_json(data)  # the flow may return a model
                except TypeError:
                    terminal = EventType.ERROR.value
                    encoded = encode_data(
                        ErrorData(f"result cannot be encoded: {data!r}", "TypeError")
                    )
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.cancel_timeout):
                    await self.store.append(run.run_id, terminal, encoded, terminal=True)
                    run.finished = True
        except Exception:
            log.exception("could not record the end of run %s", run.run_id)
        finally:
            hooks.run_status(run.flow.name, terminal)  # observe
            run.inbox_send.close()
            run.inbox_receive.close()
            del self._runs[run.run_id]

    # -- the runs.* methods --------------------------------------------------------------

    async def _check_access(self, run_id: str, action: str) -> RunInfo:
        info = await self.store.info(run_id)
        if not self.can_access(current_principal(), info, action):
            raise RunNotFound(f"unknown run {run_id!r}")  # the store's words, exactly
        return info

    async def _start(self, flow: str, params: dict[str, Any] | None = None) -> dict[str, str]:
        run_id = await self.start(flow, params, owner=principal_id(current_principal()))
        return {"run_id": run_id, "stream_id": run_id}

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
        items = self._fanout.subscribe(info, after, current_peer().codec, batch)
        async with contextlib.aclosing(items) as stream:
            async for item in stream:
                yield item

    async def _status(self, run_id: str) -> dict[str, Any]:
        info = await self._check_access(run_id, "status")
        return _status(info, self._fanout.subscribers(run_id))

    async def _cancel(self, run_id: str) -> dict[str, Any]:
        info = await self._check_access(run_id, "cancel")
        run = self._runs.get(run_id)
        if run is None:  # finished, or running on another node
            return _status(info, self._fanout.subscribers(run_id))
        run.scope.cancel()
        return {"run_id": run_id, "status": RunStatus.CANCELLING.value}

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
