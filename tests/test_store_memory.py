"""MemoryStore: the conformance suite, plus what only the in-memory backend promises."""

from __future__ import annotations

import ast
from contextlib import aclosing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

# Show values in the shared suite's failed asserts too (it lives outside tests/);
# this must run before the suite is imported.
from rpcstream.errors import RunExpired, RunNotFound
from rpcstream.store.base import StoredEvent
from rpcstream.store.live import Live, Tap
from rpcstream.store.memory import MemoryStore
from rpcstream.testing.store_suite import EventStoreConformance, FakeClock, StoreFactory


class TestMemoryStore(EventStoreConformance):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        return MemoryStore


async def _expire_runs(store: MemoryStore, clock: FakeClock, run_ids: list[str]) -> None:
    for run_id in run_ids:
        await store.create_run(run_id, "flow")
        await store.append(run_id, "complete", b"null", terminal=True)
        clock.advance(1)
    clock.advance(store.expire_after)
    assert await store.sweep() == len(run_ids)


@pytest.mark.anyio
async def test_tombstones_are_capped_and_the_oldest_are_forgotten_first() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock, expire_after=10, max_tombstones=3)
    await _expire_runs(store, clock, ["a", "b", "c", "d", "e"])
    for forgotten in ("a", "b"):
        with pytest.raises(RunNotFound):
            await store.info(forgotten)
    for remembered in ("c", "d", "e"):
        with pytest.raises(RunExpired):
            await store.info(remembered)


@pytest.mark.anyio
async def test_expiry_on_access_frees_the_events_at_once() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock, expire_after=10)
    await store.create_run("r", "flow")
    await store.append("r", "complete", b"null", terminal=True)
    clock.advance(10)
    with pytest.raises(RunExpired):
        await store.read("r", 0)
    assert "r" not in store._runs
    assert await store.sweep() == 0  # already gone; the stale heap entry is skipped


@pytest.mark.anyio
async def test_trimming_keeps_memory_bounded_by_max_events() -> None:
    store = MemoryStore(max_events=10)
    await store.create_run("r", "flow")
    for _ in range(1000):
        await store.append("r", "progress", b"1")
    run = store._runs["r"]
    assert len(run.events) <= 2 * 10 + 64
    assert [e.id for e in await store.read("r", 990)] == list(range(991, 1001))


@pytest.mark.anyio
async def test_the_live_cache_is_dropped_when_the_last_follower_leaves() -> None:
    store = MemoryStore()
    await store.create_run("r", "flow")
    await store.append("r", "progress", b"1")
    async with aclosing(store.follow("r")) as events:
        assert (await anext(events)).id == 1
        assert store._live["r"].followers == 1
    assert store._live == {}
    with pytest.raises(RunNotFound):
        async with aclosing(store.follow("nope")) as events:
            await anext(events)
    assert store._live == {}


@pytest.mark.anyio
async def test_the_live_cache_is_bounded() -> None:
    store = MemoryStore()
    await store.create_run("r", "flow")
    send, receive = anyio.create_memory_object_stream[int](0)

    async def follow() -> None:
        async with send, aclosing(store.follow("r")) as events:
            async for event in events:
                await send.send(event.id)

    async with receive, anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await store.append("r", "progress", b"1")
        assert await receive.receive() == 1
        for _ in range(3 * store.live_cache_size):
            await store.append("r", "progress", b"1")
        assert len(store._live["r"].events) == store.live_cache_size
        await store.append("r", "complete", b"null", terminal=True)
        ids = [i async for i in receive]
    # The follower fell behind the cache and caught up from storage, missing nothing.
    assert ids == list(range(2, 3 * store.live_cache_size + 3))


