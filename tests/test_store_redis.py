"""RedisStore: the conformance suite against a private redis-server, and what only Redis does.

Every test here starts from the module's own ``redis-server`` (see
``tests/redis_server.py``) on a free loopback port, with a fresh key prefix per
store. Runs on asyncio only (redis.asyncio), except the test that checks the
error on trio.
"""

# ruff: noqa: E402
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

pytest.register_assert_rewrite("rpcstream.testing.store_suite")

import redis_server as redis_server_module
from redis_server import RedisServer, free_port, redis_server, require_redis_server

import rpcstream
from rpcstream.errors import RunExpired, RunFinished, RunNotFound
from rpcstream.runs.writer import RunWriter
from rpcstream.store.base import StoredEvent
from rpcstream.store.redis import RedisStore, StoreUnavailable
from rpcstream.testing.store_suite import FakeClock, LeasedStoreConformance, StoreFactory

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only (trio gets a clear error: see the trio test)."""
    return "asyncio"


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return _prefix()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[Redis]:
    """A plain redis-py client, to look at the keys the store leaves."""
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


class TestRedisStore(LeasedStoreConformance):
    @pytest.fixture
    def store_factory(self, url: str) -> StoreFactory:
        def make(
            *,
            max_events: int | None = None,
            expire_after: float = 300.0,
            clock: Callable[[], float] = time.time,
        ) -> RedisStore:
            # A fresh prefix per call: every store the suite makes starts empty.
            return RedisStore(
                url, prefix=_prefix(), max_events=max_events, expire_after=expire_after, clock=clock
            )

        return make


def _data(value: Any) -> bytes:
    return msgspec.json.encode(value)


async def _keys(raw: Redis, prefix: str) -> set[str]:
    return {key.decode() async for key in raw.scan_iter(match=f"{prefix}*")}


async def _receive_until_end(store: RedisStore, run_id: str, after: int = 0) -> list[StoredEvent]:
    async with aclosing(store.follow(run_id, after)) as events:
        return [event async for event in events]


# -- ids, keys and retention ------------------------------------------------------------------


async def test_several_nodes_appending_to_one_run_keep_ids_contiguous(
    url: str, prefix: str
) -> None:
    nodes, writers, each = 4, 8, 25
    async with RedisStore(url, prefix=prefix) as first:
        stores = [first] + [RedisStore(url, prefix=prefix) for _ in range(nodes - 1)]
        for store in stores[1:]:
            await store.open()
        try:
            await first.create_run("r", "flow")
            returned: dict[tuple[int, int], list[int]] = {}

            async def write(node: int, writer: int) -> None:
                ids = returned[node, writer] = []
                for seq in range(each):
                    event = await stores[node].append("r", "progress", _data([node, writer, seq]))
                    ids.append(event.id)

            async with anyio.create_task_group() as tg:
                for node in range(nodes):
                    for writer in range(writers):
                        tg.start_soon(write, node, writer)
            total = nodes * writers * each
            assert sorted(i for ids in returned.values() for i in ids) == list(range(1, total + 1))
            stored = await stores[-1].read("r", 0, limit=total)
            assert [event.id for event in stored] == list(range(1, total + 1))
            for event in stored:
                node, writer, seq = msgspec.json.decode(event.data)
                assert returned[node, writer][seq] == event.id
        finally:
            for store in stores[1:]:
                await store.aclose()


async def test_only_one_of_two_nodes_finishes_a_run(url: str, prefix: str) -> None:
    async with RedisStore(url, prefix=prefix) as a, RedisStore(url, prefix=prefix) as b:
        await a.create_run("r", "flow")
        outcomes: list[object] = []

        async def finish(store: RedisStore, type: str) -> None:
            try:
                outcomes.append((await store.append("r", type, b"null", terminal=True)).type)
            except RunFinished:
                outcomes.append(RunFinished)

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish, a, "complete")
            tg.start_soon(finish, b, "cancelled")
        assert sorted(map(str, outcomes)).count(str(RunFinished)) == 1
        info = await b.info("r")
        assert (info.last_id, info.status) == (1, (await a.read("r", 0))[0].type)


async def test_a_run_has_the_documented_keys_and_a_finished_one_expires_in_redis(
    url: str, prefix: str, raw: Redis
) -> None:
    store = RedisStore(url, prefix=prefix, expire_after=30, tombstone_ttl=60)
    async with store:
        await store.create_run("r", "flow", owner="alice")
        await store.append("r", "progress", b"1")
        run, stream, tombstone = store.run_keys("r")
        assert (run, stream, tombstone) == (
            f"{prefix}run:r",
            f"{prefix}client:r",
            f"{prefix}expired:r",
        )
        assert await _keys(raw, prefix) == {run, stream}
        assert await raw.xlen(stream) == 1
        [(entry_id, fields)] = await raw.xrange(stream) or []
        assert entry_id == b"1-0"
        assert fields is not None
        assert (fields[b"t"], fields[b"d"]) == (b"progress", b"1")
        assert float(fields[b"ts"]) == (await store.read("r", 0))[0].timestamp
        # A running run never expires by itself.
        assert await raw.pttl(run) == -1
        assert await raw.pttl(stream) == -1
        await store.append("r", "complete", b"null", terminal=True)
        assert await _keys(raw, prefix) == {run, stream, tombstone, f"{prefix}expiring"}
        for key in (run, stream):
            assert 0 < await raw.pttl(key) <= 30_000
        assert 30_000 < await raw.pttl(tombstone) <= 90_000
        assert await raw.zscore(f"{prefix}expiring", "r") == (await store.info("r")).expires


async def test_no_key_of_an_expired_run_remains(url: str, prefix: str, raw: Redis) -> None:
    """Real Redis expiry, so real (short) time: we poll Redis for the keys to go."""
    store = RedisStore(url, prefix=prefix, expire_after=0.2, tombstone_ttl=0.3)
    async with store:
        await store.create_run("r", "flow")
        await store.append("r", "progress", b"1")
        await store.append("r", "complete", b"null", terminal=True)
        run, stream, tombstone = store.run_keys("r")
        await _until(lambda: raw.exists(run, stream), 0)
        with pytest.raises(RunExpired):
            await store.info("r")
        assert (
            await store.sweep() == 0
        )  # Redis removed the run already; sweep drops its index entry
        assert await _keys(raw, prefix) == {tombstone}
        await _until(lambda: raw.exists(tombstone), 0)
        with pytest.raises(RunNotFound):
            await store.info("r")
        assert await _keys(raw, prefix) == set()


async def test_sweep_removes_the_keys_of_runs_its_clock_says_are_due(
    url: str, prefix: str, raw: Redis
) -> None:
    clock = FakeClock()
    store = RedisStore(url, prefix=prefix, clock=clock, expire_after=60, tombstone_ttl=10)
    async with store:
        for run_id in ("a", "b", "c"):
            await store.create_run(run_id, "flow")
            await store.append(run_id, "complete", b"null", terminal=True)
        await store.create_run("running", "flow")
        clock.advance(60)
        assert await store.sweep() == 3
        tombstones = {store.run_keys(run_id)[2] for run_id in "abc"}
        assert await _keys(raw, prefix) == tombstones | {f"{prefix}run:running"}
        for key in tombstones:
            assert 0 < await raw.pttl(key) <= 10_000
        with pytest.raises(RunExpired):
            await store.read("b", 0)


async def test_max_events_trims_the_stream_exactly(url: str, prefix: str, raw: Redis) -> None:
    store = RedisStore(url, prefix=prefix, max_events=3)
    async with store:
        await store.create_run("r", "flow")
        for i in range(10):
            await store.append("r", "progress", _data(i))
        stream = store.run_keys("r")[1]
        entries = await raw.xrange(stream) or []
        assert [entry_id for entry_id, _ in entries] == [b"8-0", b"9-0", b"10-0"]
        assert (await store.info("r")).first_id == 8


# -- live follow across nodes ----------------------------------------------------------------


async def test_a_run_writer_on_one_node_reaches_a_follower_on_another(
    url: str, prefix: str
) -> None:
    async with RedisStore(url, prefix=prefix) as worker, RedisStore(url, prefix=prefix) as server:
        writer = await RunWriter.create(worker, "job", "summarize", owner="bob")
        reads = _count_calls(server, "read", "info")
        send, receive = anyio.create_memory_object_stream[StoredEvent](100)

        async def follow() -> None:
            async with send, aclosing(server.follow("job")) as events:
                async for event in events:
                    await send.send(event)

        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(follow)
            started = await receive.receive()
            assert (started.id, started.type, started.data) == (
                1,
                "started",
                b'{"flow":"summarize"}',
            )
            before = reads[0]
            # Each event is appended only after the previous one arrived: they come live.
            for i in range(20):
                assert await writer.send("token", {"i": i}) == i + 2
                event = await receive.receive()
                assert (event.id, event.type, msgspec.json.decode(event.data)) == (
                    i + 2,
                    "token",
                    {"i": i},
                )
            # They came through the node's listener into its live cache, not from reads
            # (a follower that had to poll would read storage twice per event).
            assert reads[0] - before <= 6
            assert await writer.complete({"summary": "ok"}) == 22
            rest = [event async for event in receive]
        assert [(e.id, e.type, e.data) for e in rest] == [(22, "complete", b'{"summary":"ok"}')]
        info = await server.info("job")
        assert (info.status, info.owner, info.flow) == ("complete", "bob", "summarize")


async def test_a_client_of_one_server_follows_what_a_worker_writes_through_another_store(
    url: str, prefix: str
) -> None:
    """The whole point: RunServer on one node, a store-only worker on another."""
    runs = rpcstream.RunServer(store=RedisStore(url, prefix=prefix))
    async with (
        RedisStore(url, prefix=prefix) as worker_store,
        rpcstream.serve(runs) as server,
        rpcstream.connect(server.url) as peer,
    ):
        writer = await RunWriter.create(worker_store, "job-1", "summarize")
        got: list[dict[str, Any]] = []
        first = anyio.Event()

        async def subscribe() -> None:
            async for event in peer.stream("runs.subscribe", "job-1"):
                got.append(event)
                first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscribe)
            await first.wait()  # subscribed, and the worker is still writing
            await writer.send("token", {"text": "Hello"})
            await writer.complete({"words": 1})
        assert [(e["id"], e["type"], e["data"]) for e in got] == [
            (1, "started", {"flow": "summarize"}),
            (2, "token", {"text": "Hello"}),
            (3, "complete", {"words": 1}),
        ]
        assert {e["run_id"] for e in got} == {"job-1"}
        status = await peer.call("runs.status", "job-1")
        assert (status["status"], status["last_id"]) == ("complete", 3)


async def test_run_writer_fail_ends_the_run_with_an_error_event(url: str, prefix: str) -> None:
    async with RedisStore(url, prefix=prefix) as store:
        await store.create_run("r", "flow")
        writer = RunWriter(store, "r")
        assert await writer.send("progress", [1, 2]) == 1
        assert await writer.fail("disk full", error_type="OSError") == 2
        with pytest.raises(RunFinished):
            await writer.send("progress")
        with pytest.raises(TypeError):
            await writer.send("progress", object())
        events = await store.read("r", 0)
        assert [(e.type, msgspec.json.decode(e.data)) for e in events] == [
            ("progress", [1, 2]),
            ("error", {"message": "disk full", "type": "OSError"}),
        ]
        assert (await store.info("r")).status == "error"
        with pytest.raises(RunNotFound):
            await RunWriter(store, "nope").send("progress")


async def test_followers_on_a_node_share_one_subscription_and_one_listener_connection(
    url: str, prefix: str, raw: Redis
) -> None:
    runs, followers_per_run, count = 5, 20, 30
    async with (
        RedisStore(url, prefix=prefix) as writer,
        RedisStore(url, prefix=prefix, max_connections=4) as server,
    ):
        reads = _count_calls(server, "read", "info")
        got: dict[tuple[int, int], list[int]] = {}
        for run in range(runs):
            await writer.create_run(f"r{run}", "flow")
            await writer.append(f"r{run}", "progress", b"0")
        all_in = anyio.Event()
        total = runs * followers_per_run

        async def follow(run: int, index: int) -> None:
            ids = got[run, index] = []
            async with aclosing(server.follow(f"r{run}")) as events:
                async for event in events:
                    ids.append(event.id)
                    if len(got) == total and all(got.values()):
                        all_in.set()

        async with anyio.create_task_group() as tg:
            for run in range(runs):
                for index in range(followers_per_run):
                    tg.start_soon(follow, run, index)
            await all_in.wait()
            for run in range(runs):
                numsub = await raw.pubsub_numsub(server.channel(f"r{run}"))
                assert numsub == [(server.channel(f"r{run}"), 1)]  # one per node, not per follower
            clients = await raw.client_list()
            listeners = {c["name"] for c in clients if c["name"].startswith(f"{prefix}listener")}
            assert listeners == {writer.listener_name, server.listener_name}  # one per node
            reads_before = reads[0]
            for i in range(count):
                for run in range(runs):
                    await writer.append(f"r{run}", "progress", _data(i))
            for run in range(runs):
                await writer.append(f"r{run}", "complete", b"null", terminal=True)
        expected = list(range(1, count + 3))
        assert all(ids == expected for ids in got.values())
        # Served from the live cache that the one listener feeds: no read per follower per event.
        assert reads[0] - reads_before < total
        # When the last follower of a run leaves, the node unsubscribes.
        await _until(lambda: raw.pubsub_numsub(server.channel("r0")), [(server.channel("r0"), 0)])


async def test_a_listener_that_lost_its_connection_catches_up_on_what_it_missed(
    url: str, prefix: str, raw: Redis
) -> None:
    async with RedisStore(url, prefix=prefix) as a, RedisStore(url, prefix=prefix) as b:
        await a.create_run("r", "flow")
        send, receive = anyio.create_memory_object_stream[StoredEvent](100)

        async def follow() -> None:
            async with send, aclosing(b.follow("r")) as events:
                async for event in events:
                    await send.send(event)

        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(follow)
            for i in (1, 2):
                await a.append("r", "progress", _data(i))
                assert (await receive.receive()).id == i
            listener = await _client_id(raw, b.listener_name)
            assert listener is not None
            await raw.client_kill_filter(_id=str(listener))
            # Appended while b's listener is away: pub/sub does not keep them for it.
            for i in (3, 4, 5):
                await a.append("r", "progress", _data(i))
            assert [(await receive.receive()).id for _ in range(3)] == [3, 4, 5]

            async def reconnected() -> bool:
                now = await _client_id(raw, b.listener_name)
                return now not in (None, listener)

            await _until(reconnected, True)
            await a.append("r", "complete", b"null", terminal=True)
            assert [event.id async for event in receive] == [6]


async def test_concurrent_appends_share_script_calls(url: str, prefix: str) -> None:
    async with RedisStore(url, prefix=prefix) as store:
        for index in range(50):
            await store.create_run(f"run-{index}", "flow")
        batches_before = store._appends.groups

        async def append(index: int) -> None:
            for _ in range(4):
                await store.append(f"run-{index}", "progress", b"1")

        async with anyio.create_task_group() as tg:
            for index in range(50):
                tg.start_soon(append, index)
        batches = store._appends.groups - batches_before
        assert batches <= 50, batches  # 200 appends from 50 tasks: far fewer round trips
        for index in range(50):
            assert [e.id for e in await store.read(f"run-{index}", 0)] == [1, 2, 3, 4]


async def test_with_two_script_calls_in_flight_each_run_is_published_in_id_order(
    url: str, prefix: str
) -> None:
    # Two calls in flight run on two connections, in either order on the server:
    # a run's appends must never be in both, or its ids could be given out (and
    # published to this node's followers) out of order.
    async with RedisStore(url, prefix=prefix) as store:
        assert store._appends.max_writes == 2
        published: dict[str, list[int]] = {}
        publish = store._publish

        def record(run_id: str, events: Any, expires: float | None = None) -> None:
            events = list(events)
            published.setdefault(run_id, []).extend(event.id for event in events)
            publish(run_id, events, expires)

        store._publish = record  # type: ignore[method-assign]
        runs = [f"run-{index}" for index in range(10)]
        for run_id in runs:
            await store.create_run(run_id, "flow")

        async def write(run_id: str) -> None:
            for _ in range(20):
                await store.append(run_id, "progress", b"1")

        async with anyio.create_task_group() as tg:
            for run_id in runs:
                for _ in range(4):  # four tasks per run, all at once
                    tg.start_soon(write, run_id)
        assert published == {run_id: list(range(1, 81)) for run_id in runs}
        assert store._appends.groups > 20  # 800 appends from 40 tasks: several calls each


async def test_event_data_of_every_size_and_any_bytes_travels_intact(url: str, prefix: str) -> None:
    # One script call carries a group's appends as msgpack strings: every length
    # header, and bytes that are not UTF-8, must come back as they went.
    sizes = [0, 1, 31, 32, 255, 256, 65_535, 65_536, 70_000]
    datas = [bytes((i * 7 + size) % 256 for i in range(size)) for size in sizes]
    async with RedisStore(url, prefix=prefix) as a, RedisStore(url, prefix=prefix) as b:
        for index in range(len(sizes)):
            await a.create_run(f"r{index}", "flow")
        async with aclosing(b.follow("r0")) as followed:
            async with anyio.create_task_group() as tg:  # queued together: one group
                for index, data in enumerate(datas):
                    tg.start_soon(a.append, f"r{index}", "tÿpe", data)
            assert (await anext(followed)).data == datas[0]  # via pub/sub, on node b
        for index, data in enumerate(datas):
            [event] = await b.read(f"r{index}", 0)
            assert (event.type, event.data) == ("tÿpe", data)


async def test_an_append_redis_refuses_fails_alone_in_its_group(
    url: str, prefix: str, raw: Redis
) -> None:
    async with RedisStore(url, prefix=prefix) as store:
        await store.create_run("good", "flow")
        await store.create_run("bad", "flow")
        await raw.set(f"{prefix}client:bad", "not a stream")  # XADD answers WRONGTYPE
        outcomes: dict[str, Any] = {}

        async def append(run_id: str) -> None:
            try:
                outcomes[run_id] = (await store.append(run_id, "progress", b"1")).id
            except StoreUnavailable as exc:
                outcomes[run_id] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(append, "bad")
            tg.start_soon(append, "good")
        assert outcomes["good"] == 1
        assert isinstance(outcomes["bad"], StoreUnavailable)
        assert "WRONGTYPE" in str(outcomes["bad"])


# -- Redis going away --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["follow", "tail"])
async def test_appends_fail_clearly_while_redis_is_down_and_followers_recover(
    tmp_path: Path, prefix: str, how: str
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        async with (
            RedisStore(server.url, prefix=prefix, connect_timeout=1) as a,
            RedisStore(server.url, prefix=prefix, connect_timeout=1) as b,
        ):
            await a.create_run("r", "flow")
            send, receive = anyio.create_memory_object_stream[StoredEvent](100)

            async def follow() -> None:
                if how == "tail":  # what the publish hands over counts as given out
                    async with send:
                        await b.tail("r", 0, send.send_nowait)
                    return
                async with send, aclosing(b.follow("r")) as events:
                    async for event in events:
                        await send.send(event)

            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await a.append("r", "progress", b"1")
                assert (await receive.receive()).id == 1  # b's follower is live

                server.kill()
                with pytest.raises(StoreUnavailable) as caught:
                    await a.append("r", "progress", b"2")
                assert caught.value.__cause__ is not None
                with pytest.raises(StoreUnavailable):
                    await b.read("r", 0)

                server.start()  # same port, same directory: the AOF brings the run back
                assert (await a.append("r", "progress", b"2")).id == 2
                with anyio.fail_after(10):
                    event = await receive.receive()  # b's listener reconnected and caught up
                assert (event.id, event.data) == (2, b"2")
                await a.append("r", "complete", b"null", terminal=True)
                rest = [event async for event in receive]
            assert [event.id for event in rest] == [3]
    finally:
        server.stop()


def test_without_redis_server_the_tests_skip_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_server_module, "REDIS_SERVER", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_redis_server()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        require_redis_server()


async def test_opening_a_store_fails_clearly_when_redis_is_unreachable() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1"):
        await store.open()
    with pytest.raises(RuntimeError, match="not open"):
        await store.info("r")


# -- event loops -------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_opening_on_trio_raises_one_clear_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # never reached: no server needed
    with pytest.raises(RuntimeError, match=r"RedisStore needs asyncio .*not trio"):
        async with store:
            pass


def _count_calls(store: RedisStore, *methods: str) -> list[int]:
    """Count calls to the store's public storage methods, in a list's one item."""
    count = [0]
    for name in methods:
        original = getattr(store, name)

        async def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            count[0] += 1
            return await _original(*args, **kwargs)

        setattr(store, name, counted)
    return count


async def _client_id(raw: Redis, name: str) -> int | None:
    """The id of the Redis client connection named ``name``, if there is one."""
    ids = [int(c["id"]) for c in await raw.client_list() if c["name"] == name]
    return ids[0] if ids else None


async def _until(probe: Callable[[], Any], expected: Any, timeout: float = 5.0) -> None:
    """Poll Redis until ``await probe() == expected``: for what only Redis's clock decides."""
    with anyio.fail_after(timeout):
        while await probe() != expected:  # noqa: ASYNC110 - Redis's expiry tells no one
            await anyio.sleep(0.02)
