"""The connection driver: where handlers run, and that leaving a peer waits for them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import rpcstream
from rpcstream.messages import MSGPACK, Credit, Notify, StreamCall, StreamData, StreamEnd
from tests.raw import raw_connect

pytestmark = pytest.mark.anyio


def make_router(started: anyio.Event, finished: list[str], together: int = 10) -> rpcstream.Router:
    router = rpcstream.Router()
    arrived: list[int] = []
    all_here = anyio.Event()

    @router.method
    async def where() -> dict[str, Any]:
        # Still inside the reader's pass over the message: started eagerly.
        in_reader = rpcstream.current_peer()._driver._quiet
        arrived.append(1)
        if len(arrived) == together:
            all_here.set()
        await all_here.wait()  # all alive at once: their task ids cannot be reused
        return {"task": anyio.get_current_task().id, "in_reader": in_reader}

    @router.method
    async def park() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            finished.append("park")

    return router


async def test_an_async_handler_starts_eagerly_where_the_loop_can_and_in_a_task_of_its_own(
    anyio_backend: str,
) -> None:
    started, finished = anyio.Event(), []
    async with (
        rpcstream.serve(make_router(started, finished)) as server,
        rpcstream.connect(server.url) as peer,
    ):
        answers: list[dict[str, Any]] = []

        async def ask() -> None:
            answers.append(await peer.call("where"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(ask)
    eager = anyio_backend == "asyncio"
    assert {a["in_reader"] for a in answers} == {eager}
    assert len({a["task"] for a in answers}) == 10  # each call its own task, eager or not


async def test_leaving_the_server_cancels_and_waits_for_running_handlers() -> None:
    started, finished = anyio.Event(), []
    with anyio.fail_after(10):
        async with (
            rpcstream.serve(make_router(started, finished)) as server,
            rpcstream.connect(server.url) as peer,
            anyio.create_task_group() as tg,
        ):

            async def call() -> None:
                with pytest.raises(rpcstream.ConnectionClosed):
                    await peer.call("park")

            tg.start_soon(call)
            await started.wait()
            [served] = server.peers
            await served.aclose()
        # The server's exit waited for the connection's handler, eager or not.
        assert finished == ["park"]


async def test_what_a_handler_enters_before_its_first_await_is_its_own(anyio_backend: str) -> None:
    """Eager or not, a handler's first step runs in its own task: cancel scopes,
    task groups and locks entered before its first await bind to that task, so
    that a deadline, a child task and a cancel from the caller all still work."""
    lock = anyio.Lock()
    parked = anyio.Event()
    finished: list[str] = []
    router = rpcstream.Router()

    @router.method
    async def guarded(wait: bool) -> dict[str, Any]:
        me = anyio.get_current_task().id
        async with lock, anyio.create_task_group() as tg:  # entered in the first step
            child: list[int] = []

            async def note_parent() -> None:
                child.append(anyio.get_current_task().parent_id or 0)

            tg.start_soon(note_parent)
            with anyio.fail_after(30):
                if wait:
                    parked.set()
                    try:
                        await anyio.sleep_forever()
                    finally:
                        finished.append("cancelled")
                await anyio.lowlevel.checkpoint()
        return {"task": me, "child_parent": child[0]}

    @router.method
    async def fails_at_once() -> None:
        raise ValueError("no")

    with anyio.fail_after(10):
        async with (
            rpcstream.serve(router) as server,
            rpcstream.connect(server.url) as peer,
        ):
            answer = await peer.call("guarded", False)
            assert answer["child_parent"] == answer["task"]  # the child's parent: the handler
            with pytest.raises(rpcstream.InternalError):
                await peer.call("fails_at_once")
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.call, "guarded", True)
                await parked.wait()
                tg.cancel_scope.cancel()  # the call's cancel crosses the wire
            # The lock was released by the cancelled handler: a new call gets it.
            again = await peer.call("guarded", False)
            assert again["child_parent"] == again["task"]  # (ids of ended tasks are reused)
    assert finished == ["cancelled"]


async def test_stream_items_queued_together_leave_in_one_message_and_a_lone_one_leaves_alone() -> (
    None
):
    # The writer's batching, seen on the wire by a raw client: 100 items a
    # generator yields without waiting share a message (not one message each),
    # and an item that comes alone is not held back waiting for company.
    router = rpcstream.Router()
    go = [anyio.Event(), anyio.Event()]

    @router.method
    async def burst(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        await go[0].wait()
        yield n
        await go[1].wait()

    @router.method
    def release(which: int) -> None:
        go[which].set()

    def frames(message: bytes) -> list[Any]:
        # Only the stream's: the server also announces its settings (a Notify).
        return [f for f in MSGPACK.decode_batch(message) if not isinstance(f, Notify)]

    with anyio.fail_after(10):
        async with (
            rpcstream.serve(router) as server,
            raw_connect(server.url, MSGPACK.subprotocol) as ws,
        ):
            args = MSGPACK.encode_raw([100])
            call = StreamCall(1, "burst", args, MSGPACK.empty_map)
            await ws.send(MSGPACK.encode_batch([call, Credit(1, 1000, 1 << 20)]))
            messages, items = 0, []
            while len(items) < 100:
                messages += 1
                items += [MSGPACK.decode(f.payload) for f in frames(await ws.recv())]
            assert items == list(range(100))
            assert messages <= 2

            notify = Notify("release", MSGPACK.encode_raw([0]), MSGPACK.empty_map)
            await ws.send(MSGPACK.encode_batch([notify]))
            [lone] = frames(await ws.recv())
            assert lone == StreamData(1, MSGPACK.encode_raw(100))

            notify = Notify("release", MSGPACK.encode_raw([1]), MSGPACK.empty_map)
            await ws.send(MSGPACK.encode_batch([notify]))
            assert frames(await ws.recv()) == [StreamEnd(1)]
