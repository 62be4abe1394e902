"""A :class:`~rpcstream.store.sqlite.SQLiteStore`'s file, and how a group of appends
becomes one transaction in it: the schema, its statements, what an append carries to
its commit, and the commit itself (which runs in the store's worker thread, and so
touches nothing of the event loop's but the fields of its own group)."""

from __future__ import annotations

import sqlite3
from typing import Any

from .base import RUNNING, EventStore, StoredEvent
from .commit import Request
from .live import Wakeup

__all__ = [
    "EXPIRED",
    "LAST_ID",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SELECT_EVENTS",
    "GroupWriter",
    "Head",
    "Pending",
    "RunState",
    "read_state",
    "rollback",
]

# The status of a tombstone row; never shown in a RunInfo (the run raises RunExpired).
EXPIRED = "expired"
SCHEMA_VERSION = 2
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id   TEXT PRIMARY KEY,
    flow     TEXT NOT NULL,
    owner    TEXT,
    status   TEXT NOT NULL,
    created  REAL NOT NULL,
    finished REAL,
    expires  REAL,
    last_id  INTEGER NOT NULL,
    first_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    id     INTEGER NOT NULL,
    type   TEXT NOT NULL,
    data   BLOB NOT NULL,
    ts     REAL NOT NULL,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
-- Finished runs by expiry, for sweep; tombstones by age, to cap their number.
CREATE INDEX IF NOT EXISTS runs_due ON runs (expires)
    WHERE expires IS NOT NULL AND status != '{EXPIRED}';
CREATE INDEX IF NOT EXISTS runs_tombstones ON runs (expires) WHERE status = '{EXPIRED}';
"""
# A run's newest id. Version 2 of the schema: a commit of pipelined appends
# writes only their events, so while a run goes on its events hold its newest id,
# and its row's last_id may be older; the row is brought up to date when the run
# ends (so a tombstone, whose events are gone, keeps it) or is trimmed. A file of
# version 1 kept the row up to date always, so it reads the same.
LAST_ID = "max(last_id, ifnull((SELECT max(id) FROM events e WHERE e.run_id = runs.run_id), 0))"
SELECT_STATE = f"SELECT status, expires, {LAST_ID}, first_id FROM runs WHERE run_id = ?"
SELECT_EVENTS = (
    "SELECT id, type, data, ts FROM events WHERE run_id = ? AND id > ? ORDER BY id LIMIT ?"
)
INSERT_EVENT = "INSERT INTO events (run_id, id, type, data, ts) VALUES (?, ?, ?, ?, ?)"
# OR IGNORE: an id taken already (by another writer of the file) skips its row,
# and the commit, seeing fewer rows written than given, redoes the group checked.
INSERT_EVENT_UNCHECKED = "INSERT OR IGNORE" + INSERT_EVENT[len("INSERT") :]
END_RUN = (
    "UPDATE runs SET status = ?, finished = ?, expires = ?, last_id = ?"
    f" WHERE run_id = ? AND status = '{RUNNING}'"
)
UPDATE_RUN = (
    "UPDATE runs SET status = ?, finished = ?, expires = ?, last_id = ?, first_id = ?"
    " WHERE run_id = ?"
)


class Pending(Request):
    """One append waiting for its group's commit."""

    __slots__ = ("data", "event", "expected", "expires", "head", "run_id", "terminal", "type")

    def __init__(
        self,
        run_id: str,
        type: str,
        data: bytes,
        terminal: bool,
        head: Head | None = None,
        expected: StoredEvent | None = None,
    ) -> None:
        # Request's fields, set here rather than by super().__init__(): one call
        # less per append.
        self.size = len(data)
        self.key = None  # one write at a time (max_writes=1): no key needed
        self.taken = self.done = False
        self.error: BaseException | None = None
        self.run_id = run_id
        self.type = type
        self.data = data
        self.terminal = terminal
        self.event: StoredEvent | None = None
        self.expires: float | None = None
        self.head = head
        """The run's head when the append was pipelined (its id assigned at once)."""
        self.expected = expected
        """The event as its caller was given it: the commit must store exactly that."""


class Head:
    """What the store knows of a run it appends to: enough to assign ids at once.

    Only this store object should append to its file, so the head stays true.
    A commit trusts it (``committed``) and writes the events alone; if the file
    disagrees (an id taken already: another writer), it redoes the group
    checked, allocating ids from the file and checking they are the ones given.
    """

    __slots__ = ("committed", "drained", "expires", "inflight", "last_id", "status")

    def __init__(self, status: str, expires: float | None, last_id: int) -> None:
        self.status = status
        self.expires = expires
        self.last_id = last_id
        """The newest id given out."""
        self.committed = last_id
        """The newest id committed (set by the event loop between commits)."""
        self.inflight = 0
        """Pipelined appends not committed yet."""
        self.drained = Wakeup()
        """Notified whenever ``inflight`` falls back to 0 (its event is made only
        for a reader that waits, not for every batch of appends)."""


class RunState:
    """A run's row while a group transaction updates it."""

    __slots__ = ("changed", "expires", "finished", "first_id", "last_id", "status")

    def __init__(self, status: str, expires: float | None, last_id: int, first_id: int) -> None:
        self.status = status
        self.expires = expires
        self.last_id = last_id
        self.first_id = first_id
        self.finished: float | None = None
        self.changed = False


