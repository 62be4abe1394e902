"""An :class:`~rpcstream.store.base.EventStore` in one SQLite file.

Theory of operation
-------------------
The store owns one ``sqlite3`` connection (WAL journal, ``synchronous=NORMAL``:
a commit survives a process crash, and an OS crash can lose only the last
commits). Every use of it runs in a worker thread through
:func:`anyio.to_thread.run_sync`, one at a time under an :class:`anyio.Lock`,
so the event loop never blocks on disk and the connection is never shared
between threads at once.

Appends use *group commit* (:mod:`rpcstream.store.commit`): concurrent
appends queue, and one committer takes the lock, takes every pending request
and writes them all in ONE transaction, then publishes the new events to live
followers and wakes the waiters. A pipelined append has its id from the run's
*head* (kept here, one per run appended to), and its commit trusts the head;
an append that waits has its id allocated inside the transaction; either way
ids are contiguous per run however many tasks append. What the file holds and
how a group is written into it (trusted or checked) is
:mod:`rpcstream.store.sqlite_file`. An append cancelled while queued is
withdrawn; once its group is taken the transaction runs to its end, shielded
(bounded by SQLite's busy timeout), so an append cancelled then may still be
stored.

Schema: ``runs`` holds one row per run, and keeps it as a tombstone (status
``'expired'``, events deleted) after retention; ``events`` is keyed by
``(run_id, id)``. A run past its ``expires`` raises ``RunExpired`` at once; its
rows are deleted by the next :meth:`SQLiteStore.sweep`, which also drops the
oldest tombstones beyond ``max_tombstones``. All state is in the file, so a new
store opened on it after a restart reads every run the old one wrote. Only this
process's appends wake this process's followers: do not append to one file from
several processes while others follow it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from itertools import starmap
from typing import TypeVar

import anyio

from ..errors import StoreUnavailable
from .base import RUNNING, EventStore, RunInfo, StoredEvent
from .commit import GroupCommit, Take, checkpoint
from .sqlite_file import (
    EXPIRED,
    LAST_ID,
    SCHEMA,
    SCHEMA_VERSION,
    SELECT_EVENTS,
    GroupWriter,
    Head,
    Pending,
    read_state,
    rollback,
)

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

# Runs expired per sweep transaction, so appends can get in between.
_SWEEP_CHUNK = 500
# Run heads kept for pipelined appends (those with appends in flight always stay).
_MAX_HEADS = 4096
# Appends queued that make a group worth committing without waiting (commit_delay).
_FULL_GROUP = 64


class SQLiteStore(EventStore):
    """Runs and events in the SQLite file at ``path``; survives restarts.

    ``max_tombstones`` caps the rows kept for expired runs (oldest dropped by
    :meth:`sweep`); ``max_pending`` and ``max_pending_bytes`` (their data) bound
    the appends queued for one group commit (more wait for room). Opens the file
    on first use if not entered.

    ``pipelined`` (the default): an append that does not end its run returns as
    soon as its id is assigned and it is queued, before its commit; a drainer
    task commits the queue in groups, and followers see the events once they
    are committed. ``read`` and ``info`` of a run wait for its queued appends
    first, and a terminal append waits for its commit (and so for every append
    before it). A crash of the process loses the queued appends (at most
    ``max_pending``, none of them seen by a follower). If a commit fails, those
    appends are lost, and the next append to the run raises the error once.
    ``pipelined=False``: every append returns only once committed.

    ``commit_delay`` (seconds): under load, a commit of pipelined appends waits
    until that long has passed since the previous one ended, or until 64 appends
    are queued, so that more appends share it; a commit with none before it in
    that time starts at once, and so does one that someone waits for (a terminal
    or unpipelined append, a read of the run's own writes). A commit's cost is
    mostly per transaction (a worker-thread round trip, and a B-tree page written
    for each run it touches), so with many runs appending a little at a time
    this is what keeps the cost per append down: 500 runs x 20 events/s cost the
    store 58-63 us of CPU per append with the default, 89-96 without
    (docs/benchmarks_runs.md, "Tenth session"). Followers see an event up to
    that much later. 0 commits at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events: int | None = None,
        expire_after: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_tombstones: int = 100_000,
        max_pending: int = 4096,
        max_pending_bytes: int = 16 * 2**20,
        pipelined: bool = True,
        commit_delay: float = 0.002,
    ) -> None:
        super().__init__(max_events=max_events, expire_after=expire_after, clock=clock)
        if max_tombstones < 0:
            raise ValueError(f"max_tombstones must not be negative, not {max_tombstones}")
        if not commit_delay >= 0:  # NaN too
            raise ValueError(f"commit_delay must not be negative, not {commit_delay}")
        self.path = os.fspath(path)
        self.max_tombstones = max_tombstones
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.pipelined = pipelined
        self.commit_delay = commit_delay
        # When the last commit ended (the event loop's clock), and what a commit
        # waiting out commit_delay waits on: set once _FULL_GROUP appends are queued.
        self._last_commit = -math.inf
        self._lingering: anyio.Event | None = None
        self._awaited = 0  # callers waiting for a commit now (_awaited_commit)
        self._heads: dict[str, Head] = {}
        # Why pipelined appends of a run were lost, raised by its next append (once).
        self._lost: dict[str, BaseException] = {}
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        # Its ``groups`` and ``requests`` count append transactions and the appends
        # they wrote, for tests and benchmarks.
        self._appends = GroupCommit(
            self._write_appends, max_pending=max_pending, max_pending_bytes=max_pending_bytes
        )

    # -- connection -------------------------------------------------------------

    async def _open(self) -> None:
        async with self._lock:
            if self._conn is None:
                self._conn = await anyio.to_thread.run_sync(self._connect)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we BEGIN and COMMIT ourselves.
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            # A file of version 1 is one of version 2 whose rows are all up to
            # date (see LAST_ID). Version 2 stops older code opening the file:
            # it would read a running run's last_id from its row alone.
            if version not in (0, 1, SCHEMA_VERSION):
                raise RuntimeError(
                    f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}"
                )
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _aclose(self) -> None:
        await self._appends.flush()  # pipelined appends already given out are written
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await anyio.to_thread.run_sync(conn.close)

    async def _check(self) -> None:
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT 1 FROM runs LIMIT 1").fetchall()

        try:
            await self._run(probe)
        except sqlite3.Error as exc:  # the file is gone, unreadable, locked past its timeout
            raise StoreUnavailable(f"cannot read {self.path}: {exc}") from exc

    async def _ensure_open(self) -> None:
        """Open on first use, but never reopen behind the back of :meth:`aclose`."""
        if self._conn is None:
            self._check_open()
            await self._open()

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in a worker thread with the connection, one at a time."""
        await self._ensure_open()
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise anyio.ClosedResourceError
            return await anyio.to_thread.run_sync(work, conn)

    # -- the primitives ---------------------------------------------------------

    async def _create_or_get_run(
        self, run_id: str, flow: str, owner: str | None, lease: bool
    ) -> tuple[RunInfo, bool]:
        # No leases: the file belongs to one process, whose runs a restart ends.
        now = self.clock()

        def create(conn: sqlite3.Connection) -> bool:
            # ON CONFLICT makes the check and the insert one statement, so the
            # answer holds even for another process writing the same file.
            cursor = conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, NULL, NULL, 0, 1)"
                " ON CONFLICT (run_id) DO NOTHING",
                (run_id, flow, owner, RUNNING, now),
            )
            return cursor.rowcount == 1

        if await self._run(create):
            return RunInfo(run_id, flow, owner, RUNNING, now, None, 0, 1, None), True
        return await self._info(run_id), False

    async def _info(self, run_id: str) -> RunInfo:
        await self._settled(run_id)
        now = self.clock()

        def info(conn: sqlite3.Connection) -> RunInfo:
            row = conn.execute(
                f"SELECT flow, owner, status, created, finished, {LAST_ID}, first_id, expires"
                " FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                raise self._not_found(run_id)
            if row[2] == EXPIRED or (row[7] is not None and now >= row[7]):
                raise self._expired(run_id)
            return RunInfo(run_id, *row)

        return await self._run(info)

    async def _read(self, run_id: str, after: int, limit: int) -> list[StoredEvent]:
        await self._settled(run_id)
        now = self.clock()

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            state = read_state(conn, run_id, now)
            self._check_trimmed(run_id, after, state.first_id, state.last_id)
            if after >= state.last_id:
                return []
            rows = conn.execute(SELECT_EVENTS, (run_id, after, limit))
            return list(starmap(StoredEvent, rows))

        return await self._run(read)

    async def _running_runs(self) -> list[str]:
        def running(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(f"SELECT run_id FROM runs WHERE status = '{RUNNING}'")
            return [row[0] for row in rows]

        return await self._run(running)

    async def _sweep(self) -> int:
        now = self.clock()
        removed = 0
        while True:
            count = await self._run(lambda conn: self._sweep_chunk(conn, now))
            removed += count
            if count < _SWEEP_CHUNK:
                break
        await self._run(self._drop_old_tombstones)
        return removed

    def _sweep_chunk(self, conn: sqlite3.Connection, now: float) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            due = conn.execute(
                "SELECT run_id FROM runs WHERE expires IS NOT NULL"
                f" AND status != '{EXPIRED}' AND expires <= ? LIMIT {_SWEEP_CHUNK}",
                (now,),
            ).fetchall()
            conn.executemany("DELETE FROM events WHERE run_id = ?", due)
            conn.executemany(f"UPDATE runs SET status = '{EXPIRED}' WHERE run_id = ?", due)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return len(due)

    def _drop_old_tombstones(self, conn: sqlite3.Connection) -> None:
        (count,) = conn.execute(f"SELECT count(*) FROM runs WHERE status = '{EXPIRED}'").fetchone()
        if count > self.max_tombstones:
            conn.execute(
                "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs"
                f" WHERE status = '{EXPIRED}' ORDER BY expires LIMIT ?)",
                (count - self.max_tombstones,),
            )

    # -- group commit -----------------------------------------------------------

    async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> StoredEvent:
        if self._conn is None:  # no coroutine call on the hot path
            await self._ensure_open()
        if not self.pipelined:
            request = Pending(run_id, type, data, terminal)
            with self._awaited_commit():
                await self._appends.submit(request)
            assert request.event is not None
            return request.event
        lost = self._lost.pop(run_id, None) if self._lost else None
        if lost is not None:
            raise lost
        head = self._heads.get(run_id)
        if head is None:
            head = await self._load_head(run_id)
        else:
            # Every append lets the event loop turn (followers, the drainer, and
            # cancellation get in), even when it need not wait for anything.
            await checkpoint()
        if not self._appends.has_room(len(data)):
            await self._appends.wait_for_room(len(data))
        # From here to the queueing, no await: ids are assigned in call order.
        now = self.clock()
        if head.expires is not None and now >= head.expires:
            raise self._expired(run_id)
        if head.status != RUNNING:
            raise self._finished(run_id)
        head.last_id += 1
        event = StoredEvent(head.last_id, type, data, now)
        request = Pending(run_id, type, data, terminal, head, event)
        head.inflight += 1
        if not terminal:
            self._appends.put_nowait(request)
            self._queued()
            return event
        head.status, head.expires = type, now + self.expire_after
        try:
            with self._awaited_commit():
                await self._appends.submit(request)
        except BaseException:
            if not request.taken:  # withdrawn: the run goes on, as if never asked
                head.status, head.expires = RUNNING, None
                head.last_id -= 1
                self._settle(request)
            raise
        return event

    async def _load_head(self, run_id: str) -> Head:
        now = self.clock()

        def load(conn: sqlite3.Connection) -> Head:
            state = read_state(conn, run_id, now)
            return Head(state.status, state.expires, state.last_id)

        loaded = await self._run(load)
        # Another append may have loaded it meanwhile (and assigned ids): keep that one.
        head = self._heads.setdefault(run_id, loaded)
        if len(self._heads) > _MAX_HEADS:
            for key in [k for k, h in self._heads.items() if h.inflight == 0][: _MAX_HEADS // 4]:
                if key != run_id:
                    del self._heads[key]
        return head

    def _settle(self, request: Pending) -> None:
        """A pipelined append has its outcome: count it off, and on failure forget the head."""
        head = request.head
        if head is None:
            return
        head.inflight -= 1
        if head.inflight == 0:
            head.drained.notify()
        if request.error is not None and self._heads.get(request.run_id) is head:
            # The file no longer matches the head: reload it; the run's next append
            # learns that what it queued was lost (unless the caller is told now).
            del self._heads[request.run_id]
            if not request.terminal:
                self._lost[request.run_id] = request.error
                while len(self._lost) > _MAX_HEADS:
                    del self._lost[next(iter(self._lost))]

    async def _settled(self, run_id: str) -> None:
        """Wait until the run's pipelined appends are committed (read your writes)."""
        head = self._heads.get(run_id)
        if head is not None and head.inflight:
            with self._awaited_commit():
                await head.drained.wake.wait()

    def _queued(self) -> None:
        """A pipelined append is queued: end a commit's wait once the group is
        worth committing."""
        lingering = self._lingering
        if lingering is not None and self._appends.pending >= _FULL_GROUP:
            lingering.set()

    @contextlib.contextmanager
    def _awaited_commit(self) -> Iterator[None]:
        """Someone waits for a commit (an append that waits, a read of its own
        writes): meanwhile no commit waits out ``commit_delay``."""
        self._awaited += 1
        if self._lingering is not None:
            self._lingering.set()
        try:
            yield
        finally:
            self._awaited -= 1

    async def _write_appends(self, take: Take[Pending]) -> None:
        """Write a group of appends in one transaction (the GroupCommit's ``write``)."""
        wait = self.commit_delay - (anyio.current_time() - self._last_commit)
        if wait > 0 and not self._awaited and self._appends.pending < _FULL_GROUP:
            # Under load: let more appends join this group (see commit_delay).
            # Cancelled here, the committer has taken nothing: the next one commits.
            self._lingering = anyio.Event()
            try:
                with anyio.move_on_after(wait):
                    await self._lingering.wait()
            finally:
                self._lingering = None
        async with self._lock:
            group = take()
            now = self.clock()
            # The group is ours alone now: see it to an outcome even if we are
            # cancelled. to_thread.run_sync waits for its thread anyway; the shield
            # also covers the wait for a worker thread before it starts.
            with anyio.CancelScope(shield=True):
                conn = self._conn
                if conn is None:
                    for request in group:
                        request.fail(anyio.ClosedResourceError())
                        self._settle(request)
                    return
                # Per commit, from the store's own settings (their one owner).
                writer = GroupWriter(self.expire_after, self.max_events)
                await anyio.to_thread.run_sync(writer.commit, conn, group, now)
            self._last_commit = anyio.current_time()
            self._finish_group(group)

    def _finish_group(self, group: list[Pending]) -> None:
        """Publish a committed group in id order and mark it done."""
        by_run: dict[str, list[StoredEvent]] = {}
        expires: dict[str, float] = {}
        for request in group:
            request.done = True
            if request.event is not None and request.head is not None:
                request.head.committed = request.event.id
            self._settle(request)
            if request.event is not None:
                by_run.setdefault(request.run_id, []).append(request.event)
                if request.expires is not None:
                    expires[request.run_id] = request.expires
        for run_id, events in by_run.items():
            self._publish(run_id, events, expires.get(run_id))
