"""Running flows: starting runs, executing them, recording their end, keeping their leases.

Theory of operation
-------------------
:class:`FlowHost` is the half of :class:`~rpcstream.runs.server.RunServer` that
runs flows (the other half serves the ``runs.*`` methods). ``start`` creates
the run with :meth:`~rpcstream.store.base.EventStore.create_or_get_run` (so a
caller-chosen id starts the run once, however many callers race, on one node
or several), appends ``started`` and starts the flow in the server's task
group. The flow's task ends the run with exactly one terminal event:
``complete``, ``error`` or ``cancelled``.

**Ends that could not be written.** When the store fails as the flow ends (an
outage), the terminal event is retried with exponential backoff
(``end_retry_delay`` doubling up to ``end_retry_delay_max``) for up to
``end_retry_for`` seconds; ``runs.cancel`` meanwhile makes it try again at once.
Past that bound the server logs one error line and keeps the end pending: a
later ``runs.cancel`` records it, a restart on an embedded store ends the run as
:data:`~rpcstream.runs.events.INTERRUPTED`, and on a store with leases the run's
lease lapses and any node ends it so. The flow's failure itself is one log line
when the store is what failed (no chained traceback).

**Leases** (stores with :attr:`~rpcstream.store.base.EventStore.lease_ttl`,
i.e. Redis). Every run is created with a lease; a loop renews the leases of
the runs whose flows execute here every third of ``lease_ttl``, stops the flows
of runs another node ended, and ends every run whose lease lapsed (its node
died) with an ``error`` event of type ``Interrupted``. Subscribers on every
node see that end as any other.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import models
from .._tasks import new_flag
from ..errors import (
    EventValidationError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    RateLimited,
    RunExpired,
    RunFinished,
    RunNotFound,
    StoreUnavailable,
)
from ..limits import TokenBucket
from ..observe import hooks
from ..store.base import EventStore, RunInfo
from .events import (
    INTERRUPTED,
    TERMINAL_TYPES,
    ErrorData,
    EventType,
    RunStatus,
    encode_data,
    run_id_problem,
    started_data,
)
from .fanout import Fanout

__all__ = [
    "ClientEvent",
    "EventValidationError",
    "Flow",
    "FlowHost",
    "Run",
    "RunChannel",
    "RunContext",
]

log = logging.getLogger("rpcstream.runs")
# Its own logger: a store outage is one line here, and the failed flows' one line each there.
lease_log = logging.getLogger("rpcstream.runs.leases")

# Types only the framework writes: a flow ends itself only by returning (or sending
# ``complete``), so ``error`` and ``cancelled`` always mean what they say.
_RESERVED = frozenset({EventType.STARTED.value} | TERMINAL_TYPES - {EventType.COMPLETE.value})

# Ends given up on, kept for runs.cancel to record; the oldest are forgotten first.
_MAX_UNENDED = 10_000


class ClientEvent(msgspec.Struct, frozen=True):
    """An event a client sent to a running flow with ``runs.send``."""

    type: str
    data: Any


class RunChannel:
    """``ctx.client``: the flow's side of the conversation with its clients."""

    def __init__(self, server: FlowHost, run: Run) -> None:
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

    def __init__(self, server: FlowHost, run: Run) -> None:
        self.run_id = run.run_id
        self.flow = run.flow.name
        self.client = RunChannel(server, run)


class Flow:
    """A registered flow: its function, declared event types and parameter Struct."""

    def __init__(self, name: str, func: Callable[..., Awaitable[Any]], events: dict[str, Any]):
        self.name = name
        self.func = func
        self.events = events
        params = list(inspect.signature(func).parameters.values())[1:]  # skip ctx
        try:
            hints = typing.get_type_hints(func, include_extras=True)  # keep Meta constraints
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


