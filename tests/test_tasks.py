"""``rpcstream._tasks``: :func:`new_flag`, the event the driver, the stores' live
records and the fan-out hubs wait on, behaves as ``anyio.Event`` does, on both loops."""

from __future__ import annotations

import anyio
import pytest

from rpcstream._tasks import Flag, new_flag
from rpcstream.transport import is_trio

pytestmark = pytest.mark.anyio


async def test_a_flag_is_the_loops_own_event() -> None:
    flag = new_flag()
    if is_trio():
        import trio

        assert type(flag) is trio.Event
    else:
        assert type(flag) is Flag
        # One tracked object while idle (anyio.Event: three), and no list of waiters.
        assert flag._waiters is None  # type: ignore[attr-defined]


async def test_one_set_wakes_every_waiter_and_later_waits_return() -> None:
    flag = new_flag()
    woken: list[int] = []

    async def waiter(i: int) -> None:
        await flag.wait()
        woken.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(waiter, i)
        await anyio.wait_all_tasks_blocked()
        assert woken == [] and not flag.is_set()
        flag.set()
        flag.set()  # a second set changes nothing
    assert sorted(woken) == [0, 1, 2, 3, 4] and flag.is_set()
    with anyio.fail_after(5):
        await flag.wait()


async def test_waiting_on_a_set_flag_is_still_a_checkpoint() -> None:
    # As anyio.Event: a loop around wait() cannot keep a cancelled task running.
    flag = new_flag()
    flag.set()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await flag.wait()
        pytest.fail("a cancelled scope's wait on a set flag returned")
    assert scope.cancelled_caught


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    flag = new_flag()
    woken: list[str] = []

    async def waiter(name: str) -> None:
        await flag.wait()
        woken.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first")
        with anyio.CancelScope() as gone:
            async with anyio.create_task_group() as inner:
                inner.start_soon(waiter, "cancelled")
                await anyio.wait_all_tasks_blocked()
                gone.cancel()
        tg.start_soon(waiter, "last")
        await anyio.wait_all_tasks_blocked()
        assert woken == []
        flag.set()
    assert sorted(woken) == ["first", "last"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancelled_waiters_do_not_pile_up() -> None:
    # A flag waited on with a timeout, over and over (a connection's wait_closed
    # behind move_on_after), keeps at most about twice its live waiters.
    flag = Flag()
    for _ in range(1000):
        with anyio.move_on_after(0):
            await flag.wait()
    waiters = flag._waiters
    assert waiters is not None and len(waiters) <= 16
    flag.set()
    assert flag._waiters is None