@pytest.mark.anyio
async def test_a_caught_up_tail_gets_each_event_within_the_append_that_stored_it() -> None:
    store = MemoryStore()
    await store.create_run("r", "flow")
    await store.append("r", "progress", b"1")
    pushed: list[int] = []
    first = anyio.Event()

    def push(event: StoredEvent) -> None:
        pushed.append(event.id)
        first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.tail, "r", 0, push)
        await first.wait()
        while not store._live["r"].taps:  # the tail's task taps once it finds nothing new
            await anyio.lowlevel.checkpoint()
        for i in range(2, 50):
            # A memory append does not await after it publishes, so the tail's task
            # cannot have run in between: the tap handed the event over.
            await store.append("r", "progress", b"1")
            assert pushed[-1] == i
        await store.append("r", "complete", b"null", terminal=True)
        assert pushed[-1] == 50
    assert pushed == list(range(1, 51))
    assert store._live == {}


def _event(event_id: int, type: str = "progress") -> StoredEvent:
    return StoredEvent(event_id, type, b"1", 0.0)


def test_a_tap_stops_at_a_gap_and_keeps_the_position_it_reached() -> None:
    live = Live(16)
    got: list[int] = []
    tap = Tap(0, lambda event: got.append(event.id))
    live.taps[tap] = None
    live.push([_event(1), _event(2)], None)
    assert (got, tap.position, tap.stopped.is_set()) == ([1, 2], 2, False)
    live.push([_event(2)], None)  # a late duplicate is not handed over again
    assert got == [1, 2]
    live.push([_event(4)], None)  # 3 is missing: the tap's task must read storage
    assert (got, tap.position, tap.stopped.is_set()) == ([1, 2], 2, True)
    assert not live.taps and not tap.ended


def test_a_tap_ends_at_the_terminal_event_and_ignores_what_follows() -> None:
    live = Live(16)
    got: list[int] = []
    tap = Tap(0, lambda event: got.append(event.id))
    live.taps[tap] = None
    live.push([_event(1), _event(2, "complete"), _event(3)], None)
    assert (got, tap.ended, tap.stopped.is_set(), live.taps) == ([1, 2], True, True, {})


def test_stores_import_only_errors_the_run_vocabulary_anyio_msgspec_and_the_stdlib() -> None:
    # The run vocabulary (runs.events) imports nothing of rpcstream itself, so a
    # store that uses it still never reaches the server or the peer; nor does
    # observe.hooks (how stores report appends and failures), for the same reason.
    # trio is imported only when running on it, to start the group commit's drainer.
    # _tasks (the events and task groups every layer shares) imports only anyio.
    allowed = {
        "anyio", "msgspec", "trio", "errors", "base", "commit", "live", "runs.events",
        "observe.hooks", "sqlite_file", "_tasks",
    }  # fmt: skip
    store_dir = Path(__file__).parent.parent / "rpcstream" / "store"
    modules = ("base.py", "commit.py", "live.py", "memory.py", "sqlite.py", "sqlite_file.py")
    for module in modules:
        tree = ast.parse((store_dir / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in allowed, (module, node.module)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                assert top in allowed or top in _stdlib(), (module, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top in allowed or top in _stdlib(), (module, alias.name)


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names)


@pytest.mark.anyio
async def test_a_task_appending_in_a_loop_still_gives_the_loop_up() -> None:
    # Appends are schedule points only every yield_interval (a millisecond): 20,000
    # of them take far longer than that on any machine, so the other task runs
    # while the loop goes on; with yield_interval 0, at every append.
    store = MemoryStore()
    await store.create_run("r", "flow")
    turns = 0
    stop = False

    async def other() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()  # `other` has started
        before = turns
        for _ in range(20_000):
            await store.append("r", "tick", b"1")
        assert turns > before
        store.yield_interval = 0
        before = turns
        for _ in range(10):
            await store.append("r", "tick", b"1")
        # Each append a batch of the other's turns (trio may run the two of a batch
        # in either order: one turn either way at the ends).
        assert turns >= before + 9
        stop = True


@pytest.mark.anyio
async def test_an_append_in_a_cancelled_scope_is_cancelled_and_stores_nothing() -> None:
    store = MemoryStore()
    await store.create_run("r", "flow")
    await store.append("r", "tick", b"1")  # the store gave the loop up just now
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.append("r", "tick", b"2")
        pytest.fail("append went on in a cancelled scope")  # pragma: no cover
    assert scope.cancelled_caught
    assert [e.data for e in await store.read("r", 0)] == [b"1"]
