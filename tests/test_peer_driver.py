"""The connection driver: where handlers run, and that leaving a peer waits for them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import rpcstream
from rpcstream.messages import MSGPACK, Credit, Notify, StreamCall, StreamData, StreamEnd
from rpcstream.peer import PING, Lifecycle
from tests.raw import raw_connect
from tests.tcp_proxy import tcp_proxy

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


# -- handler tasks: on asyncio beside the driver's task group, on trio in its nursery --


def cleaning_router(
    started: list[str], cleaning: list[str], finished: list[str], release: anyio.Event
) -> rpcstream.Router:
    """Handlers of each kind that park until cancelled, then clean up, shielded,
    until ``release`` is set: their peer's exit must wait for them."""
    router = rpcstream.Router()

    async def park(kind: str) -> None:
        started.append(kind)
        try:
            await anyio.sleep_forever()
        finally:
            cleaning.append(kind)
            with anyio.CancelScope(shield=True):
                await release.wait()
                finished.append(kind)

    @router.method
    async def call_park(tag: str) -> None:
        await park(tag)

    @router.method
    async def note_park(tag: str) -> None:
        await park(tag)

    @router.method
    async def stream_park(tag: str) -> AsyncIterator[int]:
        await park(tag)
        yield 0  # never reached

    @router.method
    def echo(x: int) -> int:
        return x

    return router


async def wait_until(condition: Any) -> None:
    """Let other tasks run until ``condition()`` holds (each handler's steps are
    events of its own; the caller's fail_after bounds the wait)."""
    while not condition():
        await anyio.lowlevel.checkpoint()


async def test_a_handler_is_cancelled_by_its_callers_cancel_and_by_its_deadline_and_frees_its_slot(
    anyio_backend: str,
) -> None:
    """On trio the handler runs in the driver's nursery, which nobody cancels
    before the peer's exit: only its own cancel scope can end it here."""
    started: list[str] = []
    cleaning: list[str] = []
    finished: list[str] = []
    release = anyio.Event()
    release.set()  # no cleanup to hold: this test is about the cancel reaching it
    with anyio.fail_after(10):
        async with (
            rpcstream.serve(cleaning_router(started, cleaning, finished, release)) as server,
            rpcstream.connect(server.url) as peer,
        ):
            [served] = server.peers
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.call, "call_park", "cancelled")
                await wait_until(lambda: started == ["cancelled"])
                assert served.stats["running_handlers"] == 1
                tg.cancel_scope.cancel()  # a Cancel frame crosses the wire
            await wait_until(lambda: finished == ["cancelled"])

            with pytest.raises(rpcstream.DeadlineExceeded):
                await peer.call("call_park", "deadline", timeout=0.05)
            await wait_until(lambda: finished == ["cancelled", "deadline"])

            assert await peer.call("echo", 1) == 1  # the ended tasks' last steps ran
            assert served.stats["running_handlers"] == 0
            assert served.stats["tasks"] == 2  # the reader and the writer
            assert served.state is Lifecycle.OPEN


async def test_a_dropped_connection_cancels_every_handler_and_the_peer_waits_for_them(
    anyio_backend: str,
) -> None:
    """A call's, a notification's and a stream's handler: the connection's end
    cancels each, and the served peer's exit (on trio, its nursery's) waits for
    their cleanup; none outlives the peer."""
    started: list[str] = []
    cleaning: list[str] = []
    finished: list[str] = []
    release = anyio.Event()
    kinds = ["call", "note", "stream"]
    with anyio.fail_after(15):
        async with rpcstream.serve(cleaning_router(started, cleaning, finished, release)) as server:
            try:
                async with tcp_proxy(server.port) as proxy:
                    url = f"ws://127.0.0.1:{proxy.port}"
                    async with rpcstream.connect(url) as peer, anyio.create_task_group() as tg:

                        async def call() -> None:
                            with pytest.raises(rpcstream.ConnectionClosed):
                                await peer.call("call_park", "call")

                        async def stream() -> None:
                            with pytest.raises(rpcstream.ConnectionClosed):
                                async with peer.stream("stream_park", "stream") as items:
                                    async for _ in items:
                                        pass

                        tg.start_soon(call)
                        tg.start_soon(stream)
                        await peer.notify("note_park", "note")
                        await wait_until(lambda: sorted(started) == kinds)
                        [served] = server.peers
                        assert served.stats["running_handlers"] == 3
                        proxy.cut()  # both sides lose the connection under their feet
                        await wait_until(lambda: sorted(cleaning) == kinds)  # all cancelled
                        tg.cancel_scope.cancel()
                await served.wait_closed()
                # Many turns of the loop (a new connection, a call): a peer that did
                # not wait for its handlers would have left by now.
                async with rpcstream.connect(server.url) as other:
                    assert await other.call("echo", 2) == 2
                assert served in server.peers
                assert served.stats["tasks"] >= 3  # the three handlers, still cleaning up
                assert finished == []
            finally:  # also when it fails: else the peer would wait for them forever
                release.set()
    assert sorted(finished) == kinds
    assert server.stats == {"connections": 0, "tasks": 0}


class Boom(BaseException):
    """Not an Exception: a handler cannot turn it into an answer."""


async def test_a_base_exception_from_a_handler_ends_the_peer_on_trio_and_is_logged_on_asyncio(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As before handlers started in the driver's own nursery on trio: there it
    cancels the body of ``async with peer`` and comes out of it as itself (not
    in an exception group); on asyncio the task is logged and the peer goes on."""
    server_router = rpcstream.Router()
    client_router = rpcstream.Router()
    raised = anyio.Event()

    @server_router.method
    async def trigger() -> None:
        await rpcstream.current_peer().notify("boom")

    @client_router.method
    async def boom() -> None:
        await anyio.lowlevel.checkpoint()  # a task of its own on both loops
        raised.set()
        raise Boom("handler")

    body: list[str] = []
    with anyio.fail_after(10):
        async with rpcstream.serve(server_router) as server:
            if anyio_backend == "trio":
                with pytest.raises(Boom):
                    async with rpcstream.connect(server.url, router=client_router) as peer:
                        try:
                            await peer.call("trigger")
                            await anyio.sleep_forever()
                        finally:
                            body.append("cancelled")
                assert body == ["cancelled"]
            else:
                async with rpcstream.connect(server.url, router=client_router) as peer:
                    await peer.call("trigger")
                    await raised.wait()
                    failed = "notification handler 'boom' failed"
                    await wait_until(lambda: any(failed in m for m in caplog.messages))
                    assert await peer.call(PING) is None  # still open
                # Logged once, where it was raised, with its traceback.
                [record] = [r for r in caplog.records if r.levelname == "ERROR"]
                assert failed in record.message
                assert record.exc_info is not None and isinstance(record.exc_info[1], Boom)
