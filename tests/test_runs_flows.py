"""Running flows: caller-chosen run ids, ends recorded through store outages, leases.

The memory and SQLite tests run on asyncio and trio; the Redis ones (a real
``redis-server``, see ``tests/redis_server.py``) on asyncio only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import pytest
from redis_server import RedisServer, redis_server

import rpcstream
from rpcstream.errors import StoreUnavailable
from rpcstream.runs.events import INTERRUPTED

__all__ = ["redis_server"]  # the fixture, for pytest

pytestmark = pytest.mark.anyio

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
ASYNCIO = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
    return TOKENS.get(request.bearer_token or "")


class Outage:
    """What a test needs to see of a store that fails on demand."""

    def __init__(self) -> None:
        self.failing = False
        self.end_failed = anyio.Event()  # a terminal append failed


class FlakyStore(rpcstream.MemoryStore):
    """A MemoryStore whose appends fail with StoreUnavailable while ``outage.failing``."""

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self.outage = outage

    async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> Any:
        if self.outage.failing:
            if terminal:
                self.outage.end_failed.set()
            raise StoreUnavailable("could not append to the store: it is down")
        return await super()._append(run_id, type, data, terminal)


class Flows:
    """The flows of these tests, and what they let a test see and hold."""

    def __init__(self) -> None:
        self.started = 0
        self.reached = anyio.Event()
        self.go = anyio.Event()
        self.stopped = anyio.Event()

    def server(self, store: rpcstream.EventStore, **kw: Any) -> rpcstream.RunServer:
        runs = rpcstream.RunServer(store=store, **kw)

        @runs.flow("hold")
        async def hold(ctx: rpcstream.RunContext, topic: str = "") -> str:
            self.started += 1
            self.reached.set()
            try:
                await self.go.wait()
                await ctx.client.send("after", topic)  # fails while the store is down
            finally:
                self.stopped.set()
            return "done"

        @runs.flow("other")
        async def other(ctx: rpcstream.RunContext) -> None:
            pass

        return runs


@pytest.fixture(params=["memory", "sqlite"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], rpcstream.EventStore]:
    def make() -> rpcstream.EventStore:
        if request.param == "memory":
            return rpcstream.MemoryStore()
        return rpcstream.SQLiteStore(tmp_path / "runs.db")

    return make


async def collect(peer: rpcstream.RpcPeer, run_id: str) -> list[dict[str, Any]]:
    with anyio.fail_after(20):
        return [e async for e in peer.stream("runs.subscribe", run_id)]


# -- caller-chosen run ids ---------------------------------------------------------------------


async def test_a_chosen_run_id_starts_the_run_once_and_then_returns_it(
    make_store: Callable[[], rpcstream.EventStore],
) -> None:
    flows = Flows()
    async with (
        rpcstream.serve(flows.server(make_store())) as server,
        rpcstream.connect(server.url) as peer,
    ):
        answers: list[dict[str, Any]] = []

        async def start() -> None:
            answers.append(await peer.call("runs.start", "hold", {}, run_id="chat-42"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(start)
        assert sorted(a["created"] for a in answers) == [False] * 9 + [True]
        assert {a["run_id"] for a in answers} == {"chat-42"}
        flows.go.set()
        events = await collect(peer, "chat-42")
        # After the end, the same call still answers with the run: resume, never restart.
        again = await peer.call("runs.start", "hold", {"topic": "ignored"}, run_id="chat-42")
    assert again == {"run_id": "chat-42", "stream_id": "chat-42", "created": False}
    assert [e["type"] for e in events] == ["started", "after", "complete"]
    assert flows.started == 1


async def test_a_run_id_another_principal_holds_answers_not_found(
    make_store: Callable[[], rpcstream.EventStore],
) -> None:
    flows = Flows()
    runs = flows.server(make_store())
    async with (
        rpcstream.serve(runs, authenticate=authenticate) as server,
        rpcstream.RunClient(server.url, token="alice-token") as alice,
        rpcstream.RunClient(server.url, token="bob-token") as bob,
    ):
        assert await alice.start("hold", run_id="alice-chat") == "alice-chat"
        assert await alice.start("hold", run_id="alice-chat") == "alice-chat"
        with pytest.raises(rpcstream.RunNotFound) as refused:
            await bob.start("hold", run_id="alice-chat")
        with pytest.raises(rpcstream.RunNotFound) as unknown:
            await bob.status("no-such-run")
        # Word for word what an unknown run gets, but for the id: nothing to probe.
        assert str(refused.value).replace("alice-chat", "X") == str(unknown.value).replace(
            "no-such-run", "X"
        )
        # The wrong flow for an id: the caller's mistake.
        with pytest.raises(rpcstream.InvalidParams, match="flow 'hold', not 'other'"):
            await alice.start("other", run_id="alice-chat")
        flows.go.set()
    assert flows.started == 1


@pytest.mark.parametrize(
    "bad", ["", "x" * 129, "has space", "slash/", "é", "new\nline", "{braces}"]
)
async def test_a_bad_run_id_answers_invalid_params(bad: str) -> None:
    flows = Flows()
    async with (
        rpcstream.serve(flows.server(rpcstream.MemoryStore())) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(rpcstream.InvalidParams, match="run_id"):
            await peer.call("runs.start", "hold", {}, run_id=bad)
        with pytest.raises(rpcstream.InvalidParams):
            await peer.call("runs.start", "hold", {}, run_id=5)
        ok = await peer.call("runs.start", "hold", {}, run_id="A-z_0.9:" + "x" * 120)
        assert ok["created"]
        flows.go.set()
    assert flows.started == 1


# -- ends that could not be written ------------------------------------------------------------


def _runs_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rpcstream.runs"]


async def test_an_end_the_store_refused_is_recorded_once_it_is_back_in_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rpcstream.runs")
    outage, flows = Outage(), Flows()
    runs = flows.server(FlakyStore(outage))
    runs.end_retry_delay = runs.end_retry_delay_max = 0.01
    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        run_id = (await peer.call("runs.start", "hold", {}))["run_id"]
        await flows.reached.wait()
        outage.failing = True
        flows.go.set()  # its next send fails: the flow fails, and so does recording that
        await outage.end_failed.wait()
        assert (await peer.call("runs.status", run_id))["status"] == "running"
        outage.failing = False
        events = await collect(peer, run_id)
    assert events[-1]["type"] == "error"
    assert events[-1]["data"]["type"] == "StoreUnavailable"
    lines = [r for r in _runs_lines(caplog) if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in lines] == [
        f"run {run_id} (flow hold) failed: [unavailable] could not append to the store: it is down"
    ]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_cancel_while_an_end_waits_for_the_store_records_it_at_once() -> None:
    outage, flows = Outage(), Flows()
    runs = flows.server(FlakyStore(outage))
    runs.end_retry_delay = 3600.0  # only runs.cancel can make it try again in this test
    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        run_id = (await peer.call("runs.start", "hold", {}))["run_id"]
        await flows.reached.wait()
        outage.failing = True
        flows.go.set()
        await outage.end_failed.wait()
        outage.failing = False
        answer = await peer.call("runs.cancel", run_id)
        assert answer == {"run_id": run_id, "status": "cancelling"}
        events = await collect(peer, run_id)
    assert [e["type"] for e in events] == ["started", "error"]


async def test_an_end_given_up_on_logs_one_error_and_cancel_records_it_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage, flows = Outage(), Flows()
    runs = flows.server(FlakyStore(outage))
    runs.end_retry_for = 0.0  # give up after the first failure
    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        run_id = (await peer.call("runs.start", "hold", {}))["run_id"]
        await flows.reached.wait()
        outage.failing = True
        flows.go.set()
        await outage.end_failed.wait()
        with anyio.fail_after(10):
            while runs.running:  # the flow's task ends once it gives up
                await anyio.wait_all_tasks_blocked()
        outage.failing = False
        assert (await peer.call("runs.status", run_id))["status"] == "running"
        answer = await peer.call("runs.cancel", run_id)
        events = await collect(peer, run_id)
    assert answer["status"] == "error"
    assert [e["type"] for e in events] == ["started", "error"]
    errors = [r for r in _runs_lines(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith(f"gave up recording the end (error) of run {run_id}")


@ASYNCIO
async def test_an_end_during_a_redis_outage_is_recorded_when_redis_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpcstream.runs")
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    redis.start()
    outage = Outage()

    class Watched(rpcstream.RedisStore):
        async def _append(self, run_id: str, type: str, data: bytes, terminal: bool) -> Any:
            try:
                return await super()._append(run_id, type, data, terminal)
            except StoreUnavailable:
                if terminal:
                    outage.end_failed.set()
                raise

    try:
        flows = Flows()
        runs = flows.server(Watched(redis.url, connect_timeout=1, command_timeout=2))
        runs.end_retry_delay = runs.end_retry_delay_max = 0.05
        async with rpcstream.serve(runs) as server:
            async with rpcstream.connect(server.url) as peer:
                run_id = (await peer.call("runs.start", "hold", {}))["run_id"]
            await flows.reached.wait()
            redis.kill()
            flows.go.set()
            await outage.end_failed.wait()
            redis.start()  # same port and directory: the AOF brings the run back
            async with rpcstream.connect(server.url) as peer:
                events = await collect(peer, run_id)
                status = await peer.call("runs.cancel", run_id)
    finally:
        redis.stop()
    assert [e["type"] for e in events] == ["started", "error"]
    assert events[-1]["data"]["type"] == "StoreUnavailable"
    assert status["status"] == "error"  # cancel after the end: the run as it ended
    lines = [r for r in _runs_lines(caplog) if r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert not [r for r in lines if r.exc_info]


# -- leases: a node that died -------------------------------------------------------------------


@ASYNCIO
async def test_a_run_whose_node_died_ends_interrupted_once_on_the_other_nodes(
    redis_server: RedisServer,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    ttl = 0.3

    def node() -> rpcstream.RunServer:
        return Flows().server(rpcstream.RedisStore(redis_server.url, prefix=prefix, lease_ttl=ttl))

    # Node A starts the run, then dies: it never renews the lease again.
    async with rpcstream.RedisStore(redis_server.url, prefix=prefix, lease_ttl=ttl) as a:
        await a.create_or_get_run("r", "hold", lease=True)
        await a.append("r", "started", b'{"flow":"hold"}')
    # Nodes B and C both watch for lapsed leases; a client follows through B.
    async with (
        rpcstream.serve(node()) as b,
        rpcstream.serve(node()),
        rpcstream.connect(b.url) as peer,
    ):
        events = await collect(peer, "r")
    assert [(e["id"], e["type"]) for e in events] == [(1, "started"), (2, "error")]
    assert events[-1]["data"]["type"] == INTERRUPTED
    async with rpcstream.RedisStore(redis_server.url, prefix=prefix) as check:
        assert [e.type for e in await check.read("r", 0)] == ["started", "error"]


@ASYNCIO
async def test_a_node_that_lost_its_lease_stops_the_flow(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    ttl = 0.3
    flows = Flows()
    store = rpcstream.RedisStore(redis_server.url, prefix=prefix, lease_ttl=ttl)
    renew = store.renew_leases
    stalled = anyio.Event()

    async def stall(run_ids: Any) -> set[str]:
        if stalled.is_set():
            return await renew(run_ids)
        return set()  # a node too busy to renew: its lease lapses

    store.renew_leases = stall  # type: ignore[method-assign]
    async with (
        rpcstream.serve(flows.server(store)) as a,
        rpcstream.serve(
            Flows().server(rpcstream.RedisStore(redis_server.url, prefix=prefix, lease_ttl=ttl))
        ),
        rpcstream.connect(a.url) as peer,
    ):
        run_id = (await peer.call("runs.start", "hold", {}))["run_id"]
        events = await collect(peer, run_id)  # node B ended it
        stalled.set()  # A renews again and learns its run ended elsewhere
        with anyio.fail_after(10):
            await flows.stopped.wait()
        assert (await peer.call("runs.status", run_id))["status"] == "error"
    assert [e["type"] for e in events] == ["started", "error"]
    assert events[-1]["data"]["type"] == INTERRUPTED


async def test_a_flow_parameters_constraints_are_enforced_at_start() -> None:

    runs = rpcstream.RunServer()

    @runs.flow("count")
    async def count(ctx: rpcstream.RunContext, n: Annotated[int, msgspec.Meta(gt=0)]) -> int:
        return n

    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        with pytest.raises(rpcstream.InvalidParams, match="Expected `int` >= 1"):
            await peer.call("runs.start", "count", {"n": 0})
        started = await peer.call("runs.start", "count", {"n": 3})
        assert started["created"] is True
