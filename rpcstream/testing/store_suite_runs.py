"""The store conformance suite, part 3: caller-chosen run ids and leases.

Also home of what every part shares: :class:`FakeClock`, :class:`StoreFactory`
and :data:`EXPIRE_AFTER` (re-exported by :mod:`rpcstream.testing.store_suite`,
where the suite is documented).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Protocol

import anyio
import msgspec
import pytest
from anyio.abc import ObjectSendStream

from ..errors import RunExpired
from ..store.base import RUNNING, EventStore, StoredEvent

__all__ = [
    "EXPIRE_AFTER",
    "CreateOrGet",
    "FakeClock",
    "Leases",
    "NoLeases",
    "StoreFactory",
]

EXPIRE_AFTER = 60.0
"""The ``expire_after`` the suite's default ``store`` fixture uses."""


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


_LAPSED = msgspec.json.encode({"message": "its node stopped", "type": "Interrupted"})


class StoreFactory(Protocol):
    """Makes a new, empty store with the base class's keyword arguments."""

    def __call__(
        self,
        *,
        max_events: int | None = ...,
        expire_after: float = ...,
        clock: Callable[[], float] = ...,
    ) -> EventStore: ...


class FakeClock:
    """A clock that moves only when told, so expiry is tested without sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        """Return the current fake time in unix seconds."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


def _need_leases(store: EventStore) -> float:
    assert store.lease_ttl is not None, "LeasedStoreConformance is for stores with leases"
    return store.lease_ttl


class CreateOrGet:
    """The contract, part 3: atomic create-or-get."""

    # -- create or get ----------------------------------------------------------------

    async def test_create_or_get_creates_once_then_returns_the_existing_run(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        info, created = await store.create_or_get_run("chat-1", "chat", owner="alice")
        assert created
        assert (info.run_id, info.flow, info.owner, info.status) == (
            "chat-1",
            "chat",
            "alice",
            RUNNING,
        )
        await store.append("chat-1", "progress", b"1")
        clock.advance(1)
        again, created = await store.create_or_get_run("chat-1", "other", owner="bob")
        assert not created
        # The run that holds the id, as it is: the caller judges flow and owner.
        assert (again.flow, again.owner, again.last_id) == ("chat", "alice", 1)
        assert again.created == info.created
        with pytest.raises(ValueError):
            await store.create_run("chat-1", "chat")

    async def test_concurrent_create_or_get_creates_exactly_one_run(
        self, store: EventStore
    ) -> None:
        outcomes: list[bool] = []

        async def create() -> None:
            _, created = await store.create_or_get_run("r", "flow")
            outcomes.append(created)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(create)
        assert sorted(outcomes) == [False] * 19 + [True]

    async def test_create_or_get_of_an_expired_run_raises_run_expired(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        await store.create_run("r", "flow")
        await store.append("r", "complete", b"null", terminal=True)
        clock.advance(EXPIRE_AFTER)
        with pytest.raises(RunExpired):
            await store.create_or_get_run("r", "flow")  # expired, not swept yet
        await store.sweep()
        with pytest.raises(RunExpired):
            await store.create_or_get_run("r", "flow")  # its tombstone


class NoLeases:
    """The contract, part 4, for a store without leases (one process: its runs end
    with it, and are ended at its next start)."""

    async def test_a_store_without_leases_never_ends_a_run_on_its_own(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        assert store.lease_ttl is None, "use LeasedStoreConformance for a store with leases"
        await store.create_or_get_run("r", "flow", lease=True)
        clock.advance(EXPIRE_AFTER * 1000)
        assert await store.renew_leases(["r"]) == set()
        assert await store.end_lapsed_runs(_LAPSED) == []
        assert (await store.info("r")).status == RUNNING


class Leases:
    """The contract, part 4, for a store with leases (several nodes): a running run
    carries a lease its node renews; any node ends a lapsed one, exactly once."""

    async def test_a_lapsed_lease_ends_the_run_with_one_error_event(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        ttl = _need_leases(store)
        await store.create_or_get_run("r", "flow", lease=True)
        await store.append("r", "progress", b"1")
        clock.advance(ttl / 2)
        assert await store.end_lapsed_runs(_LAPSED) == []  # not yet
        clock.advance(ttl)
        async with aclosing(store.follow("r", 1)) as events:
            assert await store.end_lapsed_runs(_LAPSED) == ["r"]
            ending = [event async for event in events]
        assert [(e.id, e.type, e.data) for e in ending] == [(2, "error", _LAPSED)]
        assert (await store.info("r")).status == "error"
        assert await store.end_lapsed_runs(_LAPSED) == []
        assert await store.renew_leases(["r"]) == {"r"}  # its old node learns it ended

    async def test_a_renewed_lease_keeps_the_run_running(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        ttl = _need_leases(store)
        await store.create_or_get_run("r", "flow", lease=True)
        await store.create_or_get_run("free", "flow")  # no lease: never lapses
        for _ in range(4):
            clock.advance(ttl * 0.75)
            assert await store.renew_leases(["r"]) == set()
            assert await store.end_lapsed_runs(_LAPSED) == []
        assert (await store.info("r")).status == RUNNING
        assert (await store.info("free")).status == RUNNING

    async def test_racing_enders_append_exactly_one_terminal_event(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        ttl = _need_leases(store)
        for index in range(5):
            await store.create_or_get_run(f"r{index}", "flow", lease=True)
        clock.advance(ttl * 2)
        ended: list[str] = []

        async def end() -> None:
            ended.extend(await store.end_lapsed_runs(_LAPSED))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(end)
        assert sorted(ended) == [f"r{index}" for index in range(5)]
        for index in range(5):
            assert [e.type for e in await store.read(f"r{index}", 0)] == ["error"]

    async def test_a_run_that_ended_normally_loses_its_lease(
        self, store: EventStore, clock: FakeClock
    ) -> None:
        ttl = _need_leases(store)
        await store.create_or_get_run("r", "flow", lease=True)
        await store.append("r", "complete", b"null", terminal=True)
        clock.advance(ttl + 1)
        assert await store.end_lapsed_runs(_LAPSED) == []
        assert [e.type for e in await store.read("r", 0)] == ["complete"]
