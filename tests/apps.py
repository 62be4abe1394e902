"""Apps that tests serve from a subprocess: ``rpcstream serve tests.apps:runs``."""

from __future__ import annotations

import anyio

import rpcstream

runs = rpcstream.RunServer()


@runs.flow("ticks")
async def ticks(ctx: rpcstream.RunContext, n: int, delay: float = 0.0) -> dict[str, int]:
    """``n`` events, ``delay`` seconds apart: slow enough to kill the server mid-run."""
    for i in range(n):
        await ctx.client.send("tick", i)
        if delay:
            await anyio.sleep(delay)
    return {"ticks": n}


router = rpcstream.Router()


@router.method
async def echo(value: object) -> object:
    """Return what it was given."""
    return value


@router.method
async def divide(a: float, b: float) -> float:
    """Fails with ZeroDivisionError for ``b == 0``: an unexpected handler exception."""
    return a / b
