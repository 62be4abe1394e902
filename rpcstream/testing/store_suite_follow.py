"""The store conformance suite, part 2: follow, trimming, retention, lifecycle
(documented in :mod:`rpcstream.testing.store_suite`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from ..errors import EventsTrimmed, RunExpired, RunNotFound
from ..store.base import RUNNING, EventStore, StoredEvent
from .store_suite_runs import (
    EXPIRE_AFTER,
    FakeClock,
    StoreFactory,
    _data,
    _fill,
    _finish,
    _follow_all,
    _forward,
    _ids,
)

__all__ = ["FollowAndRetain", "Tail"]


def _append_after_first(store: EventStore, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Make the first call of ``store.<method>`` append an event to run "r" right
    after it has looked: what a follower must not miss."""
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


class FollowAndRetain:
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
        _append_after_first(store, monkeypatch, method)
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


class Tail:
    """The contract, part 2b: ``tail``, the follow of a run's fan-out hub."""

    async def test_tail_pushes_stored_then_live_events_in_order_and_returns_after_the_end(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 3)
        pushed: list[StoredEvent] = []
        arrived = anyio.Event()
        wanted = 3

        def push(event: StoredEvent) -> None:
            pushed.append(event)
            if len(pushed) >= wanted:
                arrived.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.tail, "r", 0, push)
            await arrived.wait()  # the stored ones; the tail is caught up now or soon
            # Appends from several tasks at once: the tail sees each once, in id order.
            async with anyio.create_task_group() as appenders:
                for _ in range(4):
                    appenders.start_soon(_fill, store, "r", 25)
            wanted, arrived = 103, anyio.Event()
            if len(pushed) < wanted:  # the store may have pushed them all already
                await arrived.wait()
            await _finish(store, "r")
        # The task group waited for tail() to return: it ends with the terminal event.
        assert _ids(pushed) == list(range(1, 105))
        assert pushed[-1].type == "complete"

    @pytest.mark.parametrize("method", ["read", "info"])
    async def test_tail_does_not_miss_an_event_appended_while_it_looks(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch, method: str
    ) -> None:
        """An append right after the tail's read (or info), before it taps the
        publish, must still reach it, and before the next append does."""
        await store.create_run("r", "flow")
        _append_after_first(store, monkeypatch, method)
        pushed: list[StoredEvent] = []
        first = anyio.Event()

        def push(event: StoredEvent) -> None:
            pushed.append(event)
            first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.tail, "r", 0, push)
            await first.wait()
            assert (pushed[0].id, pushed[0].data) == (1, b"sneaky")
            await _finish(store, "r")
        assert _ids(pushed) == [1, 2]

    async def test_tail_of_a_finished_run_pushes_it_all_and_returns(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        stored = await _fill(store, "r", store.follow_batch + 10)
        stored.append(await _finish(store, "r"))
        pushed: list[StoredEvent] = []
        await store.tail("r", 5, pushed.append)
        assert pushed == stored[5:]

    async def test_an_error_in_tail_push_is_raised_by_tail_not_by_the_append(
        self, store: EventStore
    ) -> None:
        await store.create_run("r", "flow")
        await _fill(store, "r", 1)
        seen = anyio.Event()

        def push(event: StoredEvent) -> None:
            seen.set()
            if event.id == 2:
                raise LookupError("push failed")

        async def tail() -> None:
            with pytest.raises(LookupError, match="push failed"):
                await store.tail("r", 0, push)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tail)
            await seen.wait()
            event = await store.append("r", "progress", b"2")  # whoever pushes it, no raise
            assert event.id == 2
        assert (await store.info("r")).last_id == 2

    async def test_closing_the_store_ends_a_caught_up_tail(
        self, store_factory: StoreFactory, clock: FakeClock
    ) -> None:
        store = store_factory(clock=clock)
        async with store:
            await store.create_run("r", "flow")
            got_first = anyio.Event()
            failed = anyio.Event()

            async def tail() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await store.tail("r", 0, lambda event: got_first.set())
                failed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(tail)
                await store.append("r", "progress", b"1")
                await got_first.wait()
                await store.aclose()
                with anyio.fail_after(10):
                    await failed.wait()
