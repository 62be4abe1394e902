"""``transport/loop.py``'s :class:`NextTurn`: the callbacks asyncio connections ask
for the loop's next turn (each writing what a burst queued) share one loop handle
a turn, each in its own context, and one that fails stops no other."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import anyio
import pytest

import rpcstream
from rpcstream.transport import is_trio
from rpcstream.transport.loop import NextTurn, Signal, TrioNextTurn, next_turn, trio_next_turn

pytestmark = pytest.mark.anyio

tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_callbacks_share_one_handle_run_in_order_and_in_their_contexts() -> None:
    loop = asyncio.get_running_loop()
    turn = next_turn(loop)
    assert next_turn(loop) is turn  # one per loop
    ran: list[tuple[str, str]] = []
    done = anyio.Event()
    handles = 0
    call_soon = loop.call_soon

    def counting_call_soon(*args: Any, **kwargs: Any) -> Any:
        nonlocal handles
        if getattr(args[0], "__self__", None) is turn:
            handles += 1
        return call_soon(*args, **kwargs)

    def context(value: str) -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(tag.set, value)
        return ctx

    def record(name: str) -> Any:
        return lambda: ran.append((name, tag.get()))

    def later() -> None:  # added while a turn's callbacks run: the turn after
        ran.append(("later", tag.get()))
        done.set()

    loop.call_soon = counting_call_soon  # type: ignore[method-assign]
    try:
        turn.add(record("a"), context("ctx-a"))
        turn.add(record("b"), context("ctx-b"))
        turn.add(lambda: turn.add(later, context("ctx-later")), context("x"))
        assert ran == []  # nothing runs before the loop turns
        with anyio.fail_after(5):
            await done.wait()
    finally:
        del loop.call_soon
    assert ran == [("a", "ctx-a"), ("b", "ctx-b"), ("later", "ctx-later")]
    assert handles == 2  # one for the three added together, one for the turn after


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    loop = asyncio.get_running_loop()
    turn = NextTurn(loop)
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    ran = anyio.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    try:
        turn.add(boom, contextvars.copy_context())
        turn.add(ran.set, contextvars.copy_context())
        with anyio.fail_after(5):
            await ran.wait()
    finally:
        loop.set_exception_handler(None)
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], RuntimeError)
    assert "boom" in repr(reported[0]["message"]) or "callback" in reported[0]["message"]


async def test_an_event_fanned_out_to_many_connections_is_written_in_one_turn() -> None:
    # Over real WebSockets: one run, twenty connections with a live subscription
    # each. An event reaches the subscriptions' streams in one turn (parked ones
    # in the appender's call, others as their tasks wake together); the twenty
    # writes that follow share the loop's next turn (NextTurn._run), not a
    # handle each (on trio: one batch of the run's next-turn task).
    n = 20
    runs = rpcstream.RunServer()
    go = anyio.Event()

    @runs.flow("one")
    async def one(ctx: rpcstream.RunContext) -> None:
        await go.wait()
        await ctx.client.send("tick", 1)

    batches: list[int] = []  # how many callbacks each turn had when one was added
    cls: Any = TrioNextTurn if is_trio() else NextTurn
    real_add = cls.add

    def counting_add(self: Any, callback: Any, context: Any) -> None:
        real_add(self, callback, context)
        batches.append(len(self._pending[0]))  # (callbacks, contexts)

    got = 0
    all_got = anyio.Event()
    started = 0
    all_started = anyio.Event()

    async def subscriber(peer: rpcstream.RpcPeer, run_id: str) -> None:
        nonlocal got, started
        async with peer.stream("runs.subscribe", run_id, batch=True) as items:
            async for item in items:
                if any(event["id"] == 1 for event in item):  # the run's first event
                    started += 1
                    if started == n:
                        all_started.set()
                if any(event["type"] == "tick" for event in item):
                    break
        got += 1
        if got == n:
            all_got.set()

    with anyio.fail_after(20):
        async with rpcstream.serve(runs) as server:
            run_id = await runs.start("one", {})
            async with anyio.create_task_group() as tg:
                peers = []
                for _ in range(n):
                    peers.append(await tg.start(_connected, server.url))
                for peer in peers:
                    tg.start_soon(subscriber, peer, run_id)
                await all_started.wait()
                cls.add = counting_add
                try:
                    go.set()
                    await all_got.wait()
                finally:
                    cls.add = real_add
                for peer in peers:
                    await peer.aclose()
    assert max(batches) >= n, batches


async def _connected(url: str, *, task_status: Any) -> None:
    async with rpcstream.connect(url) as peer:
        task_status.started(peer)
        await peer.wait_closed()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_one_task_runs_each_batch_in_order_and_contexts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    turn = trio_next_turn()
    assert trio_next_turn() is turn  # one per run
    ran: list[tuple[str, str]] = []
    done = anyio.Event()

    def context(value: str) -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(tag.set, value)
        return ctx

    def record(name: str) -> Any:
        return lambda: ran.append((name, tag.get()))

    def boom() -> None:
        raise RuntimeError("boom")

    def later() -> None:
        ran.append(("later", tag.get()))
        done.set()

    turn.add(record("a"), context("ctx-a"))
    turn.add(boom, context("x"))
    turn.add(lambda: turn.add(later, context("ctx-later")), context("x"))
    turn.add(record("b"), context("ctx-b"))
    assert ran == []  # nothing runs before this task lets others run
    with anyio.fail_after(5):
        await done.wait()
    assert ran == [("a", "ctx-a"), ("b", "ctx-b"), ("later", "ctx-later")]
    failed = [r for r in caplog.records if "next turn failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    # Asleep again, it wakes for the next callback.
    again = anyio.Event()
    turn.add(again.set, contextvars.copy_context())
    with anyio.fail_after(5):
        await again.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_signal_wakes_its_waiter_whenever_it_is_set_and_a_cancelled_wait_stays_quiet() -> (
    None
):
    # What callers wait on for answers, and streams for items and credit (asyncio).
    early = Signal()
    early.set()
    await early.wait()  # set before the wait: returns at once
    assert early.is_set()

    later = Signal()
    woken: list[bool] = []

    async def waiter() -> None:
        await later.wait()
        woken.append(later.is_set())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert woken == []  # still waiting
        later.set()
        later.set()  # a second set changes nothing
    assert woken == [True]

    abandoned = Signal()
    with anyio.move_on_after(0.01) as scope:
        await abandoned.wait()  # nobody sets it: the deadline ends the wait
    assert scope.cancelled_caught and not abandoned.is_set()
    abandoned.set()  # after its waiter left: no error, nothing to wake
    assert abandoned.is_set()
