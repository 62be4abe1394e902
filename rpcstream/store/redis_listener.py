"""The listener of a :class:`~rpcstream.store.redis.RedisStore`: live events from other nodes.

Each open store runs ONE listener task with ONE dedicated Redis connection,
subscribed to the channel of every run followed on this node (however many
follow it), and hands what arrives to the store's live followers through the
:class:`~rpcstream.store.base.EventStore` hooks (``_publish``,
``_newest_published``). See the theory of operation in
:mod:`rpcstream.store.redis`: subscriptions follow the first and last follower
of a run, every confirmed subscription catches up from storage, echoes of this
node's own appends are dropped, and a lost connection is reopened with
backoff. It is a part of the store, kept in its own module for size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from redis.asyncio.connection import AbstractConnection

from .base import StoredEvent

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["Listener"]

log = logging.getLogger("rpcstream.store.redis")


class Listener:
    """The listener task of one :class:`RedisStore`, and what it subscribed to."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self.name = f"{store.prefix}listener:{uuid.uuid4().hex[:12]}"
        """The Redis client name of the listener's connection (``CLIENT LIST``)."""
        self._task: asyncio.Task[None] | None = None
        # Runs followed on this node -> how many follow each; the listener subscribes to these.
        self._watchers: dict[str, int] = {}
        # The listener's connection, the channels it asked Redis for (run ids), and the
        # task group where subscription changes are sent; None while disconnected.
        self._sub_conn: AbstractConnection | None = None
        self._sub_sent: set[str] = set()
        self._sub_tg: anyio.abc.TaskGroup | None = None
        self._lock: anyio.Lock | None = None
        self._heard = 0.0

    def start(self) -> None:
        """Start the task (the store just opened its pool)."""
        self._lock = anyio.Lock()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"RedisStore listener ({self._store.prefix})"
        )

    async def stop(self) -> None:
        """Cancel the task and wait for it (at most 5 s)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with anyio.move_on_after(5):
                await asyncio.wait([task])

    def watch(self, run_id: str) -> None:
        """A follower of ``run_id`` begins on this node: subscribe with the first."""
        self._watchers[run_id] = self._watchers.get(run_id, 0) + 1
        self._sync_soon(run_id)

    def unwatch(self, run_id: str) -> None:
        """A follower of ``run_id`` ended: unsubscribe after the last."""
        left = self._watchers[run_id] - 1
        if left:
            self._watchers[run_id] = left
        else:
            del self._watchers[run_id]
            self._sync_soon(run_id)

    def _sync_soon(self, run_id: str) -> None:
        """Have the listener (un)subscribe the run if that changed; never blocks."""
        tg = self._sub_tg
        if tg is not None and (run_id in self._watchers) != (run_id in self._sub_sent):
            tg.start_soon(self._sync_subscription, run_id)

    async def _sync_subscription(self, run_id: str) -> None:
        assert self._lock is not None
        async with self._lock:
            conn = self._sub_conn
            wanted = run_id in self._watchers
            if conn is None or wanted == (run_id in self._sub_sent):
                return
            channel = self._store.channel(run_id)
            try:
                if wanted:
                    self._sub_sent.add(run_id)
                    await conn.send_command("SUBSCRIBE", channel, check_health=False)
                else:
                    self._sub_sent.discard(run_id)
                    await conn.send_command("UNSUBSCRIBE", channel, check_health=False)
            except Exception as exc:
                # The reader sees the broken connection too, and reconnects.
                log.debug("listener: could not send a subscription change: %r", exc)
                await _drop(conn)

    async def _run(self) -> None:
        """The listener task: connect, subscribe, read; on any failure, reconnect."""
        delay = self._store.reconnect_delay
        warned = False
        while True:
            conn = self._listener_connection()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                delay = self._store.reconnect_delay
                if warned:
                    log.info("the Redis listener is back at %s", where(self._store.url))
                    warned = False
                await self._listen_on(conn)
            except Exception as exc:
                if not warned:
                    log.warning(
                        "the Redis listener lost %s (%s: %s); reconnecting in the background",
                        where(self._store.url),
                        type(exc).__name__,
                        exc,
                    )
                    warned = True
                else:
                    log.debug("the Redis listener failed again: %r", exc)
            finally:
                self._sub_conn = self._sub_tg = None
                with anyio.CancelScope(shield=True):
                    await _drop(conn)
            await anyio.sleep(delay)
            delay = min(delay * 2, self._store.reconnect_delay_max)

    def _listener_connection(self) -> AbstractConnection:
        pool = self._store._pool
        assert pool is not None
        kwargs = dict(pool.connection_kwargs)
        # Wait for messages indefinitely; the keepalive notices a dead link instead.
        kwargs["socket_timeout"] = None
        kwargs["client_name"] = self.name
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    async def _listen_on(self, conn: AbstractConnection) -> None:
        assert self._lock is not None
        failure: Exception | None = None
        # Failures leave the task group as themselves, not wrapped in an ExceptionGroup:
        # the helpers started in it never raise.
        async with anyio.create_task_group() as tg:
            try:
                async with self._lock:
                    sent = self._sub_sent = set(self._watchers)
                    if sent:
                        channels = [self._store.channel(run_id) for run_id in sent]
                        await conn.send_command("SUBSCRIBE", *channels, check_health=False)
                    self._sub_conn, self._sub_tg = conn, tg
                self._heard = time.monotonic()
                tg.start_soon(self._keepalive, conn)
                await self._read_messages(conn)
            except Exception as exc:
                failure = exc
            finally:
                self._sub_conn = self._sub_tg = None
                tg.cancel_scope.cancel()
        raise failure or ConnectionError("the listener connection ended")

    async def _read_messages(self, conn: AbstractConnection) -> None:
        skip = len(self._store.channel(""))
        while True:
            reply = await conn.read_response()
            self._heard = time.monotonic()
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            kind = reply[0]
            if kind == b"message":
                self._deliver(reply[1][skip:].decode(), reply[2])
            elif kind == b"subscribe":
                await self._catch_up(reply[1][skip:].decode())

    def _deliver(self, run_id: str, message: bytes) -> None:
        """Publish one event another node (or this one) appended."""
        newest = self._store._newest_published(run_id)
        if newest is None:
            return  # nobody follows it here (any more)
        try:
            id_text, timestamp, expires, type_length, rest = message.split(b" ", 4)
            event_id = int(id_text)
            if event_id <= newest:
                return  # already published: this node's own append, or a catch-up read
            length = int(type_length)
            event = StoredEvent(event_id, rest[:length].decode(), rest[length:], float(timestamp))
            until = None if expires == b"-" else float(expires)
        except ValueError:
            log.warning("ignored a malformed message on %r", self._store.channel(run_id))
            return
        self._store._publish(run_id, (event,), until)

    async def _catch_up(self, run_id: str) -> None:
        """After Redis confirms a subscription: publish what it may have missed."""
        after = self._store._newest_published(run_id)
        if after is None:
            return
        if not after:
            self._store._publish(run_id, ())  # nothing cached: wake the followers to read storage
            return
        batch = self._store.follow_batch
        while True:
            try:
                info, events = await self._store._fetch(run_id, after, batch)
            except LookupError:  # RunNotFound, RunExpired: the followers will find out
                self._store._publish(run_id, ())
                return
            if after + 1 < info.first_id and after < info.last_id:
                after = info.first_id - 1  # trimmed meanwhile: followers behind see the gap
                continue
            self._store._publish(run_id, events, info.expires)
            if len(events) < batch:
                return
            after = events[-1].id

    async def _keepalive(self, conn: AbstractConnection) -> None:
        assert self._lock is not None
        interval = self._store.ping_interval
        while True:
            await anyio.sleep(interval)
            if time.monotonic() - self._heard > 3 * interval:
                log.warning(
                    "the Redis listener heard nothing for %.0f s: reconnecting", 3 * interval
                )
                await _drop(conn)
                return
            async with self._lock:
                if conn is not self._sub_conn:
                    return
                try:
                    await conn.send_command("PING", check_health=False)
                except Exception:
                    await _drop(conn)
                    return


async def _drop(conn: AbstractConnection) -> None:
    """Close a listener connection; its reader then fails and the listener reconnects."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


def where(url: str) -> str:
    """Where Redis is, for messages: host and port (or socket path), never a password."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"
