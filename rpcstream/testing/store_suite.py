"""A pytest conformance suite for :class:`~rpcstream.store.base.EventStore` backends.

Subclass :class:`EventStoreConformance` in a test module and provide a
``store_factory`` fixture that returns a :class:`StoreFactory`: a callable
taking the base keyword arguments (``max_events``, ``expire_after``, ``clock``)
and returning a new, empty, unopened store. Every call must give an independent
store (a fresh file, a fresh key prefix)::

    class TestMemoryStore(EventStoreConformance):
        @pytest.fixture
        def store_factory(self) -> StoreFactory:
            return MemoryStore

The suite tests only the contract, through the public methods, and runs every
test on each backend the ``anyio_backend`` fixture names (asyncio and trio in
this project). Time is a :class:`FakeClock` that tests advance by hand; no
test sleeps: they wait on the events themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import ObjectSendStream, TaskGroup

from ..errors import EventsTrimmed, RunExpired, RunFinished, RunNotFound
from ..runs.events import MAX_EVENT_ID
from ..store.base import RUNNING, TERMINAL_TYPES, EventStore, RunInfo, StoredEvent
from .store_suite_runs import EXPIRE_AFTER, CreateAndLease, FakeClock, StoreFactory

__all__ = ["EXPIRE_AFTER", "EventStoreConformance", "FakeClock", "StoreFactory"]


def _data(value: Any) -> bytes:
    return msgspec.json.encode(value)


async def _fill(store: EventStore, run_id: str, count: int) -> list[StoredEvent]:
    return [await store.append(run_id, "progress", _data(i)) for i in range(count)]


async def _finish(store: EventStore, run_id: str, type: str = "complete") -> StoredEvent:
    return await store.append(run_id, type, _data(None), terminal=True)


async def _follow_all(store: EventStore, run_id: str, after: int = 0) -> list[StoredEvent]:
    async with aclosing(store.follow(run_id, after)) as events:
        return [event async for event in events]


async def _forward(
    store: EventStore, run_id: str, after: int, send: ObjectSendStream[StoredEvent]
) -> None:
    """Follow the run into ``send``, closing it when the run ends."""
    async with send, aclosing(store.follow(run_id, after)) as events:
        async for event in events:
            await send.send(event)


def _ids(events: list[StoredEvent]) -> list[int]:
    return [event.id for event in events]


class _AppendAndRead:
    """The contract, part 1: appending, reading, terminal events, concurrency."""

    # -- appending and reading ------------------------------------------------

    async def test_ids_are_contiguous_from_one(self, store: EventStore) -> None:
        await store.create_run("r", "flow")
        events = await _fill(store, "r", 5)
        assert _ids(events) == [1, 2, 3, 4, 5]
        assert _ids(await store.read("r", 0)) == [1, 2, 3, 4, 5]

    async def test_events_keep_their_type_data_and_the_clock_time(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("r", "flow")
        first = await store.append("r", "token", _data({"text": "hé"}))
        clock.advance(2.5)
        second = await store.append("r", "token", b"")
        assert first == StoredEvent(1, "token", _data({"text": "hé"}), clock.now - 2.5)
        assert second.timestamp == clock.now
        assert await store.read("r", 0) == [first, second]

    async def test_read_returns_events_after_the_given_id_up_to_the_limit(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 10)
        assert _ids(await store.read("r", 3)) == [4, 5, 6, 7, 8, 9, 10]
        assert _ids(await store.read("r", 3, limit=2)) == [4, 5]
        assert _ids(await store.read("r", 9, limit=5)) == [10]
        assert await store.read("r", 10) == []
        assert await store.read("r", 50) == []

    async def test_read_rejects_an_after_outside_the_ids_or_a_limit_below_one(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await store.append("r", "progress", b"1")
        with pytest.raises(ValueError):
            await store.read("r", -1)
        with pytest.raises(ValueError):
            await store.read("r", 0, limit=0)
        with pytest.raises(ValueError):
            store.follow("r", -1)
        # Ids are signed 64-bit: past that, no backend could even ask for it.
        with pytest.raises(ValueError):
            await store.read("r", MAX_EVENT_ID + 1)
        with pytest.raises(ValueError):
            store.follow("r", MAX_EVENT_ID + 1)
        assert await store.read("r", MAX_EVENT_ID) == []

    async def test_a_new_run_is_running_with_no_events(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        created = await store.create_run("r", "summarize", owner="alice")
        expected = RunInfo(
            run_id="r",
            flow="summarize",
            owner="alice",
            status=RUNNING,
            created=clock.now,
            finished=None,
            last_id=0,
            first_id=1,
            expires=None,
        )
        assert created == expected
        assert await store.info("r") == expected
        assert await store.read("r", 0) == []
        assert (await store.create_run("r2", "summarize")).owner is None

    async def test_creating_a_run_twice_raises_value_error(self, store: EventStore) -> None:
        await store.create_run("r", "flow")
        with pytest.raises(ValueError):
            await store.create_run("r", "other")

    @pytest.mark.parametrize("terminal_type", sorted(TERMINAL_TYPES))
    async def test_the_terminal_event_finishes_the_run(
        self, store: EventStore, clock: FakeClock, terminal_type: str
    ) -> None:
        start = clock.now
        await store.create_run("r", "flow", owner="bob")
        clock.advance(5)
        await _fill(store, "r", 2)
        assert (await store.info("r")).last_id == 2
        clock.advance(5)
        final = await _finish(store, "r", terminal_type)
        assert final.id == 3
        assert final.type == terminal_type
        assert await store.info("r") == RunInfo(
            run_id="r",
            flow="flow",
            owner="bob",
            status=terminal_type,
            created=start,
            finished=start + 10,
            last_id=3,
            first_id=1,
            expires=start + 10 + EXPIRE_AFTER,
        )

    async def test_appending_after_the_terminal_event_raises_run_finished(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _finish(store, "r", "error")
        with pytest.raises(RunFinished):
            await store.append("r", "progress", b"1")
        with pytest.raises(RunFinished):
            await _finish(store, "r")
        assert (await store.info("r")).last_id == 1

    async def test_terminal_flag_must_match_the_terminal_types(self, store: EventStore) -> None:
        await store.create_run("r", "flow")
        with pytest.raises(ValueError):
            await store.append("r", "complete", b"null")
        with pytest.raises(ValueError):
            await store.append("r", "progress", b"null", terminal=True)
        assert (await store.info("r")).last_id == 0

    async def test_an_unknown_run_raises_run_not_found_everywhere(self, store: EventStore) -> None:
        with pytest.raises(RunNotFound):
            await store.info("nope")
        with pytest.raises(RunNotFound):
            await store.read("nope", 0)
        with pytest.raises(RunNotFound):
            await store.append("nope", "progress", b"1")
        with pytest.raises(RunNotFound):
            await _follow_all(store, "nope")

    # -- concurrency ------------------------------------------------------------

    async def test_concurrent_appends_to_one_run_stay_contiguous(self, store: EventStore) -> None:
        writers, each = 20, 25
        await store.create_run("r", "flow")
        returned: list[list[int]] = [[] for _ in range(writers)]

        async def write(writer: int) -> None:
            for seq in range(each):
                event = await store.append("r", "progress", _data([writer, seq]))
                returned[writer].append(event.id)

        async with anyio.create_task_group() as tg:
            for writer in range(writers):
                tg.start_soon(write, writer)
        total = writers * each
        assert sorted(i for ids in returned for i in ids) == list(range(1, total + 1))
        stored = await store.read("r", 0, limit=total + 10)
        assert _ids(stored) == list(range(1, total + 1))
        for event in stored:
            writer, seq = msgspec.json.decode(event.data)
            assert returned[writer][seq] == event.id  # each append got its own event's id
        assert all(ids == sorted(ids) for ids in returned)
        assert (await store.info("r")).last_id == total

    async def test_a_hundred_runs_appended_concurrently(self, store: EventStore) -> None:
        runs, each = 100, 10

        async def run(index: int) -> None:
            run_id = f"run-{index}"
            await store.create_run(run_id, "flow")
            for seq in range(each):
                await store.append(run_id, "progress", _data([index, seq]))
            await _finish(store, run_id)

        async with anyio.create_task_group() as tg:
            for index in range(runs):
                tg.start_soon(run, index)
        for index in range(runs):
            events = await store.read(f"run-{index}", 0)
            assert _ids(events) == list(range(1, each + 2))
            assert [msgspec.json.decode(e.data) for e in events[:-1]] == [
                [index, seq] for seq in range(each)
            ]
            info = await store.info(f"run-{index}")
            assert (info.status, info.last_id) == ("complete", each + 1)

    async def test_cancelled_appends_leave_ids_contiguous(self, store: EventStore) -> None:
        await store.create_run("r", "flow")
        returned: list[StoredEvent] = []

        async def write(tg: TaskGroup) -> None:
            while True:
                returned.append(await store.append("r", "progress", b"1"))
                if len(returned) == 100:
                    tg.cancel_scope.cancel()  # cancel the writers mid-flight

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(write, tg)
        stored = await store.read("r", 0, limit=10_000)
        assert _ids(stored) == list(range(1, len(stored) + 1))
        assert set(returned) <= set(stored)
        # The store is still usable, and carries on from the last id.
        assert (await store.append("r", "progress", b"2")).id == len(stored) + 1


class _FollowAndRetain:
    """The contract, part 2: follow, trimming, retention, lifecycle."""

    # -- follow -----------------------------------------------------------------

    async def test_follow_replays_then_goes_live_and_ends_after_the_terminal_event(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 3)
        send, receive = anyio.create_memory_object_stream[StoredEvent](10)
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(_forward, store, "r", 0, send)
            assert _ids([await receive.receive() for _ in range(3)]) == [1, 2, 3]
            # The follower has replayed everything stored; now it must get live events.
            await store.append("r", "progress", b"4")
            assert (await receive.receive()).id == 4
            await store.append("r", "progress", b"5")
            await _finish(store, "r")
            rest = [event async for event in receive]  # ends when the follower ends
        assert _ids(rest) == [5, 6]
        assert rest[-1].type == "complete"

    async def test_follow_started_before_any_event_gets_every_event(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        send, receive = anyio.create_memory_object_stream[StoredEvent](10)
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(_forward, store, "r", 0, send)
            await store.append("r", "progress", b"1")
            assert (await receive.receive()).id == 1
            await _fill(store, "r", 2)
            await _finish(store, "r", "cancelled")
            rest = [event async for event in receive]
        assert _ids(rest) == [2, 3, 4]

    async def test_follow_from_a_position_skips_what_the_follower_has(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 5)
        await _finish(store, "r")
        assert _ids(await _follow_all(store, "r", 3)) == [4, 5, 6]

    async def test_follow_of_a_finished_run_replays_it_and_ends(self, store: EventStore) -> None:
        await store.create_run("r", "flow")
        stored = await _fill(store, "r", store.follow_batch + 100)  # more than one read
        stored.append(await _finish(store, "r"))
        assert await _follow_all(store, "r") == stored

    async def test_follow_at_or_past_the_end_of_a_finished_run_ends_at_once(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 2)
        await _finish(store, "r")
        assert await _follow_all(store, "r", 3) == []
        assert await _follow_all(store, "r", 10) == []

    @pytest.mark.parametrize("method", ["read", "info"])
    async def test_follow_does_not_miss_an_event_appended_while_it_looks(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch, method: str
    ) -> None:
        """An append right after the follower's read (or info) must still reach it."""
        await store.create_run("r", "flow")
        original = getattr(store, method)
        appended = False

        async def look_then_append(*args: Any, **kwargs: Any) -> Any:
            nonlocal appended
            result = await original(*args, **kwargs)
            if not appended:
                appended = True
                await store.append("r", "progress", b"sneaky")
            return result

        monkeypatch.setattr(store, method, look_then_append)
        send, receive = anyio.create_memory_object_stream[StoredEvent](10)
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(_forward, store, "r", 0, send)
            first = await receive.receive()
            assert (first.id, first.type, first.data) == (1, "progress", b"sneaky")
            await _finish(store, "r")
            assert _ids([event async for event in receive]) == [2]

    async def test_fifty_concurrent_followers_all_get_every_event(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        followers, count = 50, 100
        await store.create_run("r", "flow")
        got: list[list[int]] = [[] for _ in range(followers)]
        all_live = anyio.Event()
        queries = 0

        def counting(method: Callable[..., Any]) -> Callable[..., Any]:
            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal queries
                queries += 1
                return await method(*args, **kwargs)

            return counted

        monkeypatch.setattr(store, "read", counting(store.read))
        monkeypatch.setattr(store, "info", counting(store.info))

        async def follow(index: int) -> None:
            async with aclosing(store.follow("r")) as events:
                async for event in events:
                    got[index].append(event.id)
                    if event.id == 1 and sum(1 for ids in got if ids) == followers:
                        all_live.set()

        async with anyio.create_task_group() as tg:
            for index in range(followers):
                tg.start_soon(follow, index)
            await store.append("r", "progress", b"0")
            await all_live.wait()
            before = queries
            for i in range(count):
                await store.append("r", "progress", _data(i))
            await _finish(store, "r")
        expected = list(range(1, count + 3))
        assert all(ids == expected for ids in got)
        # Live followers are served from memory: storage is not queried per follower per event.
        assert queries - before < followers

    # -- trimming ---------------------------------------------------------------

    async def test_max_events_trims_the_oldest_events(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        async with store_factory(clock=clock, max_events=5) as store:
            await store.create_run("r", "flow")
            await _fill(store, "r", 12)
            info = await store.info("r")
            assert (info.first_id, info.last_id) == (8, 12)
            assert _ids(await store.read("r", 7)) == [8, 9, 10, 11, 12]
            assert _ids(await store.read("r", 10)) == [11, 12]
            assert await store.read("r", 12) == []
            await _finish(store, "r")
            assert _ids(await _follow_all(store, "r", 8)) == [9, 10, 11, 12, 13]
            assert (await store.info("r")).first_id == 9

    async def test_reading_trimmed_events_raises_events_trimmed_with_first_id(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        async with store_factory(clock=clock, max_events=5) as store:
            await store.create_run("r", "flow")
            await _fill(store, "r", 12)
            for after in (0, 3, 6):
                with pytest.raises(EventsTrimmed) as caught:
                    await store.read("r", after)
                assert caught.value.first_id == 8
                assert caught.value.data == {"first_id": 8}
            with pytest.raises(EventsTrimmed) as caught:
                await _follow_all(store, "r")
            assert caught.value.first_id == 8

    async def test_a_follower_that_fell_behind_gets_events_trimmed_and_can_resume(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        async with store_factory(clock=clock, max_events=5) as store:
            await store.create_run("r", "flow")
            await _fill(store, "r", 3)
            seen: list[int] = []
            async with aclosing(store.follow("r")) as events:
                seen.append((await anext(events)).id)
                await _fill(store, "r", 10)  # the follower is now far behind: 4..8 trimmed
                await store.info("r")  # all stored: a pipelined store returns before it
                with pytest.raises(EventsTrimmed) as caught:
                    async for event in events:
                        seen.append(event.id)
            assert seen == [1, 2, 3]  # what it had been given; nothing skipped silently
            assert caught.value.first_id == 9
            # Resuming from first_id accepts the gap and carries on live.
            async with aclosing(store.follow("r", caught.value.first_id - 1)) as events:
                assert [(await anext(events)).id for _ in range(5)] == [9, 10, 11, 12, 13]
                await _finish(store, "r")
                assert [event.id async for event in events] == [14]

    # -- retention ----------------------------------------------------------------

    async def test_a_finished_run_expires_and_raises_run_expired(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 3)
        await _finish(store, "r")
        clock.advance(EXPIRE_AFTER - 1)
        assert await store.sweep() == 0
        assert (await store.info("r")).last_id == 4
        clock.advance(1)
        assert await store.sweep() == 1
        with pytest.raises(RunExpired):
            await store.info("r")
        with pytest.raises(RunExpired):
            await store.read("r", 0)
        with pytest.raises(RunExpired):
            await store.append("r", "progress", b"1")
        with pytest.raises(RunExpired):
            await _follow_all(store, "r")
        with pytest.raises(RunNotFound):
            await store.info("never-created")
        assert await store.sweep() == 0

    async def test_a_run_past_its_expiry_raises_run_expired_before_any_sweep(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("r", "flow")
        await _finish(store, "r")
        clock.advance(EXPIRE_AFTER)
        with pytest.raises(RunExpired):
            await _follow_all(store, "r")
        with pytest.raises(RunExpired):
            await store.read("r", 0)
        await store.sweep()
        with pytest.raises(RunExpired):
            await store.info("r")

    async def test_an_expired_run_id_cannot_be_created_again(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("r", "flow")
        await _finish(store, "r")
        clock.advance(EXPIRE_AFTER)
        await store.sweep()
        with pytest.raises(ValueError):
            await store.create_run("r", "flow")

    async def test_sweep_removes_only_finished_runs_past_their_expiry(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("running", "flow")
        await store.create_run("early", "flow")
        await _finish(store, "early")
        clock.advance(EXPIRE_AFTER / 2)
        await store.create_run("late", "flow")
        await _finish(store, "late")
        clock.advance(EXPIRE_AFTER / 2)
        assert await store.sweep() == 1
        with pytest.raises(RunExpired):
            await store.info("early")
        assert (await store.info("late")).status == "complete"
        clock.advance(EXPIRE_AFTER * 1000)
        assert await store.sweep() == 1
        info = await store.info("running")
        assert (info.status, info.expires) == (RUNNING, None)

    # -- lifecycle ------------------------------------------------------------------

    async def test_open_and_aclose_may_be_called_twice(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        store = store_factory(clock=clock)
        await store.open()
        await store.open()
        await store.create_run("r", "flow")
        await store.aclose()
        await store.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await store.info("r")

    async def test_closing_the_store_ends_waiting_followers(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        store = store_factory(clock=clock)
        async with store:
            await store.create_run("r", "flow")
            got_first = anyio.Event()
            failed = anyio.Event()

            async def follow() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    async with aclosing(store.follow("r")) as events:
                        async for _ in events:
                            got_first.set()
                failed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await store.append("r", "progress", b"1")
                await got_first.wait()
                await store.aclose()
                with anyio.fail_after(10):
                    await failed.wait()


class EventStoreConformance(_AppendAndRead, _FollowAndRetain, CreateAndLease):
    """The contract every :class:`~rpcstream.store.base.EventStore` backend must meet.

    Subclasses provide the ``store_factory`` fixture (see the module docstring).
    The tests live in three mixins, by subject; the fixtures they use are here.
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        """Override in the backend's test class."""
        raise NotImplementedError("define a store_factory fixture in the subclass")

    @pytest.fixture
    def clock(self) -> FakeClock:
        """The fake clock the ``store`` fixture runs on."""
        return FakeClock()

    @pytest.fixture
    async def store(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> AsyncIterator[EventStore]:
        """An open store on the fake clock, with ``expire_after=EXPIRE_AFTER``."""
        async with store_factory(clock=clock, expire_after=EXPIRE_AFTER) as store:
            yield store
