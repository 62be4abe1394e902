"""SQLiteStore: the conformance suite, plus restarts, group commit and the file itself."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

# Show values in the shared suite's failed asserts too (it lives outside tests/);
# this must run before the suite is imported.
from rpcstream.errors import RunExpired, RunFinished, RunNotFound
from rpcstream.store import sqlite as sqlite_module
from rpcstream.store import sqlite_file
from rpcstream.store.sqlite import SQLiteStore
from rpcstream.testing.store_suite import EventStoreConformance, FakeClock, StoreFactory


class TestSQLiteStore(EventStoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        counter = iter(range(1_000_000))

        def make(
            *,
            max_events: int | None = None,
            expire_after: float = 300.0,
            clock: Callable[[], float] = time.time,
        ) -> SQLiteStore:
            # A fresh file per call: every store the suite makes starts empty.
            path = tmp_path / f"store-{next(counter)}.sqlite"
            return SQLiteStore(path, max_events=max_events, expire_after=expire_after, clock=clock)

        return make


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs.sqlite"


@pytest.mark.anyio
async def test_a_new_store_on_the_same_file_reads_what_the_old_one_wrote(db: Path) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock) as first:
        await first.create_run("done", "flow", owner="alice")
        written = [await first.append("done", "progress", b'"%d"' % i) for i in range(3)]
        written.append(await first.append("done", "complete", b"null", terminal=True))
        await first.create_run("open", "flow")
        await first.append("open", "progress", b"1")
        done_info = await first.info("done")

    async with SQLiteStore(db, clock=clock) as second:
        assert await second.info("done") == done_info
        assert await second.read("done", 0) == written
        async with aclosing(second.follow("done")) as events:
            assert [event async for event in events] == written
        with pytest.raises(RunFinished):
            await second.append("done", "progress", b"1")
        # A run left open carries on from its last id.
        assert (await second.append("open", "progress", b"2")).id == 2
        with pytest.raises(RunNotFound):
            await second.info("never")


@pytest.mark.anyio
async def test_tombstones_survive_a_restart(db: Path) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock, expire_after=10) as first:
        await first.create_run("r", "flow")
        await first.append("r", "complete", b"null", terminal=True)
        clock.advance(10)
        assert await first.sweep() == 1
    async with SQLiteStore(db, clock=clock, expire_after=10) as second:
        with pytest.raises(RunExpired):
            await second.info("r")
        with pytest.raises(RunNotFound):
            await second.info("other")


@pytest.mark.anyio
async def test_sweep_deletes_the_events_and_keeps_a_small_tombstone_row(db: Path) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock, expire_after=10) as store:
        await store.create_run("r", "flow")
        for _ in range(5):
            await store.append("r", "progress", b"1")
        await store.append("r", "complete", b"null", terminal=True)
        clock.advance(10)
        with pytest.raises(RunExpired):
            await store.info("r")  # expired at once; the rows go at the next sweep
        assert _count(db, "events") == 6
        assert await store.sweep() == 1
    assert _count(db, "events") == 0
    assert _count(db, "runs") == 1


@pytest.mark.anyio
async def test_tombstones_are_capped_and_the_oldest_are_dropped_first(db: Path) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock, expire_after=10, max_tombstones=3) as store:
        for run_id in "abcde":
            await store.create_run(run_id, "flow")
            await store.append(run_id, "complete", b"null", terminal=True)
            clock.advance(1)
        clock.advance(10)
        assert await store.sweep() == 5
        for forgotten in "ab":
            with pytest.raises(RunNotFound):
                await store.info(forgotten)
        for remembered in "cde":
            with pytest.raises(RunExpired):
                await store.info(remembered)
    assert _count(db, "runs") == 3


@pytest.mark.anyio
async def test_sweep_works_through_many_runs_in_chunks(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_SWEEP_CHUNK", 7)
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock, expire_after=10) as store:
        for index in range(30):
            await store.create_run(f"run-{index}", "flow")
            await store.append(f"run-{index}", "complete", b"null", terminal=True)
        clock.advance(10)
        assert await store.sweep() == 30
        assert await store.sweep() == 0
    assert _count(db, "events") == 0


@pytest.mark.anyio
async def test_concurrent_appends_share_commits(db: Path) -> None:
    async with SQLiteStore(db) as store:
        for index in range(100):
            await store.create_run(f"run-{index}", "flow")
        commits_before = store._appends.groups

        async def append(index: int) -> None:
            for _ in range(5):
                await store.append(f"run-{index}", "progress", b"1")

        async with anyio.create_task_group() as tg:
            for index in range(100):
                tg.start_soon(append, index)
        await store._appends.flush()  # pipelined: some may still be queued
        commits = store._appends.groups - commits_before
        assert store._appends.requests == 500
        # 500 appends from 100 tasks: a handful of groups, far from one commit each.
        assert commits <= 50, commits
        for index in range(100):
            assert [e.id for e in await store.read(f"run-{index}", 0)] == [1, 2, 3, 4, 5]


@pytest.mark.anyio
async def test_one_bad_append_does_not_fail_its_group(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("good", "flow")
        await store.create_run("done", "flow")
        await store.append("done", "complete", b"null", terminal=True)
        outcomes: dict[str, object] = {}

        async def append(run_id: str) -> None:
            try:
                outcomes[run_id] = (await store.append(run_id, "progress", b"1")).id
            except (RunNotFound, RunFinished) as exc:
                outcomes[run_id] = type(exc)

        async with anyio.create_task_group() as tg:
            for run_id in ("good", "missing", "done"):
                tg.start_soon(append, run_id)
        assert outcomes == {"good": 1, "missing": RunNotFound, "done": RunFinished}


@pytest.mark.anyio
async def test_the_pending_list_is_bounded(db: Path) -> None:
    async with SQLiteStore(db, max_pending=4) as store:
        await store.create_run("r", "flow")
        most = 0

        async def append() -> None:
            nonlocal most
            most = max(most, store._appends.pending)
            await store.append("r", "progress", b"1")
            most = max(most, store._appends.pending)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(append)
        assert most <= 4
        assert (await store.info("r")).last_id == 40


@pytest.mark.anyio
async def test_an_append_cancelled_while_its_group_waits_for_the_lock_is_not_stored(
    db: Path,
) -> None:
    # Appends that wait for their commit: pipelined=False, or a terminal one (below).
    async with SQLiteStore(db, pipelined=False) as store:
        await store.create_run("r", "flow")
        first_scope = anyio.CancelScope()

        async def first() -> None:
            with first_scope:
                await store.append("r", "first", b"1")

        async def until_pending(count: int) -> None:
            with anyio.fail_after(10):
                while store._appends.pending != count:
                    await anyio.lowlevel.checkpoint()

        # The committer waits for the lock before taking its group.
        async with anyio.create_task_group() as tg, store._lock:
            tg.start_soon(first)
            await until_pending(1)
            tg.start_soon(store.append, "r", "second", b"2")
            await until_pending(2)
            first_scope.cancel()
            await until_pending(1)
        # The cancelled committer took nothing: the next appender wrote the rest.
        assert [(e.id, e.type) for e in await store.read("r", 0)] == [(1, "second")]


@pytest.mark.anyio
async def test_the_file_uses_wal_and_the_small_schema(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("r", "flow")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        assert {name for (name,) in rows} == {"runs", "events"}
    conn.close()


@pytest.mark.anyio
async def test_the_store_opens_itself_on_first_use(db: Path) -> None:
    store = SQLiteStore(db)
    try:
        await store.create_run("r", "flow")
        assert (await store.append("r", "progress", b"1")).id == 1
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_appends_pending_when_the_store_closes_fail_cleanly(db: Path) -> None:
    store = SQLiteStore(db)
    await store.open()
    await store.create_run("r", "flow")
    results: list[object] = []

    async def append() -> None:
        try:
            results.append((await store.append("r", "progress", b"1")).id)
        except anyio.ClosedResourceError:
            results.append("closed")

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(append)
        tg.start_soon(store.aclose)
    assert len(results) == 20
    ids = [r for r in results if isinstance(r, int)]
    assert sorted(ids) == list(range(1, len(ids) + 1))


def _count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(count)
    finally:
        conn.close()


# -- pipelined appends ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pipelined_appends_return_ids_before_the_commit_and_show_after_it(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("r", "flow")
        assert (await store.append("r", "token", b"1")).id == 1
        await store._appends.flush()
        seen: list[int] = []
        got_four = anyio.Event()

        async def follow() -> None:
            async with aclosing(store.follow("r", 1)) as events:
                async for event in events:
                    seen.append(event.id)
                    if event.id == 4:
                        got_four.set()

        async with anyio.create_task_group() as tg:
            async with store._lock:  # no commit (and no read) can happen while we hold it
                tg.start_soon(follow)
                ids = [(await store.append("r", "token", b"1")).id for _ in range(3)]
                assert ids == [2, 3, 4]  # given out at once, in order
                await anyio.wait_all_tasks_blocked()
                assert seen == []  # nothing is visible before its commit
                assert _count(db, "events") == 1
            await got_four.wait()
            await store.append("r", "complete", b"null", terminal=True)  # waits: committed
            assert _count(db, "events") == 5
        assert seen == [2, 3, 4, 5]


@pytest.mark.anyio
async def test_read_and_info_see_the_callers_own_pipelined_appends(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("r", "flow")
        for _ in range(50):
            await store.append("r", "token", b"1")
        assert (await store.info("r")).last_id == 50  # waited for the queue, not stale
        assert [e.id for e in await store.read("r", 45)] == [46, 47, 48, 49, 50]


@pytest.mark.anyio
async def test_a_failed_commit_loses_the_queued_appends_and_the_next_append_says_so(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("r", "flow")
        assert (await store.append("r", "token", b"ok")).id == 1
        await store._appends.flush()
        write = sqlite_file.GroupWriter.write

        def broken(*args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(sqlite_file.GroupWriter, "write", broken)
        assert (await store.append("r", "token", b"lost")).id == 2  # queued, then lost
        await store._appends.flush()
        monkeypatch.setattr(sqlite_file.GroupWriter, "write", write)
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            await store.append("r", "token", b"refused")  # told once...
        assert (await store.append("r", "token", b"again")).id == 2  # ...then on again
        assert [e.data for e in await store.read("r", 0)] == [b"ok", b"again"]


@pytest.mark.anyio
async def test_a_terminal_append_cancelled_while_queued_leaves_the_run_running(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_run("r", "flow")
        await store.append("r", "token", b"1")
        await store._appends.flush()

        async def finish() -> None:
            await store.append("r", "complete", b"null", terminal=True)

        async with anyio.create_task_group() as tg, store._lock:
            tg.start_soon(finish)
            with anyio.fail_after(10):
                while store._appends.pending != 1:  # queued; its committer waits for the lock
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert (await store.append("r", "token", b"2")).id == 2
        await store.append("r", "complete", b"null", terminal=True)
        assert [e.type for e in await store.read("r", 0)] == ["token", "token", "complete"]


# -- commits that trust the heads (schema version 2) ------------------------------------------


def _row(db: Path, run_id: str) -> tuple[str, int]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT status, last_id FROM runs WHERE run_id = ?", (run_id,))
        status, last_id = row.fetchone()
        return status, last_id
    finally:
        conn.close()


@pytest.mark.anyio
async def test_a_commit_of_pipelined_appends_writes_events_not_rows_until_the_run_ends(
    db: Path,
) -> None:
    clock = FakeClock()
    async with SQLiteStore(db, clock=clock, expire_after=10) as store:
        await store.create_run("r", "flow")
        for i in range(5):
            await store.append("r", "progress", b"%d" % i)
        await store._appends.flush()
        assert _row(db, "r") == ("running", 0)  # the row untouched: the events hold the id
        assert (await store.info("r")).last_id == 5
        await store.append("r", "complete", b"null", terminal=True)
        assert _row(db, "r") == ("complete", 6)  # the end brings the row up to date
        clock.advance(10)
        assert await store.sweep() == 1
    assert _count(db, "events") == 0
    assert _row(db, "r") == ("expired", 6)  # the tombstone keeps the last id


@pytest.mark.anyio
async def test_a_file_of_schema_version_1_is_read_and_appended_to(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(sqlite_file.SCHEMA)
    conn.execute("INSERT INTO runs VALUES ('old', 'flow', NULL, 'running', 0, NULL, NULL, 2, 1)")
    conn.executemany(
        "INSERT INTO events VALUES ('old', ?, 'progress', ?, 0)", [(1, b"1"), (2, b"2")]
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with SQLiteStore(db) as store:
        assert (await store.info("old")).last_id == 2
        assert (await store.append("old", "progress", b"3")).id == 3
        assert [e.data for e in await store.read("old", 0)] == [b"1", b"2", b"3"]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    conn.close()


@pytest.mark.anyio
async def test_another_writer_of_the_file_costs_only_its_run_the_appends_it_raced(
    db: Path,
) -> None:
    async with SQLiteStore(db) as store, SQLiteStore(db) as other:
        for run_id in ("x", "y"):
            await store.create_run(run_id, "flow")
            await store.append(run_id, "progress", b"1")
        await store._appends.flush()
        assert (await other.append("x", "progress", b"other")).id == 2  # store's head: 1
        await other._appends.flush()
        async with store._lock:  # both appends wait for one group
            assert (await store.append("x", "progress", b"raced")).id == 2
            assert (await store.append("y", "progress", b"2")).id == 2
        await store._appends.flush()
        assert [e.data for e in await store.read("y", 0)] == [b"1", b"2"]
        with pytest.raises(RuntimeError, match="event 2 was lost"):
            await store.append("x", "progress", b"refused")  # told once...
        assert (await store.append("x", "progress", b"3")).id == 3  # ...then on from the file
        assert [e.data for e in await store.read("x", 0)] == [b"1", b"other", b"3"]


# -- commit_delay ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_under_load_a_commit_waits_for_a_full_group_and_a_commit_after_a_quiet_spell_does_not(
    db: Path,
) -> None:
    # An hour's delay: a commit that waited it out would fail the test's deadline.
    async with SQLiteStore(db, commit_delay=3600) as store:
        await store.create_run("r", "flow")
        with anyio.fail_after(10):
            await store.append("r", "token", b"0")  # no commit before it: at once
            await store._appends.flush()
            groups = store._appends.groups
            # Right after a commit: the next one waits, until 64 appends are queued.
            for i in range(1, 64):
                await store.append("r", "token", b"%d" % i)
            assert store._appends.groups == groups  # waiting, 63 queued
            await store.append("r", "token", b"64")
            await store._appends.flush()
        assert store._appends.groups == groups + 1  # all 64 in one group
        assert [e.id for e in await store.read("r", 0)] == list(range(1, 66))


@pytest.mark.anyio
async def test_a_commit_someone_waits_for_does_not_wait_out_the_commit_delay(db: Path) -> None:
    async with SQLiteStore(db, commit_delay=3600) as store:  # an hour: see above
        for run_id in ("a", "b"):
            await store.create_run(run_id, "flow")
        with anyio.fail_after(10):
            await store.append("a", "token", b"1")
            await store._appends.flush()
            # A pipelined append: its commit waits (the last one just ended)...
            await store.append("a", "token", b"2")
            # ...until a read of the run's own writes needs it.
            assert [e.id for e in await store.read("a", 0)] == [1, 2]
            await store.append("b", "token", b"1")
            # A terminal append waits for its commit: that commit does not wait.
            await store.append("b", "complete", b"null", terminal=True)
            assert (await store.info("b")).status == "complete"
            assert store._lingering is None and store._awaited == 0


def test_commit_delay_must_not_be_negative(db: Path) -> None:
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="commit_delay must not be negative"):
            SQLiteStore(db, commit_delay=bad)
