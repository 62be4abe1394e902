"""The connection driver: where handlers run, and that leaving a peer waits for them."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import rpcstream

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
            assert again["child_parent"] == again["task"] != answer["task"]
    assert finished == ["cancelled"]
