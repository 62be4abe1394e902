"""An :class:`~rpcstream.store.base.EventStore` on Redis Streams, shared by many processes.

Theory of operation
-------------------
Every process ("node") that serves or writes runs opens its own
:class:`RedisStore` on the same Redis and ``prefix``. All state is in Redis,
under these names (``{prefix}`` is ``"rpcstream:"`` unless told otherwise)::

    {prefix}run:{run_id}      hash    the run's metadata: flow, owner, status, created,
                                      finished, expires, last_id, first_id
    {prefix}client:{run_id}   stream  the run's events, one entry per event: entry id
                                      "<event id>-0", fields t (type), d (data), ts (timestamp)
    {prefix}expired:{run_id}  string  the tombstone: the run existed and finished; it
                                      outlives the two keys above by ``tombstone_ttl``
    {prefix}expiring          zset    store-wide: ids of finished runs scored by
                                      ``expires``, for :meth:`RedisStore.sweep`
    {prefix}leases            zset    store-wide: ids of leased running runs, scored
                                      by their lease deadline (see Leases below)
    {prefix}events:{run_id}   channel (pub/sub, not a key) every event appended to the run

**Appends** run a Lua script, which Redis executes atomically: for each append it checks that
the run exists (else ``RunNotFound``, or ``RunExpired`` when its tombstone is
there), is not past ``expires`` and is still running (else ``RunFinished``),
takes the next id with ``HINCRBY last_id``, ``XADD``\\s the event under the
explicit entry id ``<id>-0`` (so stream order is id order), trims with an exact
``MAXLEN`` and moves ``first_id`` with it, and for a terminal event sets
status, ``finished`` and ``expires``, puts a real Redis expiry on the run's hash
and stream (``PEXPIRE expire_after``) and on its tombstone (``expire_after +
tombstone_ttl``), and adds the run to ``{prefix}expiring``. Last it
``PUBLISH``\\es the event on the run's channel. However many nodes append to a
run at once, its ids stay contiguous: Redis runs one script at a time.
Concurrent appends on one node, to any runs, share ONE call of that script,
with the SQLite store's group commit (:mod:`rpcstream.store.commit`): whoever
finds a call slot free sends the queued appends (up to ``max_batch``) as one
``EVALSHA`` whose keys and arguments hold them all, publishes the results in
order and wakes the others; what queued meanwhile forms the next call. One
call, not a pipeline of one call per append, is what makes a group cheap: the
client encodes and parses one command, and Redis runs one script. Up to
``max_calls`` (2) calls are in flight at once, each on its own pooled
connection, so that Redis runs one group while this node publishes the other's
results and its callers queue their next appends (with one call, the two took
turns). Two calls may run on the server in either order, so a run's appends
are never in two calls at once (the group commit's *key*): its ids are given,
and published, in the order its appends were queued. Each append
runs under ``pcall``, so one that Redis refuses fails alone. A sent call runs to
its end shielded (bounded by ``command_timeout``), so an append cancelled then
may still be stored; one cancelled while queued is not.

**Leases.** A run created with ``lease=True`` (``RunServer`` does so for the
runs whose flows it runs) has an entry in the store-wide sorted set
``{prefix}leases``, scored by its lease deadline in the store's ``clock``. The
node running its flow renews the leases of all its runs in one script
(:meth:`RedisStore.renew_leases`), which also tells it which of them another
node has ended. Any node may call :meth:`RedisStore.end_lapsed_runs`: it reads
the entries past their deadline and runs, for each, the append script with a
flag that makes it re-check the deadline inside the script before it appends
the ``error`` event, so the check and the append are one atomic step and
exactly one terminal event ends the run however many nodes race. Every
terminal append removes the run's entry. Deadlines are compared across nodes,
so their clocks must agree to well within ``lease_ttl``.

**Reads** (``read``, ``info``) are one read-only script each, so the metadata
and the events they return are one consistent snapshot. Time decisions use the
store's ``clock``: a run is expired once ``clock() >= expires``, as in every
backend. The Redis expiry (in milliseconds) only removes the keys; with a clock
that follows real time the two agree.

**Live follow across nodes** (:mod:`rpcstream.store.redis_listener`). The base
class serves a node's followers from a per-run live cache that ``_publish``
feeds. Appends made on this node publish at once. For the others, each open
store runs ONE listener task with ONE dedicated Redis connection, subscribed to
the channel of every run followed on this node (however many follow it); it
publishes what arrives. So a node holds at most ``max_connections`` pooled
connections plus that one, whatever the number of followers; a run followed on
no node costs Redis one ``PUBLISH`` to nobody. The subscription starts with a
run's first follower on the node and ends with its last. Pub/sub delivers only
to subscribers connected at the time, so whenever Redis confirms a subscription
(the first, or again after a reconnect) the listener reads what the run stored
after the newest event the cache holds and publishes it (an empty cache only
wakes the followers, which then read storage themselves). Echoes of this node's
own appends are dropped.

**Outages.** Every Redis failure (refused or broken connection, timeout, a
``LOADING`` server...) raises :class:`StoreUnavailable`, with the redis-py
exception as ``__cause__``; commands are never retried, so an append that
failed after it was sent may still have been stored (ids stay contiguous either
way). The listener reconnects on its own, with backoff, resubscribes and
catches up as above. ``follow`` rides through outages: a follower waiting for
live events does not notice, and one whose storage read fails retries with the
same backoff, resuming right after the last event it yielded.

**asyncio only**: redis.asyncio runs on asyncio; :meth:`RedisStore.open`
raises ``RuntimeError`` on trio. The listener is an asyncio task owned by the
store, started by ``open`` and cancelled and awaited by ``aclose``. (A task
group entered in ``open`` would force ``aclose`` to be called at the same
cancel-scope depth, which ``async with`` code that closes the store from inside
another task group cannot promise.)

Not for Redis Cluster: scripts touch a run's keys and the store-wide
``{prefix}expiring`` set together. Use a Redis that does not evict keys
(``maxmemory-policy noeviction``); persist it (AOF) if runs must survive a
Redis restart.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterator

import anyio
import anyio.abc
import msgspec
import sniffio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..errors import StoreUnavailable
from ..runs.events import EventType
from .base import RUNNING, EventStore, RunInfo, StoredEvent
from .commit import GroupCommit, Request, Take
from .redis_listener import Listener, where
from .redis_scripts import (
    APPEND,
    CREATE,
    FETCH,
    RENEW,
    SWEEP,
    pack_append,
    pack_array,
    parse_fetch,
)

__all__ = ["RedisStore", "StoreUnavailable"]

log = logging.getLogger("rpcstream.store.redis")

_ERROR = EventType.ERROR.value
_DECODE = msgspec.msgpack.Decoder(list[int | str]).decode


class _Pending(Request):
    """One append waiting for its group's script call."""

    __slots__ = ("client", "command", "data", "event", "expires", "now", "run_id", "type")

    def __init__(
        self,
        client: Redis,
        run_id: str,
        type: str,
        data: bytes,
        now: float,
        expires: float | None,
        command: bytes,
    ) -> None:
        # Request's fields, set here rather than by super().__init__(): one call
        # less per append.
        self.size = 0
        self.key = run_id  # a run's appends are in one script call at a time: in order
        self.taken = self.done = False
        self.error: BaseException | None = None
        self.client = client  # the connection pool it was queued for
        self.run_id = run_id
        self.type = type
        self.data = data
        self.now = now
        self.expires = expires
        self.command = command  # the append, as the script takes it
        self.event: StoredEvent | None = None


