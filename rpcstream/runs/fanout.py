"""Fan-out of a run's events to its subscribers: followed once, encoded once per codec.

Theory of operation
-------------------
Every ``runs.subscribe`` of a running run on this process shares one :class:`Hub`
per run. The hub is the run's only follower of the event store here: one task
runs ``store.tail(run_id, after=<the last id when the hub began>, hub.push)``
(once caught up, the store calls ``push`` from each append itself) and keeps
the newest events in a bounded deque of :class:`_Entry`, each holding the
stored event and, per codec, the event already encoded as it goes on the wire
(a ``msgspec.Raw``: the codec's encoder embeds those bytes as they are). The
first subscription that sends an event on a codec encodes it (and formats its
timestamp); every other one sends the same bytes.

Subscriptions pull (live ones park, below): each keeps its position (the id
of the last event it yielded) and loops

1. take the hub's current wake-up event (a publish after this wakes it);
2. ask the hub for the entries after its position: they are its next items;
3. when the hub cannot answer (the position is older than its deque: a late
   joiner, a resume from far back, or a subscriber that lagged more than the
   deque holds), read the next events from the store and encode them itself
   (*catch-up*), then go back to 1: once it reaches the hub's window it is
   live again;
4. when there is nothing new, wait on the event taken in 1.

So a slow subscriber costs the hub nothing (it only falls back to reading the
store, which is bounded by its stream's credit), the hub's memory is bounded by
its deque, and positions are ids, contiguous per run: whether an event comes
from the hub or the store, nothing is skipped and nothing sent twice. A run
already finished when subscribed to has no hub: its events are read from the
store in order. If the hub's follow fails (the store closed, the run expired),
its subscribers each go on with their own ``store.follow``, which raises the
store's error to them.

Parked subscribers. Waking every subscription's task for every event is most
of what a live event costs when each subscriber has a connection of its own
(a browser tab each). So a subscription that caught up, and whose stream lets
its producer queue items itself (``send``: the peer's
:class:`~rpcstream.peer.streams.StreamSender`), *parks* in the hub instead of
waiting in step 4, and the hub queues each new event straight into its stream,
the same bytes for every subscriber (for batches, the one-event list, encoded
once too), and moves its position on. Its task sleeps on. It wakes only when
the hub cannot do that without waiting (no credit left, the connection's buffer
full, the stream stopped), at the run's terminal event (its stream must end),
or when the hub stops: then it goes back to step 1 and sends the event itself,
as before, waiting for credit or the buffer as the pump does. The task sleeps
inside the pump's wait for its next item, so no item of the stream can come
between: the order holds.

Batches. With ``batch=True`` each stream item is a list of events (up to
:data:`BATCH_BYTES` of encoded events, at least one): what was waiting when the
subscription looked, so a live subscriber that keeps up gets one-event lists,
and replay, catch-up and a subscriber that fell behind get long ones, one item
of credit each. Without it (older clients) each item is one event, as before.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import msgspec

from .._tasks import new_flag
from ..observe.hooks import events_delivered as delivered
from ..store.base import RUNNING, EventStore, RunInfo, StoredEvent
from ..store.live import Wakeup
from .events import TERMINAL_TYPES, RunEvent, decode_data

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..messages import Codec

    class Send(Protocol):
        """How a parked subscription's stream takes an item without waiting."""

        def __call__(self, payload: msgspec.Raw, /) -> bool: ...


__all__ = ["BATCH_BYTES", "HUB_SIZE", "Fanout", "Hub", "iso_time"]

log = logging.getLogger("rpcstream.runs")

HUB_SIZE: Final = 256
"""Encoded events a hub keeps per run; a subscriber further behind reads the store."""

BATCH_BYTES: Final = 64 * 1024
"""The encoded size a batch stops growing at (it holds at least one event)."""

# What an event costs on the wire beyond its data, for sizing batches read from the store.
_EVENT_OVERHEAD: Final = 96


def iso_time(ts: float) -> str:
    """``ts`` (unix seconds) as ISO 8601 UTC with milliseconds, as events carry it."""
    # Only the seconds go through datetime (cached: events come many per second);
    # the milliseconds are appended. Rounded to microseconds first, as
    # datetime.fromtimestamp does, then truncated to milliseconds, as isoformat does.
    fraction, whole = math.modf(ts)
    us = round(fraction * 1_000_000)
    seconds = int(whole)
    if us >= 1_000_000:
        seconds, us = seconds + 1, us - 1_000_000
    elif us < 0:
        seconds, us = seconds - 1, us + 1_000_000
    return f"{_iso_seconds(seconds)}.{us // 1000:03d}Z"


@functools.lru_cache(maxsize=1024)
def _iso_seconds(seconds: int) -> str:
    dt = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S")


def wire_event(event: StoredEvent, info: RunInfo, binary: bool) -> RunEvent:
    """The event as a subscriber receives it: JSON data passes through to JSON
    clients as it is stored; binary codecs get it decoded (and re-encoded)."""
    data = decode_data(event.data) if binary else msgspec.Raw(event.data)
    return RunEvent(event.id, event.type, data, iso_time(event.timestamp), info.run_id, info.flow)