def read_state(conn: sqlite3.Connection, run_id: str, now: float) -> RunState:
    """The run's row, or the error that says why there is none."""
    row = conn.execute(SELECT_STATE, (run_id,)).fetchone()
    if row is None:
        raise EventStore._not_found(run_id)
    state = RunState(*row)
    if state.status == EXPIRED or (state.expires is not None and now >= state.expires):
        raise EventStore._expired(run_id)
    return state


class GroupWriter:
    """How a group of appends becomes one transaction: what of the store's settings
    the commit needs, and the commit itself, called in the store's worker thread."""

    __slots__ = ("expire_after", "max_events")

    def __init__(self, expire_after: float, max_events: int | None) -> None:
        self.expire_after = expire_after
        self.max_events = max_events

    def commit(self, conn: sqlite3.Connection, group: list[Pending], now: float) -> None:
        """Write a group of appends in one transaction, giving each its outcome."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.write(conn, group, now)
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        except BaseException as exc:
            # Nothing of the group was written; each append raises the database's error.
            for request in group:
                request.event = None
                request.expires = None
                request.error = exc

    def write(self, conn: sqlite3.Connection, group: list[Pending], now: float) -> None:
        """Write the group (inside its transaction): trusted if it can be, else checked.

        Trusted only when every append was pipelined (its event given out from a
        head) and nothing is trimmed (which needs each run's row)."""
        if self.max_events is None and all(r.expected is not None for r in group):
            if self._write_trusted(conn, group):
                return
            # Back to the start of the transaction, and every request as it was taken.
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for request in group:
                request.event = request.error = request.expires = None
        self._write_checked(conn, group, now)

    def _write_trusted(self, conn: sqlite3.Connection, group: list[Pending]) -> bool:
        """Write a group of pipelined appends from their heads: their events, and
        the row of a run that ends. One statement for the events, none per run
        (a ``SELECT`` and an ``UPDATE`` of each run's row cost about as much
        again: docs/benchmarks_runs.md, "Tenth session"). False, with the
        transaction half written, when the file disagrees with a head."""
        committed: dict[str, int] = {}  # per run: the newest id written so far
        rows: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        for request in group:
            head, event = request.head, request.expected
            assert head is not None and event is not None  # pipelined: see write()
            run_id = request.run_id
            last = committed.get(run_id)
            if last is None:
                last = head.committed
            if event.id != last + 1:
                request.error = _lost(run_id, event.id)
                continue
            committed[run_id] = event.id
            rows.append((run_id, event.id, event.type, event.data, event.timestamp))
            request.event = event
            if request.terminal:
                request.expires = event.timestamp + self.expire_after
                ends.append((event.type, event.timestamp, request.expires, event.id, run_id))
        if rows and conn.executemany(INSERT_EVENT_UNCHECKED, rows).rowcount != len(rows):
            return False
        # Each ending run's row, still running: else another writer ended it.
        return all(conn.execute(END_RUN, end).rowcount == 1 for end in ends)

    def _write_checked(self, conn: sqlite3.Connection, group: list[Pending], now: float) -> None:
        """Write a group as the file says: each run's row read, checked and updated."""
        states: dict[str, RunState | BaseException] = {}
        rows: list[tuple[Any, ...]] = []
        for request in group:
            run_id = request.run_id
            state = states.get(run_id)
            if state is None:
                try:
                    state = read_state(conn, run_id, now)
                except LookupError as exc:  # RunNotFound, RunExpired
                    state = exc
                states[run_id] = state
            if isinstance(state, BaseException):
                request.error = state
                continue
            if state.status != RUNNING:
                request.error = EventStore._finished(run_id)
                continue
            expected = request.expected
            if expected is not None and expected.id != state.last_id + 1:
                request.error = _lost(run_id, expected.id)
                continue
            state.last_id += 1
            state.changed = True
            # A pipelined append keeps the event (and time) its caller was given.
            if (event := expected) is None:
                event = StoredEvent(state.last_id, request.type, request.data, now)
            at = event.timestamp
            rows.append((run_id, event.id, event.type, event.data, at))
            request.event = event
            if request.terminal:
                state.status = request.type
                state.finished = at
                state.expires = request.expires = at + self.expire_after
        conn.executemany(INSERT_EVENT, rows)
        updates: list[tuple[Any, ...]] = []
        max_events = self.max_events
        for run_id, state in states.items():
            if isinstance(state, BaseException) or not state.changed:
                continue
            if max_events is not None and state.last_id - state.first_id + 1 > max_events:
                state.first_id = state.last_id - max_events + 1
                conn.execute(
                    "DELETE FROM events WHERE run_id = ? AND id < ?", (run_id, state.first_id)
                )
            updates.append(
                (state.status, state.finished, state.expires, state.last_id, state.first_id, run_id)
            )
        conn.executemany(UPDATE_RUN, updates)


def _lost(run_id: str, event_id: int) -> RuntimeError:
    # Appends queued before it were lost: it cannot keep the id it was given.
    return RuntimeError(f"run {run_id!r}: event {event_id} was lost with earlier appends")


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