class RedisStore(EventStore):
    """Runs and events in Redis, shared by every node that opens the same ``url`` and ``prefix``.

    Args:
        url: a redis-py URL, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS).
        prefix: put before every key and channel name (see the module docstring).
        max_events, expire_after, clock: as for every :class:`EventStore`.
        tombstone_ttl: how long, in seconds, an expired run's tombstone outlives it
            (it makes late readers get ``RunExpired`` rather than ``RunNotFound``).
        max_connections: pooled connections for commands (the listener has its own one);
            more concurrent commands wait up to ``pool_timeout`` for one.
        connect_timeout, command_timeout: seconds before a connection attempt, or a
            command's reply, counts as a failure (:class:`StoreUnavailable`).

    Open it (``async with``) before use; on asyncio only.
    """

    reconnect_delay: float = 0.05
    """The listener's first wait before reconnecting; doubles per failure."""
    reconnect_delay_max: float = 1.0
    """The listener's longest wait between reconnection attempts."""
    ping_interval: float = 10.0
    """The listener pings Redis this often; silence for three intervals means a dead link."""
    sweep_chunk: int = 500
    """Runs expired per round trip by :meth:`sweep`."""
    max_batch: int = 1024
    """Appends sent in one script call at most (read when the store is created)."""
    max_calls: int = 2
    """Append script calls in flight at once, each on its own connection (read when
    the store is created): Redis runs one while this node prepares the next."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rpcstream:",
        max_events: int | None = None,
        expire_after: float = 300.0,
        clock: Callable[[], float] = time.time,
        tombstone_ttl: float = 86_400.0,
        max_connections: int = 16,
        pool_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 10.0,
        max_pending: int = 1024,
        lease_ttl: float = 30.0,
    ) -> None:
        super().__init__(max_events=max_events, expire_after=expire_after, clock=clock)
        if not 0 < lease_ttl < math.inf:
            raise ValueError(f"lease_ttl must be a positive number of seconds, not {lease_ttl}")
        self.lease_ttl = self._lease_ttl = float(lease_ttl)
        if tombstone_ttl <= 0:
            raise ValueError(f"tombstone_ttl must be positive, not {tombstone_ttl}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.url = url
        self.prefix = prefix
        self.tombstone_ttl = float(tombstone_ttl)
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_pending = max_pending
        self._expiring = f"{prefix}expiring"
        self._leases = f"{prefix}leases"
        self._channel_prefix = f"{prefix}events:".encode()
        self._run_ttl_ms = math.ceil(self.expire_after * 1000)
        self._tombstone_ttl_ms = max(1, math.ceil(self.tombstone_ttl * 1000))
        self._redis: Redis | None = None
        self._pool: BlockingConnectionPool | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._append_sha = ""
        # Appends waiting for a script call; max_calls calls are in flight at most.
        self._appends = GroupCommit(
            self._send_appends,
            max_pending=max_pending,
            max_group=self.max_batch,
            max_writes=self.max_calls,
        )
        self._listener = Listener(self)
        self._closing = anyio.Event()

    @property
    def listener_name(self) -> str:
        """The Redis client name of this store's listener connection (``CLIENT LIST``)."""
        return self._listener.name

    # -- names --------------------------------------------------------------------

    def run_keys(self, run_id: str) -> tuple[str, str, str]:
        """The run's own keys: its metadata hash, its event stream and its tombstone."""
        prefix = self.prefix
        return f"{prefix}run:{run_id}", f"{prefix}client:{run_id}", f"{prefix}expired:{run_id}"

    def channel(self, run_id: str) -> bytes:
        """The pub/sub channel on which every event appended to the run is published."""
        return self._channel_prefix + run_id.encode()

    # -- lifecycle --------------------------------------------------------------------

    async def _open(self) -> None:
        if self._redis is not None:
            return
        library = sniffio.current_async_library()
        if library != "asyncio":
            raise RuntimeError(
                f"RedisStore needs asyncio (redis.asyncio runs only on asyncio), not {library}: "
                "run this process on asyncio, e.g. anyio.run(main, backend='asyncio')"
            )
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.pool_timeout,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=None,  # commands get a deadline in _mapped instead
            socket_keepalive=True,
            # RESP2 everywhere: the listener reads pub/sub messages as plain replies.
            protocol=2,
            # Never retry: a retried append could be stored twice. Callers decide.
            retry=Retry(NoBackoff(), 0),
        )
        client = Redis(connection_pool=pool)
        try:
            with _mapped(self, "connect to"):
                await client.ping()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.disconnect()
            raise
        self._scripts = {
            "create": client.register_script(CREATE),
            "renew": client.register_script(RENEW),
            "append": client.register_script(APPEND),
            "fetch": client.register_script(FETCH),
            "sweep": client.register_script(SWEEP),
        }
        self._append_sha = self._scripts["append"].sha
        self._redis, self._pool = client, pool
        self._closing = anyio.Event()
        self._listener.start()

    async def _aclose(self) -> None:
        self._closing.set()
        await self._listener.stop()
        client, self._redis = self._redis, None
        pool, self._pool = self._pool, None
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.disconnect()

    async def _check(self) -> None:
        client = self._client()
        with _mapped(self, "ping"):
            await client.ping()

    def _client(self) -> Redis:
        client = self._redis
        if client is None:
            self._check_open()
            raise RuntimeError(
                "RedisStore is not open: use 'async with store' or 'await store.open()'"
            )
        return client

    # -- the primitives -----------------------------------------------------------------

    async def _create_or_get_run(
        self, run_id: str, flow: str, owner: str | None, lease: bool
    ) -> tuple[RunInfo, bool]:
        client = self._client()
        now = self.clock()
        run, _, tombstone = self.run_keys(run_id)
        deadline = repr(now + self._lease_ttl) if lease else ""
        args = [flow, repr(now), "0" if owner is None else "1", owner or "", deadline, run_id]
        with _mapped(self, "create a run in"):
            created = await self._scripts["create"](
                keys=[run, tombstone, self._leases], args=args, client=client
            )
        if created == 2:
            raise self._expired(run_id)
        if created == 0:
            return await self._info(run_id), False
        return RunInfo(run_id, flow, owner, RUNNING, now, None, 0, 1, None), True

    # -- leases ---------------------------------------------------------------------------

    async def _renew_leases(self, run_ids: list[str]) -> set[str]:
        client = self._client()
        deadline = repr(self.clock() + self._lease_ttl)
        keys = [self._leases, *(self.run_keys(run_id)[0] for run_id in run_ids)]
        with _mapped(self, "renew leases in"):
            gone = await self._scripts["renew"](keys=keys, args=[deadline, *run_ids], client=client)
        return {run_id.decode() for run_id in gone}

    async def _end_lapsed_runs(self, data: bytes) -> list[str]:
        client = self._client()
        ended: list[str] = []
        while True:
            now = self.clock()
            with _mapped(self, "look for lapsed leases in"):
                due: list[bytes] = await client.zrangebyscore(
                    self._leases, "-inf", repr(now), start=0, num=self.sweep_chunk
                )  # type: ignore[assignment]
            if not due:
                return ended
            batch = [
                self._request(client, run_id.decode(), _ERROR, data, True, lapsed_only=True)
                for run_id in due
            ]
            with _mapped(self, "end lapsed runs in", shield=True):
                replies = await self._run_appends(client, batch)
            stale = []
            for request, reply in zip(batch, replies, strict=True):
                if type(reply) is not int:
                    error = StoreUnavailable(f"Redis refused an append: {reply}")
                    raise error from ResponseError(reply)
                if reply > 0:
                    event = StoredEvent(reply, _ERROR, data, request.now)
                    self._publish(request.run_id, (event,), request.expires)
                    ended.append(request.run_id)
                elif reply != -4:  # gone or finished: its lease entry is stale
                    stale.append(request.run_id)
            if stale:
                with _mapped(self, "drop stale leases in"):
                    await client.zrem(self._leases, *stale)
            if len(due) < self.sweep_chunk:
                return ended

    async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> StoredEvent:
        request = self._request(self._client(), run_id, type, data, terminal)
        await self._appends.submit(request)
        assert request.event is not None
        return request.event

    def _request(
        self,
        client: Redis,
        run_id: str,
        type: str,
        data: bytes,
        terminal: bool,
        lapsed_only: bool = False,
    ) -> _Pending:
        now = self.clock()
        expires = now + self.expire_after if terminal else None
        flag = b"2" if lapsed_only else b"1" if terminal else b"0"
        # Timestamps travel as repr() strings: every reader parses back the very float.
        command = pack_append(
            run_id.encode(),
            type.encode(),
            data,
            repr(now).encode(),
            flag,
            b"" if expires is None else repr(expires).encode(),
        )
        return _Pending(client, run_id, type, data, now, expires, command)

    async def _send_appends(self, take: Take[_Pending]) -> None:
        """Send the queued appends as ONE script call, then publish them in order.

        The GroupCommit's ``write``; it never raises: each append gets its outcome.
        """
        client = self._redis
        batch = []
        for request in take():
            if request.client is not client:  # closed (and maybe reopened) since it queued
                request.fail(anyio.ClosedResourceError())
            else:
                batch.append(request)
        if client is None or not batch:
            return
        try:
            # Once sent, see it through (for at most command_timeout), even if the
            # caller that flushes is cancelled: the batch holds other callers' appends.
            with _mapped(self, "append to", shield=True):
                replies = await self._run_appends(client, batch)
        except Exception as exc:  # StoreUnavailable, ClosedResourceError
            for request in batch:
                request.fail(exc)
            return
        errors = (self._not_found, self._expired, self._finished)
        publish = self._publish
        for request, reply in zip(batch, replies, strict=True):
            request.done = True
            if type(reply) is int and reply > 0:
                event = request.event = StoredEvent(reply, request.type, request.data, request.now)
                publish(request.run_id, (event,), request.expires)
            elif type(reply) is int:
                request.error = errors[-reply - 1](request.run_id)
            else:
                request.error = StoreUnavailable(f"Redis refused an append: {reply}")
                request.error.__cause__ = ResponseError(reply)

    async def _run_appends(self, client: Redis, batch: list[_Pending]) -> list[int | str]:
        """Run the append script ONCE for the whole batch: one round trip, one script run.

        Returns one reply per request: its id (> 0), ``-code`` (1 not found, 2 expired,
        3 finished, 4 lease held), or the error message Redis answered for it.
        """
        args = (
            self.prefix,
            self.max_events or 0,
            self._run_ttl_ms,
            self._run_ttl_ms + self._tombstone_ttl_ms,
            b"".join([pack_array(len(batch)), *(request.command for request in batch)]),
        )
        try:
            packed = await client.evalsha(self._append_sha, 0, *args)
        except NoScriptError:  # Redis restarted and lost its scripts: nothing ran
            self._append_sha = await client.script_load(APPEND)
            packed = await client.evalsha(self._append_sha, 0, *args)
        return _DECODE(packed)

    async def _fetch(
        self, run_id: str, after: int, limit: int
    ) -> tuple[RunInfo, list[StoredEvent]]:
        """The run's metadata and up to ``limit`` events after ``after``, in one snapshot."""
        client = self._client()
        now = self.clock()
        with _mapped(self, "read from"):
            reply = await self._scripts["fetch"](
                keys=self.run_keys(run_id), args=[after + 1, limit], client=client
            )
        status = reply[0]
        if status == 1:
            raise self._not_found(run_id)
        if status == 2:
            raise self._expired(run_id)
        info, events = parse_fetch(run_id, reply)
        if info.expires is not None and now >= info.expires:
            raise self._expired(run_id)
        return info, events

    async def _read(self, run_id: str, after: int, limit: int) -> list[StoredEvent]:
        info, events = await self._fetch(run_id, after, limit)
        self._check_trimmed(run_id, after, info.first_id, info.last_id)
        return events

    async def _info(self, run_id: str) -> RunInfo:
        info, _ = await self._fetch(run_id, 0, 0)
        return info

    async def _sweep(self) -> int:
        client = self._client()
        now = repr(self.clock())
        removed = 0
        with _mapped(self, "sweep"):
            while True:
                due: list[bytes] = await client.zrangebyscore(
                    self._expiring, "-inf", now, start=0, num=self.sweep_chunk
                )  # type: ignore[assignment]
                if not due:
                    break
                async with client.pipeline(transaction=False) as pipe:
                    for member in due:
                        await self._scripts["sweep"](
                            keys=[*self.run_keys(member.decode()), self._expiring],
                            args=[now, member, self._tombstone_ttl_ms],
                            client=pipe,
                        )
                    removed += sum(await pipe.execute())
                if len(due) < self.sweep_chunk:
                    break
        return removed

    # -- live follow across nodes ---------------------------------------------------------

    async def _follow(
        self, run_id: str, after: int, push: Callable[[StoredEvent], object] | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        # Subscribe before the base loop looks at storage; its confirmation catches up.
        self._listener.watch(run_id)
        position, delay = after, self.reconnect_delay

        def pushed(event: StoredEvent) -> None:  # given out, as yielded events are
            nonlocal position, delay
            push(event)  # type: ignore[misc]  # passed on only when there is one
            position, delay = event.id, self.reconnect_delay

        try:
            while True:
                try:
                    follow = super()._follow(run_id, position, push and pushed)
                    async with contextlib.aclosing(follow) as events:
                        async for event in events:
                            yield event
                            position, delay = event.id, self.reconnect_delay
                    return
                except StoreUnavailable as exc:
                    # Ride through the outage: resume from the last event given out.
                    level = logging.WARNING if delay == self.reconnect_delay else logging.DEBUG
                    log.log(level, "follow %r: %s; retrying in %.2f s", run_id, exc, delay)
                    with anyio.move_on_after(delay):
                        await self._closing.wait()  # aclose() ends the wait at once
                    delay = min(delay * 2, self.reconnect_delay_max)
        finally:
            self._listener.unwatch(run_id)


@contextlib.contextmanager
def _mapped(store: RedisStore, what: str, shield: bool = False) -> Iterator[None]:
    """Turn redis-py failures into :class:`StoreUnavailable` (or closed-store errors);
    ``shield``: and let no outer cancellation in (one cancel scope for both)."""
    try:
        # Our own deadline: redis-py's socket_timeout costs a task per command.
        with anyio.fail_after(store.command_timeout, shield=shield):
            yield
    except TimeoutError as exc:
        raise StoreUnavailable(
            f"could not {what} Redis at {where(store.url)}: "
            f"no answer within {store.command_timeout} s"
        ) from exc
    except (RedisError, OSError) as exc:
        if store._closed:
            raise anyio.ClosedResourceError from exc
        raise StoreUnavailable(f"could not {what} Redis at {where(store.url)}: {exc}") from exc
