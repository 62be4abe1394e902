"""GroupCommit, the one batching loop behind the SQLite and Redis stores' appends."""

from __future__ import annotations

import ast
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from rpcstream.store.commit import GroupCommit, Request, Take
from rpcstream.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

STORE = Path(__file__).resolve().parent.parent / "rpcstream" / "store"


class Item(Request):
    __slots__ = ("result", "value")

    def __init__(self, value: int, size: int = 0, key: str | None = None) -> None:
        super().__init__(size, key)
        self.value = value
        self.result: int | None = None


class Log:
    """A fake store: records each group written; ``gate`` holds writes before they take."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.gate = anyio.Lock()
        self.waiting = anyio.Event()

    async def write(self, take: Take[Item]) -> None:
        self.waiting.set()
        async with self.gate:
            group = take()
            self.groups.append([item.value for item in group])
            for item in group:
                if item.value < 0:
                    item.fail(ValueError(f"bad {item.value}"))
                else:
                    item.result = item.value * 10
                    item.done = True


async def test_concurrent_requests_share_writes() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=100)
    results: dict[int, int | None] = {}

    async def submit(value: int) -> None:
        item = Item(value)
        await commit.submit(item)
        results[value] = item.result

    async with anyio.create_task_group() as tg:
        for value in range(50):
            tg.start_soon(submit, value)
    assert results == {value: value * 10 for value in range(50)}
    assert sorted(v for group in log.groups for v in group) == list(range(50))
    assert len(log.groups) < 10, log.groups
    assert (commit.groups, commit.requests) == (len(log.groups), 50)


async def test_one_failed_request_fails_alone() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=10)
    outcomes: dict[int, object] = {}

    async def submit(value: int) -> None:
        try:
            await commit.submit(Item(value))
            outcomes[value] = "ok"
        except ValueError as exc:
            outcomes[value] = str(exc)

    async with anyio.create_task_group() as tg:
        for value in (1, -1, 2):
            tg.start_soon(submit, value)
    assert outcomes == {1: "ok", -1: "bad -1", 2: "ok"}


async def test_a_request_cancelled_while_queued_is_never_written() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=10)
    await log.gate.acquire()  # the committer will wait here, before it takes anything
    queued = anyio.CancelScope()

    async def second() -> None:
        with queued:
            await commit.submit(Item(2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit.submit, Item(1))
        await log.waiting.wait()  # item 1's caller is the committer, waiting at the gate
        tg.start_soon(second)
        await _until_pending(commit, 2)
        queued.cancel()
        await _until_pending(commit, 1)  # withdrawn
        log.gate.release()
    assert log.groups == [[1]]


async def _until_pending(commit: GroupCommit[Item], count: int) -> None:
    with anyio.fail_after(10):
        while commit.pending != count:
            await anyio.lowlevel.checkpoint()


async def test_a_committer_cancelled_before_it_took_the_group_leaves_it_to_the_next() -> None:
    # What the SQLite store used to "requeue": the committer is cancelled while it
    # waits (for the lock) before the group is taken. Nothing was taken, so the
    # next waiter commits every request still wanted, the cancelled one excepted.
    log = Log()
    commit = GroupCommit(log.write, max_pending=10)
    await log.gate.acquire()
    second_done = anyio.Event()

    async with anyio.create_task_group() as tg:
        committer = anyio.CancelScope()

        async def first() -> None:
            with committer:
                await commit.submit(Item(1))

        async def second() -> None:
            await commit.submit(Item(2))
            second_done.set()

        tg.start_soon(first)
        await log.waiting.wait()  # item 1's caller is the committer, waiting at the gate
        tg.start_soon(second)
        await _until_pending(commit, 2)
        committer.cancel()
        await _until_pending(commit, 1)
        log.gate.release()
        with anyio.fail_after(10):
            await second_done.wait()
    assert log.groups == [[2]]


async def test_a_taken_request_always_gets_an_outcome() -> None:
    async def forgetful(take: Take[Item]) -> None:
        take()  # a buggy write: takes the group and gives nobody an outcome

    commit = GroupCommit(forgetful, max_pending=4)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="without an outcome"):
        await commit.submit(Item(1))


async def test_the_pending_list_is_bounded_and_groups_by_max_group() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=4, max_group=3)
    most = 0

    async def submit(value: int) -> None:
        nonlocal most
        most = max(most, commit.pending)
        await commit.submit(Item(value))
        most = max(most, commit.pending)

    async with anyio.create_task_group() as tg:
        for value in range(40):
            tg.start_soon(submit, value)
    assert most <= 4
    assert all(len(group) <= 3 for group in log.groups)
    assert sorted(v for group in log.groups for v in group) == list(range(40))


async def test_put_nowait_returns_at_once_and_a_drainer_writes_the_queue() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=8)
    items = [Item(value) for value in range(5)]
    async with log.gate:  # hold the writes: every put returns anyway
        for item in items:
            await commit.wait_for_room()
            commit.put_nowait(item)
        assert commit.pending + sum(len(g) for g in log.groups) == 5
        assert not any(item.done for item in items)
        await log.waiting.wait()  # the drainer is at work, with no caller waiting
    await commit.flush()
    assert [item.result for item in items] == [0, 10, 20, 30, 40]
    assert sorted(v for group in log.groups for v in group) == list(range(5))
    # A waiting submit after the drainer finished works as before.
    waited = Item(7)
    await commit.submit(waited)
    assert waited.result == 70


async def test_put_nowait_without_room_is_refused_and_waiters_share_the_drainer() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=2)
    async with log.gate:
        commit.put_nowait(Item(1))
        await log.waiting.wait()  # the drainer waits at the gate, before it takes
        commit.put_nowait(Item(2))
        with pytest.raises(anyio.WouldBlock):
            commit.put_nowait(Item(3))
        waiter = Item(5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit.submit, waiter)  # waits for room, then for the drainer
            await anyio.wait_all_tasks_blocked()
            log.gate.release()
        await commit.flush()
        await log.gate.acquire()  # for the async with's release
    assert waiter.result == 50
    assert sorted(v for group in log.groups for v in group) == [1, 2, 5]


async def test_the_pending_bytes_are_bounded_but_one_large_request_always_gets_in() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=100, max_pending_bytes=10)
    async with log.gate:
        commit.put_nowait(Item(1, size=4))
        await log.waiting.wait()  # the drainer waits at the gate, before it takes
        commit.put_nowait(Item(2, size=6))  # 10 bytes queued: the limit
        with pytest.raises(anyio.WouldBlock):
            commit.put_nowait(Item(3, size=1))
        waiter = Item(5, size=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit.submit, waiter)  # waits for the bytes to leave
            await anyio.wait_all_tasks_blocked()
            assert commit.pending == 2
            log.gate.release()
        await commit.flush()
        await log.gate.acquire()  # for the async with's release
    assert waiter.result == 50
    # Alone, a request above the limit is let in (else it could never be written).
    large = Item(7, size=50)
    await commit.wait_for_room(large.size)
    commit.put_nowait(large)
    await commit.flush()
    assert large.result == 70
    assert sorted(v for group in log.groups for v in group) == [1, 2, 5, 7]
    assert commit._pending_bytes == 0


async def test_sqlite_pipelined_appends_wait_for_room_in_bytes(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "runs.db", max_pending_bytes=100) as store:
        await store.create_run("r", "flow")
        most = 0
        for i in range(60):
            await store.append("r", "progress", b"%039d" % i)  # 39 bytes
            most = max(most, store._appends._pending_bytes)
        assert most <= 100
        events = await store.read("r", 0, 100)
    assert [e.data for e in events] == [b"%039d" % i for i in range(60)]


class Overlapping:
    """A fake store that, as Redis, works on one write at a time, each taking a
    while: records each group, and which keys were being written at once (none
    may be in two writes)."""

    def __init__(self) -> None:
        self.server = anyio.Lock()
        self.groups: list[list[int]] = []
        self.writing: set[str | None] = set()
        self.most = 0  # writes at once, at most
        self.now = 0
        self.clash: list[str | None] = []

    async def write(self, take: Take[Item]) -> None:
        group = take()
        keys = {item.key for item in group}
        self.clash += [key for key in keys if key is not None and key in self.writing]
        self.writing |= keys
        self.now += 1
        self.most = max(self.most, self.now)
        self.groups.append([item.value for item in group])
        async with self.server:
            for _ in range(3):  # the store at work: the loop turns meanwhile
                await anyio.lowlevel.checkpoint()
        self.now -= 1
        self.writing -= keys
        for item in group:
            item.result = item.value
            item.done = True


async def test_with_two_writes_a_second_group_is_written_beside_the_first() -> None:
    store = Overlapping()
    commit = GroupCommit(store.write, max_pending=100, max_writes=2)

    async def submit(key: str) -> None:
        for round in range(5):
            await commit.submit(Item(round, key=key))

    async with anyio.create_task_group() as tg:
        for index in range(20):
            tg.start_soon(submit, f"k{index}")
    assert store.most == 2  # never more than max_writes, and both were used
    assert store.clash == []
    assert commit.requests == 100
    # Split: one write at a time would take all 20 tasks' requests in each group.
    assert len(store.groups) > 5, store.groups


async def test_with_two_writes_a_key_is_in_one_write_at_a_time_in_queue_order() -> None:
    store = Overlapping()
    commit = GroupCommit(store.write, max_pending=100, max_writes=2)
    queued = 0

    async def submit(key: str) -> None:
        nonlocal queued
        for _ in range(10):
            queued += 1  # submit queues at once (there is room): this is queue order
            await commit.submit(Item(queued, key=key))

    async with anyio.create_task_group() as tg:
        for index in range(12):
            tg.start_soon(submit, f"k{index % 3}")  # four tasks per key
    assert store.clash == []
    assert commit.requests == 120
    written = [value for group in store.groups for value in group]
    assert sorted(written) == list(range(1, 121))
    # Values were handed out in queue order; each key's are written in that order.
    keys = {value: None for value in written}  # (dict: ordered)
    assert list(keys) == written
    assert store.most == 2


async def test_with_two_writes_a_request_cancelled_while_queued_is_never_written() -> None:
    log = Log()
    commit = GroupCommit(log.write, max_pending=10, max_writes=2)
    await log.gate.acquire()  # both committers will wait here, before they take
    queued = anyio.CancelScope()

    async def third() -> None:
        with queued:
            await commit.submit(Item(3, key="c"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit.submit, Item(1, key="a"))
        tg.start_soon(commit.submit, Item(2, key="b"))
        await anyio.wait_all_tasks_blocked()  # two committers at the gate
        tg.start_soon(third)
        await _until_pending(commit, 3)
        queued.cancel()
        await _until_pending(commit, 2)  # withdrawn
        log.gate.release()
    assert sorted(v for group in log.groups for v in group) == [1, 2]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        GroupCommit(Log().write, max_pending=0)
    with pytest.raises(ValueError, match="max_group"):
        GroupCommit(Log().write, max_pending=1, max_group=0)
    with pytest.raises(ValueError, match="max_pending_bytes"):
        GroupCommit(Log().write, max_pending=1, max_pending_bytes=0)
    with pytest.raises(ValueError, match="max_writes"):
        GroupCommit(Log().write, max_pending=1, max_writes=0)


async def test_sqlite_appends_go_through_the_shared_group_commit(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "runs.db") as store:
        assert isinstance(store._appends, GroupCommit)
        await store.create_run("r", "flow")
        await store.append("r", "progress", b"1")
        await store._appends.flush()  # a pipelined append may return before its commit
        assert (store._appends.groups, store._appends.requests) == (1, 1)


def test_both_stores_batch_with_group_commit_and_only_through_the_base_hooks() -> None:
    for name in ("sqlite.py", "redis.py"):
        tree = ast.parse((STORE / name).read_text())
        attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert "_live" not in attrs, name  # the base class's private live records
        assert "_pending" not in attrs and "_group_done" not in attrs, name  # own loop
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert "GroupCommit" in names, name