class Run:
    """One run whose flow executes in this process."""

    def __init__(
        self,
        run_id: str,
        flow: Flow,
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
        self.ending = False
        """The flow is over; its terminal event is being recorded (maybe retried)."""
        self.retry_now = new_flag()
        """Set by ``runs.cancel`` while ``ending``: try recording the end again at once."""


class FlowHost:
    """Starts runs and executes their flows; the half of ``RunServer`` that runs flows.

    The attributes it reads are set by ``RunServer.__init__``.
    """

    store: EventStore
    inbox_size: int
    cancel_timeout: float
    end_orphaned_runs: bool
    max_runs_per_principal: int | None
    send_rate: tuple[float, int] | None
    can_access: Callable[[Any, RunInfo, str], bool]
    end_retry_for: float = 300.0
    """Seconds a terminal event the store refused is retried before the server gives up."""
    end_retry_delay: float = 0.05
    """The first wait between those retries; it doubles up to ``end_retry_delay_max``."""
    end_retry_delay_max: float = 5.0
    """The longest wait between those retries."""
    _flows: dict[str, Flow]
    _runs: dict[str, Run]
    _fanout: Fanout
    _tg: TaskGroup | None

    def _init_flows(self) -> None:
        self._flows = {}
        self._runs = {}
        # run id -> (terminal type, encoded data) of ends given up on; see runs.cancel.
        self._unended: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    # -- starting ---------------------------------------------------------------------

    async def start(
        self,
        flow: str,
        params: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Start a run of ``flow`` (as ``runs.start`` does) and return its id at once.

        With ``run_id``, the run gets that id, or, when a run holds it already,
        that run's id is returned and nothing starts (see :meth:`start_run`).
        """
        run_id, _ = await self.start_run(flow, params, owner=owner, run_id=run_id)
        return run_id

    async def start_run(
        self,
        flow: str,
        params: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        run_id: str | None = None,
        may_see: Callable[[RunInfo], bool] | None = None,
    ) -> tuple[str, bool]:
        """Start a run, or find the one that holds ``run_id``: ``(run_id, created)``.

        A run that holds ``run_id`` already is returned as it is (its flow's
        ``params`` are not compared): "resume or start". It must be a run of
        ``flow`` (else :class:`InvalidParams`) that ``may_see(info)`` allows (else
        :class:`RunNotFound`, the answer for an unknown run). Bad ids raise
        :class:`InvalidParams`; an id whose run expired, ``RunExpired``.
        """
        if self._tg is None:
            raise RuntimeError("the RunServer is not running: use it with serve() or async with")
        found = self._flows.get(flow)
        if found is None:
            raise MethodNotFound(f"no flow {flow!r}")
        if run_id is not None:
            problem = run_id_problem(run_id)
            if problem is not None:
                raise InvalidParams(f"runs.start(): bad run_id {run_id!r}: {problem}")
        try:
            values = models.convert(params or {}, found.params)
        except msgspec.ValidationError as exc:
            raise InvalidParams(f"flow {flow!r}: {exc}") from None
        kwargs = {n: getattr(values, n) for n in found.param_names}
        limit = self.max_runs_per_principal
        if limit is not None and sum(r.owner == owner for r in self._runs.values()) >= limit:
            if run_id is None:
                raise Overloaded(f"too many runs in flight for this principal (max {limit})")
            # At the limit, an existing run may still be returned; only a new one is refused.
            try:
                info = await self.store.info(run_id)
            except RunNotFound:
                raise Overloaded(
                    f"too many runs in flight for this principal (max {limit})"
                ) from None
            return self._existing(info, flow, may_see), False
        chosen = run_id is not None
        if run_id is None:
            run_id = uuid.uuid4().hex
        info, created = await self.store.create_or_get_run(run_id, flow, owner, lease=True)
        if not created:
            if not chosen:
                raise RuntimeError(f"run id {run_id} collided")  # a uuid4: never in practice
            return self._existing(info, flow, may_see), False
        run = self._runs[run_id] = Run(run_id, found, self.inbox_size, owner, self.send_rate)
        try:
            await self.store.append(run_id, EventType.STARTED.value, started_data(flow))
        except BaseException:
            # Created but not started: end it (retrying through an outage) so that
            # it neither stays running nor looks like a run that will progress.
            run.ending = True
            error = ErrorData("the run could not be started: the store failed", "StoreUnavailable")
            self._tg.start_soon(self._end_unstarted, run, encode_data(error))
            raise
        self._tg.start_soon(self._execute, run, kwargs)
        hooks.run_status(flow, RunStatus.RUNNING.value)  # observe
        return run_id, True

    @staticmethod
    def _existing(info: RunInfo, flow: str, may_see: Callable[[RunInfo], bool] | None) -> str:
        if may_see is not None and not may_see(info):
            raise RunNotFound(f"unknown run {info.run_id!r}")  # the store's words, exactly
        if info.flow != flow:
            raise InvalidParams(f"run {info.run_id!r} is a run of flow {info.flow!r}, not {flow!r}")
        return info.run_id

    # -- executing ------------------------------------------------------------------------

    async def _execute(self, run: Run, kwargs: dict[str, Any]) -> None:
        ctx = RunContext(self, run)
        terminal: str = EventType.COMPLETE.value
        data: Any = None
        try:
            with run.scope:
                try:
                    data = await run.flow.func(ctx, **kwargs)
                except (StoreUnavailable, RunFinished) as exc:
                    # The store failed (or the run was ended elsewhere), not the flow's
                    # code: one line says it all; the chained traceback would not help.
                    log.warning("run %s (flow %s) failed: %s", run.run_id, run.flow.name, exc)
                    terminal, data = EventType.ERROR.value, ErrorData.from_exception(exc)
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
                run.ending = True
                await self._record_end(run, terminal, encoded)
        finally:
            hooks.run_status(run.flow.name, terminal)  # observe
            run.inbox_send.close()
            run.inbox_receive.close()
            del self._runs[run.run_id]

    async def _end_unstarted(self, run: Run, encoded: bytes) -> None:
        try:
            await self._record_end(run, EventType.ERROR.value, encoded)
        finally:
            run.inbox_send.close()
            run.inbox_receive.close()
            del self._runs[run.run_id]

    async def _record_end(self, run: Run, terminal: str, encoded: bytes) -> None:
        """Append the run's terminal event, retrying with backoff while the store fails."""
        delay = self.end_retry_delay
        give_up_at = anyio.current_time() + self.end_retry_for
        while True:
            error: BaseException
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.cancel_timeout):
                    await self.store.append(run.run_id, terminal, encoded, terminal=True)
                    run.finished = True
                    return
                error = TimeoutError(f"no answer within {self.cancel_timeout} s")
            except RunFinished:
                # Stored by an attempt whose answer was lost, or ended by another
                # node (its lease lapsed): either way the run has its one end.
                run.finished = True
                return
            except (RunNotFound, RunExpired) as exc:
                log.warning("could not record the end of run %s: %s", run.run_id, exc)
                return
            except Exception as exc:
                error = exc
            left = give_up_at - anyio.current_time()
            if left <= 0:
                log.error(
                    "gave up recording the end (%s) of run %s after %.0f s: %s",
                    terminal, run.run_id, self.end_retry_for, error,
                )  # fmt: skip
                self._remember_unended(run.run_id, terminal, encoded)
                return
            log.debug("recording the end of run %s failed: %s", run.run_id, error)
            with anyio.move_on_after(min(delay, left)):
                await run.retry_now.wait()
            if run.retry_now.is_set():
                run.retry_now = new_flag()
            delay = min(delay * 2, self.end_retry_delay_max)

    def _remember_unended(self, run_id: str, terminal: str, encoded: bytes) -> None:
        self._unended[run_id] = (terminal, encoded)
        while len(self._unended) > _MAX_UNENDED:
            self._unended.popitem(last=False)

    # -- cancelling ------------------------------------------------------------------------

    async def _cancel_flow(self, run_id: str) -> bool:
        """Stop the run's flow, or record the end it could not; ``False``: nothing here to do.

        Returns ``True`` when the run's end is on its way (``cancelling``).
        """
        run = self._runs.get(run_id)
        if run is not None:
            if run.ending:
                run.retry_now.set()  # the end waits for the store: try it now
            else:
                run.scope.cancel()
            return True
        pending = self._unended.get(run_id)
        if pending is None:
            return False  # finished, or running on another node
        terminal, encoded = pending
        with contextlib.suppress(RunFinished):
            await self.store.append(run_id, terminal, encoded, terminal=True)
        del self._unended[run_id]
        return False

    def _cancel_all(self) -> None:
        # Flows still running when the server stops end with ``cancelled``: each
        # writes it under a shielded, time-bounded scope, and the task group's
        # exit (right after this) waits for them.
        for run in list(self._runs.values()):
            run.scope.cancel()

    # -- ends no flow will write ---------------------------------------------------------

    async def _end_orphans(self) -> None:
        # A run still "running" in an embedded store when we start was left by a
        # process that died: no flow will ever end it, so its subscribers would
        # wait forever. End it with an error they can see.
        if not self.end_orphaned_runs:
            return
        try:
            orphans = await self.store.running_runs()
        except NotImplementedError:  # a shared store: leases tell its orphans
            return
        data = encode_data(ErrorData("the server stopped while the run was in flight", INTERRUPTED))
        for run_id in orphans:
            with contextlib.suppress(RunFinished, RunNotFound, RunExpired):
                await self.store.append(run_id, EventType.ERROR.value, data, terminal=True)
                log.warning("run %s was interrupted by a restart: ended with an error", run_id)

    async def _lease_loop(self, ttl: float) -> None:
        """Renew our runs' leases; stop flows ended elsewhere; end runs whose lease lapsed."""
        data = encode_data(
            ErrorData("the node running the run stopped (its lease lapsed)", INTERRUPTED)
        )
        failing = False
        while True:
            await anyio.sleep(ttl / 3)
            try:
                ours = [r.run_id for r in self._runs.values() if not r.finished]
                for run_id in await self.store.renew_leases(ours):
                    run = self._runs.get(run_id)
                    if run is not None and not run.finished:
                        lease_log.warning("run %s was ended elsewhere: stopping its flow", run_id)
                        run.finished = True
                        run.scope.cancel()
                for run_id in await self.store.end_lapsed_runs(data):
                    lease_log.warning("run %s: its lease lapsed: ended it", run_id)
            except Exception as exc:
                if not failing:  # one line per outage
                    lease_log.warning("renewing run leases failed: %s", exc)
                failing = True
            else:
                failing = False