class _Entry(msgspec.Struct, gc=False):
    """One event in a hub, with its encodings so far (codec name -> bytes), and
    as a batch of one (the item a parked ``batch`` subscriber is sent).

    Not tracked by the cyclic garbage collector (``gc=False``): it holds only
    data (an event, bytes by codec name), so it can be in no cycle. Hubs keep up
    to ``HUB_SIZE`` of them per run, and as tracked objects they were what made
    the heap grow while runs went on: each quarter of growth costs a full
    collection, which with 500 connections open paused the server for 130-170 ms
    (docs/benchmarks_runs.md, "Tenth session")."""

    event: StoredEvent
    encoded: dict[str, msgspec.Raw] = {}
    alone: dict[str, msgspec.Raw] = {}


class _Parked:
    """A subscription asleep in its hub, which sends it each new event itself."""

    __slots__ = ("batch", "binary", "name", "position", "send", "woken")

    def __init__(self, position: int, send: Send, name: str, binary: bool, batch: bool) -> None:
        self.position = position
        self.send = send
        self.name, self.binary, self.batch = name, binary, batch
        self.woken = new_flag()


class Hub(Wakeup):
    """The shared follower of one run in this process (see the module docstring);
    subscriptions that wait take its :attr:`wake`, each push notifies them."""

    def __init__(self, store: EventStore, info: RunInfo, size: int = HUB_SIZE) -> None:
        super().__init__()
        self.store = store
        self.info = info
        self.entries: deque[_Entry] = deque(maxlen=size)
        self.seen = info.last_id
        """The newest id the hub knows is stored: it can answer for positions from here."""
        self.final_id: int | None = None
        self.failed = False
        self.users = 0
        self.scope = anyio.CancelScope()
        self.parked: dict[_Parked, None] = {}  # in the order they parked

    async def run(self) -> None:
        """Follow the run in the store until its terminal event (the hub's task)."""
        try:
            with self.scope:
                # Once caught up, each append hands the hub its event in the
                # appender's own call: no task switch per event.
                await self.store.tail(self.info.run_id, self.seen, self.push)
        except Exception as exc:
            # Each subscriber follows on its own from now on, and meets the error itself.
            log.debug("fan-out of run %s stopped: %r", self.info.run_id, exc)
        finally:
            if self.final_id is None:
                self.failed = True
            self.notify()
            self.unpark_all()

    def push(self, event: StoredEvent) -> None:
        """Add the next event (the store yields them in id order), send it to the
        parked subscriptions and wake the others."""
        entry = _Entry(event)
        self.entries.append(entry)
        self.seen = event.id
        terminal = event.type in TERMINAL_TYPES
        if terminal:
            self.final_id = event.id
        if self.parked:
            self._send_parked(entry, terminal)
        self.notify()

    def _send_parked(self, entry: _Entry, terminal: bool) -> None:
        event_id = entry.event.id
        info = self.info
        sent = 0
        for parked in list(self.parked):
            name = parked.name
            if parked.batch:
                item = entry.alone.get(name)
                if item is None:
                    raw = _encoded(entry, name, info, parked.binary)
                    item = entry.alone[name] = msgspec.Raw(_ENCODERS[name]([raw]))
            else:
                item = _encoded(entry, name, info, parked.binary)
            # Parked ones are always caught up (each event moves them on or wakes them).
            if parked.position == event_id - 1 and parked.send(item):
                parked.position = event_id
                sent += 1
                if not terminal:
                    continue
            # Cannot take it now, or its stream must end: it goes on in its task.
            del self.parked[parked]
            parked.woken.set()
        if sent:
            delivered(sent)

    def unpark_all(self) -> None:
        """Wake every parked subscription: the hub stops sending to them."""
        parked, self.parked = self.parked, {}
        for p in parked:
            p.woken.set()

    def after(self, position: int) -> list[_Entry] | None:
        """The entries after ``position``; ``[]`` when none is stored yet; ``None``
        when the hub cannot tell (the position is older than its deque, or it failed)."""
        if self.failed:
            return None
        if position >= self.seen:
            return []
        entries = self.entries
        if not entries or position + 1 < entries[0].event.id:
            return None
        newer = list(islice(reversed(entries), self.seen - position))
        newer.reverse()
        return newer


