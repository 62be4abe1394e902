"""Run streams over a real WebSocket on 127.0.0.1, on asyncio and trio, on both stores."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.testing.store_suite import FakeClock

pytestmark = pytest.mark.anyio


class Token(msgspec.Struct):
    token: str
    index: int


class Complete(msgspec.Struct):
    total_tokens: int
    duration: float


class Gate:
    """Lets a test hold a flow at a point and see that it got there."""

    def __init__(self) -> None:
        self.reached = anyio.Event()
        self.open = anyio.Event()
        self.cancelled_seen = anyio.Event()
        self.notes: list[Any] = []


def make_runs(store: rpcstream.EventStore, gate: Gate) -> rpcstream.RunServer:
    runs = rpcstream.RunServer(store=store)

    @runs.flow("ml-inference", events={"token": Token, "complete": Complete})
    async def ml_inference(ctx: rpcstream.RunContext, prompt: str, model: str = "small") -> None:
        await ctx.client.send("status", {"status": "generating", "model": model})
        words = prompt.split()
        for i, word in enumerate(words):
            await ctx.client.send("token", {"token": word, "index": i})
        await ctx.client.send("complete", Complete(total_tokens=len(words), duration=1.5))

    @runs.flow("count")
    async def count(ctx: rpcstream.RunContext, n: int) -> dict[str, int]:
        for i in range(n):
            await ctx.client.send("n", i)
        return {"sent": n}

    @runs.flow("gated")
    async def gated(ctx: rpcstream.RunContext) -> str:
        gate.reached.set()
        await gate.open.wait()
        await ctx.client.send("after-gate", None)
        return "ok"

    @runs.flow("fails")
    async def fails(ctx: rpcstream.RunContext) -> None:
        await ctx.client.send("progress", 1)
        raise RuntimeError("model exploded")

    @runs.flow("forever")
    async def forever(ctx: rpcstream.RunContext) -> None:
        gate.reached.set()
        try:
            await anyio.sleep_forever()
        finally:
            gate.cancelled_seen.set()

    @runs.flow("interactive")
    async def interactive(ctx: rpcstream.RunContext) -> None:
        @ctx.client.on("stop")
        async def on_stop(data: Any) -> None:
            gate.notes.append(("stop", data))

        gate.reached.set()
        event = await ctx.client.receive()
        await ctx.client.send("echo", {"type": event.type, "data": event.data})
        await ctx.client.send("watched", ctx.client.has_subscribers())

    @runs.flow("validates", events={"token": Token})
    async def validates(ctx: rpcstream.RunContext) -> None:
        try:
            await ctx.client.send("token", {"token": 5})
        except rpcstream.EventValidationError as exc:
            await ctx.client.send("rejected", str(exc))

    return runs


@pytest.fixture(params=["memory", "sqlite"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[..., rpcstream.EventStore]:
    def make(**kw: Any) -> rpcstream.EventStore:
        if request.param == "memory":
            return rpcstream.MemoryStore(**kw)
        return rpcstream.SQLiteStore(tmp_path / "runs.db", **kw)

    return make


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def server(
    make_store: Callable[..., rpcstream.EventStore], gate: Gate
) -> AsyncIterator[rpcstream.Server]:
    async with rpcstream.serve(make_runs(make_store(), gate)) as srv:
        yield srv


async def collect(peer: rpcstream.RpcPeer, run_id: str, after: int = 0) -> list[dict[str, Any]]:
    return [e async for e in peer.stream("runs.subscribe", run_id, after=after)]


async def test_a_run_streams_started_then_its_events_then_one_terminal_event(
    server: rpcstream.Server,
) -> None:
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "ml-inference", {"prompt": "Explain quantum computing"})
        assert run["stream_id"] == run["run_id"]
        events = await collect(peer, run["run_id"])
    assert [e["id"] for e in events] == list(range(1, 7))
    assert [e["type"] for e in events] == ["started", "status"] + ["token"] * 3 + ["complete"]
    assert events[2]["data"] == {"token": "Explain", "index": 0}
    assert events[-1]["data"] == {"total_tokens": 3, "duration": 1.5}
    assert all(e["run_id"] == run["run_id"] and e["flow"] == "ml-inference" for e in events)
    assert events[0]["timestamp"].endswith("Z")


async def test_a_flow_that_returns_ends_complete_with_its_return_value(
    server: rpcstream.Server,
) -> None:
    async with rpcstream.connect(server.url, codec="json") as peer:
        run = await peer.call("runs.start", "count", {"n": 3})
        events = await collect(peer, run["run_id"])
        status = await peer.call("runs.status", run["run_id"])
    assert [(e["type"], e["data"]) for e in events] == [
        ("started", {"flow": "count"}),
        ("n", 0),
        ("n", 1),
        ("n", 2),
        ("complete", {"sent": 3}),
    ]
    assert status["status"] == "complete"
    assert status["last_id"] == 5
    assert status["finished"] is not None


async def test_a_flow_that_raises_ends_with_an_error_event(server: rpcstream.Server) -> None:
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "fails")
        events = await collect(peer, run["run_id"])
    assert [e["type"] for e in events] == ["started", "progress", "error"]
    assert events[-1]["data"] == {"message": "model exploded", "type": "RuntimeError"}


async def test_runs_cancel_cancels_the_flow_which_ends_cancelled(
    server: rpcstream.Server, gate: Gate
) -> None:
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "forever")
        await gate.reached.wait()
        assert (await peer.call("runs.status", run["run_id"]))["status"] == "running"
        await peer.call("runs.cancel", run["run_id"])
        events = await collect(peer, run["run_id"])
        assert gate.cancelled_seen.is_set()  # the flow saw the cancellation
        assert [e["type"] for e in events] == ["started", "cancelled"]
        assert (await peer.call("runs.status", run["run_id"]))["status"] == "cancelled"


async def test_bad_start_parameters_and_bad_event_data_get_clear_errors(
    server: rpcstream.Server,
) -> None:
    async with rpcstream.connect(server.url) as peer:
        with pytest.raises(
            rpcstream.InvalidParams, match=r"Expected `str`, got `int` - at `\$.prompt`"
        ):
            await peer.call("runs.start", "ml-inference", {"prompt": 3})
        with pytest.raises(rpcstream.InvalidParams, match="unknown field `colour`"):
            await peer.call("runs.start", "ml-inference", {"prompt": "x", "colour": 1})
        with pytest.raises(rpcstream.MethodNotFound, match="no flow 'nope'"):
            await peer.call("runs.start", "nope")
        run = await peer.call("runs.start", "validates")
        events = await collect(peer, run["run_id"])
    rejected = [e["data"] for e in events if e["type"] == "rejected"]
    assert len(rejected) == 1 and "Expected `str`, got `int`" in rejected[0]


async def test_clients_send_events_to_a_running_flow(server: rpcstream.Server, gate: Gate) -> None:
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "interactive")
        await gate.reached.wait()
        async with peer.stream("runs.subscribe", run["run_id"]) as events:
            assert (await anext(events))["type"] == "started"
            await peer.call("runs.send", run["run_id"], "stop", {"now": True})  # on() handler
            await peer.call("runs.send", run["run_id"], "prompt", "more please")  # receive()
            rest = [e async for e in events]
    assert gate.notes == [("stop", {"now": True})]
    assert [(e["type"], e["data"]) for e in rest] == [
        ("echo", {"type": "prompt", "data": "more please"}),
        ("watched", True),
        ("complete", None),
    ]


async def test_every_subscriber_gets_every_event_before_and_after_the_run(
    server: rpcstream.Server, gate: Gate
) -> None:
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "gated")
        await gate.reached.wait()  # subscribed before the flow's own first event
        async with anyio.create_task_group() as tg:
            results: list[list[dict[str, Any]]] = []

            async def subscriber() -> None:
                results.append(await collect(peer, run["run_id"]))

            for _ in range(5):
                tg.start_soon(subscriber)
            gate.open.set()
        late = await collect(peer, run["run_id"])  # after its end
        tail = await collect(peer, run["run_id"], after=2)
    assert len(results) == 5
    assert all([e["type"] for e in r] == ["started", "after-gate", "complete"] for r in results)
    assert late == results[0]
    assert [e["id"] for e in tail] == [3]


async def test_unknown_and_expired_runs_are_two_different_errors(gate: Gate) -> None:
    clock = FakeClock()
    store = rpcstream.MemoryStore(expire_after=60, clock=clock)
    async with (
        rpcstream.serve(make_runs(store, gate)) as server,
        rpcstream.connect(server.url) as peer,
    ):
        run = await peer.call("runs.start", "count", {"n": 1})
        await collect(peer, run["run_id"])
        clock.advance(61)
        with pytest.raises(rpcstream.RunExpired):
            await collect(peer, run["run_id"])
        with pytest.raises(rpcstream.RunExpired):
            await peer.call("runs.status", run["run_id"])
        with pytest.raises(rpcstream.RunNotFound):
            await collect(peer, "never-existed")
        with pytest.raises(rpcstream.RunNotFound):
            await peer.call("runs.status", "never-existed")


async def test_a_subscriber_behind_trimmed_events_is_told_the_first_available_id(
    make_store: Callable[..., rpcstream.EventStore], gate: Gate
) -> None:
    runs = make_runs(make_store(max_events=10), gate)
    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "count", {"n": 50})
        while (await peer.call("runs.status", run["run_id"]))["status"] == "running":
            await collect(peer, run["run_id"], after=40)  # waits for the end, from the live tail
        with pytest.raises(rpcstream.EventsTrimmed) as info:
            await collect(peer, run["run_id"], after=0)
        assert info.value.first_id == 43  # 52 events, the newest 10 kept
        resumed = await collect(peer, run["run_id"], after=info.value.first_id - 1)
    assert [e["id"] for e in resumed] == list(range(43, 53))


async def resume_through_drops(url: str, run_id: str, rng: random.Random) -> list[int]:
    """Subscribe, drop the connection at random points, resume from the last id seen."""
    seen: list[int] = []
    done = False
    drops = 0
    while not done:
        budget = rng.randint(1, 1500)
        async with rpcstream.connect(url) as peer:
            async with peer.stream(
                "runs.subscribe", run_id, after=seen[-1] if seen else 0
            ) as events:
                async for event in events:
                    seen.append(event["id"])
                    if event["type"] == "complete":
                        done = True
                        break
                    budget -= 1
                    if budget == 0:
                        break
            if not done:
                drops += 1
                await peer.aclose()  # drop the connection mid-stream
    assert drops >= 3
    return seen


@pytest.mark.parametrize("seed", [1])
async def test_resuming_after_random_drops_gives_every_event_exactly_once(
    server: rpcstream.Server, seed: int
) -> None:
    n = 10_000
    async with rpcstream.connect(server.url) as peer:
        run = await peer.call("runs.start", "count", {"n": n})
    rng = random.Random(seed)
    results: list[list[int]] = []
    async with anyio.create_task_group() as tg:

        async def one(r: random.Random) -> None:
            results.append(await resume_through_drops(server.url, run["run_id"], r))

        for i in range(2):  # two clients, each dropping at its own random points
            tg.start_soon(one, random.Random(rng.random() + i))
    for seen in results:
        assert seen == list(range(1, n + 3))  # started + n events + complete: no gap, no duplicate


async def test_a_thousand_subscribers_one_never_reading_hold_back_no_one(gate: Gate) -> None:
    n = 200
    runs = make_runs(rpcstream.MemoryStore(), gate)
    async with (
        rpcstream.serve(runs) as server,
        rpcstream.connect(server.url, window_items=8) as lazy_peer,
        rpcstream.connect(server.url) as peer,
    ):
        await peer.call("runs.start", "gated")  # keeps the server busy with a second run
        await gate.reached.wait()
        run2 = await peer.call("runs.start", "count", {"n": n})
        lazy = lazy_peer.stream("runs.subscribe", run2["run_id"])  # opened, never read
        counts: list[int] = []

        async def subscriber(p: rpcstream.RpcPeer) -> None:
            ids = [e["id"] async for e in p.stream("runs.subscribe", run2["run_id"])]
            assert ids == list(range(1, n + 3))
            counts.append(len(ids))

        async with contextlib.AsyncExitStack() as stack:
            # 100 subscriptions per connection, within max_concurrent_handlers.
            peers = [peer] + [
                await stack.enter_async_context(rpcstream.connect(server.url)) for _ in range(9)
            ]
            async with anyio.create_task_group() as tg:
                for i in range(999):
                    tg.start_soon(subscriber, peers[i % 10])
        status = await peer.call("runs.status", run2["run_id"])
        gate.open.set()
        assert lazy.peer is lazy_peer
    assert len(counts) == 999
    assert status["status"] == "complete"  # the flow's appends were never held back


async def test_runs_in_a_sqlite_file_stay_readable_after_a_restart(
    tmp_path: Path, gate: Gate
) -> None:
    path = tmp_path / "restart.db"
    async with (
        rpcstream.serve(make_runs(rpcstream.SQLiteStore(path), gate)) as server,
        rpcstream.connect(server.url) as peer,
    ):
        run = await peer.call("runs.start", "count", {"n": 20})
        before = await collect(peer, run["run_id"])
    async with (
        rpcstream.serve(make_runs(rpcstream.SQLiteStore(path), gate)) as server,
        rpcstream.connect(server.url) as peer,
    ):
        after = await collect(peer, run["run_id"])
    assert after == before and len(after) == 22


# -- every runs.* method, given bad arguments ----------------------------------------------

# (method, args, kwargs, the error expected). ``RUN`` stands for the id of a real run
# that has ended. Arguments of the wrong shape answer INVALID_PARAMS; well-formed
# arguments that name nothing answer the run error that says so.
RUN = "<run>"
BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], type[rpcstream.RemoteError]]] = [
    ("runs.start", (), {}, rpcstream.InvalidParams),
    ("runs.start", (5,), {}, rpcstream.InvalidParams),
    ("runs.start", ("count", [1]), {}, rpcstream.InvalidParams),
    ("runs.start", ("count", {}), {}, rpcstream.InvalidParams),
    ("runs.start", ("count", {"n": "three"}), {}, rpcstream.InvalidParams),
    ("runs.start", ("count", {"n": 1, "m": 2}), {}, rpcstream.InvalidParams),
    ("runs.start", ("count", {"n": 1}, "more"), {}, rpcstream.InvalidParams),
    ("runs.start", ("count",), {"param": {}}, rpcstream.InvalidParams),
    ("runs.start", ("no-such-flow",), {}, rpcstream.MethodNotFound),
    ("runs.subscribe", (), {}, rpcstream.InvalidParams),
    ("runs.subscribe", (5,), {}, rpcstream.InvalidParams),
    ("runs.subscribe", (None,), {}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": -1}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN, -5), {}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": "2"}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": 1.5}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": True}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": 2**63}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"after": 2**64 - 1}, rpcstream.InvalidParams),
    ("runs.subscribe", (RUN,), {"since": 1}, rpcstream.InvalidParams),
    ("runs.subscribe", ("",), {}, rpcstream.RunNotFound),
    ("runs.subscribe", ("x" * 1000,), {}, rpcstream.RunNotFound),
    ("runs.subscribe", ("a\x00b",), {}, rpcstream.RunNotFound),
    ("runs.subscribe", ("../../etc/passwd",), {}, rpcstream.RunNotFound),
    ("runs.subscribe", ("*",), {"after": 2**63 - 1}, rpcstream.RunNotFound),
    ("runs.status", (), {}, rpcstream.InvalidParams),
    ("runs.status", (5,), {}, rpcstream.InvalidParams),
    ("runs.status", (RUN, 1), {}, rpcstream.InvalidParams),
    ("runs.status", ("",), {}, rpcstream.RunNotFound),
    ("runs.status", ("a\x00b",), {}, rpcstream.RunNotFound),
    ("runs.cancel", (), {}, rpcstream.InvalidParams),
    ("runs.cancel", ([RUN],), {}, rpcstream.InvalidParams),
    ("runs.cancel", ("nope",), {}, rpcstream.RunNotFound),
    ("runs.send", (), {}, rpcstream.InvalidParams),
    ("runs.send", (RUN,), {}, rpcstream.InvalidParams),
    ("runs.send", (RUN, 5), {}, rpcstream.InvalidParams),
    ("runs.send", (RUN, "stop", None, "more"), {}, rpcstream.InvalidParams),
    ("runs.send", ("nope", "stop"), {}, rpcstream.RunNotFound),
    ("runs.send", (RUN, "stop"), {}, rpcstream.RunFinished),
]


async def _answer(
    peer: rpcstream.RpcPeer, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> type[BaseException] | None:
    try:
        with anyio.fail_after(10):
            if method == "runs.subscribe":
                async with peer.stream(method, *args, **kwargs) as events:
                    async for _ in events:
                        pass
            else:
                await peer.call(method, *args, **kwargs)
    except rpcstream.RemoteError as exc:
        return type(exc)
    return None


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_every_runs_method_answers_bad_arguments_with_a_typed_error(
    server: rpcstream.Server, codec: str
) -> None:
    async with rpcstream.connect(server.url, codec=codec) as peer:
        run_id = (await peer.call("runs.start", "count", {"n": 1}))["run_id"]
        await collect(peer, run_id)  # it has ended
        wrong = []
        for method, args, kwargs, expected in BAD_CALLS:
            args = tuple(run_id if a == RUN else a for a in args)
            got = await _answer(peer, method, args, kwargs)
            if got is not expected:
                name = "no error" if got is None else got.__name__
                wrong.append(f"{method}{args}, {kwargs}: {name}, not {expected.__name__}")
        # Still a working connection: no bad argument broke it.
        assert (await peer.call("runs.status", run_id))["status"] == "complete"
    assert wrong == []
