"""The connection driver: where handlers run, and that leaving a peer waits for them."""

from __future__ import annotations

import sys
from typing import Any

import anyio
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
    eager = anyio_backend == "asyncio" and sys.version_info >= (3, 12)
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
