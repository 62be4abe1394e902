"""The fan-out hub: one follow per run, bytes shared per codec, bounded, exact; asyncio and trio."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.errors import InvalidParams
from rpcstream.messages import JSON, MSGPACK
from rpcstream.runs.events import begin_run, encode_data
from rpcstream.runs.fanout import BATCH_BYTES, Fanout
from rpcstream.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def fanout(hub_size: int = 256) -> AsyncIterator[tuple[MemoryStore, Fanout]]:
    async with MemoryStore() as store, anyio.create_task_group() as tg:
        fan = Fanout(store, hub_size)
        fan.tg = tg
        yield store, fan
        tg.cancel_scope.cancel()


async def subscribe(
    fan: Fanout, store: MemoryStore, run_id: str, after: int = 0, **kw: Any
) -> AsyncGenerator[Any, None]:
    info = await store.info(run_id)
    codec = kw.pop("codec", MSGPACK)
    return fan.subscribe(info, after, codec, kw.pop("batch", False))


def ids_of(raws: list[Any], codec: Any = MSGPACK) -> list[int]:
    out: list[int] = []
    for raw in raws:
        value = codec.decode(raw)
        out.extend(e["id"] for e in (value if isinstance(value, list) else [value]))
    return out


async def test_subscribers_on_one_codec_share_the_same_bytes_and_each_codec_encodes_once() -> None:
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        subs = [await subscribe(fan, store, "r", 1, codec=c) for c in (MSGPACK, MSGPACK, JSON)]
        await store.append("r", "tick", encode_data({"n": 1}))
        first = [await anext(s) for s in subs]
        assert len(fan.hubs) == 1  # one follow of the store for all three
        assert first[0] is first[1]  # the very same bytes object, encoded once
        assert first[2] is not first[0]
        assert MSGPACK.decode(first[0])["data"] == {"n": 1}
        assert JSON.decode(first[2])["data"] == {"n": 1}
        (hub,) = fan.hubs.values()
        assert set(hub.entries[-1].encoded) == {"msgpack", "json"}
        assert isinstance(first[0], msgspec.Raw)
        for s in subs:
            await s.aclose()
        assert fan.hubs == {} and fan.subscribers("r") == 0


async def test_the_events_a_hub_keeps_are_not_tracked_by_the_garbage_collector() -> None:
    # A full collection visits every tracked object and stops the loop meanwhile:
    # what a hub keeps per event must not add to them (see _Entry).
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        sub = await subscribe(fan, store, "r", 1, batch=True)
        for i in range(3):
            await store.append("r", "tick", encode_data({"n": i}))
        assert len(await anext(sub)) >= 1
        (hub,) = fan.hubs.values()
        assert len(hub.entries) == 3 and all(e.encoded or e.alone for e in hub.entries)
        for entry in hub.entries:
            tracked = [gc.is_tracked(x) for x in (entry, entry.event, entry.encoded, entry.alone)]
            assert tracked == [False] * 4, tracked
        await sub.aclose()


async def test_a_lagging_subscriber_catches_up_from_the_store_while_the_hub_stays_bounded() -> None:
    async with fanout(hub_size=4) as (store, fan):
        await begin_run(store, "r", "f")
        fast = await subscribe(fan, store, "r", 1)
        slow = await subscribe(fan, store, "r", 1)
        await store.append("r", "tick", encode_data(0))
        got_fast: list[Any] = [await anext(fast)]
        assert ids_of([await anext(slow)]) == [2]  # both live on the hub now
        for i in range(1, 50):
            await store.append("r", "tick", encode_data(i))
            got_fast.append(await anext(fast))  # the fast one keeps up; slow reads nothing
        (hub,) = fan.hubs.values()
        assert len(hub.entries) == 4  # the hub never holds more for the laggard
        got_slow = [await anext(slow) for _ in range(3, 52)]  # caught up from the store
        await store.append("r", "complete", encode_data(None), terminal=True)
        got_fast += [item async for item in fast]
        got_slow += [item async for item in slow]  # live on the hub again
        assert ids_of(got_fast) == list(range(2, 53))
        assert ids_of(got_slow) == list(range(3, 53))  # exact: no gap, no duplicate
        # The laggard's first events came from the store (its own encoding), its
        # last ones from the hub (the shared bytes).
        assert got_slow[0] is not got_fast[1]
        assert got_slow[-1] is got_fast[-1]


async def test_a_subscriber_behind_the_hub_gets_batches_within_the_byte_budget() -> None:
    async with fanout(hub_size=8) as (store, fan):
        await begin_run(store, "r", "f")
        for i in range(3000):
            await store.append("r", "tick", encode_data({"i": i, "pad": "x" * 50}))
        live = await subscribe(fan, store, "r", 3001)  # starts the hub at the tail
        late = await subscribe(fan, store, "r", 0, batch=True)
        await store.append("r", "complete", encode_data(None), terminal=True)
        items = [item async for item in late]
        assert ids_of(items) == list(range(1, 3003))
        assert 3 <= len(items) < 100  # many events per item
        assert all(memoryview(item).nbytes <= BATCH_BYTES + 200 for item in items)
        assert ids_of([item async for item in live]) == [3002]


async def test_a_finished_run_is_read_from_the_store_without_a_hub() -> None:
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        await store.append("r", "complete", encode_data(1), terminal=True)
        sub = await subscribe(fan, store, "r", 0, batch=True)
        items = [item async for item in sub]
        assert fan.hubs == {}
        assert ids_of(items) == [1, 2] and len(items) == 1
        assert [item async for item in await subscribe(fan, store, "r", 2)] == []


async def test_subscribers_go_on_alone_when_the_hubs_follow_fails() -> None:
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        sub = await subscribe(fan, store, "r", 1)
        got: list[Any] = []
        done = anyio.Event()

        async def consume() -> None:
            got.extend([item async for item in sub])
            done.set()

        assert fan.tg is not None
        fan.tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        (hub,) = fan.hubs.values()
        hub.scope.cancel()  # as if its follow had died
        await anyio.wait_all_tasks_blocked()
        assert hub.failed
        await store.append("r", "complete", encode_data(None), terminal=True)
        with anyio.fail_after(5):
            await done.wait()
        assert ids_of(got) == [2]


async def test_the_hub_sends_parked_subscriptions_each_event_until_their_stream_is_full() -> None:
    # Two subscriptions whose streams take 3 items without waiting: the hub queues
    # events 2-4 into both (the same bytes), their tasks asleep; event 5 does not
    # fit, so each wakes and yields it itself, and the rest, in order, to the end.
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        info = await store.info("r")
        sent: list[list[Any]] = [[], []]
        got: list[list[Any]] = [[], []]
        done = [anyio.Event(), anyio.Event()]

        def sender(into: list[Any]) -> Callable[[msgspec.Raw], bool]:
            def send(item: msgspec.Raw) -> bool:
                if len(into) == 3:
                    return False
                into.append(item)
                return True

            return send

        async def consume(i: int) -> None:
            sub = fan.subscribe(info, 1, MSGPACK, True, sender(sent[i]))
            got[i].extend([item async for item in sub])
            done[i].set()

        assert fan.tg is not None
        for i in range(2):
            fan.tg.start_soon(consume, i)
        await anyio.wait_all_tasks_blocked()
        (hub,) = fan.hubs.values()
        assert len(hub.parked) == 2
        for i in range(3):
            await store.append("r", "tick", encode_data(i))
            await anyio.wait_all_tasks_blocked()
        assert len(hub.parked) == 2 and got == [[], []]  # no task woke: the hub sent them
        await store.append("r", "tick", encode_data(3))
        await store.append("r", "complete", encode_data(None), terminal=True)
        with anyio.fail_after(5):
            for event in done:
                await event.wait()
        assert sent[0][0] is sent[1][0]  # encoded once for both
        for i in range(2):
            assert ids_of(sent[i]) == [2, 3, 4]
            assert all(isinstance(MSGPACK.decode(item), list) for item in sent[i])
            assert ids_of([raw for item in got[i] for raw in item]) == [5, 6]  # lists of Raw
        assert fan.hubs == {} and hub.parked == {}


async def test_a_parked_subscription_cancelled_leaves_nothing_in_the_hub() -> None:
    async with fanout() as (store, fan):
        await begin_run(store, "r", "f")
        info = await store.info("r")
        scope = anyio.CancelScope()

        async def consume() -> None:
            with scope:
                async for _ in fan.subscribe(info, 1, MSGPACK, True, lambda item: True):
                    pass

        assert fan.tg is not None
        fan.tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        (hub,) = fan.hubs.values()
        assert len(hub.parked) == 1
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert hub.parked == {} and fan.hubs == {} and fan.subscribers("r") == 0


# -- over the wire --------------------------------------------------------------------


def make_runs() -> rpcstream.RunServer:
    runs = rpcstream.RunServer()

    @runs.flow("ticks")
    async def ticks(ctx: rpcstream.RunContext, n: int) -> None:
        for i in range(n):
            await ctx.client.send("tick", i)

    return runs


async def test_batch_items_are_lists_and_old_style_items_single_events() -> None:
    runs = make_runs()
    async with rpcstream.serve(runs) as server, rpcstream.connect(server.url) as peer:
        run_id = await runs.start("ticks", {"n": 500})
        async with peer.stream("runs.subscribe", run_id) as events:
            singles = [event async for event in events]
        async with peer.stream("runs.subscribe", run_id, batch=True) as batches:
            lists = [item async for item in batches]
    assert all(isinstance(e, dict) for e in singles)
    assert [e["id"] for e in singles] == list(range(1, 503))
    assert all(isinstance(item, list) for item in lists)
    assert [e["id"] for item in lists for e in item] == list(range(1, 503))
    assert len(lists) < len(singles)


async def test_batches_cut_short_by_a_reconnect_resume_exactly() -> None:
    runs = make_runs()
    async with rpcstream.serve(runs) as server:
        run_id = await runs.start("ticks", {"n": 3000})
        async with rpcstream.RunClient(server.url, backoff_base=0.01) as client:
            async for _ in client.subscribe(run_id):  # the run is finished after this
                pass
            ids = []
            async for event in client.subscribe(run_id):
                ids.append(event["id"])
                if event["id"] in (10, 1500):  # in the middle of a batch of hundreds
                    for peer in list(server.peers):
                        await peer.aclose(1012, "cut")
            assert client.connections >= 2
    assert ids == list(range(1, 3003))


async def test_run_client_falls_back_to_single_events_on_a_server_without_batches() -> None:
    router = rpcstream.Router()

    async def subscribe(run_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        for i in range(after + 1, 4):
            yield {"id": i, "type": "complete" if i == 3 else "tick", "data": None}

    router.add(subscribe, "runs.subscribe")
    async with (
        rpcstream.serve(router) as server,
        rpcstream.RunClient(server.url) as client,
    ):
        assert [e["id"] async for e in client.subscribe("r")] == [1, 2, 3]
        with pytest.raises(InvalidParams):  # other parameter errors still raise
            async for _ in client.subscribe("r", after="x"):  # type: ignore[arg-type]
                pass


def test_timestamps_are_formatted_exactly_as_datetime_does() -> None:
    import datetime
    import random

    from rpcstream.runs.fanout import iso_time

    rng = random.Random(15)
    cases = [0.0, -0.0005, 1.0, 1796307376.9999995, 1796307376.0005, 1796307376.9995]
    cases += [rng.uniform(-1e9, 4e9) for _ in range(5000)]
    cases += [1796307376 + rng.randrange(1000) / 1000 + 0.0000005 for _ in range(1000)]
    for ts in cases:
        expected = datetime.datetime.fromtimestamp(ts, datetime.UTC)
        assert iso_time(ts) == expected.isoformat(timespec="milliseconds")[:-6] + "Z", ts


async def test_a_live_subscriber_that_stops_reading_misses_nothing_and_holds_back_no_one() -> None:
    # Both subscribers are live (parked in the hub) when the run starts ticking;
    # the slow one's window (8 items) fills, so the hub stops feeding it and its
    # own task waits for credit, while the other gets every event meanwhile.
    n = 100
    gate = anyio.Event()
    runs = rpcstream.RunServer()

    @runs.flow("gated")
    async def gated(ctx: rpcstream.RunContext) -> None:
        await gate.wait()
        for i in range(n):
            await ctx.client.send("tick", i)

    with anyio.fail_after(20):
        async with (
            rpcstream.serve(runs) as server,
            rpcstream.connect(server.url, window_items=8) as slow_peer,
            rpcstream.connect(server.url) as fast_peer,
        ):
            run_id = await runs.start("gated", {})
            async with (
                slow_peer.stream("runs.subscribe", run_id) as slow,
                fast_peer.stream("runs.subscribe", run_id) as fast,
            ):
                assert (await anext(slow))["id"] == 1 and (await anext(fast))["id"] == 1
                gate.set()
                assert [e["id"] async for e in fast] == list(range(2, n + 3))
                assert [e["id"] async for e in slow] == list(range(2, n + 3))
