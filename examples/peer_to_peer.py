"""Two services that serve each other and call each other, streaming both ways.

The *exchange* streams prices to the trading *desk*; the desk decides on orders
as the prices arrive and streams them to the exchange, which fills them. Each
service is a server (``rpcstream.serve``) and a client of the other
(``rpcstream.connect``):

* the desk connects to the exchange and calls its streaming method ``prices``:
  prices flow exchange -> desk on the desk's connection;
* the exchange connects to the desk and calls its streaming method ``orders``:
  orders flow desk -> exchange on the exchange's connection.

Both run in this one process on ports picked by the OS, and stop on their own
once the exchange has sent its last price and filled the last order::

    python examples/peer_to_peer.py [--loop asyncio|trio] [--ticks 20]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import AsyncIterator

import anyio
import msgspec

import rpcstream


class Price(msgspec.Struct):
    symbol: str
    tick: int
    price: float


class Order(msgspec.Struct):
    id: int
    side: str  # "buy" or "sell"
    symbol: str
    quantity: int
    limit: float


class Exchange:
    """Quotes prices to whoever asks, and fills the orders the desk streams to it."""

    def __init__(self, ticks: int, seed: int = 7) -> None:
        self.ticks = ticks
        self.random = random.Random(seed)
        self.filled: list[Order] = []
        self.router = rpcstream.Router()
        self.router.add(self.prices)

    async def prices(self, symbol: str) -> AsyncIterator[Price]:
        price = 100.0
        for tick in range(self.ticks):
            price = round(price * (1 + self.random.uniform(-0.02, 0.02)), 2)
            print(f"exchange: {symbol} quoted at {price:.2f}")
            yield Price(symbol, tick, price)
            await anyio.sleep(0.02)  # the market moves at its own pace
        print("exchange: market closed, no more prices")

    async def trade(self, desk_url: str) -> None:
        async with rpcstream.connect(desk_url) as desk:
            async for order in desk.stream("orders", item_type=Order):
                self.filled.append(order)
                print(
                    f"exchange: filled order #{order.id}: {order.side} {order.quantity} "
                    f"{order.symbol} at {order.limit:.2f}"
                )
        print(f"exchange: filled {len(self.filled)} orders")


class Desk:
    """Watches prices and decides on orders, which the exchange pulls as a stream."""

    def __init__(self) -> None:
        self.sent = 0
        self.router = rpcstream.Router()
        self.router.add(self.orders)
        self._send, self._receive = anyio.create_memory_object_stream[Order](16)

    async def orders(self) -> AsyncIterator[Order]:
        async with self._receive:
            async for order in self._receive:
                yield order

    async def watch(self, exchange_url: str, symbol: str) -> None:
        last: float | None = None
        async with self._send, rpcstream.connect(exchange_url) as exchange:
            async for quote in exchange.stream("prices", symbol, item_type=Price):
                print(f"desk: saw {quote.symbol} at {quote.price:.2f}")
                if last is not None and abs(quote.price - last) / last > 0.01:
                    # A big move: buy after a drop, sell after a rise.
                    side = "buy" if quote.price < last else "sell"
                    self.sent += 1
                    order = Order(self.sent, side, symbol, 10, quote.price)
                    print(f"desk: sending order #{order.id}: {side} 10 {symbol}")
                    await self._send.send(order)
                last = quote.price
        # Leaving `async with self._send` ended the order stream.
        print(f"desk: sent {self.sent} orders")


async def main(ticks: int) -> None:
    exchange, desk = Exchange(ticks), Desk()
    async with (
        rpcstream.serve(exchange.router, "127.0.0.1", 0) as exchange_server,
        rpcstream.serve(desk.router, "127.0.0.1", 0) as desk_server,
    ):
        print(f"exchange serving on {exchange_server.url}, desk on {desk_server.url}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(exchange.trade, desk_server.url)
            tg.start_soon(desk.watch, exchange_server.url, "ACME")
    assert [o.id for o in exchange.filled] == list(range(1, desk.sent + 1))
    print("done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--ticks", type=int, default=20)
    args = parser.parse_args()
    anyio.run(main, args.ticks, backend=args.loop)
