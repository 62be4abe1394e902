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


def serve_leased(store_url: str, port: int, lease_ttl: float) -> None:
    """Serve ``runs`` on a RedisStore whose leases last ``lease_ttl`` s (``test_multinode``).

    Prints the line ``rpcstream serve`` prints, once it accepts connections.
    """

    async def main() -> None:
        runs.store = rpcstream.RedisStore(store_url, lease_ttl=lease_ttl)
        async with rpcstream.serve(runs, port=port) as server:
            print(f"rpcstream: serving tests.apps:runs on {server.url}", flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend="asyncio")
