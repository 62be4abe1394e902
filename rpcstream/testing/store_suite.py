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

from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest
from anyio.abc import TaskGroup

from ..errors import RunFinished, RunNotFound
from ..runs.events import MAX_EVENT_ID
from ..store.base import RUNNING, TERMINAL_TYPES, EventStore, RunInfo, StoredEvent
from .store_suite_follow import FollowAndRetain, Tail
from .store_suite_runs import (
    EXPIRE_AFTER,
    CreateOrGet,
    FakeClock,
    Leases,
    NoLeases,
    StoreFactory,
    _data,
    _fill,
    _finish,
    _follow_all,
    _ids,
)

__all__ = [
    "EXPIRE_AFTER",
    "EventStoreConformance",
    "FakeClock",
    "LeasedStoreConformance",
    "StoreFactory",
]


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


class _Fixtures:
    """The fixtures every part of the suite uses."""

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


class EventStoreConformance(
    _Fixtures, _AppendAndRead, FollowAndRetain, Tail, CreateOrGet, NoLeases
):
    """The contract every :class:`~rpcstream.store.base.EventStore` backend without
    leases (``lease_ttl=None``: one process) must meet.

    Subclasses provide the ``store_factory`` fixture (see the module docstring).
    The tests live in mixins, by subject; the fixtures they use are in ``_Fixtures``.
    """


class LeasedStoreConformance(_Fixtures, _AppendAndRead, FollowAndRetain, Tail, CreateOrGet, Leases):
    """The same contract for a backend with leases (several nodes share it): its
    ``store_factory`` must make stores with ``lease_ttl`` set."""