class Fanout:
    """The hubs of one server process, and the subscriptions that read them."""

    def __init__(self, store: EventStore, hub_size: int = HUB_SIZE) -> None:
        self.store = store
        self.hub_size = hub_size
        self.hubs: dict[str, Hub] = {}
        self._counts: dict[str, int] = {}
        self.tg: TaskGroup | None = None
        """Where hub tasks run (the RunServer's task group, set while it runs)."""

    def subscribers(self, run_id: str) -> int:
        """How many subscriptions to ``run_id`` are open in this process."""
        return self._counts.get(run_id, 0)

    def _acquire(self, info: RunInfo) -> Hub | None:
        hub = self.hubs.get(info.run_id)
        if hub is None:
            if self.tg is None or info.status != RUNNING:
                return None
            hub = self.hubs[info.run_id] = Hub(self.store, info, self.hub_size)
            self.tg.start_soon(hub.run)
        hub.users += 1
        return hub

    def _release(self, hub: Hub) -> None:
        hub.users -= 1
        if hub.users == 0:
            hub.scope.cancel()
            if self.hubs.get(hub.info.run_id) is hub:
                del self.hubs[hub.info.run_id]

    async def subscribe(
        self, info: RunInfo, after: int, codec: Codec, batch: bool, send: Send | None = None
    ) -> AsyncGenerator[Any, None]:
        """The items of one ``runs.subscribe``: events after ``after`` until the
        terminal one, each already encoded for ``codec`` (a list of them per item
        when ``batch``). ``send``: how the hub may queue items into the stream
        these go to while the subscription is parked (see the module docstring)."""
        run_id = info.run_id
        self._counts[run_id] = self._counts.get(run_id, 0) + 1
        hub = self._acquire(info)
        # One generator, not one wrapping another: each item costs one resume.
        try:
            store, name, binary = self.store, codec.name, codec.binary
            position = after
            while True:
                if hub is None and info.status != RUNNING:
                    # Finished when subscribed to: its events are all in the store.
                    while True:
                        events = await store.read(info.run_id, position, store.follow_batch)
                        if not events:
                            return
                        for item, n in _encode_list(events, info, codec, batch):
                            yield item
                            delivered(n)
                        position = events[-1].id
                        if events[-1].type in TERMINAL_TYPES:
                            return
                if hub is None or hub.failed:
                    # No hub to share (the server is not running it, or its follow
                    # failed): follow the store alone, as a subscription did before hubs.
                    follow = store.follow(info.run_id, position)
                    async with contextlib.aclosing(follow) as alone:
                        async for event in alone:
                            for item, n in _encode_list([event], info, codec, batch):
                                yield item
                                delivered(n)
                    return
                wake = hub.wake  # before looking: a publish after this line wakes us
                entries = hub.after(position)
                if entries is None:  # behind the hub: catch up from the store
                    events = await store.read(info.run_id, position, store.follow_batch)
                    if not events:
                        await wake.wait()
                        continue
                    for item, n in _encode_list(events, info, codec, batch):
                        yield item
                        delivered(n)
                    position = events[-1].id
                    if events[-1].type in TERMINAL_TYPES:
                        return
                    continue
                if not entries:
                    if hub.final_id is not None and position >= hub.final_id:
                        return
                    if send is None:
                        await wake.wait()
                        continue
                    parked = _Parked(position, send, name, binary, batch)
                    hub.parked[parked] = None
                    try:
                        await parked.woken.wait()
                    finally:
                        hub.parked.pop(parked, None)
                        position = parked.position  # what the hub sent meanwhile
                    continue
                raws = [_encoded(entry, name, info, binary) for entry in entries]
                last = entries[-1].event
                if batch:
                    for chunk in _chunks(raws):
                        yield chunk
                        delivered(len(chunk))
                else:
                    for raw in raws:
                        yield raw
                        delivered(1)
                position = last.id
                if last.type in TERMINAL_TYPES:
                    return
        finally:
            if hub is not None:
                self._release(hub)
            left = self._counts[run_id] - 1
            if left:
                self._counts[run_id] = left
            else:
                del self._counts[run_id]


def _encoded(entry: _Entry, name: str, info: RunInfo, binary: bool) -> msgspec.Raw:
    raw = entry.encoded.get(name)
    if raw is None:
        encoder = _ENCODERS[name]
        raw = entry.encoded[name] = msgspec.Raw(encoder(wire_event(entry.event, info, binary)))
    return raw


_ENCODERS: Final = {
    "msgpack": msgspec.msgpack.Encoder().encode,
    "json": msgspec.json.Encoder().encode,
}


def _chunks(raws: list[msgspec.Raw]) -> Iterator[list[msgspec.Raw]]:
    """``raws`` in lists of at most :data:`BATCH_BYTES` (at least one each)."""
    if len(raws) == 1:
        yield raws
        return
    chunk: list[msgspec.Raw] = []
    size = 0
    for raw in raws:
        n = len(raw)
        if chunk and size + n > BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += n
    if chunk:
        yield chunk


def _encode_list(
    events: list[StoredEvent], info: RunInfo, codec: Codec, batch: bool
) -> Iterator[tuple[Any, int]]:
    """Events read for one subscriber: one ``Raw`` per event, or per batch, each
    with how many events it holds."""
    binary = codec.binary
    encode = _ENCODERS[codec.name]
    if not batch:
        for event in events:
            yield msgspec.Raw(encode(wire_event(event, info, binary))), 1
        return
    start = 0
    size = 0
    for i, event in enumerate(events):
        n = len(event.data) + _EVENT_OVERHEAD
        if i > start and size + n > BATCH_BYTES:
            yield (
                msgspec.Raw(encode([wire_event(e, info, binary) for e in events[start:i]])),
                i - start,
            )
            start, size = i, 0
        size += n
    # One encoder call per batch: the list is encoded as one array.
    yield (
        msgspec.Raw(encode([wire_event(e, info, binary) for e in events[start:]])),
        len(events) - start,
    )
